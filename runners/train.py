"""The training loop: evaluate, measure variance, step, log, checkpoint; then the final test evaluation.

Everything a run writes goes into its run directory: ``config.yaml`` (resolved), ``metrics.jsonl``,
``checkpoint.pt`` (model, optimiser, estimator state, RNG states, step; written atomically), ``summary.json``
and ``DONE`` (written last, marks a finished run). Re-running with the same run directory resumes from the
checkpoint with no repeated and no missing steps (and refuses a checkpoint written under another config).
Models with a ``generate(n)`` method also leave ``samples.png``, and sample images in W&B at every evaluation.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from estimators.base import Estimator
from models.base import LatentVariableModel
from runners.checks import ConfigError, check_config, check_resume, load_estimator_config
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


def build(cfg: DictConfig) -> Run:
    check_config(cfg)  # before any data is loaded
    try:
        device = resolve_device(cfg.device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    seed_everything(int(cfg.seed))
    data = instantiate(cfg.data, device=device)
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
) -> float:
    """Mean over the split of the bound with ``n_samples`` importance samples (1 = the ELBO)."""
    model.eval()
    total, count = 0.0, 0
    if max_examples is not None and max_examples < split.n:
        # evenly spaced examples, not the first N: the test file is ordered (its first images are harder)
        idx = torch.linspace(0, split.n - 1, int(max_examples)).long()  # [N']
        batches = (split.batch(i) for i in idx.split(batch_size))
    else:
        batches = split.batches(batch_size)
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
    path: Path, run: Run, step: int, batch_gen: torch.Generator, logger: RunLogger, elapsed: float
) -> None:
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
        },
        path,
    )


def train(cfg: DictConfig, run_dir: Path, group: str | None = None) -> dict[str, Any]:
    """Train per ``cfg`` in ``run_dir`` (resuming from its checkpoint if there is one); returns the summary.
    ``group``: the W&B group (run.py passes the sweep's); default logger.group, experiment_name, model name."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    check_resume(resolved, run_dir)  # before anything is loaded or overwritten
    run = build(cfg)
    model, estimator, opt = run.model, run.estimator, run.optimizer
    train_split, val_split, test_split = (run.data.split(s) for s in ("train", "valid", "test"))
    batch_gen = torch.Generator().manual_seed(int(cfg.seed))  # minibatch indices, on CPU

    start, elapsed, resume_lines = 0, 0.0, None
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=run.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        estimator.load_state_dict(ckpt["estimator"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        batch_gen.set_state(ckpt["batch_gen"])
        for name, state in ckpt.get("basket", {}).items():
            if name in run.basket:
                run.basket[name].load_state_dict(state)
        if run.basket_optimizer is not None and ckpt.get("basket_optimizer") is not None:
            run.basket_optimizer.load_state_dict(ckpt["basket_optimizer"])
        start, elapsed, resume_lines = int(ckpt["step"]), float(ckpt["elapsed"]), int(ckpt["metrics_lines"])
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
        group=group or lg.get("group") or cfg.get("experiment_name") or f"{model_name}",
        job_type=est_name,
        name=f"{model_name}-{est_name}-{cfg.seed}",
        tags=list(lg.get("tags") or []),
        resume_lines=resume_lines,
    )
    exit_code = 1
    try:
        summary = _loop(
            cfg, run, logger, train_split, val_split, test_split, batch_gen, start, elapsed, run_dir
        )
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return summary


def _loop(
    cfg,
    run: Run,
    logger: RunLogger,
    train_split,
    val_split,
    test_split,
    batch_gen,
    start: int,
    elapsed: float,
    run_dir: Path,
) -> dict[str, Any]:
    model, estimator, opt = run.model, run.estimator, run.optimizer
    t, ev, var_cfg = cfg.train, cfg.eval, cfg.variance
    steps = int(t.steps)
    var_batch = None
    last_var = float("nan")
    bar = tqdm(
        range(start, steps),
        initial=start,
        total=steps,
        desc=f"{cfg.model.name}/{cfg.estimator.name}",
        dynamic_ncols=True,
        mininterval=1.0,
        disable=bool(cfg.get("quiet", False)),
    )
    tick = time.perf_counter()
    train_elbo = float("nan")
    for step in bar:
        # --- evaluate (after `step` updates)
        if step % int(t.eval_every) == 0:
            val = evaluate(model, val_split, int(ev.batch_size), 1, max_examples=t.get("val_examples"))
            logger.log({"val/elbo": val, "time/elapsed": elapsed + time.perf_counter() - tick}, step)
            if logger.wandb is not None and hasattr(model, "generate"):
                logger.log_images(
                    "samples", sample_grid(model, int(cfg.seed) + step), step, caption=f"step {step}"
                )
        # --- gradient variance at these parameters, on one fixed minibatch
        if int(var_cfg.every) > 0 and step % int(var_cfg.every) == 0:
            if var_batch is None:
                var_batch = train_split.sample_batch(
                    int(var_cfg.batch_size), torch.Generator().manual_seed(int(cfg.seed) + 1)
                )
            metrics = {}
            for name, est in run.measured(cfg.estimator.name).items():
                stats = gradient_variance(model, est, var_batch, int(var_cfg.samples), seed=step)
                metrics.update({f"grad/{name}/{k}": v for k, v in stats.items()})
            if run.reference is not None:  # bias against the unbiased reference (runners/trajectory.py)
                metrics.update(
                    bias_metrics(
                        model,
                        run.measured(cfg.estimator.name),
                        var_batch,
                        int(var_cfg.samples),
                        run.reference,
                        int(var_cfg.bias.samples),
                        seed=step,
                    )
                )
            last_var = metrics.get(f"grad/{cfg.estimator.name}/log10_var", float("nan"))
            logger.log(metrics, step)
        # --- one step
        x = train_split.sample_batch(int(t.batch_size), batch_gen)  # [B, X]
        est = estimator(model.cost_fn(x), model.context(x))
        opt.zero_grad(set_to_none=True)
        est.surrogate.backward()
        opt.step()
        estimator.step += 1
        if run.basket:
            follow_trajectory(run, model, x)
        done = step + 1
        train_elbo = -est.cost.mean().item()
        if not math.isfinite(train_elbo):
            raise FloatingPointError(f"training ELBO is {train_elbo} at step {done}: lower optim.lr")
        if done % int(t.log_every) == 0:
            logger.log(
                {
                    "train/elbo": train_elbo,
                    **{f"train/{k}": v for k, v in est.diagnostics.items()},
                    "time/elapsed": elapsed + time.perf_counter() - tick,
                },
                done,
            )
        bar.set_postfix(elbo=f"{train_elbo:.2f}", log10_var=f"{last_var:.2f}", refresh=False)
        if done % int(t.checkpoint_every) == 0 or done == steps:
            save_checkpoint(
                run_dir / CHECKPOINT, run, done, batch_gen, logger, elapsed + time.perf_counter() - tick
            )
    bar.close()
    elapsed += time.perf_counter() - tick

    # --- final evaluation
    bs, m = int(ev.batch_size), int(ev.samples)
    limit = ev.get("test_examples")
    result = {
        "val/elbo": evaluate(model, val_split, bs, 1, max_examples=t.get("val_examples")),
        "test/elbo": evaluate(model, test_split, bs, 1, max_examples=limit),
        f"test/bound_{m}": evaluate(model, test_split, bs, m, int(ev.chunk), max_examples=limit),
    }
    if hasattr(model, "kl_to_target"):  # SVI of a target with a known normaliser (models/mixture_svi.py)
        result["test/kl_to_target"] = float(model.kl_to_target())
    logger.log(result, steps)
    if hasattr(model, "plot") and getattr(model, "latent_dim", 2) == 2:  # 2-D: target and fitted density
        path = model.plot(run_dir / "density.png")
        logger.log_images("density", str(path), steps, caption="target and fitted density")
    columns = ["model", "estimator", "seed", "steps", "test/elbo", f"test/bound_{m}", "train_seconds"]
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
                result[f"test/bound_{m}"],
                elapsed,
            ]
        ],
        steps,
    )
    if hasattr(model, "generate"):
        grid = sample_grid(model, int(cfg.seed) + steps)
        save_png(grid, run_dir / SAMPLES_PNG)
        logger.log_images("samples", grid, steps, caption=f"step {steps}")
    summary = {
        "model": cfg.model.name,
        "estimator": cfg.estimator.name,
        "seed": int(cfg.seed),
        "steps": steps,
        "train/elbo": train_elbo,
        **result,
        "eval_samples": m,
        "train_seconds": elapsed,
        "run_dir": str(run_dir),
        "wandb_sync": logger.sync_command(),
    }
    logger.summary(summary)
    atomic_json(summary, run_dir / SUMMARY)
    (run_dir / DONE).write_text("finished\n")  # written last: a sweep skips runs that have it
    return summary


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
