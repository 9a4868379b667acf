"""fDARN (models/fdarn.py): the autoregressive prior is a normalised distribution equal to the product of its
conditionals written by hand, and the estimators' exact expectations (enumeration of every state of q, no Monte
Carlo) equal the exact gradient of the tiny model's negative ELBO."""

from __future__ import annotations

import pytest
import torch

import estimators.muprop as muprop_module
import estimators.reinforce as reinforce_module
from models.fdarn import FDARN
from tests.exact import Z_MAX, enumerate_states, exact_objective, flat_grad, mc_gradients, z_scores
from tests.exact_discrete import build, expected_gradient, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def tiny_fdarn(visible: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    model = FDARN(5, latent=3, visible_autoregressive=visible).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)  # the autoregressive weights too: non-zero, so the prior is not factorial
    x = (torch.rand(3, 5) < 0.5).double()  # [B, X]
    return model, x


def test_prior_is_normalised_and_autoregressive():
    model, _ = tiny_fdarn()
    h = enumerate_states(3)  # [8, D]
    b, a = model.prior_bias.detach(), model.prior_ar.detach()
    hand = torch.ones(8, dtype=torch.float64)
    for j in range(3):  # p(h) = prod_j p(h_j | h_<j), written out unit by unit
        p1 = torch.sigmoid(b[j] + (a[j, :j] * h[:, :j]).sum(-1))  # [8]
        hand = hand * torch.where(h[:, j] == 1, p1, 1 - p1)
    from models.sbn import bernoulli_layer

    got = bernoulli_layer(model.prior_logits(h)).log_prob(h).exp().detach()  # [8]
    torch.testing.assert_close(got, hand)
    torch.testing.assert_close(got.sum(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("visible", [False, True])
@pytest.mark.parametrize(("name", "module"), [("muprop", muprop_module), ("reinforce", reinforce_module)])
def test_exact_expectation(name, module, visible, monkeypatch):
    model, x = tiny_fdarn(visible, seed=1)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)
    est = build(name, model.context_dim)
    got = expected_gradient(
        est, [model.cost_fn(x[b : b + 1]) for b in range(3)], [3], params, monkeypatch, module
    )
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


def test_generate_shapes():
    model, _ = tiny_fdarn(visible=True)
    x = model.float().generate(4)
    assert x.shape == (4, 5) and bool(((x >= 0) & (x <= 1)).all())


def unbiased_bernoulli_estimators() -> list[str]:
    from pathlib import Path

    conf = Path(__file__).resolve().parents[1] / "conf" / "estimator"
    names = sorted(p.stem for p in conf.glob("*.yaml"))
    return [n for n in names if "bernoulli" in (e := build(n, 5)).supports and e.unbiased]


@pytest.mark.parametrize("est_name", unbiased_bernoulli_estimators())
def test_unbiased_on_enumerable_fdarn(est_name):
    """Every unbiased Bernoulli estimator (glob) against the exact gradient of the tiny fDARN with autoregressive
    prior and pixels: z-test of 200 group means, |z| < Z_MAX (false-failure rate: tests/exact.py)."""
    model, x = tiny_fdarn(visible=True, seed=2)
    exact = flat_grad(exact_objective(model, x), list(model.parameters()))
    estimator = build(est_name, model.context_dim)
    torch.manual_seed(2)
    g = mc_gradients(model, estimator, x, groups=200, replicas=200)  # [G, P]
    z = z_scores(g, exact)
    assert z.abs().max() < Z_MAX, f"{est_name}: max |z| = {z.abs().max():.2f}"
