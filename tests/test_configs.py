"""Every option of every config group composes and instantiates (found by glob, so new files are covered)."""

from __future__ import annotations

import sys

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from runners.checks import available, target_class
from runners.train import build_optimizer
from tests.conftest import CONF, compose_config

MODELS = available("model")
ESTIMATORS = available("estimator")


def model_for(est_cls) -> str:
    """A model whose latents the estimator can serve."""
    for m in MODELS:
        if target_class(OmegaConf.load(CONF / "model" / f"{m}.yaml"), m).latent_kind in est_cls.supports:
            return m
    pytest.fail(f"no model in conf/model serves {est_cls.__name__} (supports {sorted(est_cls.supports)})")


def test_groups_are_not_empty():
    for group in ("data", "model", "estimator", "optim", "logger"):
        assert available(group), f"conf/{group}/ has no options"


@pytest.mark.parametrize("name", ESTIMATORS)
def test_estimator_yaml_composes_and_instantiates(name, tiny_cfg):
    node = OmegaConf.load(CONF / "estimator" / f"{name}.yaml")
    assert node.name == name, f"conf/estimator/{name}.yaml: name must equal the file stem"
    assert "defaults" not in node, "estimator files are self-contained (variance.basket loads them directly)"
    cls = target_class(node, name)
    cfg = tiny_cfg(f"estimator={name}", f"model={model_for(cls)}")
    model = instantiate(cfg.model, x_dim=784, train_mean=torch.full((784,), 0.13))
    est = instantiate(cfg.estimator, context_dim=model.context_dim)
    assert est.name == name and est.n_samples >= est.min_samples
    assert (sys.modules[cls.__module__].__doc__ or "").strip(), "estimator modules open with their formula"
    out = est(model.cost_fn(torch.bernoulli(torch.full((4, 784), 0.13))), model.context(torch.zeros(4, 784)))
    assert out.cost.shape[-1] == 4 and not out.cost.requires_grad
    assert out.surrogate.dim() == 0 and out.surrogate.requires_grad


@pytest.mark.parametrize("name", MODELS)
def test_model_yaml_composes_and_instantiates(name, tiny_cfg):
    cfg = tiny_cfg(f"model={name}")
    model = instantiate(cfg.model, x_dim=784, train_mean=torch.full((784,), 0.13))
    assert model.latent_kind in {"bernoulli", "categorical", "normal", "mixture"}
    assert cfg.model.name == name


@pytest.mark.parametrize("name", available("data"))
def test_data_yaml_composes_and_loads_tiny_files(name, tiny_data_root):
    cfg = compose_config([f"data={name}"])
    for key, value in (("root", str(tiny_data_root)), ("verify", False)):
        if key in cfg.data:  # file-backed datasets; synthetic sources have no files to check
            cfg.data[key] = value
    data = instantiate(cfg.data, device="cpu")
    x = data.split("train").sample_batch(3)
    assert x.shape == (3, data.x_dim)


@pytest.mark.parametrize("name", available("optim"))
def test_optim_yaml_builds(name, tiny_cfg):
    cfg = tiny_cfg(f"optim={name}")
    opt = build_optimizer(cfg.optim, torch.nn.Linear(2, 2), torch.nn.Linear(2, 1))
    assert len(opt.param_groups) == 2


@pytest.mark.parametrize("name", available("logger"))
def test_logger_yaml_composes(name, tiny_cfg):
    cfg = tiny_cfg(f"logger={name}")
    assert cfg.logger.mode in {"offline", "online", "disabled"}


def test_required_keys_exist(tiny_cfg):
    """Keys users, scripts and presets rely on."""
    cfg = tiny_cfg()
    for key in [
        "seed",
        "device",
        "data.root",
        "train.steps",
        "train.batch_size",
        "train.eval_every",
        "eval.samples",
        "variance.every",
        "variance.samples",
        "variance.basket",
        "logger.mode",
    ]:
        assert OmegaConf.select(cfg, key, throw_on_missing=True) is not None or key == "variance.basket", key
