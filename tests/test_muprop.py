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
from tests.exact_discrete import Chain, Toy, build, expected_gradient, one_thread

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


# --------------------------------------------------------------------------------------------------
# The derivative of the Taylor expansion: total (through the mean-field network, the paper's Algorithm 1)
# against partial (layers above held fixed), on chains and tiny models where the two differ
# --------------------------------------------------------------------------------------------------


class PartialMuProp(muprop_module.MuProp):
    """The partial-derivative form (layers above held fixed), kept for comparison: unbiased too."""

    def mean_field_sampler(self):
        return muprop_module.MeanField(total=False)


def muprop_form(derivative: str, context_dim: int | None = None):
    """Plain MuProp from conf/estimator/muprop.yaml (total derivative), or its partial-derivative form."""
    return (
        build("muprop", context_dim)
        if derivative == "total"
        else PartialMuProp(context_dim=context_dim).double()
    )


def tiny_sp(layers: list[int], seed: int = 0):
    """A tiny float64 structured-prediction SBN (x_u -> h_1 -> .. -> h_L -> y) and 3 binary examples of 6 pixels."""
    from models.sbn_sp import SBNSP

    torch.manual_seed(seed)
    model = SBNSP(6, layers, hidden=4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)  # larger than the default init, so every gradient is far from zero
    x = (torch.rand(3, 6) < 0.5).double()  # [B, X]
    return model, x


@pytest.mark.parametrize("sizes", [[2, 2], [2, 1, 2]])
@pytest.mark.parametrize("derivative", ["total", "partial"])
def test_muprop_chain_one_sample_exact(sizes, derivative):
    """One sample, S = 1: the estimate equals the formula with f'(z_bar_i) written out by hand, the total
    derivative f'_i = u_i + W_{i+1}^T [sigmoid'(l_{i+1}(z_bar_i)) f'_{i+1}] or the partial one f'_i = u_i."""
    chain, est = Chain(sizes, seed=1), muprop_form(derivative)
    torch.manual_seed(11)
    out = est(chain.cost_fn, None)
    z_bar, zs = chain.seen  # mean-field pass, then the stochastic pass
    with torch.no_grad():
        mu_bar = [torch.sigmoid(chain.first_logits()).unsqueeze(0)]  # [1, B, D_1]
        for i in range(1, len(sizes)):
            mu_bar.append(torch.sigmoid(chain.logits(i, mu_bar[-1])))  # [1, B, D_i], the mean-field network
        for a, b in zip(z_bar, mu_bar):
            torch.testing.assert_close(a, b)
        fp = chain.f_prime_chain(mu_bar) if derivative == "total" else chain.f_prime_partial(mu_bar)
        f_z, f_bar = chain.f(zs), chain.f(mu_bar)  # [1, B]
        residuals = [f_z - f_bar - (p * (z - m)).sum(-1) for p, z, m in zip(fp, zs, mu_bar)]  # [1, B] each
    hand = chain.score_grads(zs, residuals, fp)
    got = torch.autograd.grad(out.surrogate, chain.flat_params())
    for g, h in zip(got, hand):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    if derivative == "partial":  # f does not read z_1 directly: the partial derivative there is zero
        assert bool((fp[0] == 0).all())
    else:
        assert float(fp[0].abs().min()) > 1e-3


@pytest.mark.parametrize("sizes", [[2, 2], [1, 2, 2]])
@pytest.mark.parametrize("derivative", ["total", "partial"])
def test_muprop_chain_exact_expectation(sizes, derivative, monkeypatch):
    """E[estimate] by enumeration of every joint state equals the exact gradient for both derivative forms."""
    chain, est = Chain(sizes, seed=2), muprop_form(derivative)
    got = expected_gradient(
        est, chain.example_cost_fns(), sizes, chain.flat_params(), monkeypatch, muprop_module
    )
    torch.testing.assert_close(got, chain.exact(), rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("layers", [[2, 2], [2, 1, 2]])
@pytest.mark.parametrize("derivative", ["total", "partial"])
def test_exact_expectation_structured_prediction(layers, derivative, monkeypatch):
    """The structured-prediction model, where the partial derivative for h_1 is identically zero."""
    model, x = tiny_sp(layers, seed=3)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)  # [P]
    est = muprop_form(derivative, model.context_dim)
    got = expected_gradient(
        est, [model.cost_fn(x[b : b + 1]) for b in range(3)], layers, params, monkeypatch, muprop_module
    )
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("derivative", ["total", "partial"])
def test_exact_expectation_sbn_both_forms(derivative, monkeypatch):
    """The generative SBN (f reads every layer directly): both forms unbiased on a two-layer net."""
    model, x = tiny_sbn([2, 2], seed=4)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)
    est = muprop_form(derivative, model.context_dim)
    got = expected_gradient(
        est, [model.cost_fn(x[b : b + 1]) for b in range(3)], [2, 2], params, monkeypatch, muprop_module
    )
    torch.testing.assert_close(got, exact, rtol=1e-9, atol=1e-10)


def test_total_and_partial_derivatives_differ():
    """On the SP model the partial f'(z_bar_1) is zero and the total one is not; on the SBN they differ."""
    model, x = tiny_sp([2, 2], seed=3)
    f_p = muprop_form("partial").mean_field(model.cost_fn(x))[2]
    f_t = muprop_form("total").mean_field(model.cost_fn(x))[2]
    assert bool((f_p["h1"] == 0).all()) and float(f_t["h1"].abs().min()) > 1e-6
    torch.testing.assert_close(f_p["h2"], f_t["h2"])  # the top layer has nothing above it
    model, x = tiny_sbn([2, 2], seed=4)
    f_p = muprop_form("partial").mean_field(model.cost_fn(x))[2]
    f_t = muprop_form("total").mean_field(model.cost_fn(x))[2]
    assert float((f_p["z1"] - f_t["z1"]).abs().max()) > 1e-3
