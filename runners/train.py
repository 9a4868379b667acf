"""The training loop: evaluate, measure variance, step, log, checkpoint; then the final test evaluation.

Everything a run writes goes into its run directory: ``config.yaml`` (resolved), ``metrics.jsonl``,
``checkpoint.pt`` (model, optimiser, estimator state, RNG states, step; written atomically), ``summary.json``
and ``DONE`` (written last, marks a finished run). Re-running with the same run directory resumes from the
checkpoint with no repeated and no missing steps (and refuses a checkpoint written under another config).
Models with a ``generate(n)`` method also leave ``samples.png``, and sample images in W&B at every evaluation.
"""

from __future__ import annotations

import errno
import functools
import math
import pickle
import time
import zipfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from estimators.base import Estimator, MovingAverage, member_streams
from models.base import LatentVariableModel
from runners.checks import (
    ConfigError,
    check_config,
    check_resume,
    clean_cause,
    load_estimator_config,
    one_line,
)
from runners.interrupt import GracefulStop, RunInterrupted
from runners.logger import CHECKPOINT, DONE, SUMMARY, RunLogger
from runners.trajectory import bias_metrics
from runners.utils import (
    atomic_json,
    atomic_torch_save,
    git_revision,
    resolve_device,
    rng_state,
    seed_everything,
    set_rng_state,
)
from runners.variance import gradient_variance

SAMPLES_PNG = "samples.png"
N_SAMPLE_IMAGES = 64
#: errno values of a write that cannot succeed where it is: full disk, quota, read-only file system, no permission
STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG)


class Diverged(RuntimeError):
    """Training produced a non-finite or runaway cost: the run ends as failed (no DONE)."""


class CheckpointError(ConfigError):
    """A checkpoint that cannot be read back (corrupt, truncated, not ours): named, with what to do."""


class StorageError(RuntimeError):
    """A run file could not be written (disk full, read-only, no permission): named, with what to do."""


@dataclass
class Run:
    """The objects of one run, built from the config (values known only at run time passed as arguments)."""

    data: Any
    model: LatentVariableModel
    estimator: Estimator
    basket: dict[str, Estimator]
    optimizer: torch.optim.Optimizer
    device: torch.device
    reference: Estimator | None = (
        None  # variance.bias.reference: the unbiased estimator bias is measured against
    )
    basket_optimizer: torch.optim.Optimizer | None = None  # trains the basket estimators' own nets (IDB)

    def measured(self, name: str) -> dict[str, Estimator]:
        """The estimators measured at each ``variance.every``: the running one (``name``) and the basket."""
        return {**self.basket, name: self.estimator}


def build_optimizer(
    cfg: DictConfig, model: torch.nn.Module, estimator: torch.nn.Module
) -> torch.optim.Optimizer:
    """Adam or SGD with momentum; the estimator's own parameters (baseline nets) get ``estimator_lr``."""
    groups = [{"params": list(model.parameters()), "lr": float(cfg.lr)}]
    est_params = list(estimator.parameters())
    if est_params:
        groups.append({"params": est_params, "lr": float(cfg.get("estimator_lr") or cfg.lr)})
    if cfg.name == "adam":
        return torch.optim.Adam(
            groups,
            betas=tuple(cfg.get("betas", (0.9, 0.999))),
            weight_decay=float(cfg.get("weight_decay", 0.0)),
        )
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, momentum=float(cfg.get("momentum", 0.9)), weight_decay=float(cfg.get("weight_decay", 0.0))
        )
    raise ValueError(f"optim.name={cfg.name!r}: choose adam or sgd")


def build(cfg: DictConfig, data_cache: dict[str, Any] | None = None) -> Run:
    """The run's objects, seeded by ``cfg.seed``. ``data_cache``: datasets already loaded in this process, by
    data config and device (members of a pack share one copy; loading draws no random numbers)."""
    check_config(cfg)  # before any data is loaded
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seed_everything(int(cfg.seed))
    key = f"{device}|{OmegaConf.to_yaml(cfg.data, resolve=True)}"
    try:
        data = (
            data_cache[key]
            if data_cache is not None and key in data_cache
            else instantiate(cfg.data, device=device)
        )
    except Exception as err:  # noqa: BLE001 - instantiate wraps the constructor's error: look at the cause
        e = clean_cause(err, (PermissionError,))
        if e is None:
            raise
        from data.common import DataError

        # an unreadable data folder or file: name it (the bare PermissionError may not)
        raise DataError(
            f"cannot read {e.filename or cfg.data.get('root')}: permission denied. Make it readable by this user "
            f"(chmod / ask its owner), or point data.root at a readable copy"
        ) from None
    if data_cache is not None:
        data_cache[key] = data
    model = instantiate(cfg.model, x_dim=data.x_dim, train_mean=data.train_mean.to(device)).to(device)
    estimator = instantiate(cfg.estimator, context_dim=model.context_dim).to(device)
    basket = {  # the running estimator is measured as itself (with its trained state), not as a fresh copy
        name: instantiate(load_estimator_config(name), context_dim=model.context_dim).to(device)
        for name in cfg.variance.basket
        if name != cfg.estimator.name
    }
    optimizer = build_optimizer(cfg.optim, model, estimator)
    basket_params = [p for est in basket.values() for p in est.parameters()]
    basket_optimizer = None
    if basket_params:  # same optimiser and rate as the running estimator's own nets
        basket_optimizer = build_optimizer(
            cfg.optim, torch.nn.Module(), torch.nn.ParameterList(basket_params)
        )
    reference = None
    if cfg.variance.get("bias") is not None:
        ref_name = cfg.variance.bias.reference
        reference = instantiate(load_estimator_config(ref_name), context_dim=model.context_dim).to(device)
        if not getattr(reference, "unbiased", False):  # e.g. REINFORCE with a normalised signal
            raise ConfigError(
                f"variance.bias.reference={ref_name!r} is biased as configured: choose an unbiased one"
            )
    return Run(data, model, estimator, basket, optimizer, device, reference, basket_optimizer)


@torch.no_grad()
def evaluate(
    model: LatentVariableModel,
    split,
    batch_size: int,
    n_samples: int = 1,
    chunk: int = 100,
    max_examples: int | None = None,
    progress: str | None = None,
) -> float:
    """Mean over the split of the bound with ``n_samples`` importance samples (1 = the ELBO).

    ``progress``: a description for a progress bar (the m = 1000 bound over 10,000 images takes minutes)."""
    model.eval()
    total, count = 0.0, 0
    if max_examples is not None and max_examples < split.n:
        # evenly spaced examples, not the first N: the test file is ordered (its first images are harder)
        idx = torch.linspace(0, split.n - 1, int(max_examples)).long()  # [N']
        batches = (split.batch(i) for i in idx.split(batch_size))
        n_batches = math.ceil(len(idx) / batch_size)
    else:
        batches = split.batches(batch_size)
        n_batches = math.ceil(split.n / batch_size)
    if progress is not None:
        batches = tqdm(
            batches, total=n_batches, desc=progress, dynamic_ncols=True, mininterval=1.0, leave=False
        )
    for x in batches:
        if n_samples == 1:
            b = model.elbo(x)  # [B]
        else:
            b = model.bound(x, n_samples=n_samples, chunk=chunk)  # [B]
        total += b.sum().item()
        count += x.shape[0]
    model.train()
    return total / max(count, 1)


def save_checkpoint(
    path: Path,
    run: Run,
    step: int,
    batch_gen: torch.Generator,
    logger: RunLogger,
    elapsed: float,
    divergence_ref: float | None = None,
) -> None:
    logger.flush()  # W&B receives what metrics.jsonl holds up to this checkpoint
    atomic_torch_save(
        {
            "step": step,
            "model": run.model.state_dict(),
            "estimator": run.estimator.state_dict(),
            "optimizer": run.optimizer.state_dict(),
            "rng": rng_state(),
            "batch_gen": batch_gen.get_state(),
            "metrics_lines": logger.lines,
            "elapsed": elapsed,
            "basket": {name: est.state_dict() for name, est in run.basket.items()},
            "basket_optimizer": run.basket_optimizer.state_dict() if run.basket_optimizer else None,
            "divergence_ref": divergence_ref,
        },
        path,
    )


@dataclass
class Job:
    """One job to train: its config, its run directory and its W&B group (run.py passes the sweep's; default
    logger.group, experiment_name, model name)."""

    cfg: DictConfig
    run_dir: Path
    group: str | None = None


def train(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict[str, Any]:
    """Train per ``cfg`` in ``run_dir`` (resuming from its checkpoint if there is one); returns the summary.

    A single run is a pack of one member (:func:`train_pack`): there is one training loop."""
    (result,) = train_pack([Job(cfg, Path(run_dir), group)])
    if isinstance(result, BaseException):
        raise result
    return result


def train_pack(jobs: list[Job]) -> list[dict[str, Any] | BaseException]:
    """Train ``jobs`` in one process, in lock step: each round, every member takes its next step.

    Each member is exactly the single run of its job: its own seed-derived RNG stream (the global torch /
    Python RNG state is swapped in for its turn and saved after it), its own minibatch generator, model,
    estimator (moving averages, baseline nets, schedules) and optimiser, its own run directory with the files
    a single run leaves (config.yaml, metrics.jsonl, checkpoint.pt, summary.json, DONE, W&B run). So a member
    of a pack and the same job run alone produce the same numbers, and a packed job resumes like a single one.
    Jobs with the same data config share one copy of the data on the device.

    Returns one entry per job: its summary, or the exception that ended it (a member that fails, e.g. diverges,
    stops alone and the others go on). A signal (SIGTERM / SIGINT) checkpoints every member at its current step
    and raises :class:`RunInterrupted` for the whole pack.
    """
    results: list[dict[str, Any] | BaseException | None] = [None] * len(jobs)
    data_cache: dict[str, Any] = {}
    members: list[Member] = []
    for i, job in enumerate(jobs):
        try:
            members.append(open_member(i, job, data_cache))
        except Exception as e:  # noqa: BLE001 - a bad checkpoint, data or config fails its own job only
            results[i] = e
    exit_code = 1
    with GracefulStop() as stop:
        try:
            _loop(members, stop)
            exit_code = 0
        except RunInterrupted as e:
            exit_code = e.exit_code
            raise
        finally:
            for m in members:  # flushes metrics.jsonl and the W&B runs (offline: every record on disk)
                m.close(0 if m.summary is not None else (1 if m.error is not None else exit_code))
            teardown_wandb(members)
            if exit_code not in (0, 1):
                stop.chain()  # a launcher's own handler (submitit requeues on SIGUSR2), after the checkpoint
    for m in members:
        if m.summary is not None:
            # written last, after the W&B run is complete on disk: a sweep skips runs that have DONE
            atomic_json(m.summary, m.run_dir / SUMMARY)
            (m.run_dir / DONE).write_text("finished\n")
        results[m.index] = m.summary if m.summary is not None else m.error
    return results  # type: ignore[return-value]


def open_member(index: int, job: Job, data_cache: dict[str, Any] | None = None) -> Member:
    """Everything a job needs before its first step: checks, checkpoint, objects, logger (in that order, so a
    bad checkpoint is answered before the data loads and nothing in the directory is touched)."""
    cfg, run_dir = job.cfg, Path(job.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_resume(resolved, run_dir)  # before anything is loaded or overwritten
    for tmp in run_dir.glob(".*.tmp"):  # half-written files of a process killed mid-write (we hold the lock)
        tmp.unlink(missing_ok=True)
    ckpt_path = run_dir / CHECKPOINT
    ckpt = load_checkpoint(ckpt_path, torch.device("cpu")) if ckpt_path.exists() else None
    run = build(cfg, data_cache)
    # minibatch indices, drawn where the data lives: on CUDA no index copy (a host sync) per step
    batch_gen = torch.Generator(device=run.device if run.device.type == "cuda" else "cpu").manual_seed(
        int(cfg.seed)
    )

    start, elapsed, resume_lines, div_ref = 0, 0.0, None, None
    if ckpt is not None:
        try:
            restore(run, ckpt, batch_gen)
            start, elapsed, resume_lines = (
                int(ckpt["step"]),
                float(ckpt["elapsed"]),
                int(ckpt["metrics_lines"]),
            )
        except (
            KeyError,
            RuntimeError,
            ValueError,
            TypeError,
        ) as e:  # a checkpoint of another model / version
            raise CheckpointError(
                bad_checkpoint(ckpt_path, f"it does not fit this run ({one_line(e)})")
            ) from None
        div_ref = ckpt.get("divergence_ref")
        print(f"resuming from {ckpt_path} at step {start}")

    resolved["git_rev"] = git_revision()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    model_name = cfg.model.get("name", "model")
    est_name = cfg.estimator.get("name", "estimator")
    lg = cfg.logger
    logger = RunLogger(
        run_dir,
        resolved,
        mode=lg.mode,
        project=lg.project,
        entity=lg.get("entity"),
        group=job.group or lg.get("group") or cfg.get("experiment_name") or f"{model_name}",
        job_type=est_name,
        name=f"{model_name}-{est_name}-{cfg.seed}",
        tags=list(lg.get("tags") or []),
        resume_lines=resume_lines,
        init_timeout=float(lg.get("init_timeout") or 15.0),
    )
    return Member(index, job, run, logger, batch_gen, start, elapsed, div_ref)


class Member:
    """One job being trained (alone, or as one member of a pack): its objects, files, RNG state and progress."""

    def __init__(self, index, job, run, logger, batch_gen, start, elapsed, div_ref):
        self.index, self.job, self.cfg, self.run_dir = index, job, job.cfg, Path(job.run_dir)
        self.run: Run = run
        self.logger: RunLogger = logger
        self.train_split, self.val_split, self.test_split = (
            run.data.split(s) for s in ("train", "valid", "test")
        )
        self.batch_gen = batch_gen
        self.start = self.step = start  # updates done
        self.steps = int(self.cfg.train.steps)
        self.elapsed = elapsed  # training seconds of earlier processes, plus this one's turns so far
        self.watch = DivergenceWatch(float(self.cfg.train.get("divergence_factor") or 0.0), div_ref, self.cfg)
        self.estimate = estimate_fn(self.cfg.train.get("compile"))  # train.compile: eager or torch.compile'd
        self.member_dim_key = member_dim_key(self.cfg, run)  # None: steps alone
        self.var_batch: torch.Tensor | None = None
        self.last_var = float("nan")
        self.train_elbo = float("nan")
        self.saved_step = start  # the step of the last checkpoint
        self.rng = rng_state()  # this member's stream, swapped in for its turns when it shares the process
        self.summary: dict[str, Any] | None = None
        self.error: BaseException | None = None
        self.closed = False

    @functools.cached_property
    def own_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """This member's parameters and running statistics (its estimator's moving averages), named as in a
        ``_Pair`` of its model and estimator: what a step with a member dimension stacks. Gathered once: the
        optimiser, the statistics and a checkpoint's restore update these tensors in place."""
        run = self.run
        params = {
            f"{prefix}.{k}": p
            for prefix in ("model", "estimator")
            for k, p in getattr(run, prefix).named_parameters()
        }
        stats = {
            f"estimator.{name}.{b}": t
            for name, mod in run.estimator.named_modules()
            if isinstance(mod, MovingAverage)
            for b, t in mod.named_buffers(recurse=False)
        }
        return params, stats

    @property
    def active(self) -> bool:
        return self.summary is None and self.error is None

    def fail(self, e: BaseException) -> None:
        if isinstance(e, OSError) and e.errno in STORAGE_ERRNOS:
            err: BaseException = StorageError(storage_message(e, self.run_dir))
            err.__cause__ = e
            e = err
        self.error = e
        self.close(1)

    def close(self, exit_code: int) -> None:
        if not self.closed:
            self.closed = True
            self.logger.finish(exit_code, teardown=False)


def teardown_wandb(members: list[Member]) -> None:
    """Wait for W&B's service to write every run's last records (once, after all members finished)."""
    if any(m.logger.used_wandb for m in members):
        import wandb

        wandb.teardown()


def _loop(members: list[Member], stop: GracefulStop) -> None:
    """Lock-step rounds over the active members until each has finished (or failed)."""
    swap = len(members) > 1  # alone, a member keeps the process's RNG: nothing to swap
    quiet = all(bool(m.cfg.get("quiet", False)) for m in members)
    first = members[0].cfg if members else None
    desc = "" if first is None else f"{first.model.name}/{first.estimator.name}"
    if len(members) > 1:
        desc = f"pack of {len(members)}: {desc}"
    bar = tqdm(
        total=sum(m.steps - m.start for m in members),
        desc=desc,
        dynamic_ncols=True,
        mininterval=1.0,
        disable=quiet,
        unit="step" if len(members) == 1 else "member-step",
    )

    def stepped(m: Member) -> None:
        bar.update(1)
        if len(members) == 1:
            bar.set_postfix(elbo=f"{m.train_elbo:.2f}", log10_var=f"{m.last_var:.2f}", refresh=False)

    active = [m for m in members if m.active]
    while active:
        for group in _groups(active):
            _round(group, stop, swap, stepped)
        active = [m for m in active if m.active]
        if stop.requested and active:
            for m in active:  # members that stepped before the signal came: checkpoint where they are
                with _turn(m, swap):
                    try:
                        if m.saved_step != m.step:
                            _checkpoint(m)
                    except Exception as e:  # noqa: BLE001
                        m.fail(e)
            bar.close()
            stopped = [m for m in active if m.active]
            if stopped:
                where = (
                    str(stopped[0].run_dir)
                    if len(members) == 1
                    else f"the {len(stopped)} unfinished run directories"
                )
                raise RunInterrupted(stop.requested, stopped[0].step, where)
    bar.close()


def _round(group: list[Member], stop: GracefulStop, swap: bool, stepped=None) -> None:
    """One lock-step round of ``group`` (members stepped together, or one member): each member's next step
    with what falls on it, or its final evaluation once its steps are done. A member that fails stops alone
    (members stepped together fail together when their joint step does). ``stepped(m)`` after each step."""
    stepping: list[tuple[Member, torch.Tensor]] = []  # the members that take a step, with their minibatch
    for m in group:
        with _turn(m, swap):
            try:
                if m.step < m.steps:
                    stepping.append((m, _prepare(m)))
                else:
                    m.summary = _final(m)
            except Exception as e:  # noqa: BLE001 - this member fails alone; the pack goes on
                m.fail(e)
    try:
        outcomes = _gradients(stepping, swap)
    except Exception as e:  # noqa: BLE001
        for m, _ in stepping:
            m.fail(e)
        return
    for (m, x), outcome in zip(stepping, outcomes):
        if isinstance(outcome, Exception):
            m.fail(outcome)
            continue
        with _turn(m, swap):
            try:
                _update(m, x, *outcome, stop)
                if stepped is not None:
                    stepped(m)
            except Exception as e:  # noqa: BLE001
                m.fail(e)


@contextmanager
def _turn(m: Member, swap: bool):
    """Run a piece of member ``m``'s work on its own RNG stream (when it shares the process) and clock."""
    if swap:
        set_rng_state(m.rng)
    tick = time.perf_counter()
    try:
        yield
    finally:
        m.elapsed += time.perf_counter() - tick
        if swap:
            m.rng = rng_state()


def _prepare(m: Member) -> torch.Tensor:
    """What comes before member ``m``'s next step (the evaluation and variance measurement that fall on it);
    returns the step's minibatch."""
    cfg, run, logger = m.cfg, m.run, m.logger
    model = run.model
    t, ev, var_cfg = cfg.train, cfg.eval, cfg.variance
    step = m.step
    # --- evaluate (after `step` updates)
    if step % int(t.eval_every) == 0:
        val = evaluate(model, m.val_split, int(ev.batch_size), 1, max_examples=t.get("val_examples"))
        logger.log({"val/elbo": val, "time/elapsed": m.elapsed}, step)
        if logger.wandb is not None and hasattr(model, "generate"):
            logger.log_images(
                "samples", sample_grid(model, int(cfg.seed) + step), step, caption=f"step {step}"
            )
    # --- gradient variance at these parameters, on one fixed minibatch
    if int(var_cfg.every) > 0 and step % int(var_cfg.every) == 0:
        if m.var_batch is None:  # drawn off the training stream: the same batch after a resume
            device = run.device
            with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
                torch.manual_seed(int(cfg.seed) + 1)  # dynamic binarization draws its pixels from it
                m.var_batch = m.train_split.sample_batch(
                    int(var_cfg.batch_size), torch.Generator().manual_seed(int(cfg.seed) + 1)
                )
        metrics = {}
        for name, est in run.measured(cfg.estimator.name).items():
            stats = gradient_variance(model, est, m.var_batch, int(var_cfg.samples), seed=step)
            metrics.update({f"grad/{name}/{k}": v for k, v in stats.items()})
        if run.reference is not None:  # bias against the unbiased reference (runners/trajectory.py)
            metrics.update(
                bias_metrics(
                    model,
                    run.measured(cfg.estimator.name),
                    m.var_batch,
                    int(var_cfg.samples),
                    run.reference,
                    int(var_cfg.bias.samples),
                    seed=step,
                )
            )
        m.last_var = metrics.get(f"grad/{cfg.estimator.name}/log10_var", float("nan"))
        logger.log(metrics, step)
    return m.train_split.sample_batch(int(t.batch_size), m.batch_gen)  # [B, X]


def _gradients(
    stepping: list[tuple[Member, torch.Tensor]], swap: bool
) -> list[tuple[torch.Tensor, dict[str, Any]] | Exception]:
    """The step's gradient estimates of ``stepping`` (members of one group, with their minibatches), left in
    each member's ``.grad``; returns each member's cost ``[S, B]`` and diagnostics, or the error that stops
    that member alone."""
    if len(stepping) != 1:
        return _member_dim_gradients(stepping) if stepping else []
    ((m, x),) = stepping
    with _turn(m, swap):
        surrogate, cost, diagnostics = m.estimate(m.run.model, m.run.estimator, x)
        m.run.optimizer.zero_grad(set_to_none=True)
        surrogate.backward()
    return [(cost, diagnostics)]


def member_dim_key(cfg: DictConfig, run: Run) -> str | None:
    """Members with equal keys take their steps together with a member dimension (``train.member_dim``): same
    model, estimator, data, batch size and device, a model and an estimator that support it, eager steps.
    None: the member steps alone. (Computed once per member: serialising the config takes milliseconds.)"""
    if not (cfg.train.get("member_dim") and run.model.member_dim and run.estimator.member_dim):
        return None
    if cfg.train.get("compile"):
        return None
    part = {k: cfg.get(k) for k in ("model", "estimator", "data", "device")}
    part["batch_size"] = cfg.train.batch_size
    return OmegaConf.to_yaml(OmegaConf.create(part), resolve=True)


def _groups(active: list[Member]) -> list[list[Member]]:
    """This round's groups, in member order: members stepped together (:func:`member_dim_key`), and every
    other member alone."""
    groups: dict[str, list[Member]] = {}
    out: list[list[Member]] = []
    for m in active:
        key = m.member_dim_key
        if key is None:
            out.append([m])
        elif key in groups:
            groups[key].append(m)
        else:
            groups[key] = [m]
            out.append(groups[key])
    return out


class _Pair(torch.nn.Module):
    """A model and its estimator as one module, so that ``functional_call`` swaps both's tensors at once."""

    def __init__(self, model: LatentVariableModel, estimator: Estimator):
        super().__init__()
        self.model, self.estimator = model, estimator

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        return _estimate(self.model, self.estimator, x)


def _member_dim_gradients(
    stepping: list[tuple[Member, torch.Tensor]],
) -> list[tuple[torch.Tensor, dict[str, Any]] | Exception]:
    """One step's gradient estimates of M members at once (models/members.py): the first member's model and
    estimator run with every member's parameters and moving averages stacked ``[M, ...]`` and the minibatches
    concatenated member after member, each member's rows drawn on its own random stream. ``torch.stack`` is
    differentiable, so the backward pass leaves each member's gradient in its own parameters' ``.grad`` (the
    surrogate is a mean over the M*B rows: times M, it is the sum of the members' own surrogates, and no
    member's parameters reach another's rows), and the updated moving averages are copied back. Each member's
    optimiser then takes its step as a single run's would."""
    members = [m for m, _ in stepping]
    n, lead = len(members), members[0].run
    tick = time.perf_counter()
    own = [m.own_tensors for m in members]  # (parameters, running statistics) of each member
    params = {k: torch.stack([o[0][k] for o in own]) for k in own[0][0]}  # [M, ...] each
    stats = {k: torch.stack([o[1][k] for o in own]) for k in own[0][1]}  # [M] each, updated in place
    for m in members:
        m.run.optimizer.zero_grad(set_to_none=True)

    failed: dict[int, Exception] = {}  # a member whose draw failed (NaN probabilities): it stops alone

    def turns(i: int, draw):
        set_rng_state(members[i].rng)
        try:
            return draw()
        except Exception as e:  # noqa: BLE001 - the member's single run would have failed here
            failed.setdefault(i, e)
            return None
        finally:
            members[i].rng = rng_state()

    x = torch.cat([x for _, x in stepping])  # [M*B, X], member after member
    with member_streams(n, turns):
        surrogate, cost, diagnostics = torch.func.functional_call(
            _Pair(lead.model, lead.estimator), {**params, **stats}, (x,)
        )
    (surrogate * n).backward()
    with torch.no_grad():
        for k, stacked in stats.items():
            for o, value in zip(own, stacked):
                o[1][k].copy_(value)
    share = (time.perf_counter() - tick) / n
    for m in members:
        m.elapsed += share
    costs = cost.split([x.shape[0] for _, x in stepping], dim=-1)  # M x [S, B]
    return [
        failed[i]
        if i in failed
        else (
            c,
            {k: v[i] if isinstance(v, torch.Tensor) and v.dim() == 1 else v for k, v in diagnostics.items()},
        )
        for i, c in enumerate(costs)
    ]


def _update(
    m: Member, x: torch.Tensor, cost: torch.Tensor, diagnostics: dict[str, Any], stop: GracefulStop
) -> None:
    """Member ``m``'s step from the gradients in place, with the logging and checkpoint that fall on it."""
    cfg, run, logger = m.cfg, m.run, m.logger
    model, estimator, opt = run.model, run.estimator, run.optimizer
    t, step = cfg.train, m.step
    opt.step()
    estimator.step += 1
    if run.basket:
        follow_trajectory(run, model, x)
    done = m.step = step + 1
    m.watch.add(cost, done)  # on the device: no host synchronisation here
    log_now = done % int(t.log_every) == 0
    ckpt_now = done % int(t.checkpoint_every) == 0 or done == m.steps or bool(stop.requested)
    if log_now or ckpt_now:
        # the only host synchronisation of the step, and never a checkpoint of a diverged model
        m.train_elbo = -m.watch.check(done)
    if log_now:
        logger.log(
            {
                "train/elbo": m.train_elbo,
                **{f"train/{k}": v for k, v in diagnostics.items()},
                "time/elapsed": m.elapsed,
            },
            done,
        )
    if ckpt_now:
        _checkpoint(m, checked=True)


def _estimate(
    model: LatentVariableModel, estimator: Estimator, x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """The step's gradient estimate on minibatch ``x``: (surrogate, cost ``[S, B]``, diagnostics)."""
    est = estimator(model.cost_fn(x), model.context(x))
    return est.surrogate, est.cost, est.diagnostics


@functools.cache
def _compiled(mode: str):
    """``_estimate`` through ``torch.compile`` in ``mode``, built once per mode and process."""
    import torch._inductor.config as inductor_config

    inductor_config.fallback_random = True  # random draws through eager's generator (see estimate_fn)
    return torch.compile(_estimate, mode=mode)


def estimate_fn(setting: bool | str | None):
    """``train.compile``: the step's estimate eager (false, the default), or through ``torch.compile`` (true =
    mode "default", or a mode name), forward and backward (AOTAutograd). One compiled function per mode in a
    process: the members of a pack share its graphs (Dynamo guards on shapes and classes, not on the module
    instances). Random draws fall back to eager's generator (``fallback_random``), so a compiled run draws the
    same numbers as an eager one and its checkpoints resume alike: compiling changes the speed, not the
    trajectory (bench/bench_compile.py measures both). MuProp's ``autograd.grad`` and the samplers' leaf
    tensors break the graph into pieces; each piece is compiled."""
    if setting is None or setting is False:
        return _estimate
    return _compiled("default" if setting is True else str(setting))


def _checkpoint(m: Member, checked: bool = False) -> None:
    """Save member ``m`` at its current step (the divergence watch is read first unless it just was)."""
    if not checked:
        m.train_elbo = -m.watch.check(m.step)
    save_checkpoint(
        m.run_dir / CHECKPOINT, m.run, m.step, m.batch_gen, m.logger, m.elapsed, m.watch.reference
    )
    m.saved_step = m.step


def _final(m: Member) -> dict[str, Any]:
    """The final evaluation of member ``m`` (after its last step): validation, test ELBO and bound, plots."""
    cfg, model, logger = m.cfg, m.run.model, m.logger
    steps, elapsed, quiet = m.steps, m.elapsed, bool(cfg.get("quiet", False))
    t, ev = cfg.train, cfg.eval
    bs, mm = int(ev.batch_size), int(ev.samples)
    limit = ev.get("test_examples")
    result = {
        "val/elbo": evaluate(model, m.val_split, bs, 1, max_examples=t.get("val_examples")),
        "test/elbo": evaluate(model, m.test_split, bs, 1, max_examples=limit),
        f"test/bound_{mm}": evaluate(
            model,
            m.test_split,
            bs,
            mm,
            int(ev.chunk),
            max_examples=limit,
            progress=None if quiet else f"test bound (m={mm})",
        ),
    }
    if hasattr(model, "kl_to_target"):  # SVI of a target with a known normaliser (models/mixture_svi.py)
        result["test/kl_to_target"] = float(model.kl_to_target())
    bad = {k: v for k, v in result.items() if not math.isfinite(v)}
    if bad:
        raise Diverged(
            f"the final evaluation is not finite ({', '.join(f'{k}={v}' for k, v in bad.items())}): the model "
            f"diverged; lower optim.lr (now {cfg.optim.lr}) and run again in a new directory"
        )
    logger.log(result, steps)
    if hasattr(model, "plot") and getattr(model, "latent_dim", 2) == 2:  # 2-D: target and fitted density
        path = model.plot(m.run_dir / "density.png")
        logger.log_images("density", str(path), steps, caption="target and fitted density")
    columns = ["model", "estimator", "seed", "steps", "test/elbo", f"test/bound_{mm}", "train_seconds"]
    logger.log_table(
        "test/table",
        columns,
        [
            [
                cfg.model.name,
                cfg.estimator.name,
                int(cfg.seed),
                steps,
                result["test/elbo"],
                result[f"test/bound_{mm}"],
                elapsed,
            ]
        ],
        steps,
    )
    if hasattr(model, "generate"):
        grid = sample_grid(model, int(cfg.seed) + steps)
        save_png(grid, m.run_dir / SAMPLES_PNG)
        logger.log_images("samples", grid, steps, caption=f"step {steps}")
    summary = {
        "model": cfg.model.name,
        "estimator": cfg.estimator.name,
        "seed": int(cfg.seed),
        "steps": steps,
        "train/elbo": m.train_elbo,
        **result,
        "eval_samples": mm,
        "train_seconds": elapsed,
        "run_dir": str(m.run_dir),
        "wandb_sync": logger.sync_command(),
    }
    logger.summary(summary)
    return summary


def bad_checkpoint(path: Path, why: str) -> str:
    return (
        f"cannot resume from {path}: {why}. Delete it to restart this run from step 0 (rm {path}), or give "
        f"the run another directory (hydra.run.dir=... / hydra.sweep.dir=...)"
    )


def load_checkpoint(path: Path, device: torch.device) -> dict[str, Any]:
    """A checkpoint written by ``save_checkpoint``, loaded with ``weights_only=True``: tensors, numbers,
    strings and containers only, so a crafted file cannot run code. Any failure is one named error."""
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, OSError) as e:
        why = "it is truncated or corrupt, or holds objects other than tensors and numbers"
        raise CheckpointError(bad_checkpoint(path, f"{why} ({one_line(e)[:200]})")) from None
    needed = ("step", "model", "estimator", "optimizer", "rng", "batch_gen", "metrics_lines", "elapsed")
    missing = [k for k in needed if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            bad_checkpoint(path, f"it is not a checkpoint of this project (no {', '.join(missing)})")
        )
    return ckpt


def restore(run: Run, ckpt: dict[str, Any], batch_gen: torch.Generator) -> None:
    run.model.load_state_dict(ckpt["model"])
    run.estimator.load_state_dict(ckpt["estimator"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    set_rng_state(ckpt["rng"])
    batch_gen.set_state(ckpt["batch_gen"])
    for name, state in ckpt.get("basket", {}).items():
        if name in run.basket:
            run.basket[name].load_state_dict(state)
    if run.basket_optimizer is not None and ckpt.get("basket_optimizer") is not None:
        run.basket_optimizer.load_state_dict(ckpt["basket_optimizer"])


def storage_message(e: OSError, run_dir: Path) -> str:
    what = {
        errno.ENOSPC: "the disk is full",
        errno.EDQUOT: "the disk quota is exceeded",
        errno.EROFS: "the file system is read-only",
        errno.EFBIG: "the file is too large for the file system",
    }.get(e.errno, "permission denied")
    where = e.filename or run_dir
    return (
        f"cannot write {where}: {what}. Free space (or fix permissions) there, or give the run another "
        f"directory (hydra.run.dir=...); the last checkpoint in {run_dir} is intact and the same command resumes from it"
    )


class DivergenceWatch:
    """Non-finite or runaway training costs, tracked on the device and read only at log / checkpoint steps.

    Diverged when any step's mean cost is not finite, or when the mean cost of a log window exceeds, in absolute
    value, ``factor`` times the cost of the first step, at the initial parameters (taken as at least 100 nats;
    kept in the checkpoint): an SBN on MNIST starts near 550 nats and ends near 100, while Adam at lr 1e4
    reaches millions. ``factor`` 0 turns the runaway test off (non-finite costs still fail).
    """

    def __init__(self, factor: float, reference: float | None, cfg):
        self.factor, self.reference, self.cfg = factor, reference, cfg
        self.total: torch.Tensor | None = None  # [] sum of the window's per-step mean costs
        self.count = 0
        self.first_bad: torch.Tensor | None = None  # [] first step with a non-finite cost, -1 if none
        self._ref: torch.Tensor | None = None  # [] |cost| of the first step, until read

    def add(self, cost: torch.Tensor, step: int) -> None:
        c = cost.detach().mean()  # []
        if self.reference is None and self._ref is None:
            self._ref = c.abs()  # [] the first step's cost: at the initial parameters
        if self.total is None:
            self.total = torch.zeros((), dtype=c.dtype, device=c.device)
            self.first_bad = torch.full((), -1, dtype=torch.long, device=c.device)
        self.total = self.total + c
        self.count += 1
        bad = (~torch.isfinite(c)) & (self.first_bad < 0)
        self.first_bad = torch.where(bad, torch.full_like(self.first_bad, step), self.first_bad)

    def check(self, step: int) -> float:
        """The window's mean cost (then reset); raises :class:`Diverged`."""
        if self.total is None or self.count == 0:
            return float("nan")
        mean, first_bad = (self.total / self.count).item(), int(self.first_bad.item())
        self.total, self.count = None, 0
        lr = self.cfg.optim.lr
        if first_bad >= 0:
            raise Diverged(
                f"training diverged at step {first_bad}: the training cost is not finite; lower optim.lr "
                f"(now {lr}) and run again in a new directory (the checkpoint before it is kept)"
            )
        if self.reference is None and self._ref is not None:
            self.reference = float(self._ref.item())  # finite: a non-finite first step failed above
        limit = self.factor * max(self.reference, 100.0)
        if self.factor > 0 and abs(mean) > limit:
            raise Diverged(
                f"training diverged by step {step}: the mean training cost is {mean:.4g}, over "
                f"train.divergence_factor={self.factor:g} times its start ({self.reference:.4g}); lower optim.lr "
                f"(now {lr}) and run again in a new directory, or raise train.divergence_factor"
            )
        return mean


def follow_trajectory(run: Run, model: LatentVariableModel, x: torch.Tensor) -> None:
    """Let the basket estimators' running state learn along the trajectory (runners/trajectory.py).

    Each basket estimator sees the training minibatch as if it were the one training: its moving averages are
    updated, its own nets (input-dependent baselines) take a step on their own loss, its schedule advances.
    The model is not touched (only the estimators' parameters are differentiated) and the RNG is forked, so
    the trajectory is the running estimator's alone. Without this, a stateful estimator in the basket would be
    measured with its initial state (e.g. REINFORCE with a moving-average baseline stuck at zero).
    """
    device = x.device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        losses = []
        for est in run.basket.values():
            out = est(model.cost_fn(x), model.context(x))
            if any(True for _ in est.parameters()):
                losses.append(out.surrogate)
            est.step += 1
        if run.basket_optimizer is not None and losses:
            params = [p for group in run.basket_optimizer.param_groups for p in group["params"]]
            grads = torch.autograd.grad(sum(losses), params, allow_unused=True)  # estimator nets only
            for p, g in zip(params, grads):
                p.grad = g
            run.basket_optimizer.step()


@torch.no_grad()
def sample_grid(model: LatentVariableModel, seed: int, n: int = N_SAMPLE_IMAGES) -> Any:
    """``model.generate(n)`` pixel probabilities as one square grid image (numpy [H, W], values in [0, 1]).

    The RNG is forked and seeded: drawing images never changes the training trajectory."""
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.eval()
        probs = model.generate(n).float().cpu()  # [n, X]
        model.train()
    side = int(round(math.sqrt(probs.shape[1])))  # 28 for MNIST
    if side * side != probs.shape[1]:  # not square images: one row per sample
        return probs.numpy()
    rows = int(math.ceil(math.sqrt(n)))
    grid = torch.full((rows * (side + 2), rows * (side + 2)), 0.5)  # [H, W] grey gaps between images
    for i, img in enumerate(probs.view(n, side, side)):  # [side, side]
        r, c = divmod(i, rows)
        grid[
            r * (side + 2) + 1 : r * (side + 2) + 1 + side, c * (side + 2) + 1 : c * (side + 2) + 1 + side
        ] = img
    return grid.numpy()


def save_png(image: Any, path: Path) -> None:
    import matplotlib.image

    matplotlib.image.imsave(str(path), image, cmap="gray", vmin=0.0, vmax=1.0)
