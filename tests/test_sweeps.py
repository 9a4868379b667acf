"""Sweeps that survive: ``python run.py -m ...`` in subprocesses, as a user runs them, on tiny synthetic data.

* the joblib launcher (conf/hydra/launcher/parallel.yaml) runs two jobs at once in worker processes, with W&B
  offline inside the workers (read back from the offline run files), while a third job fails: its traceback
  lands in its own ``error.txt``, the others finish, and the sweep exits 1 listing the failed job;
* submitit's local executor (conf/hydra/launcher/local.yaml) runs one job to the end;
* a sweep killed with SIGKILL in the middle of training, after a checkpoint, and re-run with the same command,
  ends with the metrics.jsonl of an uninterrupted run: same records, same steps, same values, the same W&B run
  id; a third run of the same command skips the finished job;
* the SLURM config composes and its launcher can be built (no cluster here: nothing is submitted).

Subprocess runs cost mostly import time (torch); on a busy machine these tests take minutes, hence `slow`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from runners import wandb_files
from tests.datafiles import write_binarized_mnist
from tests.test_bad_input import run_env
from tests.test_bad_input import run_py as _run_py

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    return write_binarized_mnist(tmp_path_factory.mktemp("data"))


def tiny(root: Path, steps: int = 12, **extra) -> list[str]:
    """A small run: 8 latent units, 10 examples a batch, a few steps, cheap evaluation."""
    args = {
        "data.root": root,
        "data.verify": "false",
        "data.download": "false",
        "logger": "disabled",
        "quiet": "true",
        "model": "sbn",
        "model.layers": "[8]",
        "train.steps": steps,
        "train.batch_size": 10,
        "train.eval_every": 6,
        "train.log_every": 2,
        "eval.samples": 3,
        "eval.chunk": 3,
        "variance.every": 0,
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]


def run_py(args: list[str], timeout: float = 900) -> subprocess.CompletedProcess:
    """``python run.py`` as test_bad_input runs it, with the longer limit a whole sweep needs."""
    return _run_py(args, timeout=timeout)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]


def test_joblib_parallel_jobs_wandb_in_workers_and_a_failing_job(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_py(
        [
            "-m",
            "hydra/launcher=parallel",
            "hydra.launcher.n_jobs=2",
            f"hydra.sweep.dir={sweep}",
            "estimator=reparam,reinforce,reinforce_ma",  # reparam cannot serve an SBN: job 0 fails
            *tiny(data_root, steps=12, logger="wandb", **{"logger.mode": "offline"}),
        ]
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "error: 1 job(s) of the sweep" in proc.stderr and "0_sbn_reparam_s1: ConfigError" in proc.stderr
    err = (sweep / "0_sbn_reparam_s1" / "error.txt").read_text()
    assert err.startswith("ConfigError: estimator 'reparam' cannot serve model 'sbn'") and "Traceback" in err

    done = [sweep / "1_sbn_reinforce_s1", sweep / "2_sbn_reinforce_ma_s1"]
    for d in done:
        assert (d / "DONE").exists() and not (d / "error.txt").exists()
        assert [r["step"] for r in records(d) if "val/elbo" in r] == [0, 6, 12]
    # the two jobs ran at the same time: each started (config.yaml) before the other finished (DONE)
    start = [(d / "config.yaml").stat().st_mtime for d in done]
    end = [(d / "DONE").stat().st_mtime for d in done]
    assert start[0] < end[1] and start[1] < end[0], (start, end)

    # W&B offline in the loky workers: one run per job, group = the sweep, job type = the estimator
    for d, est in zip(done, ("reinforce", "reinforce_ma")):
        recs = wandb_files.read_records(wandb_files.run_file(d))
        info = wandb_files.run_info(recs)
        assert info["id"] == (d / "wandb_id.txt").read_text().strip()
        assert info["group"] == "sweep" and info["job_type"] == est and info["name"] == f"sbn-{est}-1"
        rows = wandb_files.history(recs)
        assert [r["step"] for r in rows if "val/elbo" in r] == [0, 6, 12]
        # logged objects are stored as flat keys <key>/_type, <key>/nrows, ...
        assert [r["step"] for r in rows if r.get("samples/_type") == "image-file"] == [
            0,
            6,
            12,
        ]  # model.generate
        assert [(r["test/table/_type"], r["test/table/nrows"]) for r in rows if "test/table/_type" in r] == [
            ("table-file", 1)
        ]
        assert wandb_files.config(recs)["estimator"]["name"] == est


def test_submitit_local_executor_runs_a_job(tmp_path, data_root):
    sweep = tmp_path / "sweep"
    proc = run_py(
        [
            "-m",
            "hydra/launcher=local",
            "hydra.launcher.timeout_min=30",
            f"hydra.sweep.dir={sweep}",
            "estimator=reinforce",
            "seed=3",
            *tiny(data_root, steps=6),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = sweep / "0_sbn_reinforce_s3"
    assert (run / "DONE").exists(), proc.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["seed"] == 3
    assert list((sweep / ".submitit").glob("*/*_log.out"))  # submitit's own per-job logs


def test_slurm_launcher_composes():
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose(
            "config",
            overrides=["hydra/launcher=slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    lc = cfg.hydra.launcher
    assert lc._target_.endswith("submitit_launcher.SlurmLauncher")
    assert (
        lc.partition == "gpu" and lc.gpus_per_node == 1 and lc.tasks_per_node == 1 and lc.max_num_timeout > 0
    )
    assert {"cpus_per_task", "timeout_min", "array_parallelism", "gres", "setup"} <= set(lc)
    from hydra.utils import instantiate

    assert type(instantiate(lc)).__name__ == "SlurmLauncher"  # builds; submits nothing


def test_kill_and_rerun_resumes_to_the_uninterrupted_metrics(tmp_path, data_root):
    from runners.train import train

    steps, ckpt = 600, 100
    common = tiny(
        data_root,
        steps=steps,
        **{
            "train.eval_every": 100,
            "train.log_every": 10,
            "train.checkpoint_every": ckpt,
            "estimator": "reinforce_ma",
        },
    )
    # job 0 fails before training (a range error: no import, no data); job 1 trains and is killed
    cmd = [
        "-m",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
        "optim.lr=-1,0.001",
        *common,
        "logger=wandb",
        "logger.mode=offline",
    ]
    run_dir = tmp_path / "sweep" / "1_sbn_reinforce_ma_s1"

    # the uninterrupted reference, in this process, one thread like the subprocesses
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        cfg = compose("config", overrides=[*common, "optim.lr=0.001"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(cfg, tmp_path / "reference")
    finally:
        torch.set_num_threads(threads)
    reference = records(tmp_path / "reference")

    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *cmd],
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline, killed_at = time.monotonic() + 600, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if (run_dir / "checkpoint.pt").exists() and (run_dir / "metrics.jsonl").exists():
                steps_logged = [r["step"] for r in records(run_dir)]
                if steps_logged and ckpt + 20 <= steps_logged[-1] < steps - 100:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole group: run.py and W&B's service
                    killed_at = steps_logged[-1]
                    break
                if steps_logged and steps_logged[-1] >= steps - 100:
                    break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_at is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert killed_at is not None, "the run ended (or never started) before it could be killed mid-way"
    assert not (run_dir / "DONE").exists()
    ckpt_step = torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"]
    assert ckpt_step < killed_at  # lines after the checkpoint exist and must be dropped on resume
    run_id = (run_dir / "wandb_id.txt").read_text()

    again = run_py(cmd)
    assert again.returncode == 1 and "0_sbn_reinforce_ma_s1: ConfigError: optim.lr=-1" in again.stderr, (
        again.stderr
    )
    assert f"resuming from {run_dir / 'checkpoint.pt'} at step {ckpt_step}" in again.stdout
    error = (run_dir / "error.txt").read_text() if (run_dir / "error.txt").exists() else ""
    assert (run_dir / "DONE").exists(), error + again.stderr[-2000:]

    resumed = records(run_dir)
    steps_of = lambda recs: [(r["step"], tuple(sorted(k for k in r if k != "time/elapsed"))) for r in recs]  # noqa: E731
    assert len(resumed) == len(reference)
    assert steps_of(resumed) == steps_of(reference)  # no repeated, no missing steps
    for a, b in zip(resumed, reference):  # and the same trajectory, to float precision
        for k in a:
            if k != "time/elapsed":
                assert a[k] == pytest.approx(b[k], rel=1e-9, abs=1e-9), (a["step"], k)

    assert (run_dir / "wandb_id.txt").read_text() == run_id
    ids = set()
    for f in run_dir.glob("wandb/offline-run-*/run-*.wandb"):
        try:
            ids.add(wandb_files.run_info(wandb_files.read_records(f))["id"])
        except Exception:  # noqa: BLE001 - the killed run's file may end in a cut record
            pass
    assert ids == {run_id.strip()}  # the resumed run continued the same W&B run
    assert (
        wandb_files.run_info(wandb_files.read_records(wandb_files.run_file(run_dir)))["id"] == run_id.strip()
    )

    third = run_py(cmd)
    assert f"already finished: {run_dir}" in third.stdout
    assert records(run_dir) == resumed
