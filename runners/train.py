"""The training loop: evaluate, measure variance, step, log, checkpoint; then the final test evaluation.

Everything a run writes goes into its run directory: ``config.yaml`` (resolved), ``metrics.jsonl``,
``checkpoint.pt`` (model, optimiser, estimator state, RNG states, step; written atomically), ``summary.json``
and ``DONE`` (written last, marks a finished run). Re-running with the same run directory resumes from the
checkpoint with no repeated and no missing steps.
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
from runners.checks import check_config, load_estimator_config
from runners.logger import RunLogger
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

CHECKPOINT = "checkpoint.pt"
DONE = "DONE"
SUMMARY = "summary.json"


@dataclass
class Run:
    """The objects of one run, built from the config (values known only at run time passed as arguments)."""

    data: Any
    model: LatentVariableModel
    estimator: Estimator
    basket: dict[str, Estimator]
    optimizer: torch.optim.Optimizer
    device: torch.device


def build_optimizer(cfg: DictConfig, model: torch.nn.Module, estimator: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or SGD with momentum; the estimator's own parameters (baseline nets) get ``estimator_lr``."""
    groups = [{"params": list(model.parameters()), "lr": float(cfg.lr)}]
    est_params = list(estimator.parameters())
    if est_params:
        groups.append({"params": est_params, "lr": float(cfg.get("estimator_lr") or cfg.lr)})
    if cfg.name == "adam":
        return torch.optim.Adam(groups, betas=tuple(cfg.get("betas", (0.9, 0.999))),
                                weight_decay=float(cfg.get("weight_decay", 0.0)))
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, momentum=float(cfg.get("momentum", 0.9)),
                               weight_decay=float(cfg.get("weight_decay", 0.0)))
    raise ValueError(f"optim.name={cfg.name!r}: choose adam or sgd")


def build(cfg: DictConfig) -> Run:
    check_config(cfg)  # before any data is loaded
    device = resolve_device(cfg.device)
    seed_everything(int(cfg.seed))
    data = instantiate(cfg.data, device=device)
    model = instantiate(cfg.model, x_dim=data.x_dim, train_mean=data.train_mean.to(device)).to(device)
    estimator = instantiate(cfg.estimator, context_dim=model.context_dim).to(device)
    basket = {
        name: instantiate(load_estimator_config(name), context_dim=model.context_dim).to(device)
        for name in cfg.variance.basket
    }
    optimizer = build_optimizer(cfg.optim, model, estimator)
    return Run(data, model, estimator, basket, optimizer, device)


@torch.no_grad()
def evaluate(model: LatentVariableModel, split, batch_size: int, n_samples: int = 1, chunk: int = 100,
             max_examples: int | None = None) -> float:
    """Mean over the split of the bound with ``n_samples`` importance samples (1 = the ELBO)."""
    model.eval()
    total, count = 0.0, 0
    for x in split.batches(batch_size):
        if max_examples is not None and count >= max_examples:
            break
        if n_samples == 1:
            b = model.elbo(x)  # [B]
        else:
            b = model.bound(x, n_samples=n_samples, chunk=chunk)  # [B]
        total += b.sum().item()
        count += x.shape[0]
    model.train()
    return total / max(count, 1)


def save_checkpoint(path: Path, run: Run, step: int, batch_gen: torch.Generator, logger: RunLogger,
                    elapsed: float) -> None:
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
        },
        path,
    )


def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train per ``cfg`` in ``run_dir`` (resuming from its checkpoint if there is one); returns the summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    run = build(cfg)
    model, estimator, opt = run.model, run.estimator, run.optimizer
    train_split, val_split, test_split = (run.data.split(s) for s in ("train", "valid", "test"))
    batch_gen = torch.Generator().manual_seed(int(cfg.seed))  # minibatch indices, on CPU
    t, ev = cfg.train, cfg.eval

    start, elapsed, resume_lines = 0, 0.0, None
    ckpt_path = run_dir / CHECKPOINT
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=run.device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        estimator.load_state_dict(ckpt["estimator"])
        opt.load_state_dict(ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        batch_gen.set_state(ckpt["batch_gen"])
        start, elapsed, resume_lines = int(ckpt["step"]), float(ckpt["elapsed"]), int(ckpt["metrics_lines"])
        print(f"resuming from {ckpt_path} at step {start}")

    resolved = OmegaConf.to_container(cfg, resolve=True)
    resolved["git_rev"] = git_revision()
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    model_name = cfg.model.get("name", "model")
    est_name = cfg.estimator.get("name", "estimator")
    lg = cfg.logger
    logger = RunLogger(
        run_dir, resolved, mode=lg.mode, project=lg.project, entity=lg.get("entity"),
        group=lg.get("group") or cfg.get("experiment_name") or f"{model_name}", job_type=est_name,
        name=f"{model_name}-{est_name}-{cfg.seed}", tags=list(lg.get("tags") or []), resume_lines=resume_lines,
    )
    exit_code = 1
    try:
        summary = _loop(cfg, run, logger, train_split, val_split, test_split, batch_gen, start, elapsed, run_dir)
        exit_code = 0
    finally:
        logger.finish(exit_code)
    return summary


def _loop(cfg, run: Run, logger: RunLogger, train_split, val_split, test_split, batch_gen, start: int,
          elapsed: float, run_dir: Path) -> dict[str, Any]:
    model, estimator, opt = run.model, run.estimator, run.optimizer
    t, ev, var_cfg = cfg.train, cfg.eval, cfg.variance
    steps = int(t.steps)
    var_batch = None
    last_var = float("nan")
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"{cfg.model.name}/{cfg.estimator.name}",
               dynamic_ncols=True, mininterval=1.0, disable=bool(cfg.get("quiet", False)))
    tick = time.perf_counter()
    train_elbo = float("nan")
    for step in bar:
        # --- evaluate (after `step` updates)
        if step % int(t.eval_every) == 0:
            val = evaluate(model, val_split, int(ev.batch_size), 1, max_examples=t.get("val_examples"))
            logger.log({"val/elbo": val, "time/elapsed": elapsed + time.perf_counter() - tick}, step)
        # --- gradient variance at these parameters, on one fixed minibatch
        if int(var_cfg.every) > 0 and step % int(var_cfg.every) == 0:
            if var_batch is None:
                var_batch = train_split.sample_batch(int(var_cfg.batch_size),
                                                     torch.Generator().manual_seed(int(cfg.seed) + 1))
            metrics = {}
            for name, est in {cfg.estimator.name: estimator, **run.basket}.items():
                stats = gradient_variance(model, est, var_batch, int(var_cfg.samples), seed=step)
                metrics.update({f"grad/{name}/{k}": v for k, v in stats.items()})
            last_var = metrics.get(f"grad/{cfg.estimator.name}/log10_var", float("nan"))
            logger.log(metrics, step)
        # --- one step
        x = train_split.sample_batch(int(t.batch_size), batch_gen)  # [B, X]
        est = estimator(model.cost_fn(x), model.context(x))
        opt.zero_grad(set_to_none=True)
        est.surrogate.backward()
        opt.step()
        estimator.step += 1
        done = step + 1
        train_elbo = -est.cost.mean().item()
        if not math.isfinite(train_elbo):
            raise FloatingPointError(f"training ELBO is {train_elbo} at step {done}: lower optim.lr")
        if done % int(t.log_every) == 0:
            logger.log({"train/elbo": train_elbo, **{f"train/{k}": v for k, v in est.diagnostics.items()},
                        "time/elapsed": elapsed + time.perf_counter() - tick}, done)
        bar.set_postfix(elbo=f"{train_elbo:.2f}", log10_var=f"{last_var:.2f}", refresh=False)
        if done % int(t.checkpoint_every) == 0 or done == steps:
            save_checkpoint(run_dir / CHECKPOINT, run, done, batch_gen, logger,
                            elapsed + time.perf_counter() - tick)
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
    logger.log(result, steps)
    summary = {
        "model": cfg.model.name, "estimator": cfg.estimator.name, "seed": int(cfg.seed), "steps": steps,
        "train/elbo": train_elbo, **result, "eval_samples": m, "train_seconds": elapsed,
        "run_dir": str(run_dir), "wandb_sync": logger.sync_command(),
    }
    logger.summary(summary)
    atomic_json(summary, run_dir / SUMMARY)
    (run_dir / DONE).write_text("finished\n")  # written last: a sweep skips runs that have it
    return summary
