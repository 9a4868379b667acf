"""Refuse bad input before any data is loaded or any step is taken, with the key and the allowed range.

Three moments, cheapest first:

* ``check_overrides(argv)``: before Hydra composes anything (run.py calls it on the command line): an
  unknown option of a config group (``estimator=foo``) is named with the list of valid ones.
* ``check_config(cfg)``: after composition, before data: value ranges (no imports needed, so these answer in
  a second), then whether the estimator (and every ``variance.basket`` / bias reference estimator) can serve
  the model's latents, naming the estimators that can.
* ``check_resume(config, run_dir)``: a run directory holding a checkpoint is resumed only by the same
  configuration (a re-run sweep whose job numbers shifted must not continue another job's checkpoint).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

#: keys that may change between an interrupted run and its resumption (they do not change the trajectory)
RESUMABLE_CHANGES = (
    "git_rev",
    "quiet",
    "device",
    "experiment_name",
    "train.steps",
    "eval",
    "logger",
    "data.root",
    "data.download",
    "data.verify",
)


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def config_groups() -> list[str]:
    """The swappable config groups of conf/ (top level, not Hydra's own)."""
    return sorted(p.name for p in CONF_DIR.iterdir() if p.is_dir() and p.name != "hydra")


def _options(group: str) -> str:
    names = available(group)
    return ", ".join(names) if names else f"(none: conf/{group}/ holds no .yaml file)"


def check_overrides(args: list[str]) -> None:
    """Unknown options of a config group on the command line, e.g. ``estimator=foo`` or ``model=a,b``.

    Parsed with Hydra's own override grammar, so sweeps (``a,b``, ``choice(a,b)``) are checked value by
    value; globs, deletions and anything Hydra cannot parse are left to Hydra.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    groups = set(config_groups())
    parser = OverridesParser.create()
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue  # a flag (-m, --cfg job) or a deletion without value
        try:
            (ov,) = parser.parse_overrides([arg])
        except Exception:  # noqa: BLE001 - Hydra will report its own syntax error
            continue
        group = ov.key_or_group
        if group not in groups or ov.is_delete() or ov.is_hydra_override():
            continue
        if ov.is_sweep_override():
            if not ov.is_choice_sweep() or "glob" in arg:
                continue
            values = list(ov.sweep_string_iterator())
        else:
            value = ov.value()
            if value is None:
                continue  # group=null removes the group
            values = [str(value)]
        for value in values:
            if value not in available(group):
                raise ConfigError(f"unknown {group} {value!r} in {arg!r}; choose one of: {_options(group)}")


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


def _number(node: DictConfig, key: str, prefix: str, kind: type = int):
    """``node[key]`` as a number; a value that is not one is refused with the key."""
    value = node.get(key)
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"{prefix}.{key}={value!r} is not {'an integer' if kind is int else 'a number'}"
        ) from None
    if kind is int and float(value) != number:
        raise ConfigError(f"{prefix}.{key}={value!r} is not an integer")
    return number


def _at_least(
    node: DictConfig, key: str, prefix: str, low: float, kind: type = int, strict: bool = False
) -> None:
    if node.get(key) is None:
        return
    v = _number(node, key, prefix, kind)
    ok = v > low if strict else v >= low
    what = "an integer" if kind is int else "a number"
    _need(ok, f"{prefix}.{key}", node.get(key), f"{what} {'>' if strict else '>='} {low:g}")


def check_ranges(cfg: DictConfig) -> None:
    """Every range check that needs no import: answers before torch is loaded."""
    t, e, v, o = cfg.train, cfg.eval, cfg.variance, cfg.optim
    _need(isinstance(cfg.seed, int) and not isinstance(cfg.seed, bool), "seed", cfg.seed, "an integer")
    for key, low in (
        ("steps", 0),
        ("batch_size", 1),
        ("eval_every", 1),
        ("log_every", 1),
        ("checkpoint_every", 1),
    ):
        _at_least(t, key, "train", low)
    _at_least(t, "val_examples", "train", 1)
    for key in ("samples", "chunk", "batch_size", "test_examples"):
        _at_least(e, key, "eval", 1)
    _need(_number(v, "every", "variance") >= 0, "variance.every", v.every, "an integer >= 0 (0 turns it off)")
    _at_least(v, "samples", "variance", 2)
    _at_least(v, "batch_size", "variance", 1)
    _need(
        OmegaConf.is_list(v.basket),
        "variance.basket",
        v.basket,
        "a list of estimator names, e.g. [reinforce]",
    )
    bias = v.get("bias")
    if bias is not None:
        _need(
            bias.get("reference") is not None, "variance.bias.reference", None, "an unbiased estimator name"
        )
        _at_least(bias, "samples", "variance.bias", 2)
    _need(o.get("name") in ("adam", "sgd"), "optim.name", o.get("name"), "adam or sgd")
    _at_least(o, "lr", "optim", 0.0, float, strict=True)
    _at_least(o, "estimator_lr", "optim", 0.0, float, strict=True)
    if o.get("momentum") is not None:
        m = _number(o, "momentum", "optim", float)
        _need(0.0 <= m < 1.0, "optim.momentum", o.momentum, "a number in [0, 1)")
    _at_least(o, "weight_decay", "optim", 0.0, float)
    from runners.logger import WANDB_MODES

    mode = cfg.logger.get("mode")
    _need(mode in WANDB_MODES, "logger.mode", mode, f"one of {', '.join(WANDB_MODES)}")
    device = str(cfg.get("device", "auto"))
    _need(
        re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device) is not None,
        "device",
        device,
        "auto, cpu, mps, cuda or cuda:N",
    )

    # the model: sizes and the number of mixture components K
    m = cfg.model
    for key in ("latent_dim", "components", "prior_components", "target_components"):
        _at_least(m, key, "model", 1)
    for key in ("layers", "hidden"):
        sizes = m.get(key)
        if sizes is None:
            continue
        sizes = list(sizes) if OmegaConf.is_list(sizes) else [sizes]
        _need(
            len(sizes) > 0 and all(isinstance(s, int) and s >= 1 for s in sizes),
            f"model.{key}",
            m.get(key),
            "positive integers (a non-empty list of layer sizes)",
        )
    # estimators: sample counts, temperatures, decays
    for prefix, node in [
        ("estimator", cfg.estimator),
        *[(f"estimator {b}", _basket_node(b)) for b in v.basket],
    ]:
        _check_estimator_ranges(node, prefix)


def _basket_node(name: Any) -> DictConfig:
    return load_estimator_config(str(name))


def _check_estimator_ranges(node: DictConfig, prefix: str) -> None:
    _at_least(node, "n_samples", prefix, 1)
    for key in ("temperature", "min_temperature"):
        _at_least(node, key, prefix, 0.0, float, strict=True)
    _at_least(node, "anneal_rate", prefix, 0.0, float)
    if node.get("decay") is not None:
        d = _number(node, "decay", prefix, float)
        _need(0.0 <= d < 1.0, f"{prefix}.decay", node.decay, "a number in [0, 1)")


def check_config(cfg: DictConfig) -> None:
    """All checks that need no data: ranges, and whether the estimators can serve the model."""
    check_ranges(cfg)
    model_cls = target_class(cfg.model, "model")
    kind = model_cls.latent_kind
    nodes = [
        ("estimator", cfg.estimator),
        *[(f"variance.basket[{b}]", load_estimator_config(b)) for b in cfg.variance.basket],
    ]
    bias = cfg.variance.get("bias")
    if bias is not None:
        nodes.append(("variance.bias.reference", load_estimator_config(bias.reference)))
    for est_name, node in nodes:
        est_cls = target_class(node, est_name)
        if kind not in est_cls.supports:
            able = [
                n
                for n in available("estimator")
                if kind in target_class(load_estimator_config(n), n).supports
            ]
            raise ConfigError(
                f"{est_name} {node.get('name', est_cls.__name__)!r} cannot serve model "
                f"{cfg.model.get('name', model_cls.__name__)!r} ({kind} latents). "
                f"Estimators that can: {', '.join(able)}"
            )
        low = int(getattr(est_cls, "min_samples", 1))
        n = int(node.get("n_samples", 1))
        _need(
            n >= low,
            f"{est_name}.n_samples" if est_name == "estimator" else f"{est_name} n_samples",
            n,
            f"an integer >= {low} for {node.get('name', est_cls.__name__)}",
        )
    if bias is not None and not getattr(
        target_class(load_estimator_config(bias.reference), "reference"), "unbiased", False
    ):
        raise ConfigError(
            f"variance.bias.reference={bias.reference!r} is a biased estimator: the reference must be "
            f"unbiased. Unbiased estimators for this model: {', '.join(unbiased_for(kind))}"
        )


def unbiased_for(kind: str) -> list[str]:
    """Estimators whose class says it is unbiased and that serve latents of ``kind``."""
    out = []
    for n in available("estimator"):
        cls = target_class(load_estimator_config(n), n)
        if getattr(cls, "unbiased", False) and kind in cls.supports:
            out.append(n)
    return out


def load_estimator_config(name: str) -> DictConfig:
    """``conf/estimator/<name>.yaml`` (estimator files are self-contained: no defaults lists)."""
    path = CONF_DIR / "estimator" / f"{name}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown estimator {name!r}; available: {', '.join(available('estimator'))}")
    return OmegaConf.load(path)


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def check_resume(config: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a checkpoint in ``run_dir`` written under a different configuration.

    ``config`` is the resolved config about to run; the one saved next to the checkpoint
    (``run_dir/config.yaml``) may differ only in keys that do not change the trajectory
    (``RESUMABLE_CHANGES``: more steps, evaluation, logging, where the data lives).
    """
    from runners.logger import CHECKPOINT

    saved_path = Path(run_dir) / "config.yaml"
    if not (Path(run_dir) / CHECKPOINT).exists() or not saved_path.exists():
        return
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    now = _flatten(config)

    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in RESUMABLE_CHANGES)

    diffs = [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if not free(k) and saved.get(k) != now.get(k)
    ]
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different configuration ({'; '.join(diffs[:5])}"
            f"{'; ...' if len(diffs) > 5 else ''}). Resume it with its own settings, or give this run another "
            f"directory (hydra.run.dir / hydra.sweep.dir), or delete that one."
        )
