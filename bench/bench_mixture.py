"""Benchmark: ``DiagNormalMixture.rsample`` + backward against the dense-Jacobian reference and a Normal.

For a batch of B mixtures (K components, D dims) each timed step draws one sample per mixture and
backpropagates a random linear cost to logits, loc and scale:

* ``structured``: ``DiagNormalMixture(...).rsample()`` + ``torch.autograd.grad`` (the O(D K) backward);
* ``dense``: sample + ``implicit_grad_dense_reference`` (autograd Jacobian of T, D x D per sample,
  triangular solve); skipped when its [D, B, K, D] intermediates would be too large;
* ``normal``: ``Normal(loc, scale).rsample()`` + backward of the same [B, D] (the floor: K = 1 and no T).

Ratios dense/structured and structured/normal come from the same run. Times are medians of
``torch.utils.benchmark`` blocked_autorange (it warms up first).

    python bench/bench_mixture.py            # full table (CPU, and CUDA when available)
    python bench/bench_mixture.py --quick    # small subset
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.distributions import Normal
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from estimators.mixture_dist import (  # noqa: E402
    DEFAULT_BLOCK_SIZE,
    DiagNormalMixture,
    implicit_grad_dense_reference,
)

DENSE_MAX_ELEMENTS = 64_000_000  # B * K * D^2 above which the dense reference is skipped (memory)


def make_params(b: int, k: int, d: int, device: str, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, k, generator=gen, dtype=dtype)  # [B, K]
    loc = 2.0 * torch.randn(b, k, d, generator=gen, dtype=dtype)  # [B, K, D]
    scale = 0.5 + torch.rand(b, k, d, generator=gen, dtype=dtype)  # [B, K, D]
    return [p.to(device).requires_grad_() for p in (logits, loc, scale)]


def time_fn(fn, device: str, min_run_time: float) -> float:
    """Median seconds per call."""

    def step():
        fn()
        if device == "cuda":
            torch.cuda.synchronize()

    step()  # warm-up (allocator, lazy init) outside the measurement
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def bench_one(b, k, d, device, dtype, min_run_time, block_size, with_dense=True):
    params = make_params(b, k, d, device, dtype)
    g = torch.randn(b, d, device=device, dtype=dtype)  # [B, D], upstream gradient of a linear cost
    dist = DiagNormalMixture(*params, block_size=block_size)

    def structured():
        x = dist.rsample()  # [B, D]
        torch.autograd.grad((x * g).sum(), params)

    def dense():
        x = dist.sample()  # [B, D]
        implicit_grad_dense_reference(*params, x, g)

    loc2 = params[1][:, 0].detach().clone().requires_grad_()  # [B, D]
    scale2 = params[2][:, 0].detach().clone().requires_grad_()  # [B, D]

    def normal():
        x = Normal(loc2, scale2).rsample()  # [B, D]
        torch.autograd.grad((x * g).sum(), (loc2, scale2))

    t_struct = time_fn(structured, device, min_run_time)
    t_normal = time_fn(normal, device, min_run_time)
    t_dense = float("nan")
    if with_dense and b * k * d * d <= DENSE_MAX_ELEMENTS:
        t_dense = time_fn(dense, device, min_run_time)
    return t_struct, t_dense, t_normal


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="D in {2, 32}, K in {1, 10}")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda", "all"], default="all")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--no-dense", action="store_true")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    dims = [2, 32] if args.quick else [2, 8, 32, 128, 512]
    comps = [1, 10] if args.quick else [1, 10, 100]
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [dev for dev in devices if dev == "cpu" or torch.cuda.is_available()]
    dtype = getattr(torch, args.dtype)

    print(
        f"# torch {torch.__version__}, {args.dtype}, B = {args.batch}, block_size = {args.block_size}, "
        f"CPU threads = {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} "
        f"on {os.cpu_count()} CPUs"
        + (f", GPU = {torch.cuda.get_device_name()}" if "cuda" in devices else ", no CUDA device")
    )
    print(
        "# times: median ms per rsample + backward; dense skipped (-) where B*K*D^2 > "
        f"{DENSE_MAX_ELEMENTS:.1e}"
    )
    header = (
        f"{'device':>6} {'D':>5} {'K':>4} {'structured':>11} {'dense':>10} {'normal':>9} "
        f"{'dense/struct':>13} {'struct/normal':>14}"
    )
    print(header)
    print("-" * len(header))
    for device in devices:
        for d in dims:
            for k in comps:
                t_s, t_d, t_n = bench_one(
                    args.batch, k, d, device, dtype, args.min_run_time, args.block_size, not args.no_dense
                )
                dense_txt = "-" if t_d != t_d else f"{t_d * 1e3:10.3f}"
                ratio_txt = "-" if t_d != t_d else f"{t_d / t_s:13.2f}"
                print(
                    f"{device:>6} {d:>5} {k:>4} {t_s * 1e3:11.3f} {dense_txt:>10} {t_n * 1e3:9.3f} "
                    f"{ratio_txt:>13} {t_s / t_n:14.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
