"""Shared fixtures: tiny data files in the real formats, and configs composed the way run.py composes them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from tests.datafiles import write_binarized_mnist, write_mnist_idx

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Tiny models: one thread is fastest and does not thrash when the cores are shared.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory) -> Path:
    """A data root holding tiny binarized-MNIST (.amat.gz) and MNIST (IDX gz) files: 50/10/10 examples."""
    root = tmp_path_factory.mktemp("data")
    write_binarized_mnist(root)
    write_mnist_idx(root)
    return root


# Overrides that make any run tiny: a few steps, small evaluation, no W&B.
TINY = [
    "train.steps=4",
    "train.batch_size=8",
    "train.eval_every=2",
    "train.log_every=1",
    "eval.samples=3",
    "eval.batch_size=5",
    "variance.every=2",
    "variance.samples=3",
    "logger.mode=disabled",
    "quiet=true",
    "device=cpu",
]


def compose_config(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(version_base="1.3", config_dir=str(CONF)):
        return compose("config", overrides=overrides)


@pytest.fixture
def tiny_cfg(tiny_data_root):
    """``tiny_cfg(*overrides)``: the full config for a tiny run on the synthetic files."""

    def make(*overrides: str) -> DictConfig:
        return compose_config([f"data.root={tiny_data_root}", "data.verify=false", *TINY, *overrides])

    return make
