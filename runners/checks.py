"""Refuse bad input before any data is loaded or any step is taken, with the key and the allowed range."""

from __future__ import annotations

import importlib
from pathlib import Path

from omegaconf import DictConfig

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def target_class(node: DictConfig, what: str) -> type:
    target = node.get("_target_")
    if not target:
        raise ConfigError(f"{what} config has no _target_")
    module, _, name = str(target).rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{what}._target_={target!r} cannot be imported: {e}") from None


def _need(cond: bool, key: str, value, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is out of range: {allowed}")


def check_config(cfg: DictConfig) -> None:
    """All checks that need no data: ranges, and whether the estimator can serve the model."""
    t, e, v, o = cfg.train, cfg.eval, cfg.variance, cfg.optim
    _need(int(t.steps) >= 0, "train.steps", t.steps, "an integer >= 0")
    _need(int(t.batch_size) >= 1, "train.batch_size", t.batch_size, "an integer >= 1")
    _need(int(t.eval_every) >= 1, "train.eval_every", t.eval_every, "an integer >= 1")
    _need(int(t.log_every) >= 1, "train.log_every", t.log_every, "an integer >= 1")
    _need(int(t.checkpoint_every) >= 1, "train.checkpoint_every", t.checkpoint_every, "an integer >= 1")
    _need(int(e.samples) >= 1, "eval.samples", e.samples, "an integer >= 1")
    _need(int(e.chunk) >= 1, "eval.chunk", e.chunk, "an integer >= 1")
    _need(int(v.every) >= 0, "variance.every", v.every, "an integer >= 0 (0 turns it off)")
    _need(int(v.samples) >= 2, "variance.samples", v.samples, "an integer >= 2")
    _need(float(o.lr) > 0, "optim.lr", o.lr, "a number > 0")
    if o.get("estimator_lr") is not None:
        _need(float(o.estimator_lr) > 0, "optim.estimator_lr", o.estimator_lr, "a number > 0")
    _need(int(cfg.estimator.get("n_samples", 1)) >= 1, "estimator.n_samples", cfg.estimator.get("n_samples"),
          "an integer >= 1")
    model_cls = target_class(cfg.model, "model")
    for est_name, node in [("estimator", cfg.estimator), *[(f"variance.basket[{b}]", load_estimator_config(b))
                                                           for b in v.basket]]:
        est_cls = target_class(node, est_name)
        kind = model_cls.latent_kind
        if kind not in est_cls.supports:
            able = [n for n in available("estimator")
                    if kind in target_class(load_estimator_config(n), n).supports]
            raise ConfigError(
                f"{est_name} {node.get('name', est_cls.__name__)!r} cannot serve model "
                f"{cfg.model.get('name', model_cls.__name__)!r} ({kind} latents). "
                f"Estimators that can: {', '.join(able)}"
            )


def load_estimator_config(name: str) -> DictConfig:
    """``conf/estimator/<name>.yaml`` (estimator files are self-contained: no defaults lists)."""
    from omegaconf import OmegaConf

    path = CONF_DIR / "estimator" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown estimator {name!r}; available: {', '.join(available('estimator'))}")
    return OmegaConf.load(path)
