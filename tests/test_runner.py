"""The runner end to end on tiny synthetic files: smoke runs, resume, local files and offline W&B."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from runners.logger import read_metrics
from runners.train import CHECKPOINT, DONE, SUMMARY, train
from runners.wandb_files import config as wandb_config
from runners.wandb_files import history, read_records, run_file, run_info
from tests.conftest import ROOT, TINY


@pytest.mark.parametrize(
    "model,estimator",
    [("sbn", "reinforce"), ("sbn", "reinforce_ma"), ("vae", "reparam"), ("vae", "reinforce")],
)
def test_train_in_process(tiny_cfg, tmp_path, model, estimator):
    cfg = tiny_cfg(f"model={model}", f"estimator={estimator}", "variance.basket=[reinforce]")
    summary = train(cfg, tmp_path)
    for name in (CHECKPOINT, DONE, SUMMARY, "config.yaml", "metrics.jsonl"):
        assert (tmp_path / name).exists(), name
    assert summary["test/bound_3"] >= summary["test/elbo"] - 50  # both finite, same scale
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows if "train/elbo" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in rows if "val/elbo" in r and "test/elbo" not in r] == [0, 2]
    grads = [r for r in rows if f"grad/{estimator}/log10_var" in r]
    assert [r["step"] for r in grads] == [0, 2] and all("grad/reinforce/snr" in r for r in grads)


def test_run_py_subprocess(tiny_data_root, tmp_path):
    """``python run.py`` itself: Hydra parses the overrides, writes into the given run dir, prints the bound."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "run.py",
        "model=sbn",
        "estimator=reinforce",
        f"data.root={tiny_data_root}",
        "data.verify=false",
        *TINY,
        f"hydra.run.dir={run_dir}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "test bound (m=3)" in out.stdout and str(run_dir) in out.stdout
    assert json.loads((run_dir / SUMMARY).read_text())["steps"] == 4
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "already finished" in again.stdout


def _without_time(rows):
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_continues_without_repeats(tiny_cfg, tmp_path):
    """A run stopped after N steps and restarted reaches 2N with the same metrics as an uninterrupted run."""
    n = 6
    common = ["train.eval_every=3", "train.log_every=1", "variance.every=3"]
    straight = train(tiny_cfg(f"train.steps={2 * n}", *common), tmp_path / "straight")
    first = tiny_cfg(f"train.steps={n}", *common)
    train(first, tmp_path / "resumed")
    (tmp_path / "resumed" / DONE).unlink()  # extend the finished run: it resumes from its last checkpoint
    resumed = train(tiny_cfg(f"train.steps={2 * n}", *common), tmp_path / "resumed")
    a, b = read_metrics(tmp_path / "straight"), read_metrics(tmp_path / "resumed")
    steps = [r["step"] for r in b if "train/elbo" in r]
    assert steps == list(range(1, 2 * n + 1)), steps  # no repeated and no missing steps
    assert _without_time(a) == _without_time(b)  # RNG, optimiser and estimator state restored exactly
    assert straight["test/elbo"] == resumed["test/elbo"]


def test_wandb_offline_files_hold_metrics_and_config(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = tiny_cfg("logger.mode=offline", "estimator=reinforce_ma", "seed=7")
    train(cfg, tmp_path)
    records = read_records(run_file(tmp_path))
    rows = history(records)
    assert [r["step"] for r in rows if "train/elbo" in r] == [1, 2, 3, 4]
    local = [r for r in read_metrics(tmp_path) if "train/elbo" in r]
    assert [r["train/elbo"] for r in rows if "train/elbo" in r] == pytest.approx(
        [r["train/elbo"] for r in local]
    )
    assert any("grad/reinforce_ma/log10_var" in r for r in rows)
    conf = wandb_config(records)
    assert conf["estimator"]["name"] == "reinforce_ma" and conf["seed"] == 7 and "git_rev" in conf
    info = run_info(records)
    assert info["job_type"] == "reinforce_ma" and info["name"] == "sbn-reinforce_ma-7"
    assert (tmp_path / "wandb_id.txt").read_text().strip() == info["id"]
    assert os.environ.get("WANDB_MODE") in (None, "offline")
