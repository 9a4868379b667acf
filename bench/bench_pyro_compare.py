"""Compare ``DiagNormalMixture.rsample`` + backward with Pyro's ``MixtureOfDiagNormals`` on the same machine.

Pyro is NOT a project dependency: run this from a separate throwaway environment that has torch and pyro-ppl,
with the project on the path, e.g.

    python3 -m venv /tmp/pyrovenv && /tmp/pyrovenv/bin/pip install torch pyro-ppl
    /tmp/pyrovenv/bin/python bench/bench_pyro_compare.py            # issue-10 grid, 1 thread

Both draw B = 256 samples of one mixture (K components, D dims; Pyro's class has no batch shape) and
backpropagate sum(x^2) to logits, loc and scale, float32; ``normal`` is a plain ``Normal(loc, scale)``
rsample + backward of the same [B, D] (the floor). Pyro's gradient is Jankowiak & Karaletsos (2018)'s
pathwise velocity field, ours Graves' implicit one: different unbiased estimators of the same gradient.
Pyro's class needs K >= 2 (K = 1 is reported for ours and the floor only). Median ms of
``torch.utils.benchmark`` blocked_autorange, all columns from one run.
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.mixture_peers import Case, median_ms
from bench.mixture_peers import parser as peer_parser  # noqa: E402


def main() -> None:
    from pyro.distributions import MixtureOfDiagNormals

    parser = peer_parser(__doc__)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    grid = [(k, d) for d in (1, 2, 16, 128, 512) for k in (1, 2, 10, 100)]
    if args.only:
        grid = [tuple(int(v) for v in item.split("x")) for item in args.only.split(",")]
    torch.manual_seed(0)
    b = 256
    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, B = {b}, float32, CPU, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; median ms of rsample + backward of sum(x^2)"
    )
    print(f"{'K':>4}{'D':>5}{'ours':>10}{'pyro':>10}{'normal':>9}{'ours/pyro':>11}{'ours/normal':>13}")
    for k, d in grid:
        case = Case(k, d, b)
        logits, loc, scale = case.params

        def pyro(logits=logits, loc=loc, scale=scale):
            x = MixtureOfDiagNormals(loc, scale, logits).rsample((b,))  # [B, D]
            torch.autograd.grad(x.square().sum(), [logits, loc, scale])

        t_ours = median_ms(case.ours, args.min_run_time)
        t_pyro = median_ms(pyro, args.min_run_time) if k >= 2 else float("nan")
        t_normal = median_ms(case.floor, args.min_run_time)
        pyro_txt = f"{t_pyro:>10.3f}" if t_pyro == t_pyro else f"{'-':>10}"
        ratio_txt = f"{t_ours / t_pyro:>11.2f}" if t_pyro == t_pyro else f"{'-':>11}"
        print(
            f"{k:>4}{d:>5}{t_ours:>10.3f}{pyro_txt}{t_normal:>9.3f}{ratio_txt}{t_ours / t_normal:>13.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
