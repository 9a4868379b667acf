"""MuProp's pieces against closed forms, and its exact expectation by enumeration.

* the Taylor term's score-function expectation E[grad_l log p(z) f'^T (z - z_bar)] equals its closed form
  f' * mu (1 - mu) (what the correction term adds back);
* the correction term's gradient, with f'(z_bar) from the mean-field pass, equals sigmoid'(l) f'(mu) by hand;
* E[MuProp estimate], enumerated exactly over every joint state (no Monte Carlo), equals the exact gradient
  on the toy cost and on tiny 1-, 2- and 3-layer SBNs ([3], [2, 2], [1, 2, 1]);
* Gaussian latents (MuProp claims "normal"): z-test against the closed-form gradient of a quadratic cost;
* the variance-reduction state is created with the estimator (checkpoint keys and optimiser see it).
"""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Bernoulli, Independent, Normal

import estimators.muprop as muprop_module
from tests.exact import Z_MAX, enumerate_states, exact_objective, flat_grad, tiny_sbn, z_scores
from tests.exact_discrete import Toy, build, expected_gradient, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def test_taylor_term_expectation_closed_form():
    torch.manual_seed(0)
    logits = torch.randn(4, dtype=torch.float64, requires_grad=True)  # [D]
    f_prime = torch.randn(4, dtype=torch.float64)  # [D], any constant
    z_bar = torch.rand(4, dtype=torch.float64)  # [D], any constant point
    states = enumerate_states(4)  # [16, D]
    log_p = Independent(Bernoulli(logits=logits), 1).log_prob(states)  # [16]
    taylor = (f_prime * (states - z_bar)).sum(-1)  # [16]
    # E[grad log p * taylor] = sum_z p(z) grad log p(z) taylor(z) = grad of sum_z p(z) SG(taylor(z))
    (lhs,) = torch.autograd.grad((log_p.exp().detach() * log_p * taylor).sum(), logits)
    mu = torch.sigmoid(logits).detach()
    torch.testing.assert_close(lhs, f_prime * mu * (1 - mu), rtol=1e-12, atol=1e-12)


def test_mean_field_and_correction_closed_form():
    toy, est = Toy(), build("muprop")
    f_bar, z_bar, f_prime = est.mean_field(toy.cost_fn)
    mu = torch.sigmoid(toy.logits()).detach().unsqueeze(0)  # [1, B, D]
    torch.testing.assert_close(z_bar["z1"], mu)
    torch.testing.assert_close(f_bar, toy.f(mu).detach())
    torch.testing.assert_close(f_prime["z1"], toy.f_prime(mu))
    # correction term mu(l)^T SG(f'(z_bar)): gradient sigmoid'(l) f'(mu) per example
    (g,) = torch.autograd.grad((torch.sigmoid(toy.logits()) * f_prime["z1"][0]).sum(-1).mean(), toy.theta)
    torch.testing.assert_close(g, (mu * (1 - mu) * toy.f_prime(mu)).mean((0, 1)))
    assert toy.theta.grad is None and toy.w.grad is None  # the mean-field pass accumulates no gradient


def test_exact_expectation_toy(monkeypatch):
    toy, est = Toy(), build("muprop")
    exact = torch.cat([g.reshape(-1) for g in toy.exact()])

    def cost_fn_of(b):
        def cost_fn(sample, n):
            logits = toy.logits()[b : b + 1].expand(n, 1, toy.D)  # [S, 1, D]
            z = sample("z1", Independent(Bernoulli(logits=logits, validate_args=False), 1))  # [S, 1, D]
            return toy.f(z)  # [S, 1]

        return cost_fn

    got = expected_gradient(
        est, [cost_fn_of(b) for b in range(toy.B)], [toy.D], [toy.theta, toy.w], monkeypatch, muprop_module
    )
    torch.testing.assert_close(got, exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [[3], [2, 2], [1, 2, 1]])
def test_exact_expectation_sbn(layers, monkeypatch):
    """No Monte Carlo: the enumerated mean of the estimate is the exact gradient, to rounding.

    One estimator call per joint state and example (2^sum(D) x 3 calls), so the three-layer net is kept at
    four units; its middle layer is the one with a parent and a child, the case single-layer tests miss."""
    model, x = tiny_sbn(layers, seed=1)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)  # [P]
    est = build("muprop", model.context_dim)
    got = expected_gradient(
        est,
        [model.cost_fn(x[b : b + 1]) for b in range(x.shape[0])],
        layers,
        params,
        monkeypatch,
        muprop_module,
    )
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


def test_gaussian_latents_unbiased():
    """z ~ N(m, s^2) (D = 2), f(z) = sum (z - c)^2 + z_0 z_1: E f = sum (m - c)^2 + s^2 + m_0 m_1."""
    m = torch.tensor([0.3, -0.8], dtype=torch.float64, requires_grad=True)
    log_s = torch.tensor([-0.2, 0.4], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([1.0, 0.5], dtype=torch.float64)

    def cost_fn(sample, n, reps=2000):
        q = Independent(Normal(m.expand(n, reps, 2), log_s.exp().expand(n, reps, 2)), 1)  # batch [S, R]
        z = sample("z", q)  # [S, R, 2]
        return ((z - c) ** 2).sum(-1) + z[..., 0] * z[..., 1]  # [S, R]

    value = ((m - c) ** 2 + (2 * log_s).exp()).sum() + m[0] * m[1]
    exact = torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, [m, log_s])])
    est = build("muprop")
    torch.manual_seed(3)
    g = torch.stack(
        [
            torch.cat([x.reshape(-1) for x in torch.autograd.grad(est(cost_fn).surrogate, [m, log_s])])
            for _ in range(200)
        ]
    )  # [G, P]
    assert z_scores(g, exact).abs().max() < Z_MAX
    assert z_scores(g, 1.1 * exact).abs().max() > Z_MAX  # and the check has the power to see a 10% error


def test_signal_state_exists_before_first_step():
    model, x = tiny_sbn([2, 2], seed=1)
    est = build("muprop_c_idb", model.context_dim)
    keys, n_params = set(est.state_dict()), len(list(est.parameters()))
    assert n_params > 0  # the IDB net: an optimiser built now trains it
    est(model.cost_fn(x), model.context(x)).surrogate.backward()
    assert set(est.state_dict()) == keys and len(list(est.parameters())) == n_params
    fresh = build("muprop_c_idb", model.context_dim)
    fresh.load_state_dict(est.state_dict())  # strict: same keys
    assert bool(fresh.signal.mean.initialised)
