"""Packed sweeps: the jobs of a ``-m`` sweep trained as members of one process (``hydra/launcher=packed``).

    python run.py -m hydra/launcher=packed experiment=muprop_table3_sbn_1layer estimator=muprop_c \\
        seed=1,2,3,4,5 optim.lr=3e-3,1e-3,3e-4,1e-4,3e-5 hydra.sweep.dir=outputs/sweeps/t3

runs the 25 jobs as one process with 25 members, and leaves exactly what 25 single runs would leave: one job
directory each (``.hydra/``, ``config.yaml``, ``metrics.jsonl``, ``checkpoint.pt``, ``summary.json``, ``DONE``,
an offline W&B run), so ``runners.report``, skip / resume / re-run of the sweep and ``wandb sync`` work
unchanged. Hydra makes each job's directory and config as its basic launcher does (``run_job``); the jobs
are then grouped into packs and each pack is trained by ``runners.jobs.run_jobs`` (the same checks, locks,
skips and failure reports as a single run) and ``runners.train.train_pack`` (the one training loop).

Packs: jobs of the same model, estimator, data and device share a pack (up to ``max_members``); the others go
into packs of their own, trained one after another. The user never chooses: any sweep can be packed. With
``hydra.launcher.n_jobs=N`` each pack is dealt over N worker processes that run side by side (joblib's loky
workers, as ``hydra/launcher=parallel``; SIGTERM reaches them through run.py): one per core on a CPU.

Mechanism (measured, bench/bench_packed.py): members take their steps in lock step, each on its own RNG stream
(swapped in for its turn), with its own model, estimator, optimiser and minibatch generator, and the data loaded
once. By default one member at a time: on CPU this costs nothing per member against separate runs and saves the
process start, imports and data loading of every job. With ``train.member_dim=true`` the members of one model,
estimator, data and batch size take each step together (``runners.train._member_dim_gradients``,
models/members.py): one pass with their parameters and moving averages stacked ``[M, ...]`` and ``baddbmm``
over members, each member's rows drawn on its own stream, then each member's own optimiser. That is what a GPU
needs (one kernel per layer for all members instead of one per member); on this CPU, which is bound by the
arithmetic, it measured 1.07-1.28x at 4-64 members and 0.52-0.57x at 256 (the README's table). ``torch.func.vmap`` cannot run MuProp
(``autograd.grad``) or the estimators' in-place running statistics.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from runners.jobs import JobSpec, run_jobs

log = logging.getLogger(__name__)


def pack_key(cfg: DictConfig) -> str:
    """Jobs with equal keys share a pack: same model, estimator, data and device (seed, learning rate,
    optimiser settings, steps and everything else may differ per member)."""
    part = {k: cfg.get(k) for k in ("model", "data", "device")}
    part["estimator"] = cfg.estimator.get("name")
    return OmegaConf.to_yaml(OmegaConf.create(part), resolve=True)


def packs(specs: list[JobSpec], max_members: int) -> list[list[int]]:
    """Indices of ``specs`` grouped by :func:`pack_key`, in sweep order, each group cut at ``max_members``."""
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(specs):
        groups.setdefault(pack_key(s.cfg), []).append(i)
    out = []
    for idx in groups.values():
        out += [idx[j : j + max_members] for j in range(0, len(idx), max_members)]
    return out


def _collect(cfg: DictConfig) -> JobSpec:
    """The task Hydra's ``run_job`` runs for each job of a packed sweep: it only records the job (Hydra has
    made its directory and written ``.hydra/``); the jobs train together afterwards."""
    hc = HydraConfig.get()
    return JobSpec(cfg, Path(hc.runtime.output_dir), copy.deepcopy(hc))


class PackedLauncherBase(Launcher):
    """Hydra launcher: every job of the sweep in this process, as members of packs (see the module doc).
    Registered by hydra_plugins/packed_launcher/packed_launcher.py."""

    def __init__(self, max_members: int = 256, n_jobs: int = 1, **_: object) -> None:
        super().__init__()
        if int(max_members) < 1:
            raise ValueError(
                f"hydra.launcher.max_members={max_members}: give a positive number of members per pack"
            )
        if int(n_jobs) < 1:
            raise ValueError(f"hydra.launcher.n_jobs={n_jobs}: give a positive number of packed processes")
        self.max_members, self.n_jobs = int(max_members), int(n_jobs)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context = config, hydra_context

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        rets: list[JobReturn] = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=_collect,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
            rets.append(ret)
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        specs = [r.return_value for r in rets]  # a job Hydra could not even set up raises here, as basic does
        groups = packs(specs, self.max_members)
        if self.n_jobs > 1:  # each pack dealt round-robin over n_jobs processes that run side by side
            groups = [g[k :: self.n_jobs] for g in groups for k in range(min(self.n_jobs, len(g)))]
        log.info(
            f"Launching {len(specs)} jobs as {len(groups)} pack(s)"
            + (f", {self.n_jobs} at a time in worker processes" if self.n_jobs > 1 else " in this process")
        )
        for g, group in enumerate(groups):
            for i in group:
                log.info(
                    f"\tpack {g} #{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}"
                )
        if self.n_jobs > 1:
            from joblib import Parallel, delayed  # the `launchers` extra, as hydra/launcher=parallel

            results = Parallel(n_jobs=self.n_jobs, backend="loky")(
                delayed(run_jobs)([specs[i] for i in group]) for group in groups
            )
        else:
            results = (run_jobs([specs[i] for i in group]) for group in groups)
        for group, outcomes in zip(groups, results):
            for i, outcome in zip(group, outcomes):
                rets[i].return_value = outcome.value
                rets[i].status = JobStatus.FAILED if outcome.status == "failed" else JobStatus.COMPLETED
        return rets
