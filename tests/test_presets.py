"""Every experiment preset (glob over conf/experiment/*.yaml, so presets added later are covered): it composes
with Hydra, its model and estimator build, the estimators named in its multirun comment exist and can serve its
model, and it trains for a few steps end to end on tiny synthetic files (in-process; one run through run.py).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from runners.checks import check_config
from tests.datafiles import write_binarized_mnist

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
PRESETS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))
SWEEP = re.compile(r"python run\.py -m experiment=(\S+)(.*)")


def compose_preset(name: str, overrides: list[str] = ()) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=[f"experiment={name}", *overrides])


def data_overrides(cfg: DictConfig, root: Path) -> list[str]:
    """Point file-backed data at the tiny synthetic files; data sources without files (data=synthetic) are left
    alone apart from keys they also have."""
    wanted = {"root": str(root), "verify": "false", "download": "false"}
    return [f"data.{k}={v}" for k, v in wanted.items() if k in cfg.data]


def x_dim_of(cfg: DictConfig) -> int:
    return int(cfg.data.get("x_dim", 784))


def sweep_line(name: str) -> tuple[str, list[str]] | None:
    """(experiment, estimators) from the preset's ``python run.py -m experiment=... estimator=a,b`` comment."""
    for line in (CONF / "experiment" / f"{name}.yaml").read_text().splitlines():
        m = SWEEP.search(line)
        if m and line.lstrip().startswith("#"):
            est = re.search(r"estimator=(\S+)", m.group(2))
            return m.group(1), est.group(1).split(",") if est else []
    return None


def test_presets_found():
    expected = {
        "muprop_table2_mnist_2layer",
        "muprop_table2_mnist_3layer",
        "muprop_table3_sbn_1layer",
        "muprop_table3_sbn_2layer",
        "muprop_table3_sbn_3layer",
        "muprop_table3_sbn_nonlinear",
    }
    assert expected <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_preset_composes_and_builds(name: str):
    cfg = compose_preset(name)
    check_config(cfg)
    x_dim = x_dim_of(cfg)
    model = instantiate(cfg.model, x_dim=x_dim, train_mean=torch.full((x_dim,), 0.2))
    estimator = instantiate(cfg.estimator, context_dim=model.context_dim)
    assert model.latent_kind in type(estimator).supports


def leaves(node, prefix: str = ""):
    """(dotted key, value) of every leaf of a plain nested dict; lists count as leaves."""
    for k, v in node.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            yield from leaves(v, key + ".")
        else:
            yield key, v


@pytest.mark.parametrize("name", PRESETS)
def test_preset_values_reach_the_config(name: str):
    """Every value a preset sets must win over conf/config.yaml's own values (train, eval, experiment_name)."""
    cfg = compose_preset(name)
    own = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"), resolve=False)
    lost = []
    for key, value in leaves({k: v for k, v in own.items() if k != "defaults"}):
        got = OmegaConf.select(cfg, key)
        got = OmegaConf.to_container(got) if OmegaConf.is_config(got) else got
        if got != value:
            lost.append(f"{key}: preset {value!r}, composed {got!r}")
    assert not lost, (
        f"experiment={name}: values of the preset are overridden in the composed config ({'; '.join(lost)}). "
        f"If train/eval/experiment_name are among them, conf/config.yaml merges its own values (`- _self_`) "
        f"after `- experiment: null`: move `- _self_` above `- experiment: null` in its defaults list."
    )


@pytest.mark.parametrize("name", [p for p in PRESETS if p.startswith("muprop_")])
def test_muprop_preset_paper_settings(name: str):
    cfg = compose_preset(name)
    assert cfg.optim.name == "sgd" and float(cfg.optim.momentum) == 0.9 and int(cfg.train.batch_size) == 100
    assert float(cfg.optim.lr) in {3e-3, 1e-3, 3e-4, 1e-4, 3e-5, 1e-5, 3e-6}, "an lr from the paper's grid"
    if name.startswith("muprop_table2"):
        assert cfg.model.name == "sbn_sp"
    assert sweep_line(name) is not None, "muprop presets carry their multirun command in a comment"
    # the preset's file sets the paper's m (whether it reaches the composed config is the test above)
    text = (CONF / "experiment" / f"{name}.yaml").read_text()
    m = 100 if name.startswith("muprop_table2") else 1000
    assert re.search(rf"^eval:\n\s+samples: {m}\b", text, re.M), f"eval.samples: {m} in the preset"


@pytest.mark.parametrize("name", [p for p in PRESETS if sweep_line(p) is not None])
def test_sweep_comment_names_existing_estimators(name: str):
    experiment, estimators = sweep_line(name)
    assert experiment == name
    available = {p.stem for p in (CONF / "estimator").glob("*.yaml")}
    assert set(estimators) <= available, f"unknown estimators {sorted(set(estimators) - available)}"
    for est in estimators:
        check_config(compose_preset(name, [f"estimator={est}"]))  # the estimator can serve the model


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory) -> Path:
    return write_binarized_mnist(tmp_path_factory.mktemp("data"), n_train=50, n_valid=10, n_test=10)


SMOKE = [
    "train.steps=3",
    "train.eval_every=2",
    "eval.samples=2",
    "variance.every=0",
    "logger.mode=disabled",
    "quiet=true",
    "device=cpu",
]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_trains_a_few_steps(name: str, tiny_root: Path, tmp_path: Path):
    from runners.train import train

    base = compose_preset(name)
    cfg = compose_preset(name, [*SMOKE, *data_overrides(base, tiny_root)])
    with open_dict(cfg):
        if "n_eval" in cfg.data:  # data without files: keep the evaluation passes short
            cfg.data.n_eval = 20
    summary = train(cfg, tmp_path / "run")
    m = int(cfg.eval.samples)
    assert summary["steps"] == 3
    for key in ("test/elbo", f"test/bound_{m}", "val/elbo"):
        assert isinstance(summary[key], float) and summary[key] == summary[key], key  # finite, not NaN
    assert (tmp_path / "run" / "DONE").exists()


def test_run_py_with_a_preset(tiny_root: Path, tmp_path: Path):
    name = "muprop_table2_mnist_2layer"
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "run.py",
        f"experiment={name}",
        *SMOKE,
        f"data.root={tiny_root}",
        "data.verify=false",
        "data.download=false",
        f"hydra.run.dir={run_dir}",
    ]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["model"] == "sbn_sp" and summary["estimator"] == "muprop_c" and "test/bound_2" in summary
    assert "test bound (m=2)" in out.stdout
