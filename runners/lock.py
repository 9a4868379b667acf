"""One process per run directory: an exclusive lock held for the run's whole life.

Two starts of the same run (a re-submitted SLURM job, a sweep re-run while the first is still going, a user's
second terminal) would otherwise both train, write one ``metrics.jsonl`` and one W&B run id from two processes,
and leave files of one beside files of the other. The lock is an ``flock`` on ``<run dir>/.lock``: the kernel
releases it when the holding process exits, however it exits (``kill -9`` included), so a lock left by a dead
process is never in the way: the file stays, the lock does not. The file's text names the holder (pid, host,
start time) for the error message of the second start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """The run directory is in use by another live process (the message names it)."""


class RunLock:
    """``with RunLock(run_dir): ...``: refuse with :class:`RunLocked` when another process holds it."""

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            raise RunLocked(
                f"run directory {self.path.parent} is in use by {self.holder()}: wait for that run to end or "
                f"stop it (kill <pid>); a lock of a process that has died is released by itself"
            ) from None
        os.ftruncate(fd, 0)
        holder = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> str:
        """The holder as its lock file names it (best effort: the file may be mid-write)."""
        try:
            info = json.loads(self.path.read_text() or "{}")
            return f"pid {info['pid']} on host {info['host']} (since {info['since']})"
        except (OSError, ValueError, KeyError):
            return "another process"

    def release(self) -> None:
        if self._fd is not None:
            # the text stays (harmless: only a held flock refuses a start); unlocking and closing frees it
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
