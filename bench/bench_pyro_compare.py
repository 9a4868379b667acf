"""Compare ``DiagNormalMixture.rsample`` + backward with Pyro's ``MixtureOfDiagNormals`` on the same machine.

Pyro is NOT a project dependency: run this from a separate throwaway environment that has torch and pyro-ppl,
with the project on the path, e.g.

    python3 -m venv /tmp/pyrovenv && /tmp/pyrovenv/bin/pip install torch pyro-ppl
    /tmp/pyrovenv/bin/python bench/bench_pyro_compare.py

Both draw B samples of one mixture (K components, D dims; Pyro's class has no batch shape) and backpropagate a
random linear cost to logits, loc and scale. Pyro's gradient is Jankowiak & Karaletsos (2018)'s pathwise
velocity field, ours is Graves' implicit one: different unbiased estimators, same cost to compute.
"""

from __future__ import annotations

import os
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimators.mixture_dist import DiagNormalMixture  # noqa: E402


def main() -> None:
    from pyro.distributions import MixtureOfDiagNormals

    torch.manual_seed(0)
    b = 256
    print(f"# torch {torch.__version__}, threads {torch.get_num_threads()}, B = {b}, float32, CPU")
    print(f"{'D':>5}{'K':>5}{'ours ms':>10}{'pyro ms':>10}{'pyro/ours':>11}")
    for d in (2, 8, 32, 128):
        for k in (2, 10, 100):
            logits = torch.randn(k, requires_grad=True)
            loc = torch.randn(k, d, requires_grad=True)
            scale = (0.5 + torch.rand(k, d)).requires_grad_(True)
            w = torch.randn(b, d)

            def ours(logits=logits, loc=loc, scale=scale, w=w):  # bound now: timed in this iteration
                x = DiagNormalMixture(logits, loc, scale).rsample((b,))  # [B, D]
                torch.autograd.grad((x * w).sum(), [logits, loc, scale])

            def pyro(logits=logits, loc=loc, scale=scale, w=w):
                x = MixtureOfDiagNormals(loc, scale, logits).rsample((b,))  # [B, D]
                torch.autograd.grad((x * w).sum(), [logits, loc, scale])

            t = [
                benchmark.Timer("f()", globals={"f": f}).blocked_autorange(min_run_time=0.3).median
                for f in (ours, pyro)
            ]
            print(f"{d:>5}{k:>5}{1e3 * t[0]:>10.3f}{1e3 * t[1]:>10.3f}{t[1] / t[0]:>11.2f}")


if __name__ == "__main__":
    main()
