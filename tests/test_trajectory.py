"""Same-trajectory comparison (runners/trajectory.py): bias against an exact gradient (enumeration of a tiny SBN)
and against an unbiased reference estimator, and the measurement inside the training loop.

Pass/fail by z-scores, fixed seeds (so a pass is reproducible). ``z2`` is the mean over parameters of squared
z-scores of (estimator mean - reference): for an unbiased estimator its expectation is 1 whatever the correlation
between parameters, and even in the worst case (all parameters perfectly correlated: z2 ~ chi-square with one
degree of freedom) P(z2 > 11) < 1e-3; that is the false-failure rate of the "unbiased" checks. The biased
estimator below (REINFORCE scaled by 1.2: bias = 0.2 x gradient) gives z2 in the hundreds at these sample sizes,
and ``rel_sq`` (an unbiased estimate of |bias|^2 / |gradient|^2) must find 0.2^2 = 0.04.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from estimators.base import Estimate, Estimator
from estimators.reinforce import Reinforce
from runners.trajectory import bias_metrics, gradient_moments
from tests.datafiles import write_binarized_mnist
from tests.exact import exact_objective, flat_grad, tiny_sbn

ROOT = Path(__file__).resolve().parents[1]
Z2_UNBIASED_MAX = 11.0
REPLICAS = 200  # copies of the 3-example batch in one draw: each draw averages 600 examples
DRAWS = 50


class Scaled(Estimator):
    """A deliberately biased estimator: ``scale`` times another estimator's gradient."""

    supports = frozenset({"bernoulli"})
    unbiased = False

    def __init__(self, inner: Estimator, scale: float):
        super().__init__()
        self.inner, self.scale = inner, scale

    def forward(self, cost_fn, context=None) -> Estimate:
        est = self.inner(cost_fn, context)
        return Estimate(est.cost, self.scale * est.surrogate, est.diagnostics)


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)
    model, x = tiny_sbn([3])
    exact = flat_grad(exact_objective(model, x), list(model.parameters())).detach()  # [P]
    return model, x.repeat(REPLICAS, 1), exact  # the mean gradient of copies is the gradient of the batch


def test_bias_against_exact_gradient(tiny):
    model, x, exact = tiny
    ests = {"reinforce": Reinforce().double(), "scaled": Scaled(Reinforce().double(), 1.2)}
    m = bias_metrics(model, ests, x, DRAWS, exact, seed=0)
    assert m["bias/reinforce/z2"] < Z2_UNBIASED_MAX, m
    assert abs(m["bias/reinforce/rel_sq"]) < 0.01, m
    assert m["bias/scaled/z2"] > 100, m
    assert 0.025 < m["bias/scaled/rel_sq"] < 0.055, m  # 0.2^2 = 0.04
    assert m["bias/reinforce/cos"] > 0.99


def test_bias_against_reference_estimator(tiny):
    model, x, _ = tiny
    ests = {"reinforce_ma": Reinforce(centre=True).double(), "scaled": Scaled(Reinforce().double(), 1.2)}
    m = bias_metrics(model, ests, x, DRAWS, Reinforce().double(), ref_draws=4 * DRAWS, seed=1)
    assert m["bias/reinforce_ma/z2"] < Z2_UNBIASED_MAX, m
    assert m["bias/scaled/z2"] > 100, m


def test_measuring_leaves_state_and_rng_alone(tiny):
    model, x, _ = tiny
    est = Reinforce(centre=True).double()
    est(model.cost_fn(x), model.context(x))  # move the moving average off its initial value
    before = {k: v.clone() for k, v in est.state_dict().items()}
    rng = torch.get_rng_state()
    gradient_moments(model, est, x[:30], 3, seed=5)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in est.state_dict().items())
    assert est.update_state


def compose_cfg(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(ROOT / "conf")):
        return compose("config", overrides=overrides)


def test_basket_and_bias_along_one_trajectory(tmp_path):
    """Measurements go to metrics.jsonl at the same step; a stateful basket estimator (moving-average baseline)
    learns its state along the trajectory; and training is the same with or without any of it."""
    from runners.train import train

    torch.set_num_threads(1)
    root = write_binarized_mnist(tmp_path / "data")
    base = [
        f"data.root={root}",
        "data.verify=false",
        "data.download=false",
        "logger=disabled",
        "quiet=true",
        "model=sbn",
        "model.layers=[8]",
        "estimator=reinforce",
        "train.steps=12",
        "train.batch_size=10",
        "train.eval_every=6",
        "train.log_every=2",
        "eval.samples=3",
        "eval.chunk=3",
    ]
    train(compose_cfg([*base, "variance.every=0"]), tmp_path / "plain")
    train(
        compose_cfg(
            [
                *base,
                "runner=trajectory",
                "variance.every=6",
                "variance.samples=4",
                "variance.basket=[reinforce_ma]",
                "variance.bias.samples=8",
            ]
        ),
        tmp_path / "measured",
    )

    def records(d: Path) -> list[dict]:
        return [json.loads(ln) for ln in (d / "metrics.jsonl").read_text().splitlines()]

    measured = records(tmp_path / "measured")
    at = [r for r in measured if "bias/reinforce/z2" in r]
    assert [r["step"] for r in at] == [0, 6]
    for r in at:
        for key in (
            "grad/reinforce/log10_var",
            "grad/reinforce_ma/log10_var",
            "bias/reinforce/z2",
            "bias/reinforce_ma/z2",
            "bias/reinforce_ma/rel_sq",
            "bias/reinforce/cos",
        ):
            assert key in r, key
    # at step 0 the moving average has seen nothing: reinforce_ma is reinforce, draw for draw; after six
    # training minibatches its baseline is learned, so it differs
    assert at[0]["grad/reinforce_ma/log10_var"] == at[0]["grad/reinforce/log10_var"]
    assert at[1]["grad/reinforce_ma/log10_var"] != at[1]["grad/reinforce/log10_var"]
    state = torch.load(tmp_path / "measured" / "checkpoint.pt", weights_only=False)["basket"]["reinforce_ma"]
    assert state["step"] == 12 and bool(state["signal.mean.initialised"])
    train_of = lambda recs: [(r["step"], r["train/elbo"]) for r in recs if "train/elbo" in r]  # noqa: E731
    assert train_of(measured) == train_of(records(tmp_path / "plain"))  # measuring changed nothing
