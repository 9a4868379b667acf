"""One-hot categorical latents (models/sbn_categorical.py, MuProp's "(200x10)-784") against exact answers.

A tiny model, 2 variables x 3 classes (9 joint states), 4 pixels, batch of 3; the exact gradient of E_q[cost]
by enumerating the 9 states (tests/exact_discrete.py ``exact_objective_sites``). Estimators are found by glob
over conf/estimator/*.yaml (those whose class supports ``categorical``):

* MuProp and REINFORCE: the enumerated mean of the estimate (every state forced, no Monte Carlo) equals the
  exact gradient to rounding;
* every estimator whose instance says unbiased: z-test of 200 group means (each over 200 replicated batches)
  against the exact gradient, |z| < Z_MAX (false-failure rate: tests/exact.py);
* every biased one (ST, 1/2, Gumbel-Softmax and their variants) is caught as biased (|z| > Z_MAX somewhere);
* one-sample formulas of ST, 1/2 (x_bar = 1/k) and straight-through Gumbel-Softmax on a categorical toy cost with
  a hand-written derivative.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributions import Independent

import estimators.muprop as muprop_module
import estimators.reinforce as reinforce_module
from models.sbn_categorical import LinearOneHotCategorical
from tests.exact import Z_MAX, flat_grad, mc_gradients, z_scores
from tests.exact_discrete import (
    build,
    enumerate_one_hot,
    exact_objective_sites,
    expected_gradient_sites,
    one_thread,
    tiny_categorical,
)

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"


def categorical_estimators(unbiased: bool) -> list[str]:
    """YAMLs serving categorical latents whose instance says (un)biased. The biased list leaves out the VN
    variants of unbiased classes: their bias is one positive scale, max(1, sqrt(v)), which is 1 on a model
    this small (tests/test_biased.py catches it on deeper SBNs)."""
    out = []
    for name in sorted(p.stem for p in CONF.glob("*.yaml")):
        est = build(name, context_dim=4)
        if "categorical" not in est.supports or est.unbiased != unbiased:
            continue
        if not unbiased and type(est).unbiased:
            continue
        out.append(name)
    return out


def exact_gradient(model, x) -> torch.Tensor:
    states = [enumerate_one_hot(model.variables, model.classes)]  # [9, V, K]
    return flat_grad(exact_objective_sites(model.cost_fn(x), states, x.shape[0]), list(model.parameters()))


def test_enumeration_is_a_distribution():
    """The 9 states' probabilities under q sum to one for every example (the enumeration covers the support)."""
    model, x = tiny_categorical()
    logits = model.encoder(model.context(x)).unflatten(-1, (2, 3))  # [B, V, K]
    states = enumerate_one_hot(2, 3)  # [9, V, K]
    q = Independent(LinearOneHotCategorical(logits=logits), 1)
    total = q.log_prob(states.unsqueeze(1)).exp().sum(0)  # [B]
    torch.testing.assert_close(total, torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("prior", ["learned", "uniform"])
@pytest.mark.parametrize(("name", "module"), [("muprop", muprop_module), ("reinforce", reinforce_module)])
def test_exact_expectation(name, module, prior, monkeypatch):
    model, x = tiny_categorical(prior=prior, seed=1)
    params = list(model.parameters())
    est = build(name, model.context_dim)
    got = expected_gradient_sites(
        est,
        [model.cost_fn(x[b : b + 1]) for b in range(3)],
        [enumerate_one_hot(2, 3)],
        params,
        monkeypatch,
        module,
    )
    torch.testing.assert_close(got, exact_gradient(model, x), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("est_name", categorical_estimators(unbiased=True))
def test_unbiased_on_enumerable_categorical(est_name):
    model, x = tiny_categorical(seed=1)
    exact = exact_gradient(model, x)
    estimator = build(est_name, model.context_dim)
    torch.manual_seed(2)
    g = mc_gradients(model, estimator, x, groups=200, replicas=200)  # [G, P]
    z = z_scores(g, exact)
    assert z.abs().max() < Z_MAX, f"{est_name}: max |z| = {z.abs().max():.2f}"


@pytest.mark.parametrize("est_name", categorical_estimators(unbiased=False))
def test_biased_estimator_is_caught(est_name):
    model, x = tiny_categorical(seed=1)
    exact = exact_gradient(model, x)
    estimator = build(est_name, model.context_dim)
    torch.manual_seed(2)
    g = mc_gradients(model, estimator, x, groups=200, replicas=100)  # [G, P]
    assert z_scores(g, exact).abs().max() > Z_MAX, f"{est_name} is declared biased but shows no bias"


class CatToy(torch.nn.Module):
    """Two categorical variables of 3 classes, batch of 2: l = theta + offset_b, f(z) = sum A * z + c z_00 z_12,
    so f'(z) = A + c (z_12 at [0, 0], z_00 at [1, 2])."""

    B, V, K = 2, 2, 3

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.theta = torch.nn.Parameter(torch.randn(self.V, self.K, generator=g, dtype=torch.float64))
        self.offset = torch.randn(self.B, self.V, self.K, generator=g, dtype=torch.float64)
        self.A = torch.randn(self.V, self.K, generator=g, dtype=torch.float64)
        self.c = 1.7
        self.seen = []

    def logits(self):
        return self.theta + self.offset  # [B, V, K]

    def f(self, z):
        return (z * self.A).sum((-1, -2)) + self.c * z[..., 0, 0] * z[..., 1, 2]  # [S, B]

    def f_prime(self, z):
        fp = self.A.expand_as(z).clone()  # [S, B, V, K]
        fp[..., 0, 0] += self.c * z[..., 1, 2]
        fp[..., 1, 2] += self.c * z[..., 0, 0]
        return fp

    def cost_fn(self, sample, n):
        q = Independent(
            LinearOneHotCategorical(logits=self.logits().expand(n, -1, -1, -1), validate_args=False), 1
        )
        z = sample("z1", q)  # [S, B, V, K]
        self.seen.append(z.detach().clone())
        return self.f(z)


def softmax_vjp(p, v):
    """(d softmax / d l)^T v for p = softmax(l) over the last dimension."""
    return p * (v - (p * v).sum(-1, keepdim=True))


def check_theta(toy, out, g_logits):
    (g,) = torch.autograd.grad(out.surrogate, [toy.theta])
    torch.testing.assert_close(g, g_logits.mean((0, 1)), rtol=1e-10, atol=1e-12)


def test_st_categorical_exact():
    toy, est = CatToy(), build("st")
    torch.manual_seed(21)
    out = est(toy.cost_fn, None)
    (b,) = toy.seen
    assert set(b.sum(-1).unique().tolist()) == {1.0}  # one-hot forward values
    p = torch.softmax(toy.logits(), -1).detach()  # [B, V, K]
    check_theta(toy, out, softmax_vjp(p, toy.f_prime(b)))  # f'(b) through d softmax(l) / dl


def test_darn_categorical_exact():
    toy, est = CatToy(), build("darn")
    torch.manual_seed(22)
    out = est(toy.cost_fn, None)
    (b,) = toy.seen
    p = torch.softmax(toy.logits(), -1).detach()
    signal = (toy.f_prime(b) * (b - 1.0 / 3)).sum(-1)  # [1, B, V]: per variable f'_v(b)^T (b_v - 1/k), k = 3
    check_theta(toy, out, (b - p) * signal[..., None])  # grad_l log p(b_v) = b_v - p_v


def test_gumbel_st_categorical_exact():
    toy, est = CatToy(), build("gumbel_st", temperature=0.7, min_temperature=0.7)
    torch.manual_seed(23)
    u = torch.rand(1, toy.B, toy.V, toy.K, dtype=torch.float64)  # the estimator's first random draw
    torch.manual_seed(23)
    out = est(toy.cost_fn, None)
    (b,) = toy.seen
    logits = toy.logits().detach()
    gumbel = -torch.log(-torch.log(u))
    torch.testing.assert_close(b, torch.nn.functional.one_hot((logits + gumbel).argmax(-1), 3).double())
    y = torch.softmax((logits + gumbel) / 0.7, -1)
    check_theta(toy, out, softmax_vjp(y, toy.f_prime(b)) / 0.7)  # f'(b) through dy/dl = J_softmax / tau


def test_gumbel_relaxed_categorical_exact():
    toy, est = CatToy(), build("gumbel", temperature=0.5, min_temperature=0.5)
    torch.manual_seed(24)
    u = torch.rand(1, toy.B, toy.V, toy.K, dtype=torch.float64)
    torch.manual_seed(24)
    out = est(toy.cost_fn, None)
    (y,) = toy.seen
    y_hand = torch.softmax((toy.logits().detach() - torch.log(-torch.log(u))) / 0.5, -1)
    torch.testing.assert_close(y, y_hand)
    check_theta(toy, out, softmax_vjp(y, toy.f_prime(y)) / 0.5)  # f' of the multilinear f at y
