"""Per-sample gradient variance and tails of ``DiagNormalMixture.rsample`` for both ``component_grad`` modes.

For a fixed random mixture (K components, D dims; logits ~ N(0, 1), loc ~ N(0, 2^2), scale ~ U(0.5, 1.5))
and the smooth cost c(x) = sum_d (x_d - a_d)^2 / D with a fixed target a ~ N(0, 1), N independent
one-sample gradients are drawn (the parameters are expanded to a batch of N, so each batch row's gradient
is one sample's). Per parameter element i it reports, over the N samples,

* var:    the variance of g_i, summed over the elements of the tensor (total variance; both modes are
          unbiased, so this is the part that differs);
* kurt:   the excess kurtosis E[(g - mean)^4] / var^2 - 3, median and max over elements (0 for a Gaussian;
          heavy tails make it large, and make sample variances unreliable);
* top:    the share of sum_n (g_n - mean)^2 contributed by the largest 0.1% of samples, median over
          elements (0.001 for light tails, near 1 when a few samples carry all of the variance);
* |z|:    the largest |mean_implicit - mean_graves| / standard error over elements (both unbiased: small).

The logits gradient goes through T in both modes (the same numbers), so it is reported once.

    python bench/mixture_variance.py                 # D in {1, 2, 8, 32}, K in {2, 10}, N = 20000
    python bench/mixture_variance.py --growth        # total variance vs N (K = 2, D in {8, 32})

A sample variance that keeps growing with N (``--growth``) while the kurtosis sits near N (one sample
carries all of it) is the signature of an infinite variance.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimators.mixture_dist import DiagNormalMixture  # noqa: E402


def per_sample_gradients(k: int, d: int, n: int, component_grad: str, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k, generator=gen, dtype=torch.float64)  # [K]
    loc = 2.0 * torch.randn(k, d, generator=gen, dtype=torch.float64)  # [K, D]
    scale = 0.5 + torch.rand(k, d, generator=gen, dtype=torch.float64)  # [K, D]
    target = torch.randn(d, generator=gen, dtype=torch.float64)  # [D]
    params = [p.expand(n, *p.shape).clone().requires_grad_() for p in (logits, loc, scale)]  # [N, ...]
    torch.manual_seed(seed + 1)  # the same draws for both modes
    x = DiagNormalMixture(*params, component_grad=component_grad).rsample()  # [N, D]
    cost = (x - target).square().sum(-1) / d  # [N]
    return list(torch.autograd.grad(cost.sum(), params))  # [N, K], [N, K, D] x2


def tail_stats(g: torch.Tensor) -> tuple[float, float, float, float]:
    """(total variance, median and max excess kurtosis, median top-0.1% share) of per-sample g [N, ...]."""
    g = g.reshape(g.shape[0], -1)  # [N, P]
    centred = g - g.mean(0)  # [N, P]
    var = centred.square().mean(0)  # [P]
    keep = var > 0  # elements that vary (a one-component coordinate can be constant)
    kurt = centred.pow(4).mean(0)[keep] / var[keep].square() - 3.0  # [P']
    sq = centred.square()[:, keep]  # [N, P']
    top_n = max(1, g.shape[0] // 1000)
    top = sq.topk(top_n, dim=0).values.sum(0) / sq.sum(0)  # [P']
    return var.sum().item(), kurt.median().item(), kurt.max().item(), top.median().item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--growth", action="store_true", help="total variance against N instead")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.growth:
        print(f"# total variance of the per-sample gradient against N, K = 2, seed {args.seed}")
        print(
            f"{'D':>3} {'N':>6} {'logits (both)':>14} {'loc implicit':>13} {'loc graves':>11} {'scale impl':>11} {'scale graves':>13}"
        )
        for d in (8, 32):
            for n in (5000, 20000, 80000):
                imp = per_sample_gradients(2, d, n, "implicit", args.seed)
                gra = per_sample_gradients(2, d, n, "graves", args.seed)
                v = [tail_stats(t)[0] for t in (imp[0], imp[1], gra[1], imp[2], gra[2])]
                print(
                    f"{d:>3} {n:>6} {v[0]:14.3e} {v[1]:13.3e} {v[2]:11.3e} {v[3]:11.3e} {v[4]:13.3e}",
                    flush=True,
                )
        return
    print(f"# N = {args.samples} one-sample gradients, float64, seed {args.seed}, cost sum((x - a)^2) / D")
    header = (
        f"{'K':>3} {'D':>3} {'param':>6} {'mode':>8} {'var':>10} {'kurt med':>9} {'kurt max':>10} "
        f"{'top med':>8} {'|z| max':>8}"
    )
    print(header)
    print("-" * len(header))
    for k in (2, 10):
        for d in (1, 2, 8, 32):
            grads = {
                mode: per_sample_gradients(k, d, args.samples, mode, args.seed)
                for mode in ("implicit", "graves")
            }
            for i, name in enumerate(("logits", "loc", "scale")):
                a, b = grads["implicit"][i], grads["graves"][i]  # [N, ...]
                se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()  # [...]
                z = ((a.mean(0) - b.mean(0)).abs() / se)[se > 0]
                z_txt = f"{z.max().item():8.2f}" if z.numel() else f"{'-':>8}"
                for mode in ("implicit", "graves") if name != "logits" else ("both",):
                    g = grads["implicit" if mode == "both" else mode][i]
                    var, kmed, kmax, top = tail_stats(g)
                    print(
                        f"{k:>3} {d:>3} {name:>6} {mode:>8} {var:10.3e} {kmed:9.1f} {kmax:10.1f} {top:8.3f} "
                        f"{z_txt if mode != 'graves' else '':>8}",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
