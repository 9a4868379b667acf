"""``train.compile`` measured: member-steps per second of the runner's step, eager vs ``torch.compile``.

    python bench/bench_compile.py [--members 1,16] [--modes default] [--device cpu|cuda] [--reps 6]

SBN 200-784 (Table 3 preset), MuProp-C and NVIL, B = 100, Adam, the members of a pack as ``train_pack`` runs
them (``bench_packed.runner_members``); eager and compiled repetitions alternate in pairs, and the ratio
compiled ÷ eager (of the times; < 1 is faster) is the median (range) over the pairs, measured in one run. The
compile time of the first steps is printed apart (it is paid once per process and estimator class; a pack's
members share the graphs). On CUDA try ``--modes default,reduce-overhead`` (CUDA graphs).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_packed import paired, runner_members, runner_step_fn  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", default="1,16")
    ap.add_argument("--estimators", default="muprop_c,nvil")
    ap.add_argument("--modes", default="default", help="torch.compile modes, comma-separated")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--reps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-steps", type=int, default=64, help="member-steps per timed repetition (at least)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    from tests.datafiles import write_binarized_mnist

    tmp = Path(tempfile.mkdtemp(prefix="bench_compile_"))
    write_binarized_mnist(tmp / "data")
    print(
        f"device {device}, {a.threads} thread(s), torch {torch.__version__}; SBN 200-784, B = 100, Adam; "
        f"compiled ÷ eager time: median (range) of {a.reps} alternated pairs of >= {a.min_steps} member-steps"
    )
    head = "| estimator | mode | M | eager member-steps/s | compiled member-steps/s | compiled ÷ eager time | compile (s) |"
    print("\n" + head + "\n" + "|---" * (head.count("|") - 1) + "|")
    for kind in a.estimators.split(","):
        for mode in a.modes.split(","):
            for m in [int(s) for s in a.members.split(",")]:
                rounds = max(1, a.min_steps // m)
                eager = runner_members(kind, m, device, tmp / "data", tmp / "e")
                compiled = runner_members(
                    kind, m, device, tmp / "data", tmp / "c", (f"train.compile={mode}",)
                )
                step_c = runner_step_fn(compiled, True, 1)
                t0 = time.perf_counter()
                step_c()  # the first round compiles (once per process, mode and estimator class)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first = time.perf_counter() - t0
                te, tc, ratios = paired(
                    runner_step_fn(eager, True, rounds), runner_step_fn(compiled, True, rounds), a.reps
                )
                inv = sorted(1 / r for r in ratios)  # paired() gives eager ÷ compiled per pair
                print(
                    f"| {kind} | {mode} | {m} | {m * rounds / te:,.0f} | {m * rounds / tc:,.0f} | "
                    f"{statistics.median(inv):.2f} ({inv[0]:.2f}–{inv[-1]:.2f}) | {first:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
