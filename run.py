"""Entry point: ``python run.py model=sbn estimator=reinforce``; ``-m`` sweeps. See README.md.

One run: bad input (an unknown option, a value out of range, an estimator that cannot serve the model, data
that cannot be loaded) ends with ``error: ...`` on stderr and exit status 2, no traceback.

A sweep (``-m``): every job runs whatever the others do. A job that fails writes its traceback to
``<run dir>/error.txt`` and says ``FAILED`` on stderr; when all jobs have returned, the sweep exits with
status 1 and one message listing every failed job of this invocation. Re-running the same command with the
same ``hydra.sweep.dir`` skips finished jobs (``DONE``, when their configuration is the job's), resumes
interrupted ones from their checkpoint, and runs the failed and missing ones again.

Every job holds a lock on its run directory while it runs (a second start is refused, naming the holder).
SIGTERM / SIGINT: the run finishes its step, saves a checkpoint, flushes its metrics and W&B, and exits with
128 + the signal number (runners/interrupt.py); a parallel sweep passes SIGTERM on to its workers.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runners.checks import (
    ConfigError,
    check_config,
    check_finished,
    check_overrides,
    check_paths,
    clean_cause,
    one_line,
    with_model_defaults,
)
from runners.interrupt import RunInterrupted
from runners.lock import RunLock, RunLocked
from runners.logger import DONE, ERROR_FILE, SUMMARY


class JobFailed(CompactHydraException):
    """Raised by a failed job of a sweep, after its traceback is written to its ``error.txt``.

    Hydra's sweeper lets every job of the sweep run, then re-raises the first failure in the main process and
    prints ``str()`` of a ``CompactHydraException`` (no traceback). The message is therefore composed when it
    is printed, from the sweep directory: by then every job has returned, and each failed job of this
    invocation has left an ``error.txt`` newer than the sweep's ``multirun.yaml`` (written at its start).
    """

    def __init__(self, sweep_dir: str, run_dir: str, message: str):
        super().__init__(sweep_dir, run_dir, message)  # all in args: survives pickling from worker processes
        self.sweep_dir, self.run_dir, self.message = sweep_dir, run_dir, message

    def __str__(self) -> str:
        failed = failed_jobs(Path(self.sweep_dir)) or [(Path(self.run_dir), self.message)]
        lines = [
            f"error: {len(failed)} job(s) of the sweep in {self.sweep_dir} failed (the others ran to the end):"
        ]
        lines += [f"  {d.name}: {msg}" for d, msg in failed]
        lines.append(
            f"tracebacks: <run dir>/{ERROR_FILE}; re-run the same command to retry them (finished jobs are "
            f"skipped, interrupted ones resume)"
        )
        return "\n".join(lines)


def failed_jobs(sweep_dir: Path) -> list[tuple[Path, str]]:
    """(run dir, one-line error) of the jobs whose ``error.txt`` is newer than the sweep's start."""
    start = (sweep_dir / "multirun.yaml").stat().st_mtime if (sweep_dir / "multirun.yaml").exists() else 0.0
    out = []
    for err in sorted(sweep_dir.glob(f"*/{ERROR_FILE}")):
        if err.stat().st_mtime >= start - 1.0:  # 1 s of slack for coarse file-system clocks
            out.append((err.parent, error_line(err)))
    return out


def error_line(path: Path) -> str:
    """The first line of an ``error.txt``: the exception, as ``write_error`` puts it there."""
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return text.splitlines()[0] if text else "(empty error.txt)"


def write_error(run_dir: Path, e: BaseException, headline: BaseException) -> None:
    """``error.txt``: one line naming the exception (``headline``: the error that explains it), then the
    command's overrides, then the full traceback of ``e``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    overrides = " ".join(HydraConfig.get().overrides.task)
    text = (
        f"{one_line(headline)}\n"
        f"overrides: {overrides}\nat: {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
        + "".join(traceback.format_exception(type(e), e, e.__traceback__))
    )
    (run_dir / ERROR_FILE).write_text(text, encoding="utf-8")


def flat(e: BaseException) -> str:
    """The message on one line (a DataError explains itself over several: what is missing, where, the fix)."""
    return " ".join(str(e).split())


def untouched(run_dir: Path) -> bool:
    """Nothing in the run directory but what Hydra and the lock put there: this command wrote no run."""
    return not any(p for p in run_dir.iterdir() if p.name not in (".hydra", "run.log", ".lock"))


def wandb_group(cfg: DictConfig, hc) -> str | None:
    """The W&B group: logger.group, else the preset's experiment_name, else the sweep directory's name."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).name
    return None  # train.py falls back to the model name


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    clean: tuple[type, ...] = (ConfigError, RunLocked)
    failed_run: tuple[type, ...] = ()
    lock = RunLock(run_dir)
    try:
        check_config(cfg)  # ranges answer before torch is imported; no data is loaded here
        lock.acquire()  # held until this job returns: one process per run directory
        if (run_dir / DONE).exists():
            check_finished(cfg, run_dir)  # a finished run of another configuration is refused, not reused
            print(f"already finished: {run_dir} (delete {run_dir / DONE} to run again)")
            return (
                OmegaConf.to_container(OmegaConf.load(run_dir / SUMMARY))
                if (run_dir / SUMMARY).exists()
                else None
            )
        (run_dir / ERROR_FILE).unlink(missing_ok=True)  # a retry starts clean
        from data.common import DataError  # noqa: PLC0415 - heavy imports after the cheap checks
        from runners.train import CheckpointError, Diverged, StorageError, train  # noqa: PLC0415

        failed_run = (
            Diverged,
            StorageError,
        )  # the run started and failed (exit 1); the others: bad input (2)
        clean = (ConfigError, RunLocked, DataError, CheckpointError, *failed_run)
        summary = train(cfg, run_dir, group=wandb_group(cfg, hc))
    except Exception as e:
        if isinstance(e, RunInterrupted):  # saved and stopped: resumable, not a failure
            print(f"\n{e}", file=sys.stderr)
            sys.exit(e.exit_code)  # SystemExit passes through Hydra's launchers: the sweep stops too
        known = clean_cause(e, clean)
        if isinstance(known, RunLocked):  # the directory is another process's: write nothing into it
            print(f"error: {flat(known)}", file=sys.stderr)
            if multirun:
                raise JobFailed(str(hc.sweep.dir), str(run_dir), one_line(known)) from None
            sys.exit(2)
        if not multirun and known is not None and untouched(run_dir):
            # refused before anything ran: leave no folder behind (Hydra made it for this command only)
            lock.release()
            shutil.rmtree(run_dir, ignore_errors=True)
            print(f"error: {flat(known)}", file=sys.stderr)
            sys.exit(2)
        write_error(run_dir, e, known or e)
        if multirun:
            print(f"FAILED {run_dir}: {one_line(known or e)}", file=sys.stderr)
            raise JobFailed(str(hc.sweep.dir), str(run_dir), one_line(known or e)) from e
        if known is not None:
            print(f"error: {flat(known)}", file=sys.stderr)
            sys.exit(1 if isinstance(known, failed_run) else 2)
        raise
    finally:
        lock.release()
    m = int(cfg.eval.samples)
    print(
        f"\ntest ELBO {summary['test/elbo']:.2f} nats, test bound (m={m}) {summary[f'test/bound_{m}']:.2f} nats"
    )
    print(f"run directory: {run_dir}  ({SUMMARY}, metrics.jsonl, checkpoint.pt)")
    if summary.get("wandb_sync"):
        print(f"upload to W&B: {summary['wandb_sync']}")
    return summary


def precheck(argv: list[str]) -> None:
    """Before Hydra starts: unknown group options (``estimator=foo``) answered with the valid ones, run and
    sweep directories that cannot be created, a SLURM launcher without SLURM."""
    try:
        check_overrides(argv)
        check_paths(argv)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


class SweepSignals:
    """In the process that runs a parallel (joblib) sweep: pass SIGTERM on to the worker processes, which
    save a checkpoint and stop (a terminal's Ctrl-C reaches them by itself), then exit 128 + signal."""

    def __init__(self) -> None:
        self.received = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._forward)

    def _forward(self, signum, frame) -> None:
        self.received = signum
        for pid in worker_pids(os.getpid()):
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass


def worker_pids(parent: int) -> list[int]:
    """Child processes of ``parent`` that are joblib/loky workers (not W&B's service), from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == parent and b"loky" in cmdline:
            out.append(int(stat.parent.name))
    return out


if __name__ == "__main__":
    sys.argv[1:] = with_model_defaults(sys.argv[1:])  # model=mixture_vae alone: an estimator that serves it
    precheck(sys.argv[1:])
    sweep_signals = SweepSignals()
    if any(a in ("-m", "--multirun") for a in sys.argv[1:]):
        sweep_signals.install()
    try:
        main()
    finally:
        if sweep_signals.received:
            print(
                f"sweep interrupted by {signal.Signals(sweep_signals.received).name}: the running jobs saved a "
                f"checkpoint; run the same command again to resume",
                file=sys.stderr,
            )
            os._exit(128 + sweep_signals.received)
