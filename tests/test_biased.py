"""Biased estimators are caught as biased against exact gradients on a tiny SBN.

Estimators are found by glob over conf/estimator/*.yaml: every one whose instance says ``unbiased = False`` and
that supports Bernoulli latents must show a z-score above Z_MAX (tests/exact.py) on at least one of the tiny
3-, 2- and 1-layer SBNs that tests/test_unbiased.py uses (tried in that order; the first catch ends the test).
A pass here means the bias is large enough for the unbiasedness check to see, i.e. that check would not
wave a biased estimator through. Seeds are fixed, so the outcome is reproducible.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.exact import Z_MAX, exact_objective, flat_grad, mc_gradients, tiny_sbn, z_scores
from tests.exact_discrete import build, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"
# deepest first: VN's rescaling and DARN's bias show most clearly there (largest cost variance, most
# non-quadratic f), so one model usually settles it
MODELS = {"3layer": [2, 2, 2], "2layer": [2, 2], "1layer": [3]}


def biased_bernoulli_estimators() -> list[str]:
    """YAMLs whose *instance* says biased (a YAML option such as VN can make an estimator biased)."""
    names = sorted(p.stem for p in CONF.glob("*.yaml"))
    return [n for n in names if "bernoulli" in (e := build(n, 5)).supports and not e.unbiased]


@pytest.mark.parametrize("est_name", biased_bernoulli_estimators())
def test_biased_estimator_is_caught(est_name: str):
    seen = {}
    for model_name, layers in MODELS.items():
        model, x = tiny_sbn(layers, seed=1)
        params = list(model.parameters())
        exact = flat_grad(exact_objective(model, x), params)  # [P]
        estimator = build(est_name, model.context_dim)
        torch.manual_seed(2)
        g = mc_gradients(model, estimator, x, groups=200, replicas=100)  # [G, P]; the biases seen are z > 20
        seen[model_name] = float(z_scores(g, exact).abs().max())
        if seen[model_name] > Z_MAX:
            return
    pytest.fail(f"{est_name} is declared biased but no tiny SBN shows it: max |z| per model {seen}")
