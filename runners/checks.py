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
    "train.compile",
    "train.member_dim",
    "eval",
    "logger",
    "data.root",
    "data.download",
    "data.verify",
)

#: torch.compile modes that ``train.compile`` may name (runners.train.estimate_fn)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")


class ConfigError(ValueError):
    """A configuration value that cannot work; the message names the key and what is allowed."""


def one_line(e: BaseException) -> str:
    """``Type: first line of the message``: how an error is named in error.txt's headline and in messages."""
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first}"


def clean_cause(e: BaseException | None, kinds: tuple[type, ...]) -> BaseException | None:
    """``e`` or the error it was raised from that is one of ``kinds`` (``hydra.utils.instantiate`` wraps the
    errors of a constructor, e.g. a dataset's DataError or PermissionError, in an InstantiationException)."""
    while e is not None:
        if isinstance(e, kinds):
            return e
        e = e.__cause__
    return None


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


#: what ``model=X`` brings with it when the command line chooses no estimator / data / experiment itself: the
#: defaults of conf/config.yaml (muprop_c, binarized MNIST) cannot serve these models
MODEL_DEFAULTS: dict[str, dict[str, str]] = {
    # Graves' mode at D = 50: the implicit mode's loc/scale gradients look infinite-variance at D >= 8
    # (bench/mixture_variance.py); on the 2-D SVI targets the two modes measure alike
    "mixture_vae": {"estimator": "graves_mixture"},
    "mixture_svi": {"estimator": "implicit_mixture", "data": "synthetic"},
}


def with_model_defaults(args: list[str]) -> list[str]:
    """``args`` plus the choices ``MODEL_DEFAULTS`` gives a model named alone (one value) on the command line."""
    chosen = {a.split("=", 1)[0].lstrip("+~") for a in args if "=" in a and not a.startswith("-")}
    if "experiment" in chosen:
        return args
    model = next((a.split("=", 1)[1] for a in args if a.startswith("model=")), None)
    extra = [
        f"{group}={option}"
        for group, option in MODEL_DEFAULTS.get(model or "", {}).items()
        if group not in chosen
    ]
    return [*extra, *args]  # first: after a flag such as --cfg job, argparse takes no more overrides


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
    if o.get("betas") is not None:
        betas = list(o.betas) if OmegaConf.is_list(o.betas) else None
        _need(
            betas is not None
            and len(betas) == 2
            and all(
                isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 <= b < 1.0 for b in betas
            ),
            "optim.betas",
            o.betas,
            "two numbers in [0, 1), e.g. [0.9, 0.999]",
        )
    _at_least(t, "divergence_factor", "train", 0.0, float)
    _need(
        t.get("compile") in (None, False, True, *COMPILE_MODES),
        "train.compile",
        t.get("compile"),
        f"false, true or a torch.compile mode ({', '.join(COMPILE_MODES)})",
    )
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
        if key == "layers" and not OmegaConf.is_list(sizes):
            raise ConfigError(f"model.layers={sizes!r} is not a list: write model.layers=[{sizes}]")
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


def _group_choice(cfg: DictConfig, group: str) -> str | None:
    """The option chosen for a config group (Hydra's record of it; else the node's ``name``)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        choice = HydraConfig.get().runtime.choices.get(group)
        if choice:
            return str(choice)
    except ValueError:  # composed outside @hydra.main (tests, compose API)
        pass
    node = cfg.get(group)
    return str(node.get("name")) if isinstance(node, DictConfig) and node.get("name") else None


def _kind_of(value: Any) -> str | None:
    """The type class a default value fixes for a key: bool, list, number (None: no constraint)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, list):
        return "list"
    if isinstance(value, (int, float)):
        return "number"
    return None


def _matches(kind: str, value: Any) -> bool:
    if value is None:
        return True  # null: "not set", checked by the range checks where it matters
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "list":
        return OmegaConf.is_list(value) or isinstance(value, list)
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_EXAMPLE = {"bool": "true or false", "number": "a number"}


def check_types(cfg: DictConfig) -> None:
    """Booleans are booleans, lists are lists, numbers are numbers: each key's type is fixed by its default
    (the group's YAML file, or conf/config.yaml), so ``model.nonlinear=maybe`` or ``model.layers=200`` is
    refused here instead of being taken as true or failing deep inside a constructor."""
    defaults: list[tuple[str, Any]] = []
    for group in ("model", "estimator", "optim", "data", "logger"):
        choice = _group_choice(cfg, group)
        path = CONF_DIR / group / f"{choice}.yaml"
        if choice and path.exists():
            defaults.append((group, OmegaConf.to_container(OmegaConf.load(path), resolve=False)))
    top = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    defaults += [(k, top[k]) for k in ("train", "eval", "variance") if k in top]
    for prefix, node in defaults:
        for key, default in _flatten(node).items():
            kind = _kind_of(default)
            if kind is None or key.endswith("_target_"):
                continue
            value = OmegaConf.select(cfg, f"{prefix}.{key}", default=None, throw_on_missing=False)
            if not _matches(kind, value):
                if kind == "list":
                    raise ConfigError(
                        f"{prefix}.{key}={value!r} is not a list: write {prefix}.{key}=[{value}]"
                    )
                raise ConfigError(f"{prefix}.{key}={value!r} is not {_EXAMPLE[kind]}")


def check_data_root(cfg: DictConfig) -> None:
    root = cfg.data.get("root", None)
    if root is not None and not str(root).strip():
        raise ConfigError(
            "data.root is empty: give the folder that holds (or will hold) the data, e.g. data.root=~/data, or "
            "leave it out for $DATA_ROOT / ~/.cache/gradest/data"
        )


def check_wandb_online(cfg: DictConfig) -> None:
    """``logger.mode=online`` needs credentials: refused before any data is loaded when there are none."""
    if cfg.logger.get("mode") != "online":
        return
    import netrc
    import os
    from urllib.parse import urlparse

    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname or "api.wandb.ai"
    try:
        if netrc.netrc(os.environ.get("NETRC")).authenticators(host):
            return
    except (OSError, netrc.NetrcParseError):
        pass
    raise ConfigError(
        f"logger.mode=online needs a W&B API key and none was found (WANDB_API_KEY, or ~/.netrc for {host}): "
        f"run `wandb login`, or use logger.mode=offline (then `wandb sync` uploads later)"
    )


def check_pairing(cfg: DictConfig, model_cls: type) -> None:
    """The data must be what the model reads: images for the image models, nothing (``data=synthetic``) for
    SVI of a fixed target."""
    data_cls = target_class(cfg.data, "data")
    want, have = getattr(model_cls, "data_kind", "images"), getattr(data_cls, "kind", "images")
    if want != have:
        able = [
            n
            for n in available("data")
            if getattr(target_class(OmegaConf.load(CONF_DIR / "data" / f"{n}.yaml"), n), "kind", "images")
            == want
        ]
        raise ConfigError(
            f"model {cfg.model.get('name')!r} reads {want} but data {cfg.data.get('name')!r} provides {have}: "
            f"use data={' or data='.join(able)}"
        )


def check_config(cfg: DictConfig) -> None:
    """All checks that need no data: types, ranges, and whether the estimators can serve the model."""
    check_types(cfg)
    check_ranges(cfg)
    check_data_root(cfg)
    check_wandb_online(cfg)
    model_cls = target_class(cfg.model, "model")
    check_pairing(cfg, model_cls)
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


def config_diffs(run_dir: Path, config: dict[str, Any], free_keys: tuple[str, ...]) -> list[str]:
    """``key: saved -> now`` for every key of ``run_dir/config.yaml`` that differs from ``config`` and is not
    one of ``free_keys`` (or under one)."""
    saved_path = Path(run_dir) / "config.yaml"
    saved = _flatten(OmegaConf.to_container(OmegaConf.load(saved_path), resolve=True))
    now = _flatten(config)

    def free(key: str) -> bool:
        return any(key == k or key.startswith(k + ".") for k in free_keys)

    return [
        f"{k}: {saved.get(k)!r} -> {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if not free(k) and saved.get(k) != now.get(k)
    ]


def _listed(diffs: list[str]) -> str:
    return "; ".join(diffs[:5]) + ("; ..." if len(diffs) > 5 else "")


def check_resume(config: dict[str, Any], run_dir: Path) -> None:
    """Refuse to resume a checkpoint in ``run_dir`` written under a different configuration.

    ``config`` is the resolved config about to run; the one saved next to the checkpoint
    (``run_dir/config.yaml``) may differ only in keys that do not change the trajectory
    (``RESUMABLE_CHANGES``: more steps, evaluation, logging, where the data lives).
    """
    from runners.logger import CHECKPOINT

    if not (Path(run_dir) / CHECKPOINT).exists() or not (Path(run_dir) / "config.yaml").exists():
        return
    diffs = config_diffs(run_dir, config, RESUMABLE_CHANGES)
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a checkpoint of a different configuration ({_listed(diffs)}). Resume it with its "
            f"own settings, or give this run another directory (hydra.run.dir / hydra.sweep.dir), or delete that one."
        )


#: keys that may differ between a finished run and a job that would skip it (they do not change its result)
FINISHED_FREE = (
    "git_rev",
    "quiet",
    "train.member_dim",  # how the members of a pack are stepped, not what they compute
    "device",
    "experiment_name",
    "logger",
    "data.root",
    "data.download",
    "data.verify",
)


def check_finished(cfg: DictConfig, run_dir: Path) -> None:
    """A finished run (``DONE``) is skipped only when it ran this job's configuration: a sweep re-run with a
    changed grid must not return an old job's result under a new job's number."""
    if not (Path(run_dir) / "config.yaml").exists():
        return
    diffs = config_diffs(run_dir, OmegaConf.to_container(cfg, resolve=True), FINISHED_FREE)
    if diffs:
        raise ConfigError(
            f"{run_dir} holds a finished run of a different configuration ({_listed(diffs)}): give this job "
            f"another directory (hydra.run.dir / hydra.sweep.dir); or, to extend that run with more steps, delete "
            f"{Path(run_dir) / 'DONE'} (it resumes from its last checkpoint)"
        )


def _override_value(argv: list[str], key: str) -> str | None:
    for arg in argv:
        for prefix in (f"{key}=", f"+{key}=", f"++{key}="):
            if arg.startswith(prefix):
                return arg[len(prefix) :]
    return None


def check_paths(argv: list[str]) -> None:
    """Run / sweep directories that cannot be made (an existing file, a read-only or unwritable place), and a
    SLURM launcher on a machine without SLURM: answered before Hydra tries and fails with a traceback."""
    import os
    import shutil

    for key in ("hydra.run.dir", "hydra.sweep.dir"):
        value = _override_value(argv, key)
        if not value or "${" in value:
            continue
        path = Path(value).expanduser()
        if path.exists() and not path.is_dir():
            raise ConfigError(f"{key}={value!r} is an existing file, not a folder: choose another path")
        parent = path
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
        if parent.exists() and not parent.is_dir():
            raise ConfigError(f"{key}={value!r}: {parent} is a file, not a folder: choose another path")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(
                f"{key}={value!r}: cannot write under {parent} (read-only file system or no permission): "
                f"choose a writable folder"
            )
    if _override_value(argv, "hydra.run.dir") is None and _override_value(argv, "hydra.sweep.dir") is None:
        if not os.access(Path.cwd(), os.W_OK | os.X_OK):
            raise ConfigError(
                f"cannot write run folders under the current folder {Path.cwd()} (read-only or no permission): "
                f"run from a writable folder or give hydra.run.dir=... (hydra.sweep.dir=... with -m)"
            )
    launcher = _override_value(argv, "hydra/launcher")
    if launcher == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError(
            "hydra/launcher=slurm needs SLURM, but sbatch is not on this machine's PATH: run the command on the "
            "cluster's login node, or use hydra/launcher=local (a dry run on this machine) or hydra/launcher=parallel"
        )
