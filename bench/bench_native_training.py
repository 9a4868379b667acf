"""Benchmark: the mixture's fused CPU backward (estimators/native.py) in a training step of the mixture VAE.

One member of ``experiment=mixture_vae`` (binarized MNIST, 784-200-200-(K x 50 mixture), B = 100) per
estimator, built as the runner builds it, steps timed with the native backward on and off in alternated pairs
(``bench_packed.paired``); prints the median time per step each way and the median (range) of the per-pair
ratios (native / torch operations). One thread by default.

    python bench/bench_native_training.py --data-root /work/shared/data
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_packed import paired, runner_members, runner_step_fn  # noqa: E402
from estimators import native  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", required=True)
    ap.add_argument("--estimators", default="implicit_mixture,graves_mixture")
    ap.add_argument("--components", default="2,10", help="comma-separated K of the posterior mixture")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed repetition")
    ap.add_argument("--reps", type=int, default=6, help="alternated pairs")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not native.available():
        raise SystemExit("the native backward is unavailable here (no C compiler?)")

    def switched(step, enabled: bool):
        def run() -> None:
            previous = native.set_enabled(enabled)
            try:
                step()
            finally:
                native.set_enabled(previous)

        return run

    print(
        f"# torch {torch.__version__}, threads {torch.get_num_threads()}, {args.steps} steps per repetition"
    )
    print("| estimator | K | torch ops ms/step | native ms/step | native ÷ torch ops, median (range) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.estimators.split(","):
            for k in (int(v) for v in args.components.split(",")):
                (member,) = runner_members(
                    kind, 1, torch.device("cpu"), Path(args.data_root), Path(tmp),
                    extra=(f"model.components={k}",), experiment="mixture_vae",
                )  # fmt: skip
                step = runner_step_fn([member], packed=False, rounds=args.steps)
                t_on, t_off, ratios = paired(switched(step, True), switched(step, False), args.reps)
                ratios.sort()
                mid = statistics.median(ratios)
                print(
                    f"| {kind} | {k} | {t_off / args.steps * 1e3:.1f} | {t_on / args.steps * 1e3:.1f} | "
                    f"{mid:.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
