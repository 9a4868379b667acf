"""One exact test per discrete estimator: fixed seed, one sample, the estimator's gradient against the formula
written out by hand (tests/exact_discrete.py: Toy, one Bernoulli layer of 3 units, batch of 2, cost
f(z; w) = a^T z + c z_0 z_1 + w z_2 + w^2, logits l = theta + offset_b).

The sample is read back from the values the cost function saw (``Toy.seen``) or, where the formula needs the
underlying noise (ARM's u, Gumbel's logistic noise), recomputed from the same seed and checked against the
values seen.
"""

from __future__ import annotations

import math

import pytest
import torch

from tests.exact_discrete import Toy, build, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def sig(x):
    return torch.sigmoid(x)


def check(toy: Toy, out, g_theta_hand, g_w_hand):
    g_theta, g_w = toy.grads(out.surrogate)
    torch.testing.assert_close(g_theta, g_theta_hand, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, g_w_hand, rtol=1e-10, atol=1e-12)


def per_example_mean(g):  # [S, B, D] -> [D]: the surrogate averages over samples and examples
    return g.mean((0, 1))


def test_muprop_exact():
    toy, est = Toy(), build("muprop")
    torch.manual_seed(0)
    out = est(toy.cost_fn, None)
    z_bar, z = toy.seen  # mean-field pass first, then the stochastic pass
    mu = sig(toy.logits()).detach().unsqueeze(0)  # [1, B, D]
    torch.testing.assert_close(z_bar, mu)
    with torch.no_grad():
        fp = toy.f_prime(mu)  # [1, B, D], f' at the mean-field point
        r = toy.f(z) - toy.f(mu) - (fp * (z - mu)).sum(-1)  # [1, B] Taylor residual
        g = (z - mu) * r.unsqueeze(-1) + mu * (1 - mu) * fp  # [1, B, D] score x residual + d mu/dl f'
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())
    torch.testing.assert_close(out.cost, toy.f(z).detach())


def test_muprop_c_vn_second_step():
    """Centring and VN act on the residual of the second call with the first call's statistics; VN also scales
    the correction term."""
    toy, est = Toy(scale=6.0), build("muprop_c_vn")  # large costs: VN's scale exceeds 1
    torch.manual_seed(1)
    out = est(toy.cost_fn, None)
    mu = sig(toy.logits()).detach().unsqueeze(0)  # [1, B, D]
    with torch.no_grad():
        fp = toy.f_prime(mu)
        r1 = toy.f(toy.seen[1]) - toy.f(mu) - (fp * (toy.seen[1] - mu)).sum(-1)  # [1, B]
    c = r1.mean()  # first moving-average value (initialised to the first signal)
    v = r1.pow(2).mean()  # first variance of the centred signal (centred by the initial zero)
    scale = max(1.0, float(v.sqrt()))
    assert scale > 1.5
    toy.seen.clear()
    out = est(toy.cost_fn, None)
    z = toy.seen[1]
    with torch.no_grad():
        r = toy.f(z) - toy.f(mu) - (fp * (z - mu)).sum(-1)  # [1, B]
        g = (z - mu) * ((r - c) / scale).unsqueeze(-1) + mu * (1 - mu) * fp / scale  # [1, B, D]
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())
    assert out.cost.shape == (1, 2)


def test_reinforce_loo_exact():
    toy, est = Toy(), build("reinforce_loo", n_samples=3)
    torch.manual_seed(2)
    out = est(toy.cost_fn, None)
    (z,) = toy.seen  # [3, B, D]
    mu = sig(toy.logits()).detach()  # [B, D]
    with torch.no_grad():
        f = toy.f(z)  # [3, B]
        base = torch.stack([(f.sum(0) - f[s]) / 2 for s in range(3)])  # [3, B], mean of the two others
        g = (z - mu) * (f - base).unsqueeze(-1)  # [3, B, D]
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())


def test_st_exact():
    toy, est = Toy(), build("st")
    torch.manual_seed(3)
    out = est(toy.cost_fn, None)
    (z,) = toy.seen  # the hard sample
    assert set(z.unique().tolist()) <= {0.0, 1.0}
    mu = sig(toy.logits()).detach()
    with torch.no_grad():
        g = mu * (1 - mu) * toy.f_prime(z)  # [1, B, D]: f'(b) d sigmoid(l) / dl
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())


def test_st_annealed_exact():
    toy, est = Toy(), build("st_annealed", slope_rate=0.01, max_slope=5.0)
    est.step.fill_(150)  # slope = min(5, 1 + 0.01 * 150) = 2.5
    torch.manual_seed(4)
    out = est(toy.cost_fn, None)
    (z,) = toy.seen
    a = 2.5
    s = sig(a * toy.logits()).detach()
    with torch.no_grad():
        g = a * s * (1 - s) * toy.f_prime(z)  # [1, B, D]
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())
    est.step.fill_(10_000)
    assert est.current_slope() == 5.0


def test_darn_exact():
    toy, est = Toy(), build("darn")
    torch.manual_seed(5)
    out = est(toy.cost_fn, None)
    (z,) = toy.seen
    mu = sig(toy.logits()).detach()
    with torch.no_grad():
        signal = toy.f_prime(z) * (z - 0.5)  # [1, B, D]: one signal per unit, f'_j(z) (z_j - 1/2)
        g = (z - mu) * signal  # [1, B, D]: grad_l log p(z) = z - mu
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())


def _logistic_noise(seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    u = torch.rand(1, Toy.B, Toy.D, dtype=torch.float64)  # the estimator's first random draw
    return torch.log(u) - torch.log1p(-u)  # [1, B, D]


def test_gumbel_exact():
    toy, est = Toy(), build("gumbel", temperature=0.5, min_temperature=0.5)
    noise = _logistic_noise(6)
    torch.manual_seed(6)
    out = est(toy.cost_fn, None)
    (y,) = toy.seen
    tau = 0.5
    y_hand = sig((toy.logits().detach() + noise) / tau)  # [1, B, D]
    torch.testing.assert_close(y, y_hand)
    with torch.no_grad():
        g = toy.f_prime(y) * y * (1 - y) / tau  # [1, B, D]: f'(y) dy/dl, f' of the multilinear f at y
    check(toy, out, per_example_mean(g), (y[..., 2] + 2 * toy.w).mean().detach())


def test_gumbel_annealed_exact():
    toy, est = Toy(), build("gumbel_annealed", temperature=1.0, min_temperature=0.3, anneal_rate=0.001)
    est.step.fill_(500)
    tau = max(0.3, math.exp(-0.001 * 500))
    assert abs(est.current_temperature() - tau) < 1e-12
    noise = _logistic_noise(7)
    torch.manual_seed(7)
    out = est(toy.cost_fn, None)
    (y,) = toy.seen
    torch.testing.assert_close(y, sig((toy.logits().detach() + noise) / tau))
    with torch.no_grad():
        g = toy.f_prime(y) * y * (1 - y) / tau
    check(toy, out, per_example_mean(g), (y[..., 2] + 2 * toy.w).mean().detach())
    est.step.fill_(10_000)
    assert est.current_temperature() == 0.3


def test_gumbel_st_exact():
    toy, est = Toy(), build("gumbel_st", temperature=0.8, min_temperature=0.8)
    noise = _logistic_noise(8)
    torch.manual_seed(8)
    out = est(toy.cost_fn, None)
    (z,) = toy.seen
    tau = 0.8
    logits = toy.logits().detach()
    torch.testing.assert_close(z, (logits + noise > 0).double())  # hard forward value
    y = sig((logits + noise) / tau)
    with torch.no_grad():
        g = toy.f_prime(z) * y * (1 - y) / tau  # [1, B, D]: f' at the hard sample, relaxed dy/dl
    check(toy, out, per_example_mean(g), (z[..., 2] + 2 * toy.w).mean().detach())


def _antithetic(seed: int, toy: Toy):
    torch.manual_seed(seed)
    u = torch.rand(1, Toy.B, Toy.D, dtype=torch.float64)  # [1, B, D], the estimator's first random draw
    phi = toy.logits().detach()
    b1 = (u > sig(-phi)).double()  # [1, B, D]
    b2 = (u < sig(phi)).double()
    return u, phi, b1, b2


def test_arm_exact():
    toy, est = Toy(), build("arm")
    u, phi, b1, b2 = _antithetic(9, toy)
    torch.manual_seed(9)
    out = est(toy.cost_fn, None)
    base, flipped = toy.seen
    torch.testing.assert_close(base, b2)
    torch.testing.assert_close(flipped, b1)
    with torch.no_grad():
        g = (toy.f(b1) - toy.f(b2)).unsqueeze(-1) * (u - 0.5)  # [1, B, D]
    # the direct dependence on w is taken at the base sample b2
    check(toy, out, per_example_mean(g), (b2[..., 2] + 2 * toy.w).mean().detach())


def test_disarm_exact():
    toy, est = Toy(), build("disarm")
    u, phi, b1, b2 = _antithetic(10, toy)
    assert (b1 != b2).any(), "pick a seed where the pair differs somewhere, or the test is vacuous"
    torch.manual_seed(10)
    out = est(toy.cost_fn, None)
    base, flipped = toy.seen
    torch.testing.assert_close(base, b2)
    torch.testing.assert_close(flipped, b1)
    with torch.no_grad():
        g = (
            0.5 * (toy.f(b1) - toy.f(b2)).unsqueeze(-1) * (b1 != b2).double() * (-1.0) ** b2 * sig(phi.abs())
        )  # [1, B, D]
    check(toy, out, per_example_mean(g), (b2[..., 2] + 2 * toy.w).mean().detach())
