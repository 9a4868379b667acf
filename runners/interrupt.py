"""Stop a run cleanly on SIGTERM / SIGINT (and on the launcher's preemption signal): finish the step, save.

What clusters and users send, and what a run does with it:

* ``SIGTERM`` (``kill``, SLURM at the time limit or on preemption, a parallel sweep passing it on) and
  ``SIGINT`` (Ctrl-C): the handler only records the signal. The training loop looks at it after each step,
  writes a checkpoint at that step, flushes the metrics and W&B, and the run ends with
  :class:`RunInterrupted` (``run.py`` prints one line and exits with 128 + the signal number). Re-running the
  same command resumes at that step: nothing is lost and nothing is done twice. A second Ctrl-C while the
  first is being handled stops at once (``KeyboardInterrupt``), for the impatient.
* The launcher's own handler (submitit installs one for ``SIGUSR2``, sent by SLURM ``signal_delay_s``
  before the time limit, which requeues the job; and a ``SIGTERM`` handler that ignores the signal) is
  called *after* the checkpoint is written, so a requeued job resumes from the step where it stopped.

Signal handlers can only be installed in the main thread; elsewhere (a thread pool) the run keeps the
process's defaults and relies on its periodic checkpoints.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class RunInterrupted(Exception):
    """The run stopped on a signal after saving a checkpoint at ``step``; re-run to resume."""

    def __init__(self, signum: int, step: int, where: str):
        self.signum, self.step, self.where = signum, step, where
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at step {step}: checkpoint and metrics saved in "
            f"{where}; run the same command again to resume from step {step}"
        )

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def _chainable(handler: Any) -> bool:
    """A Python handler someone else installed (a launcher's), as opposed to SIG_DFL / SIG_IGN / None, or a
    handler that asks not to be chained (``not_chained``: run.py's sweep handler, which stops the process)."""
    return (
        callable(handler)
        and handler not in (signal.default_int_handler,)
        and not getattr(handler, "not_chained", False)
    )


class GracefulStop:
    """``with GracefulStop() as stop:`` the loop checks ``stop.requested`` (an int signal number or 0)."""

    def __init__(self) -> None:
        self.requested = 0
        self._previous: dict[int, Any] = {}

    def _signals(self) -> list[int]:
        sigs = [signal.SIGTERM, signal.SIGINT]
        usr2 = getattr(signal, "SIGUSR2", None)
        # the preemption signal only when a launcher handles it (submitit); otherwise its default (terminate)
        if usr2 is not None and _chainable(signal.getsignal(usr2)):
            sigs.append(usr2)
        return sigs

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.requested = self.requested or signum

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        for sig in self._signals():
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():  # kept: chain() may still call them
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)

    def chain(self) -> None:
        """Call the handler that was in place before ours (a launcher's) for the signal we stopped on.

        submitit's SIGUSR2 handler requeues the job and exits; its SIGTERM handler only logs."""
        sig = self.requested
        handler = self._previous.get(sig)
        if sig and _chainable(handler):
            handler(sig, None)
