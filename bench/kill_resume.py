"""Kill runs at random points (SIGKILL, SIGTERM, SIGINT), re-run them, count lost and repeated steps.

    python bench/kill_resume.py --data-root DIR [--trials 6] [--kills 3] [--steps 400] [--packed 3]

Each trial starts a small run (SBN, offline W&B, a checkpoint every 25 steps, train metrics every step), then
``--kills`` times: waits a random time, sends a random one of the three signals, and re-runs the same command;
finally lets it finish. Then it compares the training steps logged in ``metrics.jsonl`` and in the W&B offline
run file with 1..steps: missing steps are lost, steps seen more than once are repeated. Goal: 0 and 0.
``--packed N``: each trial is a packed sweep of N members (``hydra/launcher=packed``, seeds 1..N) killed the
same way; every member is counted.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runners import wandb_files  # noqa: E402
from runners.logger import read_metrics  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=os.environ.get("DATA_ROOT"))
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--kills", type=int, default=3)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--packed", type=int, default=0, help="members of a packed sweep per trial (0: single runs)"
    )
    a = ap.parse_args()
    rng = random.Random(a.seed)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    sigs = [signal.SIGKILL, signal.SIGTERM, signal.SIGINT]
    totals = collections.Counter()
    with tempfile.TemporaryDirectory() as t:
        for trial in range(a.trials):
            run_dir = Path(t) / f"run{trial}"
            cmd = [
                sys.executable, str(ROOT / "run.py"), f"data.root={a.data_root}", f"train.steps={a.steps}",
                "train.log_every=1", "train.checkpoint_every=25", "train.eval_every=100", "train.val_examples=500",
                "eval.samples=10", "eval.test_examples=500", "variance.every=0", "estimator=reinforce_ma",
                "logger.mode=offline", "quiet=true",
            ]  # fmt: skip
            if a.packed:
                seeds = ",".join(str(trial * a.packed + i + 1) for i in range(a.packed))
                cmd[2:2] = ["-m"]  # before the overrides (argparse)
                cmd += ["hydra/launcher=packed", f"seed={seeds}", f"hydra.sweep.dir={run_dir}"]
            else:
                cmd += [f"seed={trial}", f"hydra.run.dir={run_dir}"]
            sent = []
            for _ in range(a.kills):
                proc = subprocess.Popen(
                    cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
                )
                time.sleep(
                    rng.uniform(4.0, 12.0)
                )  # imports take ~3 s: some kills land in start-up, most in training
                sig = rng.choice(sigs)
                if proc.poll() is None:
                    proc.send_signal(sig)
                    sent.append(sig.name)
                proc.wait()
            final = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
            members = (
                sorted(d for d in run_dir.iterdir() if d.is_dir() and d.name[0].isdigit())
                if a.packed
                else [run_dir]
            )
            res = collections.Counter()
            folders = []
            for member in members:
                steps = [r["step"] for r in read_metrics(member) if "train/elbo" in r]
                mine = list((member / "wandb").glob("offline-run-*"))
                folders += mine
                rows = []
                for f in mine:
                    rows += wandb_files.history(wandb_files.read_records(next(f.glob("run-*.wandb"))))
                wsteps = [r["step"] for r in rows if "train/elbo" in r]
                want = set(range(1, a.steps + 1))
                c = collections.Counter(steps)
                wc = collections.Counter(wsteps)
                res.update(
                    {
                        "lost_local": len(want - set(steps)),
                        "repeated_local": sum(v - 1 for v in c.values() if v > 1),
                        "lost_wandb": len(want - set(wsteps)),
                        "repeated_wandb": sum(v - 1 for v in wc.values() if v > 1),
                    }
                )
            res.update({k: 0 for k in ("lost_local", "repeated_local", "lost_wandb", "repeated_wandb")})
            totals.update(res)
            print(
                f"trial {trial}: signals {', '.join(sent)}; final exit {final.returncode}; wandb folders "
                f"{len(folders)}; " + ", ".join(f"{k} {v}" for k, v in res.items()),
                flush=True,
            )
    print(
        f"\nall {a.trials} trials{f' of {a.packed} packed members' if a.packed else ''}, "
        f"{a.trials * a.kills} interruptions: "
        + ", ".join(
            f"{k} {totals[k]}" for k in ("lost_local", "repeated_local", "lost_wandb", "repeated_wandb")
        )
    )


if __name__ == "__main__":
    main()
