"""Unbiasedness of every unbiased estimator against exact gradients (enumeration / closed forms).

Estimators are found by glob over conf/estimator/*.yaml; the ones whose class says ``unbiased`` and that
support Bernoulli latents are checked on tiny SBNs with one, two and three stochastic layers; biased ones
must be caught as biased on at least one of them. See tests/exact.py for the false-failure rate.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from tests.exact import Z_MAX, exact_objective, flat_grad, mc_gradients, tiny_sbn, z_scores

CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"
ESTIMATORS = sorted(p.stem for p in CONF.glob("*.yaml"))
MODELS = {"1layer": [3], "2layer": [2, 2], "3layer": [2, 2, 2]}


def build(name: str, context_dim: int):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    return instantiate(cfg, context_dim=context_dim).double()


def bernoulli_estimators(unbiased: bool) -> list[str]:
    """Estimator YAMLs that serve Bernoulli latents and whose instance says it is (un)biased."""
    out = []
    for name in ESTIMATORS:
        est = build(name, context_dim=5)
        if "bernoulli" in est.supports and est.unbiased == unbiased:
            out.append(name)
    return out


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("est_name", bernoulli_estimators(unbiased=True))
def test_unbiased_on_enumerable_sbn(est_name: str, model_name: str):
    model, x = tiny_sbn(MODELS[model_name], seed=1)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)  # [P]
    estimator = build(est_name, model.context_dim)
    torch.manual_seed(2)
    g = mc_gradients(model, estimator, x, groups=200, replicas=200)  # [G, P]
    z = z_scores(g, exact)
    worst = int(z.abs().argmax())
    assert z.abs().max() < Z_MAX, (
        f"{est_name} on {model_name}: max |z| = {z.abs().max():.2f} at parameter {worst} "
        f"(MC {g.mean(0)[worst]:.5f} vs exact {exact[worst]:.5f})"
    )


def test_z_test_can_fail():
    """The check above rejects a wrong gradient: exact gradient of a different objective (scaled by 1.05)."""
    model, x = tiny_sbn(MODELS["1layer"], seed=1)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)
    estimator = build("reinforce_ma", model.context_dim)
    torch.manual_seed(2)
    g = mc_gradients(model, estimator, x, groups=200, replicas=200)
    assert z_scores(g, 1.05 * exact).abs().max() > Z_MAX
