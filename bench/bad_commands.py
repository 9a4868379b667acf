"""Run a list of bad commands as a user would type them; count those answered with one clear line.

    python bench/bad_commands.py [--data-root DIR] [--jobs 2]

"One clear line": exit status != 0, stderr holds exactly one line starting with ``error: `` (Hydra's own
syntax errors are allowed their two-line form), no ``Traceback``; and no run folder left behind for a
refused single run. Prints a table (command, exit status, verdict, the line) and the count.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def commands(data: str, tmp: Path) -> list[list[str]]:
    afile = tmp / "a_file"
    afile.write_text("x")
    tiny = [f"data.root={data}", "train.steps=3", "eval.samples=2", "variance.every=0", "logger=disabled"]
    bad_ckpt = tmp / "bad_ckpt"
    bad_ckpt.mkdir()
    (bad_ckpt / "checkpoint.pt").write_bytes(b"\x00" * 64)
    return [
        ["estimator=foo"],
        ["model=nope"],
        ["experiment=nope"],
        ["data=cifar"],
        ["optim=rmsprop"],
        ["logger=tensorboard"],
        ["runner=fast"],
        ["-m", "estimator=reinforce,foo"],
        ["-m", "model=sbn,nope"],
        ["optim.lr=-0.1"],
        ["optim.lr=0"],
        ["optim.lr=fast"],
        ["optim.momentum=1.5", "optim=sgd"],
        ["optim.betas=[0.9]"],
        ["optim.betas=0.9"],
        ["optim.betas=[0.9,1.2]"],
        ["optim.weight_decay=-1"],
        ["optim.estimator_lr=-1"],
        ["eval.samples=0"],
        ["eval.batch_size=0"],
        ["eval.chunk=0"],
        ["eval.test_examples=0"],
        ["variance.samples=1"],
        ["variance.every=-1"],
        ["variance.batch_size=0"],
        ["variance.basket=reinforce"],
        ["variance.basket=[nope]"],
        ["variance.basket=[reparam]"],
        ["train.batch_size=0"],
        ["train.steps=-5"],
        ["train.steps=many"],
        ["train.eval_every=0"],
        ["train.log_every=0"],
        ["train.checkpoint_every=0"],
        ["train.val_examples=0"],
        ["train.divergence_factor=-1"],
        ["seed=abc"],
        ["seed=1.5"],
        ["estimator=reinforce_ma", "estimator.decay=1.5"],
        ["estimator=reinforce_loo", "estimator.n_samples=1"],
        ["estimator.n_samples=0"],
        ["estimator=gumbel", "estimator.temperature=0"],
        ["estimator=reparam"],
        ["model=mixture_vae", "estimator=muprop"],
        ["model=mixture_vae", "model.components=0"],
        ["model=mixture_vae", "model.latent_dim=0"],
        ["model.layers=200"],
        ["model.layers=[]"],
        ["model.layers=[0]"],
        ["model.layers=[200,-1]"],
        ["model.nonlinear=maybe"],
        ["model.hidden=-3", "model.nonlinear=true"],
        ["data=synthetic"],
        ["model=mixture_svi", "data=binarized_mnist"],
        ["data.root="],
        ["data.root=/nonexistent/gradest", "data.download=false"],
        ["device=gpu7"],
        ["device=mps"],
        ["device=cuda"],
        ["device=cuda:3"],
        ["logger.mode=sometimes"],
        ["logger.mode=online"],  # no W&B key on this machine
        ["runner=trajectory", "variance.bias.reference=st"],
        ["runner=trajectory", "variance.bias.samples=1"],
        [f"hydra.run.dir={afile}"],
        [f"hydra.run.dir={afile}/run"],
        ["-m", "hydra/launcher=slurm", f"hydra.sweep.dir={tmp / 'slurm'}"],
        [f"hydra.run.dir={bad_ckpt}", *tiny],
        ["estimator=muprop_c", "estimator.decay=-0.5"],
        ["train.batch_size=1e9x"],
    ]


def run(args: list[str], tmp: Path, i: int) -> tuple[list[str], int, str, str]:
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        PYTHONPYCACHEPREFIX=str(Path(tempfile.gettempdir()) / "gradest-pycache"),
    )
    env.pop("WANDB_API_KEY", None)
    env["HOME"] = str(tmp / "home")  # no ~/.netrc: logger.mode=online has no key
    run_dir = tmp / f"run{i}"
    where = (
        []
        if any(a.startswith("hydra.") for a in args)
        else ([f"hydra.sweep.dir={tmp / f'sweep{i}'}"] if "-m" in args else [f"hydra.run.dir={run_dir}"])
    )
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), *args, *where],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    err = proc.stderr.strip()
    lines = err.splitlines()
    one = (
        proc.returncode != 0
        and "Traceback" not in err
        and len(lines) >= 1
        and lines[0].startswith("error: ")
        and (len(lines) == 1 or lines[0].startswith("error: unknown"))  # sweeps: one line too
    )
    leftover = "-m" not in args and run_dir.exists()
    verdict = "one line" if one and not leftover else ("folder left" if one else "NOT CLEAN")
    first = lines[0] if lines else (proc.stdout.strip().splitlines() or [""])[-1]
    return args, proc.returncode, verdict, first


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", default=os.environ.get("DATA_ROOT", "/nonexistent"))
    ap.add_argument("--jobs", type=int, default=2)
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        (tmp / "home").mkdir()
        cmds = commands(a.data_root, tmp)
        with cf.ThreadPoolExecutor(a.jobs) as pool:
            results = list(pool.map(lambda ic: run(ic[1], tmp, ic[0]), enumerate(cmds)))
    clean = 0
    print("| command | exit | verdict | first line |\n|---|---|---|---|")
    for args, rc, verdict, line in results:
        clean += verdict == "one line"
        print(f"| `{' '.join(args)}` | {rc} | {verdict} | {line[:140].replace('|', '/')} |")
    print(f"\n{clean} of {len(results)} bad commands answered with one clear line")


if __name__ == "__main__":
    main()
