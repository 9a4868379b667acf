"""Entry point: ``python run.py model=sbn estimator=reinforce``; ``-m`` sweeps. See README.md.

One run: bad input (an unknown option, a value out of range, an estimator that cannot serve the model, data
that cannot be loaded) ends with ``error: ...`` on stderr and exit status 2, no traceback.

A sweep (``-m``): every job runs whatever the others do. A job that fails writes its traceback to
``<run dir>/error.txt`` and says ``FAILED`` on stderr; when all jobs have returned, the sweep exits with
status 1 and one message listing every failed job of this invocation. Re-running the same command with the
same ``hydra.sweep.dir`` skips finished jobs (``DONE``, when their configuration is the job's), resumes
interrupted ones from their checkpoint, and runs the failed and missing ones again.

``hydra/launcher=packed``: the jobs of the sweep train as members of one process (runners/pack.py), each
leaving exactly the files of its single run. The per-job checks, locks, skips and failure reports are the same
for every launcher (runners/jobs.py).

Every job holds a lock on its run directory while it runs (a second start is refused, naming the holder).
SIGTERM / SIGINT: the run finishes its step, saves a checkpoint, flushes its metrics and W&B, and exits with
128 + the signal number (runners/interrupt.py); a parallel sweep passes SIGTERM on to its workers.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from runners.checks import ConfigError, check_overrides, check_paths, with_model_defaults
from runners.jobs import JobSpec, run_jobs
from runners.logger import SUMMARY


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict | None:
    hc = HydraConfig.get()
    (outcome,) = run_jobs([JobSpec(cfg, Path(hc.runtime.output_dir), hc)])  # a single run: a pack of one
    if outcome.status == "failed":
        raise outcome.value  # a JobFailed: Hydra's sweeper re-raises it once every job has returned
    summary = outcome.value
    if outcome.status == "finished":
        return summary
    m = int(cfg.eval.samples)
    print(
        f"\ntest ELBO {summary['test/elbo']:.2f} nats, test bound (m={m}) {summary[f'test/bound_{m}']:.2f} nats"
    )
    print(f"run directory: {hc.runtime.output_dir}  ({SUMMARY}, metrics.jsonl, checkpoint.pt)")
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
    """In the process that runs a sweep: with worker processes (parallel launcher, packed with n_jobs > 1) pass
    SIGTERM on to them, which save a checkpoint and stop (a terminal's Ctrl-C reaches them by itself), then exit
    128 + signal; without workers, a SIGTERM outside training (start-up, between jobs) stops the sweep at once
    (inside training the job's own handler checkpoints first)."""

    def __init__(self) -> None:
        self.received = 0

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._forward)

    def _forward(self, signum, frame) -> None:
        pids = worker_pids(os.getpid())
        if not pids:
            # no workers: the jobs run in this process (basic or packed launcher), and a training job has its own
            # handler (runners/interrupt.py), so the signal came between jobs or during start-up, where no
            # checkpoint is due: stop now, as a single run would (finished jobs keep their DONE)
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum
        for pid in pids:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                pass

    _forward.not_chained = True  # a run that stopped on the signal does not call this (runners/interrupt.py)


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
