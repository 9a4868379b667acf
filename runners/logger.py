"""Run logging: ``metrics.jsonl`` in the run directory always, and Weights & Biases unless disabled.

Every record carries ``step``; metric names are namespaced (``train/``, ``val/``, ``test/``, ``grad/``).
The local file is flushed at every record, so a crash loses nothing that was logged. On resume the
file is cut back to the length it had at the checkpoint (recorded in it), so no step is logged twice.
W&B runs offline by default (no account or network needed; ``wandb sync`` uploads later), keep one run id
per run directory (``wandb_id.txt``) and resume it, and always ``finish``.

Exactly once in W&B after interruptions (offline mode): ``metrics.jsonl`` is the record of truth (flushed per
record, cut back to the checkpoint on resume). A resumed run deletes the offline W&B folders of its earlier
processes (partial, possibly holding steps after the checkpoint that are about to be redone) and replays
``metrics.jsonl`` into a fresh offline run of the same id before it goes on, so the one folder that
``wandb sync`` is told about holds every step once. (Images of the interrupted part are not replayed.)
Online, a resumed run continues the server's run from the checkpoint step: steps logged between the last
checkpoint and a kill may reach W&B twice, as W&B keeps what it received; SIGTERM / SIGINT stop at a
checkpoint, so only a hard kill can do that.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

# The files of a run directory (runners/train.py writes them; run.py and runners/report.py read them).
METRICS_FILE = "metrics.jsonl"
CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
DONE = "DONE"  # written last: a finished run
ERROR_FILE = "error.txt"  # the traceback of a failed run (run.py)
WANDB_MODES = ("offline", "online", "disabled")

# W&B online is decided once per process: after one run found W&B unreachable, the later runs of the
# process (the other members of a packed process) go offline at once instead of each waiting for the
# timeout, and no later failure can tear down W&B's service under runs that are already open.
_online_unreachable = False
_open_runs = 0  # W&B runs of this process started and not yet finished


class RunLogger:
    def __init__(
        self,
        run_dir: Path,
        config: dict[str, Any],
        mode: str = "offline",
        project: str = "gradest",
        entity: str | None = None,
        group: str | None = None,
        job_type: str | None = None,
        name: str | None = None,
        tags: list[str] | None = None,
        resume_lines: int | None = None,
        init_timeout: float = 15.0,
    ):
        global _online_unreachable, _open_runs
        if mode not in WANDB_MODES:
            raise ValueError(f"logger.mode={mode!r}: choose one of {', '.join(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS_FILE
        self.lines = self._truncate(resume_lines)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - closed in finish()
        self.wandb = None
        self.wandb_dir: Path | None = None
        self.used_wandb = mode != "disabled"  # finish(teardown=False) leaves W&B's service to the caller
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else generate_run_id()
            id_file.write_text(run_id + "\n")
            kwargs = dict(
                project=project,
                entity=entity,
                group=group,
                job_type=job_type,
                name=name,
                tags=tags,
                config=config,
                dir=str(self.run_dir),
                id=run_id,
                resume="allow",
                reinit="create_new",  # members of a packed process each keep their own run
            )
            if mode == "online" and _online_unreachable:
                print(
                    "warning: W&B online was unreachable earlier in this process; logging offline "
                    "(upload later with the printed wandb sync command)",
                    file=sys.stderr,
                )
                mode = "offline"
            if mode == "offline":
                self._drop_offline_folders(run_id)
            # init_timeout bounds the wait for W&B's servers (online only); an offline start keeps W&B's own
            # timeout, which a busy machine's service start-up needs
            timeout = {"init_timeout": float(init_timeout)} if mode == "online" else {}
            try:
                self.run = wandb.init(
                    **kwargs, mode=mode, settings=wandb.Settings(console="off", silent=True, **timeout)
                )
            except Exception as e:  # noqa: BLE001 - any failure to reach W&B online: go on offline
                if mode != "online":
                    raise
                print(
                    f"warning: W&B online did not start within {init_timeout:g} s ({type(e).__name__}); "
                    f"logging offline instead (upload later with the printed wandb sync command)",
                    file=sys.stderr,
                )
                mode = "offline"
                _online_unreachable = True
                if _open_runs == 0:
                    # the failed online run still holds its id in W&B's service: start afresh (only when
                    # no other run of this process is open: teardown would end those runs too)
                    wandb.teardown()
                self._drop_offline_folders(run_id)
                self.run = wandb.init(
                    **kwargs, mode="offline", settings=wandb.Settings(console="off", silent=True)
                )
            _open_runs += 1
            self.mode = mode
            self.run.define_metric("step")
            self.run.define_metric("*", step_metric="step")  # plot everything against our own step
            self.wandb = wandb
            self.wandb_dir = Path(self.run.dir).parent  # .../wandb/offline-run-<time>-<id>
            if mode == "offline" and self.lines:
                self._replay()

    def _drop_offline_folders(self, run_id: str) -> None:
        """Earlier processes' offline folders of this run: superseded by the replay (we hold the run's lock)."""
        for old in (self.run_dir / "wandb").glob(f"offline-run-*-{run_id}"):
            shutil.rmtree(old, ignore_errors=True)

    def _replay(self) -> None:
        """Log the kept lines of metrics.jsonl (the steps up to the checkpoint) into this W&B run."""
        for record in read_metrics(self.run_dir)[: self.lines]:
            self.run.log(record)

    def flush(self) -> None:
        """Make the logged metrics durable (called before each checkpoint that counts them)."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())

    def _truncate(self, resume_lines: int | None) -> int:
        """Cut metrics.jsonl back to ``resume_lines`` lines (the count saved with the checkpoint)."""
        if not self.path.exists():
            return 0
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        lines = [ln for ln in lines if ln.endswith("\n")]  # a line cut by a kill is dropped
        if resume_lines is not None:
            lines = lines[:resume_lines]
        elif lines:
            lines = []  # a fresh run in an old directory starts a fresh file
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(lines), encoding="utf-8")
        os.replace(tmp, self.path)
        return len(lines)

    def log(self, metrics: dict[str, Any], step: int) -> None:
        record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        self.lines += 1
        if self.wandb is not None:
            self.run.log(record)

    def log_images(self, key: str, images, step: int, caption: str | None = None) -> None:
        """Images only go to W&B (local copies are written by the caller as PNG)."""
        if self.wandb is not None:
            self.run.log({"step": int(step), key: self.wandb.Image(images, caption=caption)})

    def log_table(self, key: str, columns: list[str], rows: list[list[Any]], step: int) -> None:
        """A ``wandb.Table`` (W&B only; the same rows are in summary.json / the report's CSV)."""
        if self.wandb is not None:
            table = self.wandb.Table(columns=columns, data=[[_plain(v) for v in row] for row in rows])
            self.run.log({"step": int(step), key: table})

    def summary(self, values: dict[str, Any]) -> None:
        if self.wandb is not None:
            for k, v in values.items():
                self.run.summary[k] = _plain(v)

    def sync_command(self) -> str | None:
        if self.wandb is None or self.wandb_dir is None:
            return None
        return f"wandb sync {self.wandb_dir}"

    def finish(self, exit_code: int = 0, teardown: bool = True) -> None:
        """Close metrics.jsonl and finish the W&B run. ``teardown=False``: the caller calls ``wandb.teardown()``
        once after finishing every run of the process (a packed process), before anything reads the files."""
        global _open_runs
        if not self._file.closed:
            self._file.close()
        if self.wandb is not None:
            self.run.finish(exit_code=exit_code)
            _open_runs -= 1
            # finish() can return before W&B's service has written the last records of an offline run to
            # disk; teardown waits for the service, so the run file is complete when this returns (a reader
            # of the file, DONE written after this, and `wandb sync` all see every record)
            if teardown:
                self.wandb.teardown()
            self.wandb = None


def generate_run_id() -> str:
    """A W&B-style run id (8 lowercase alphanumerics), kept in the run directory for resume."""
    import secrets
    import string

    return "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "numel", lambda: 1)() == 1:
        return v.item()
    return v


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
