"""Jobs of a command: the checks, locks, skips and failure reports around training, for one run or a pack.

``run.py`` hands every job to :func:`run_jobs`: a single run and each job of a basic / parallel / SLURM sweep
as a list of one, the packed launcher (``hydra/launcher=packed``) a whole pack. Per job, in order:

* ``check_config`` (ranges, before torch is imported), then the run directory's lock (one process per run
  directory; a second start is refused, naming the holder);
* a finished run (``DONE``) is skipped when its saved config is the job's, and refused otherwise;
* the rest train together (``runners.train.train_pack``): one member per job, each exactly its single run.

A job that fails writes its traceback to ``<run dir>/error.txt`` and says ``FAILED`` on stderr; in a sweep it
returns a :class:`JobFailed`, which Hydra re-raises once every job has returned (the message lists every failed
job of this invocation). Alone, bad input ends with ``error: ...`` and exit status 2 (1 for a run that started
and failed: diverged, disk full), no traceback, and a run refused before anything ran leaves no folder.
SIGTERM / SIGINT: every member checkpoints and the process exits with 128 + the signal number.
"""

from __future__ import annotations

import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import CompactHydraException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from runners.checks import ConfigError, check_config, check_finished, clean_cause, one_line
from runners.interrupt import RunInterrupted
from runners.lock import RunLock, RunLocked
from runners.logger import DONE, ERROR_FILE, SUMMARY


class JobFailed(CompactHydraException):
    """A failed job of a sweep, after its traceback is written to its ``error.txt``.

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


@dataclass
class JobSpec:
    """A job as Hydra made it: the task config, its run directory and its Hydra config (``HydraConfig.get()``)."""

    cfg: DictConfig
    run_dir: Path
    hydra: DictConfig


@dataclass
class Outcome:
    """What became of a job: ``trained`` (value: its summary), ``finished`` (skipped: it had finished before;
    value: its summary or None) or ``failed`` (value: a :class:`JobFailed`, in a sweep)."""

    status: str
    value: Any = None


#: where a sweep notes the jobs refused because another process holds their run directory (nothing may be
#: written into that directory), one file per job, named after it
REFUSED_DIR = ".refused"


def failed_jobs(sweep_dir: Path) -> list[tuple[Path, str]]:
    """(run dir, one-line error) of the jobs whose ``error.txt`` (or refusal note) is newer than the sweep's
    start."""
    start = (sweep_dir / "multirun.yaml").stat().st_mtime if (sweep_dir / "multirun.yaml").exists() else 0.0
    out = []
    for err in sorted(sweep_dir.glob(f"*/{ERROR_FILE}")):
        if err.stat().st_mtime >= start - 1.0:  # 1 s of slack for coarse file-system clocks
            out.append((err.parent, error_line(err)))
    for note in sorted((sweep_dir / REFUSED_DIR).glob("*.txt")):
        if note.stat().st_mtime >= start - 1.0:
            out.append((sweep_dir / note.stem, error_line(note)))
    return sorted(out)


def error_line(path: Path) -> str:
    """The first line of an ``error.txt``: the exception, as ``write_error`` puts it there."""
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    return text.splitlines()[0] if text else "(empty error.txt)"


def write_error(run_dir: Path, e: BaseException, headline: BaseException, overrides: list[str]) -> None:
    """``error.txt``: one line naming the exception (``headline``: the error that explains it), then the
    command's overrides, then the full traceback of ``e``."""
    run_dir.mkdir(parents=True, exist_ok=True)
    text = (
        f"{one_line(headline)}\n"
        f"overrides: {' '.join(overrides)}\nat: {time.strftime('%Y-%m-%d %H:%M:%S')}\n\n"
        + "".join(traceback.format_exception(type(e), e, e.__traceback__))
    )
    (run_dir / ERROR_FILE).write_text(text, encoding="utf-8")


def flat(e: BaseException) -> str:
    """The message on one line (a DataError explains itself over several: what is missing, where, the fix)."""
    return " ".join(str(e).split())


def untouched(run_dir: Path) -> bool:
    """Nothing in the run directory but what Hydra and the lock put there: this command wrote no run."""
    return not any(p for p in run_dir.iterdir() if p.name not in (".hydra", "run.log", ".lock"))


def wandb_group(cfg: DictConfig, hc: DictConfig) -> str | None:
    """The W&B group: logger.group, else the preset's experiment_name, else the sweep directory's name."""
    if cfg.logger.get("group"):
        return str(cfg.logger.group)
    if cfg.get("experiment_name"):
        return str(cfg.experiment_name)
    if hc.mode == RunMode.MULTIRUN:
        return Path(hc.sweep.dir).name
    return None  # train.py falls back to the model name


def _known_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(errors reported in one line, those of them that mean "the run started and failed": exit 1).
    Before torch is imported only config and lock errors can have happened."""
    if "runners.train" not in sys.modules:
        return (ConfigError, RunLocked), ()
    from data.common import DataError
    from runners.train import CheckpointError, Diverged, StorageError

    failed_run = (Diverged, StorageError)
    return (ConfigError, RunLocked, DataError, CheckpointError, *failed_run), failed_run


def _failure(spec: JobSpec, e: BaseException, lock: RunLock) -> Outcome:
    """Report a failed job; in a sweep, return it as a :class:`JobFailed`; alone, exit (or re-raise a bug)."""
    clean, failed_run = _known_errors()
    known = clean_cause(e, clean)
    multirun = spec.hydra.mode == RunMode.MULTIRUN
    sweep_dir, run_dir = str(spec.hydra.sweep.dir), spec.run_dir
    if isinstance(known, RunLocked):  # the directory is another process's: write nothing into it
        print(f"error: {flat(known)}", file=sys.stderr)
        if multirun:
            note = Path(sweep_dir) / REFUSED_DIR / f"{Path(run_dir).name}.txt"  # for the sweep's summary
            note.parent.mkdir(parents=True, exist_ok=True)
            note.write_text(one_line(known) + "\n", encoding="utf-8")
            return Outcome("failed", JobFailed(sweep_dir, str(run_dir), one_line(known)))
        sys.exit(2)
    if not multirun and known is not None and untouched(run_dir):
        # refused before anything ran: leave no folder behind (Hydra made it for this command only)
        lock.release()
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: {flat(known)}", file=sys.stderr)
        sys.exit(2)
    write_error(run_dir, e, known or e, list(spec.hydra.overrides.task))
    if multirun:
        print(f"FAILED {run_dir}: {one_line(known or e)}", file=sys.stderr)
        failed = JobFailed(sweep_dir, str(run_dir), one_line(known or e))
        failed.__cause__ = e
        return Outcome("failed", failed)
    if known is not None:
        print(f"error: {flat(known)}", file=sys.stderr)
        sys.exit(1 if isinstance(known, failed_run) else 2)
    raise e


def run_jobs(specs: list[JobSpec]) -> list[Outcome]:
    """Check, lock, skip or train every job (the trained ones as one pack); one :class:`Outcome` per job."""
    outcomes: list[Outcome | None] = [None] * len(specs)
    locks = [RunLock(s.run_dir) for s in specs]
    to_train: list[int] = []
    try:
        for i, s in enumerate(specs):
            try:
                check_config(s.cfg)  # ranges answer before torch is imported; no data is loaded here
                locks[i].acquire()  # held until the pack returns: one process per run directory
                if (s.run_dir / DONE).exists():
                    check_finished(s.cfg, s.run_dir)  # a finished run of another configuration is refused
                    print(f"already finished: {s.run_dir} (delete {s.run_dir / DONE} to run again)")
                    summary = (
                        OmegaConf.to_container(OmegaConf.load(s.run_dir / SUMMARY))
                        if (s.run_dir / SUMMARY).exists()
                        else None
                    )
                    outcomes[i] = Outcome("finished", summary)
                    continue
                (s.run_dir / ERROR_FILE).unlink(missing_ok=True)  # a retry starts clean
                to_train.append(i)
            except Exception as e:  # noqa: BLE001 - reported per job
                outcomes[i] = _failure(s, e, locks[i])
        if to_train:
            from runners.train import Job, train_pack  # noqa: PLC0415 - heavy imports after the cheap checks

            try:
                results = train_pack(
                    [
                        Job(specs[i].cfg, specs[i].run_dir, wandb_group(specs[i].cfg, specs[i].hydra))
                        for i in to_train
                    ]
                )
            except RunInterrupted as e:  # saved and stopped: resumable, not a failure
                print(f"\n{e}", file=sys.stderr)
                sys.exit(e.exit_code)  # SystemExit passes through Hydra's launchers: the sweep stops too
            for i, r in zip(to_train, results):
                outcomes[i] = (
                    _failure(specs[i], r, locks[i]) if isinstance(r, BaseException) else Outcome("trained", r)
                )
    finally:
        for lock in locks:
            lock.release()
    return outcomes  # type: ignore[return-value]
