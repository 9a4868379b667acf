"""float32 accuracy of the implicit mixture gradient, before and after issue 10, on the issue's regimes.

For each regime of ``tests/test_mixture_float32.py`` (scales mixed 1e-6..1e6, a dominant component, two
components overlapping at scale 1e6 with O(1) locations, the same with unequal scales) and its seeded
fuzz of extreme parameters, the float32 gradient of N samples is compared with the float64 gradient of
the same inputs, for ``estimators/mixture_dist.py`` now and at git revision ``--baseline`` (loaded from
``git show``), in one run. Columns, per parameter tensor:

* ``norm``: the largest per-sample normwise relative error |g32 - g64| / |g64|;
* ``elem``: the largest elementwise relative error over elements that are well-conditioned in the sense of
  the test (kappa <= 100: the float64 gradient moves by at most 100 eps32 relative when every input is
  perturbed by one float32 rounding) and above the underflow floor;
* ``sum``: for logits, the largest |sum_k g_k| / sum_k |g_k| (zero in exact arithmetic).

    python bench/mixture_float32_accuracy.py
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))
sys.path.insert(0, os.path.join(ROOT, "tests"))

from bench_mixture import BASELINE_REV, load_revision  # noqa: E402
from test_mixture_float32 import (  # noqa: E402
    EPS32,
    FLOOR,
    KAPPA_MAX,
    REGIMES,
    TINY32,
    fuzz_params,
    perturbation_spread,
    regime,
)

import estimators.mixture_dist as current  # noqa: E402


def errors(module, params, x, g, spread, want):
    got = module.implicit_grad_structured(*params, x, g)[:3]
    out = []
    for a, w, s in zip(got, want, spread):
        a = a.double()
        rows = w.reshape(w.shape[0], -1)  # [N, P]
        diff = (a - w).reshape(w.shape[0], -1)  # [N, P]
        norm = (diff.norm(dim=-1) / rows.norm(dim=-1).clamp_min(1e-300)).max().item()
        row_max = rows.abs().amax(-1, keepdim=True)  # [N, 1]
        good = (s.reshape_as(rows) <= KAPPA_MAX * EPS32 * rows.abs()) & (rows.abs() > FLOOR * row_max)
        good &= rows.abs() > TINY32
        elem = (diff.abs() / rows.abs())[good].max().item() if good.any() else float("nan")
        out.append((norm, elem, torch.isfinite(a).all().item()))
    logit_sum = (got[0].sum(-1).abs() / got[0].abs().sum(-1).clamp_min(1e-30)).max().item()
    return out, logit_sum


def main() -> None:
    torch.set_num_threads(1)
    base = load_revision(BASELINE_REV)
    cases = [(name, regime(name)) for name in REGIMES]
    for k, d in [(3, 2), (5, 4), (10, 16)]:
        gen = torch.Generator().manual_seed(100 * k + d)
        params = fuzz_params(gen, k, d, 1000)
        torch.manual_seed(k + d)
        x = current.DiagNormalMixture(*params).sample()  # [N, D]
        cases.append((f"fuzz K={k} D={d}", (params, x, torch.randn(x.shape, generator=gen))))
    print(f"# float32 vs float64 on the same inputs; before = {BASELINE_REV}, after = working tree")
    print(
        f"{'case':>22} {'version':>7} {'logits norm/elem':>20} {'loc norm/elem':>20} {'scale norm/elem':>20} {'sum':>8}"
    )
    for name, (params, x, g) in cases:
        params64 = [p.double() for p in params]
        want = current.implicit_grad_structured(*params64, x.double(), g.double())[:3]
        spread = perturbation_spread(params64, x.double(), g.double(), want)
        for label, module in (("before", base), ("after", current)):
            if module is None:
                continue
            errs, logit_sum = errors(module, params, x, g, spread, want)
            cols = " ".join(f"{(f'{n:.1e}/{e:.1e}' if ok else 'non-finite'):>20}" for n, e, ok in errs)
            print(f"{name:>22} {label:>7} {cols} {logit_sum:8.1e}", flush=True)


if __name__ == "__main__":
    main()
