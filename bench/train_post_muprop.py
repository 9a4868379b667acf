"""Short training of REBAR, RELAX, VIMCO and MuProp rollout next to NVIL and MuProp-C on SBN 200-784 and 200-200-784.

Each run goes through ``run.py`` (the project's runner, one subprocess each, run one after another): real
binarized MNIST, linear SBN, Adam (``--lr``), batch 100, ``--steps`` steps, one seed, one intra-op thread;
afterwards the test ELBO (one sample) and the importance-weighted bound with ``--bound-samples`` samples on
``--eval-examples`` evenly spaced test images (the runner's subset; the test file is ordered). The
table lists the last logged training ELBO (the runner's ``train/elbo``; VIMCO's is its single-sample ELBO, its
K-sample training bound is ``train/vimco_bound``), the test metrics and the training time. The anchors of the
issue (RELAX paper Table 1, highest training ELBO after 2e6 steps of batch 24) are far longer runs: these short
runs only order the estimators early in training.

    .venv/bin/python bench/train_post_muprop.py [--steps 3000] [--only rebar relax] [--models 200 200-200]

Run directories under ``bench/results/post_muprop_runs/``; the table is printed and written to
``bench/results/post_muprop_train.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = ["nvil", "muprop_c", "rebar", "relax", "vimco", "muprop_rollout"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--bound-samples", type=int, default=100)
    ap.add_argument(
        "--eval-examples", type=int, default=2000, help="evenly spaced test (and validation) examples"
    )
    ap.add_argument("--only", nargs="*", default=DEFAULT)
    ap.add_argument("--models", nargs="*", default=["200", "200-200"], help="layer sizes joined by '-'")
    ap.add_argument(
        "--data-root", default=os.environ.get("DATA_ROOT", str(Path.home() / ".cache/gradest/data"))
    )
    args = ap.parse_args()
    out_root = ROOT / "bench" / "results" / "post_muprop_runs"
    rows = []
    for model in args.models:
        layers = model.split("-")
        for est in args.only:
            run_dir = out_root / f"sbn{model}_{est}_s{args.seed}_{args.steps}"
            cmd = [
                sys.executable,
                str(ROOT / "run.py"),
                "model=sbn",
                f"model.layers=[{','.join(layers)}]",
                f"estimator={est}",
                f"seed={args.seed}",
                f"optim.lr={args.lr}",
                f"train.steps={args.steps}",
                "train.batch_size=100",
                f"train.eval_every={args.steps}",
                "train.log_every=100",
                "variance.every=0",
                f"train.val_examples={args.eval_examples}",
                f"eval.samples={args.bound_samples}",
                f"eval.test_examples={args.eval_examples}",
                "logger.mode=disabled",
                "quiet=true",
                "device=cpu",
                f"data.root={args.data_root}",
                f"hydra.run.dir={run_dir}",
            ]
            t0 = time.perf_counter()
            done = run_dir / "summary.json"
            if not done.exists():
                # one intra-op thread: tiny matrices, and the cores are shared (more threads only thrash)
                env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
                proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env)
                if proc.returncode != 0:
                    print(f"{model} {est}: failed\n{proc.stderr[-2000:]}", flush=True)
                    continue
            s = json.loads(done.read_text())
            rows.append((model, est, s))
            print(
                f"{model} {est}: train {s['train/elbo']:.2f} test {s['test/elbo']:.2f} "
                f"bound {s[f'test/bound_{args.bound_samples}']:.2f} ({time.perf_counter() - t0:.0f} s)",
                flush=True,
            )
    m = args.bound_samples
    lines = [
        f"SBN (linear) on binarized MNIST, Adam lr {args.lr}, batch 100, {args.steps} steps, seed {args.seed}; "
        f"{args.eval_examples} evenly spaced test images (ELBO with 1 sample, IW bound with m = {m}); "
        "higher is better:",
        "",
        f"| model | estimator | train ELBO (last 100 steps) | test ELBO | test bound m={m} | train s |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for model, est, s in rows:
        lines.append(
            f"| {model}-784 | {est} | {s['train/elbo']:.2f} | {s['test/elbo']:.2f} | "
            f"{s[f'test/bound_{m}']:.2f} | {s['train_seconds']:.0f} |"
        )
    table = "\n".join(lines)
    print(table)
    path = ROOT / "bench" / "results" / "post_muprop_train.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"`{' '.join(sys.argv)}`\n\n{table}\n")


if __name__ == "__main__":
    main()
