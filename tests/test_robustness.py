"""Runs survive what clusters and users do to them: signals, kills, two starts, full disks, bad checkpoints,
divergence, W&B without network. Real subprocesses and real signals wherever the behaviour is a process's.

Nothing here depends on timing for its verdict: a test waits (polling, with a generous upper bound) until the
run has reached the state it needs (so many metric lines, a held lock), then acts; what it asserts holds
wherever the signal lands.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from runners import wandb_files
from runners.logger import read_metrics
from tests.test_bad_input import ROOT, run_env, run_py

WAIT_S = 240  # upper bound for a state to be reached on a loaded machine (normally seconds)


def tiny_args(
    root: Path, run_dir: Path, *extra: str, steps: int = 100_000, log: str = "disabled"
) -> list[str]:
    return [
        f"data.root={root}",
        "data.verify=false",
        f"train.steps={steps}",
        "train.batch_size=8",
        "train.log_every=1",
        "train.eval_every=100000",
        "train.checkpoint_every=100000",
        "eval.samples=3",
        "eval.batch_size=5",
        "variance.every=0",
        "model.layers=[16]",
        "estimator=reinforce_ma",
        f"logger.mode={log}",
        "quiet=true",
        "device=cpu",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "run.py"), *args],
        cwd=ROOT,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(cond, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def n_lines(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in read_metrics(run_dir) if "train/elbo" in r]


def ckpt_step(run_dir: Path) -> int:
    return int(torch.load(run_dir / "checkpoint.pt", weights_only=True)["step"])


# --------------------------------------------------------------------------------------------------
# signals: finish the step, checkpoint, flush, exit 128 + signum; the re-run resumes with nothing lost or redone
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_saves_and_the_rerun_resumes_exactly(tiny_data_root, tmp_path, sig):
    run_dir, ref_dir = tmp_path / "run", tmp_path / "ref"
    proc = start(tiny_args(tiny_data_root, run_dir))
    wait_for(lambda: n_lines(run_dir) >= 30, "30 metric lines", proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + sig, err
    assert f"interrupted by {signal.Signals(sig).name} at step" in err and "Traceback" not in err, err
    stopped = ckpt_step(run_dir)  # the checkpoint is at the step where it stopped, not at an earlier one
    assert train_steps(run_dir) == list(range(1, stopped + 1))
    assert not (run_dir / "DONE").exists()

    total = stopped + 20
    done = run_py(tiny_args(tiny_data_root, run_dir, steps=total))
    assert done.returncode == 0, done.stderr
    assert f"resuming from {run_dir / 'checkpoint.pt'} at step {stopped}" in done.stdout
    assert train_steps(run_dir) == list(range(1, total + 1))  # none lost, none repeated
    # and the interrupted-and-resumed run is the uninterrupted run, record for record
    ref = run_py(tiny_args(tiny_data_root, ref_dir, steps=total))
    assert ref.returncode == 0, ref.stderr
    a = [r["train/elbo"] for r in read_metrics(run_dir) if "train/elbo" in r]
    b = [r["train/elbo"] for r in read_metrics(ref_dir) if "train/elbo" in r]
    assert a == pytest.approx(b, rel=1e-6, abs=1e-9)


@pytest.mark.slow
def test_kill9_then_rerun_w_and_b_offline_holds_every_step_once(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_data_root, run_dir, "train.checkpoint_every=25", steps=300, log="offline")
    proc = start(args)
    wait_for(lambda: n_lines(run_dir) >= 60, "60 metric lines", proc)
    proc.kill()  # SIGKILL: no handler runs; the last checkpoint is all that is kept
    proc.communicate(timeout=WAIT_S)
    assert (run_dir / "checkpoint.pt").exists()
    done = run_py(args)
    assert done.returncode == 0, done.stderr
    steps = train_steps(run_dir)
    assert steps == list(range(1, 301))
    folders = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1, folders  # the earlier process's partial folder is superseded, not kept beside
    assert f"wandb sync {folders[0]}" in done.stdout
    rows = wandb_files.history(wandb_files.read_records(next(folders[0].glob("run-*.wandb"))))
    assert [r["step"] for r in rows if "train/elbo" in r] == steps  # every step once, in order
    local = {r["step"]: r["train/elbo"] for r in read_metrics(run_dir) if "train/elbo" in r}
    assert {r["step"]: r["train/elbo"] for r in rows if "train/elbo" in r} == local


@pytest.mark.slow
def test_parallel_sweep_passes_sigterm_to_its_workers(tiny_data_root, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    from run import worker_pids

    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=parallel",
        "hydra.launcher.n_jobs=2",
        "seed=1,2",
        f"hydra.sweep.dir={sweep}",
        *[a for a in tiny_args(tiny_data_root, tmp_path / "unused") if not a.startswith("hydra.run.dir")],
    ]
    proc = start(args)
    jobs = lambda: sorted(p for p in sweep.glob("*_s*") if p.is_dir())  # noqa: E731
    wait_for(lambda: len(jobs()) == 2 and all(n_lines(d) >= 10 for d in jobs()), "both jobs training", proc)
    workers = worker_pids(proc.pid)
    assert workers
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "sweep interrupted by SIGTERM" in err
    for d in jobs():  # every job stopped at a step and saved it
        assert ckpt_step(d) == train_steps(d)[-1] >= 10
        assert not (d / "DONE").exists()

    def gone() -> bool:
        return not any(Path(f"/proc/{pid}").exists() and b"loky" in _cmdline(pid) for pid in workers)

    wait_for(gone, "the workers to exit (no orphans)")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


# --------------------------------------------------------------------------------------------------
# one process per run directory
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_start_is_refused_and_a_dead_holder_does_not_block(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    args = tiny_args(tiny_data_root, run_dir)
    first = start(args)
    lock = run_dir / ".lock"
    wait_for(lambda: lock.exists() and f'"pid": {first.pid}' in lock.read_text(), "the lock", first)
    second = run_py(args)
    assert second.returncode == 2, second.stderr
    assert second.stderr.startswith("error: ") and f"in use by pid {first.pid}" in second.stderr
    assert "Traceback" not in second.stderr
    first.kill()  # the holder dies without releasing anything
    first.communicate(timeout=WAIT_S)
    third = run_py(tiny_args(tiny_data_root, run_dir, steps=5))
    assert third.returncode == 0, third.stderr
    assert (run_dir / "DONE").exists()


def test_lock_in_process(tmp_path):
    from runners.lock import RunLock, RunLocked

    with RunLock(tmp_path):
        # flock locks belong to the open file: a second open in the same process is refused too
        with pytest.raises(RunLocked, match=f"in use by pid {os.getpid()}"):
            RunLock(tmp_path).acquire()
    RunLock(tmp_path).acquire().release()  # released on exit


# --------------------------------------------------------------------------------------------------
# finished runs, checkpoints
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_finished_run_is_skipped_only_under_its_own_config(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_py(tiny_args(tiny_data_root, run_dir, steps=5)).returncode == 0
    same = run_py(tiny_args(tiny_data_root, run_dir, steps=5, log="disabled") + ["quiet=false"])
    assert same.returncode == 0 and "already finished" in same.stdout, same.stderr
    other = run_py(tiny_args(tiny_data_root, run_dir, "optim.lr=0.01", steps=5))
    assert other.returncode == 2, other.stderr
    assert "holds a finished run of a different configuration" in other.stderr and "optim.lr" in other.stderr
    assert "Traceback" not in other.stderr


def _train_tiny(tiny_cfg, run_dir: Path, *extra: str):
    from runners.train import train

    return train(tiny_cfg("train.checkpoint_every=2", *extra), run_dir)


class Payload:
    """Unpickling this object would run code (creates a marker file)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_loading_runs_no_code(tiny_cfg, tmp_path):
    from runners.train import CheckpointError

    marker = tmp_path / "pwned"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"step": 2, "model": Payload(marker)}, run_dir / "checkpoint.pt")
    before = (run_dir / "checkpoint.pt").read_bytes()
    with pytest.raises(CheckpointError, match="cannot resume from .*checkpoint.pt.*Delete it"):
        _train_tiny(tiny_cfg, run_dir)
    assert not marker.exists()
    assert (run_dir / "checkpoint.pt").read_bytes() == before  # nothing overwritten


@pytest.mark.parametrize("damage", ["truncated", "garbage", "foreign"])
def test_bad_checkpoint_is_one_named_error_and_nothing_is_overwritten(tiny_cfg, tmp_path, damage):
    from runners.train import CheckpointError

    run_dir = tmp_path / "run"
    _train_tiny(tiny_cfg, run_dir)
    (run_dir / "DONE").unlink()
    ckpt = run_dir / "checkpoint.pt"
    if damage == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    elif damage == "garbage":
        ckpt.write_bytes(b"not a checkpoint at all")
    else:
        torch.save({"weights": torch.zeros(3)}, ckpt)
    files = {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()}
    with pytest.raises(CheckpointError) as info:
        _train_tiny(tiny_cfg, run_dir)
    msg = str(info.value)
    assert str(ckpt) in msg and "Delete it" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in run_dir.iterdir() if p.is_file()} == files


def test_corrupt_checkpoint_on_the_command_line(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    assert run_py(tiny_args(tiny_data_root, run_dir, "train.checkpoint_every=2", steps=4)).returncode == 0
    (run_dir / "DONE").unlink()
    (run_dir / "checkpoint.pt").write_bytes(b"\x00" * 100)
    proc = run_py(tiny_args(tiny_data_root, run_dir, "train.checkpoint_every=2", steps=6))
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: cannot resume from") and proc.stderr.count("\n") == 1, proc.stderr


def test_disk_full_at_a_checkpoint_is_one_line_and_the_last_checkpoint_stays(tiny_cfg, tmp_path, monkeypatch):
    import runners.utils
    from runners.train import StorageError

    run_dir = tmp_path / "run"
    real_fsync, calls = os.fsync, {"n": 0}

    def full_disk(fd):
        if ".checkpoint.pt." in os.readlink(f"/proc/self/fd/{fd}"):
            calls["n"] += 1
            if calls["n"] >= 2:  # the first checkpoint is written, the second finds the disk full
                raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(runners.utils.os, "fsync", full_disk)
    with pytest.raises(StorageError) as info:
        _train_tiny(tiny_cfg, run_dir)
    msg = str(info.value)
    assert "disk is full" in msg and str(run_dir / "checkpoint.pt") in msg and "\n" not in msg
    monkeypatch.setattr(runners.utils.os, "fsync", real_fsync)
    assert ckpt_step(run_dir) == 2  # the last good checkpoint is intact
    assert not list(run_dir.glob(".*.tmp"))  # and no half-written file is left


def test_leftover_temporary_files_are_cleaned(tiny_cfg, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / ".checkpoint.pt.abc123.tmp").write_bytes(b"half")
    _train_tiny(tiny_cfg, run_dir)
    assert not list(run_dir.glob(".*.tmp"))


# --------------------------------------------------------------------------------------------------
# divergence
# --------------------------------------------------------------------------------------------------


def test_divergence_watch_names_the_first_non_finite_step():
    from omegaconf import OmegaConf

    from runners.train import Diverged, DivergenceWatch

    cfg = OmegaConf.create({"optim": {"lr": 0.1}})
    watch = DivergenceWatch(100.0, None, cfg)
    for step, c in enumerate([500.0, 400.0, float("nan"), 300.0], start=1):
        watch.add(torch.full((1, 4), c), step)
    with pytest.raises(Diverged, match="diverged at step 3: .* lower optim.lr \\(now 0.1\\)"):
        watch.check(4)
    runaway = DivergenceWatch(100.0, None, cfg)
    runaway.add(torch.full((1, 4), 550.0), 1)
    assert runaway.check(1) == pytest.approx(550.0)
    runaway.add(torch.full((1, 4), 4.6e6), 2)
    with pytest.raises(Diverged, match="by step 2"):
        runaway.check(2)
    off = DivergenceWatch(0.0, 550.0, cfg)  # factor 0: runaway test off, non-finite still fails
    off.add(torch.full((1, 4), 4.6e6), 1)
    assert off.check(1) == pytest.approx(4.6e6)


@pytest.mark.slow
def test_a_diverged_run_fails_with_one_line(tiny_data_root, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_py(tiny_args(tiny_data_root, run_dir, "optim.lr=10000", "train.log_every=10", steps=200))
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.startswith("error: training diverged") and "optim.lr" in proc.stderr, proc.stderr
    assert not (run_dir / "DONE").exists() and (run_dir / "error.txt").read_text().startswith("Diverged")


# --------------------------------------------------------------------------------------------------
# W&B online
# --------------------------------------------------------------------------------------------------


def test_online_without_a_key_is_refused_before_data(tmp_path, monkeypatch):
    env_home = tmp_path / "home"
    env_home.mkdir()
    monkeypatch.setenv("HOME", str(env_home))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("NETRC", raising=False)
    proc = run_py(["logger.mode=online", "data.root=/nonexistent/x", f"hydra.run.dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr.startswith("error: logger.mode=online needs a W&B API key")
        and "wandb login" in proc.stderr
    )


@pytest.mark.slow
def test_online_without_network_falls_back_to_offline(tiny_data_root, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens on the discard port
    run_dir = tmp_path / "run"
    proc = run_py(tiny_args(tiny_data_root, run_dir, "logger.init_timeout=5", steps=5, log="online"))
    assert proc.returncode == 0, proc.stderr
    assert "warning: W&B online did not start" in proc.stderr and "Traceback" not in proc.stderr
    (run_file,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    rows = wandb_files.history(wandb_files.read_records(run_file))
    assert [r["step"] for r in rows if "train/elbo" in r] == [1, 2, 3, 4, 5]
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 5


def test_a_launchers_preemption_handler_runs_after_the_checkpoint():
    """submitit installs a SIGUSR2 handler that requeues the job: the run records the signal first (and
    checkpoints), and only then ``chain()`` hands it to the launcher's handler."""
    from runners.interrupt import GracefulStop

    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))
    try:
        with GracefulStop() as stop:
            os.kill(os.getpid(), signal.SIGUSR2)
            deadline = time.monotonic() + 10
            while not stop.requested and time.monotonic() < deadline:
                time.sleep(0.01)
            assert stop.requested == signal.SIGUSR2 and calls == []  # not yet: the checkpoint comes first
        stop.chain()
        assert calls == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_without_a_launcher_handler_sigusr2_is_left_alone():
    from runners.interrupt import GracefulStop

    assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None)
    with GracefulStop():
        assert signal.getsignal(signal.SIGUSR2) in (signal.SIG_DFL, None)  # its default: terminate
