"""Benchmark: ``DiagNormalMixture.rsample`` + backward, against an earlier revision, the floor and the dense reference.

For a batch of B mixtures (K components, D dims) each timed step draws one sample per mixture and
backpropagates the cost sum(x^2) to logits, loc and scale:

* ``ours``: ``DiagNormalMixture(...).rsample()`` + ``torch.autograd.grad`` (the O(D K) backward; on CPU the
  fused C kernel of ``estimators/native.py`` where it is available);
* ``torch``: ``ours`` with the native kernel switched off (the same backward in torch operations);
* ``base``: the same with ``estimators/mixture_dist.py`` as of git revision ``--baseline`` (default: the
  revision before the float32 / API / speed work of issue 10), loaded from ``git show`` into a scratch
  module, so before and after are measured in ONE run on the same machine state;
* ``comp``: ``ours`` with ``compile_backward=True`` (``torch.compile`` of the backward), only for the
  configurations in ``--compiled`` (each new shape compiles for tens of seconds; compile excluded from the
  timing and printed separately);
* ``normal``: ``Normal(loc, scale).rsample()`` + backward of the same [B, D] (the floor: K = 1, no T);
* ``dense`` (``--dense``): sample + ``implicit_grad_dense_reference`` (autograd Jacobian of T, D x D per
  sample, triangular solve); skipped when its intermediates would be too large.

Times are medians of ``torch.utils.benchmark`` blocked_autorange (after one warm-up call). One CPU thread
by default (``--threads``): the machine this was written on has 2 cores shared by several jobs.

    python bench/bench_mixture.py                                  # K x D grid of issue 10, eager
    python bench/bench_mixture.py --only 10x16,2x128 --compiled 10x16,2x128
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time

import torch
from torch.distributions import Normal
from torch.utils import benchmark

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from estimators import native  # noqa: E402
from estimators.mixture_dist import (  # noqa: E402
    DEFAULT_BLOCK_SIZE,
    DiagNormalMixture,
    implicit_grad_dense_reference,
)

DENSE_MAX_ELEMENTS = 64_000_000  # B * K * D^2 above which the dense reference is skipped (memory)
BASELINE_REV = "99a8426"  # main before issue 10's changes to estimators/mixture_dist.py


def load_revision(rev: str):
    """``estimators/mixture_dist.py`` at git revision ``rev`` as a module (None if git cannot show it)."""
    try:
        source = subprocess.run(
            ["git", "-C", ROOT, "show", f"{rev}:estimators/mixture_dist.py"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    path = os.path.join(tempfile.mkdtemp(), f"mixture_dist_{rev}.py")
    with open(path, "w") as f:
        f.write(source)
    spec = importlib.util.spec_from_file_location(f"mixture_dist_{rev}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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

    step()  # warm-up (allocator, lazy init, compile) outside the measurement
    timer = benchmark.Timer(stmt="step()", globals={"step": step})
    return timer.blocked_autorange(min_run_time=min_run_time).median


def rsample_step(cls, params, **kwargs):
    dist = cls(*params, **kwargs)

    def step():
        x = dist.rsample()  # [B, D]
        torch.autograd.grad(x.square().sum(), params)

    return step


def parse_configs(text: str) -> list[tuple[int, int]]:
    """'10x16,2x128' -> [(10, 16), (2, 128)] as (K, D)."""
    return [tuple(int(v) for v in item.split("x")) for item in text.split(",") if item]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK_SIZE)
    parser.add_argument("--min-run-time", type=float, default=0.2, help="seconds per measurement")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--baseline", default=BASELINE_REV, help="git revision to compare with ('' for none)")
    parser.add_argument("--only", default="", help="K x D configurations, e.g. 10x16,2x128 (default: grid)")
    parser.add_argument("--compiled", default="", help="K x D configurations that also time compile_backward")
    parser.add_argument("--dense", action="store_true", help="also time the dense-Jacobian reference")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")

    grid = [(k, d) for d in (1, 2, 16, 128, 512) for k in (1, 2, 10, 100)]
    configs = parse_configs(args.only) if args.only else grid
    compiled = set(parse_configs(args.compiled))
    base = load_revision(args.baseline) if args.baseline else None
    dtype = getattr(torch, args.dtype)
    print(
        f"# torch {torch.__version__}, {args.dtype}, {args.device}, B = {args.batch}, block_size = "
        f"{args.block_size}, threads = {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} CPUs, baseline = {args.baseline if base else 'none'}"
    )
    print("# median ms per rsample + backward of sum(x^2); ratios from this one run")
    header = (
        f"{'K':>4} {'D':>4} {'base':>9} {'torch':>9} {'ours':>9} {'comp':>9} {'normal':>8} {'dense':>9} "
        f"{'ours/base':>9} {'ours/torch':>10} {'comp/base':>9} {'ours/normal':>11} {'comp/normal':>11} "
        f"{'compile s':>9}"
    )
    print(header)
    print("-" * len(header))
    nan = float("nan")
    for k, d in configs:
        params = make_params(args.batch, k, d, args.device, dtype)
        t_ours = time_fn(
            rsample_step(DiagNormalMixture, params, block_size=args.block_size),
            args.device,
            args.min_run_time,
        )
        t_torch = nan
        if native.available() and args.device == "cpu":
            previous = native.set_enabled(False)
            try:
                t_torch = time_fn(
                    rsample_step(DiagNormalMixture, params, block_size=args.block_size),
                    args.device,
                    args.min_run_time,
                )
            finally:
                native.set_enabled(previous)
        t_base = nan
        if base is not None:
            t_base = time_fn(
                rsample_step(base.DiagNormalMixture, params, block_size=args.block_size),
                args.device,
                args.min_run_time,
            )
        t_comp = compile_s = nan
        if (k, d) in compiled:
            step = rsample_step(DiagNormalMixture, params, block_size=args.block_size, compile_backward=True)
            start = time.perf_counter()
            step()  # compiles
            compile_s = time.perf_counter() - start
            t_comp = time_fn(step, args.device, args.min_run_time)
        loc = params[1][:, 0].detach().clone().requires_grad_()  # [B, D]
        scale = params[2][:, 0].detach().clone().requires_grad_()  # [B, D]

        def normal(loc=loc, scale=scale):  # bound now: timed in this iteration
            x = Normal(loc, scale).rsample()  # [B, D]
            torch.autograd.grad(x.square().sum(), (loc, scale))

        t_normal = time_fn(normal, args.device, args.min_run_time)
        t_dense = nan
        if args.dense and args.batch * k * d * d <= DENSE_MAX_ELEMENTS:
            x = DiagNormalMixture(*params).sample()  # [B, D]
            t_dense = time_fn(
                lambda params=params, x=x: implicit_grad_dense_reference(*params, x, 2 * x),
                args.device,
                args.min_run_time,
            )

        def ms(t: float, width: int) -> str:
            return f"{'-':>{width}}" if t != t else f"{t * 1e3:{width}.2f}"

        def ratio(a: float, b: float, width: int) -> str:
            return f"{'-':>{width}}" if a != a or b != b else f"{a / b:{width}.2f}"

        print(
            f"{k:>4} {d:>4} {ms(t_base, 9)} {ms(t_torch, 9)} {ms(t_ours, 9)} {ms(t_comp, 9)} {ms(t_normal, 8)} "
            f"{ms(t_dense, 9)} {ratio(t_ours, t_base, 9)} {ratio(t_ours, t_torch, 10)} {ratio(t_comp, t_base, 9)} "
            f"{ratio(t_ours, t_normal, 11)} "
            f"{ratio(t_comp, t_normal, 11)} {'-' if compile_s != compile_s else f'{compile_s:9.1f}':>9}",
            flush=True,
        )


if __name__ == "__main__":
    main()
