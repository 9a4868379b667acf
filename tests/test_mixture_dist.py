"""Tests for ``estimators.mixture_dist`` (Graves 2016 / implicit reparameterization of diagonal mixtures).

Statistical tests use fixed seeds. Each z-score check passes at |z| < 4.5 per coordinate (two-sided
p = 6.8e-6 under the null); the file checks fewer than 150 such coordinates, so by Bonferroni a fresh seed
would fail with probability below 1e-3. Kolmogorov-Smirnov checks pass at p > 1e-4 (12 tests, < 1.2e-3).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.distributions import Categorical, Independent, MixtureSameFamily, Normal

from estimators.mixture_dist import (
    COMPONENT_GRADS,
    DiagNormalMixture,
    implicit_grad_dense_reference,
    implicit_grad_structured,
    mixture_cdf_transform,
    mixture_quantile,
    reparameterize,
)

Z_MAX = 4.5  # per-coordinate z-score threshold (see module docstring)
KS_P_MIN = 1e-4


def random_mixture(batch_shape, k, d, dtype=torch.float64, seed=0, spread=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(*batch_shape, k, generator=gen, dtype=dtype)  # [..., K]
    loc = spread * torch.randn(*batch_shape, k, d, generator=gen, dtype=dtype)  # [..., K, D]
    scale = 0.3 + torch.rand(*batch_shape, k, d, generator=gen, dtype=dtype)  # [..., K, D]
    return logits, loc, scale


def z_scores(samples: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """(sample mean - exact) / standard error, per coordinate; samples [N, P], exact [P]."""
    n = samples.shape[0]
    se = samples.std(0) / math.sqrt(n)  # [P]
    return (samples.mean(0) - exact) / se  # [P]


# ---------------------------------------------------------------------------------------------------
# gradcheck of the hand-written backward


def test_gradcheck_implicit_float64():
    # x(theta) = T_theta^{-1}(u) with u fixed: finite differences of the quantile solve must match backward.
    logits, loc, scale = random_mixture((2,), 3, 4, seed=1)
    u = torch.tensor([[0.2, 0.7, 0.45, 0.9], [0.6, 0.1, 0.35, 0.55]], dtype=torch.float64)  # [2, D]
    x0 = mixture_quantile(logits, loc, scale, u)  # [2, D]
    torch.testing.assert_close(mixture_cdf_transform(logits, loc, scale, x0), u, rtol=0, atol=1e-13)

    def x_of_theta(a, m, s):
        x = mixture_quantile(a.detach(), m.detach(), s.detach(), u, init=x0)  # [2, D]
        return reparameterize(a, m, s, x, block_size=3)  # two blocks: carries across blocks too

    params = tuple(p.clone().requires_grad_() for p in (logits, loc, scale))
    assert torch.autograd.gradcheck(x_of_theta, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_implicit_one_dimensional():
    logits, loc, scale = random_mixture((), 2, 1, seed=2)
    u = torch.tensor([0.3], dtype=torch.float64)  # [D]
    x0 = mixture_quantile(logits, loc, scale, u)  # [D]

    def x_of_theta(a, m, s):
        return reparameterize(a, m, s, mixture_quantile(a.detach(), m.detach(), s.detach(), u, init=x0))

    params = tuple(p.clone().requires_grad_() for p in (logits, loc, scale))
    assert torch.autograd.gradcheck(x_of_theta, params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradcheck_graves_components():
    # Graves' loc/scale gradient is the ordinary reparameterization x = mu_k + sigma_k eps, k fixed.
    logits, loc, scale = random_mixture((3,), 4, 5, seed=3)
    component = torch.tensor([0, 3, 1])  # [B]
    eps = torch.randn(3, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0))  # [B, D]
    index = component[:, None, None].expand(3, 1, 5)  # [B, 1, D]

    def x_of_theta(m, s):
        x = m.gather(-2, index).squeeze(-2) + s.gather(-2, index).squeeze(-2) * eps  # [B, D]
        return reparameterize(logits, m, s, x, component=component, component_grad="graves")

    params = tuple(p.clone().requires_grad_() for p in (loc, scale))
    assert torch.autograd.gradcheck(x_of_theta, params)


# ---------------------------------------------------------------------------------------------------
# agreement with the dense reference (autograd Jacobian of T + triangular solve)


@pytest.mark.parametrize(
    "batch_shape,k,d,block_size",
    [
        ((), 1, 1, 16),
        ((), 3, 1, 16),
        ((), 10, 20, 16),
        ((5,), 1, 6, 16),
        ((4,), 2, 20, 1),
        ((4,), 10, 20, 16),
        ((4,), 10, 20, 7),
        ((2, 3), 4, 7, 3),
        ((2, 3), 6, 12, 16),
        ((3, 1), 5, 9, 4),
    ],
)
def test_matches_dense_reference(batch_shape, k, d, block_size):
    logits, loc, scale = random_mixture(batch_shape, k, d, seed=10 * k + d)
    dist = DiagNormalMixture(logits, loc, scale)
    torch.manual_seed(k + d)
    x = dist.sample((2,))  # [2, *batch, D]: sample dims broadcast against the batch shape
    g = torch.randn_like(x)  # [2, *batch, D]

    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    xr = reparameterize(*params, x, block_size=block_size)  # [2, *batch, D]
    fast = torch.autograd.grad(xr, params, grad_outputs=g)
    dense = implicit_grad_dense_reference(logits, loc, scale, x, g)
    for got, want in zip(fast, dense):
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_block_sizes_agree():
    logits, loc, scale = random_mixture((8,), 6, 37, seed=5)
    x = DiagNormalMixture(logits, loc, scale).sample()  # [8, D]
    g = torch.randn_like(x)  # [8, D]
    ref = implicit_grad_structured(logits, loc, scale, x, g, block_size=1)[:3]
    for block_size in (2, 5, 16, 37, 64):
        got = implicit_grad_structured(logits, loc, scale, x, g, block_size=block_size)[:3]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_exact_one_sample_one_dimension():
    # D = 1 written out by hand: F = sum_k pi_k Phi_k, f = sum_k pi_k N_k,
    # dx/da_j = -pi_j (Phi_j - F) / f, dx/dmu_k = pi_k N_k / f, dx/dsigma_k = z_k pi_k N_k / f.
    logits = torch.tensor([0.3, -0.4], dtype=torch.float64)  # [K]
    loc = torch.tensor([[-1.0], [1.5]], dtype=torch.float64)  # [K, 1]
    scale = torch.tensor([[0.7], [1.2]], dtype=torch.float64)  # [K, 1]
    x = torch.tensor([0.4], dtype=torch.float64)  # [1]
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    grads = torch.autograd.grad(reparameterize(*params, x), params)

    pi = torch.softmax(logits, 0)  # [K]
    z = (x - loc[:, 0]) / scale[:, 0]  # [K]
    cdf = 0.5 * torch.erfc(-z / math.sqrt(2.0))  # [K]
    dens = torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * scale[:, 0])  # [K]
    big_f, small_f = (pi * cdf).sum(), (pi * dens).sum()
    torch.testing.assert_close(grads[0], -pi * (cdf - big_f) / small_f, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[1][:, 0], pi * dens / small_f, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[2][:, 0], z * pi * dens / small_f, rtol=1e-12, atol=1e-14)


# ---------------------------------------------------------------------------------------------------
# unbiasedness


def per_sample_grads(logits, loc, scale, n, cost, component_grad, seed):
    """One gradient estimate per sample: the parameters are n independent copies, so grads do not sum."""
    k, d = loc.shape[-2:]
    a = logits.detach().expand(n, k).clone().requires_grad_()  # [N, K]
    m = loc.detach().expand(n, k, d).clone().requires_grad_()  # [N, K, D]
    s = scale.detach().expand(n, k, d).clone().requires_grad_()  # [N, K, D]
    torch.manual_seed(seed)
    x = DiagNormalMixture(a, m, s, component_grad=component_grad).rsample()  # [N, D]
    cost(x).sum().backward()
    return torch.cat([a.grad, m.grad.flatten(1), s.grad.flatten(1)], 1)  # [N, K + 2 K D]


def exact_grads(logits, loc, scale, expectation):
    params = [p.detach().clone().requires_grad_() for p in (logits, loc, scale)]
    grads = torch.autograd.grad(expectation(*params), params)
    return torch.cat([g.flatten() for g in grads])  # [K + 2 K D]


@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
def test_unbiased_quadratic_cost(component_grad):
    logits, loc, scale = random_mixture((), 3, 3, seed=7, spread=1.5)
    a = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)  # [D]
    b = torch.tensor([1.0, 0.3, -0.7], dtype=torch.float64)  # [D]

    def cost(x):
        return (a * x + b * x.square()).sum(-1)  # [N]

    def expectation(lg, m, s):
        pi = torch.softmax(lg, -1).unsqueeze(-1)  # [K, 1]
        first = (pi * m).sum(-2)  # [D], E[x_d]
        second = (pi * (s.square() + m.square())).sum(-2)  # [D], E[x_d^2]
        return (a * first + b * second).sum()

    est = per_sample_grads(logits, loc, scale, 20000, cost, component_grad, seed=11)  # [N, P]
    z = z_scores(est, exact_grads(logits, loc, scale, expectation))  # [P]
    assert z.abs().max() < Z_MAX, z


def gauss_hermite(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Nodes t and weights for E_{N(0,1)}[h] ~ sum_i weight_i h(t_i)."""
    t, w = np.polynomial.hermite.hermgauss(n)
    return torch.tensor(t * math.sqrt(2.0)), torch.tensor(w / math.sqrt(math.pi))  # [n], [n]


def cost_1d(x):
    return torch.sin(2.0 * x[..., 0]) + torch.tanh(x[..., 0])  # [...]


def cost_2d(x):
    return torch.sin(x[..., 0]) + x[..., 0] * torch.tanh(x[..., 1])  # [...]


def quadrature_expectation(cost, lg, m, s, n_nodes=80):
    """sum_k pi_k E_{N(mu_k, diag sigma_k^2)}[cost] by a tensor-product Gauss-Hermite rule (D <= 2)."""
    t, w = gauss_hermite(n_nodes)  # [n], [n]
    d = m.shape[-1]
    grids = torch.meshgrid(*([t] * d), indexing="ij")  # D x [n, ..., n]
    nodes = torch.stack([g.flatten() for g in grids], -1)  # [n^D, D]
    weights = torch.stack(torch.meshgrid(*([w] * d), indexing="ij"), -1).flatten(0, -2).prod(-1)  # [n^D]
    x = m.unsqueeze(-2) + s.unsqueeze(-2) * nodes  # [K, n^D, D]
    per_component = (weights * cost(x)).sum(-1)  # [K]
    return (torch.softmax(lg, -1) * per_component).sum()


@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
@pytest.mark.parametrize("d,cost", [(1, cost_1d), (2, cost_2d)])
def test_unbiased_against_quadrature(component_grad, d, cost):
    logits, loc, scale = random_mixture((), 3, d, seed=20 + d, spread=1.5)
    # the quadrature is converged far below the Monte Carlo error
    e80 = quadrature_expectation(cost, logits, loc, scale, 80)
    assert abs(e80 - quadrature_expectation(cost, logits, loc, scale, 120)) < 1e-8

    est = per_sample_grads(logits, loc, scale, 20000, cost, component_grad, seed=30 + d)  # [N, P]
    exact = exact_grads(logits, loc, scale, lambda *p: quadrature_expectation(cost, *p))  # [P]
    z = z_scores(est, exact)  # [P]
    assert z.abs().max() < Z_MAX, z


def test_biased_without_logit_term():
    # sanity check that the z-test has power: dropping the through-T logit gradient (the "naive"
    # estimator that only reparameterizes inside the sampled component) is detectably biased.
    logits, loc, scale = random_mixture((), 3, 2, seed=22, spread=1.5)
    est = per_sample_grads(logits, loc, scale, 20000, cost_2d, "graves", seed=32)  # [N, P]
    est[:, :3] = 0.0  # the naive estimator gives the logits nothing
    exact = exact_grads(logits, loc, scale, lambda *p: quadrature_expectation(cost_2d, *p))  # [P]
    assert (est[:, :3].mean(0) - exact[:3]).abs().max() > 0.05


# ---------------------------------------------------------------------------------------------------
# the distribution: samples, transform, moments, log_prob


def test_cdf_transform_uniform_and_moments():
    from scipy import stats  # imported here: scipy.stats takes seconds to import on a cold interpreter

    logits, loc, scale = random_mixture((2,), 4, 3, seed=40, spread=2.5)
    dist = DiagNormalMixture(logits, loc, scale)
    torch.manual_seed(41)
    x = dist.sample((4000,))  # [N, 2, D]
    u = dist.cdf_transform(x)  # [N, 2, D]
    for b in range(2):
        for i in range(3):
            assert stats.kstest(u[:, b, i].numpy(), "uniform").pvalue > KS_P_MIN
    # independence-ish: pairwise correlations of the uniforms are ~ N(0, 1/N)
    for b in range(2):
        corr = np.corrcoef(u[:, b].numpy().T)  # [D, D]
        assert np.abs(corr[np.triu_indices(3, 1)]).max() * math.sqrt(4000) < Z_MAX

    x = dist.sample((20000,))  # [N, 2, D]
    mean, var = dist.mean, dist.variance  # [2, D], [2, D]
    assert (z_scores(x.flatten(1), mean.flatten()).abs() < Z_MAX).all()
    sq = (x - mean).square()  # [N, 2, D], E[sq] = variance
    assert (z_scores(sq.flatten(1), var.flatten()).abs() < Z_MAX).all()


def test_moments_match_mixture_same_family():
    logits, loc, scale = random_mixture((3,), 5, 4, seed=42)
    dist = DiagNormalMixture(logits, loc, scale)
    msf = dist.to_mixture_same_family()
    torch.testing.assert_close(dist.mean, msf.mean)
    torch.testing.assert_close(dist.variance, msf.variance)


def test_log_prob_matches_mixture_same_family():
    logits, loc, scale = random_mixture((2, 3), 5, 4, seed=43)
    msf = MixtureSameFamily(Categorical(logits=logits), Independent(Normal(loc, scale), 1))
    dist = DiagNormalMixture.from_mixture_same_family(msf)
    x = msf.sample((7,))  # [7, 2, 3, D]
    torch.testing.assert_close(dist.log_prob(x), msf.log_prob(x))
    x = torch.randn(4, 1, 1, 4, dtype=torch.float64)  # [4, 1, 1, D]: broadcasts against [2, 3]
    torch.testing.assert_close(dist.log_prob(x), msf.log_prob(x))


def test_distribution_api():
    logits, loc, scale = random_mixture((3,), 4, 2, seed=44)
    dist = DiagNormalMixture(logits, loc, scale, component_grad="graves")
    assert dist.has_rsample and dist.batch_shape == (3,) and dist.event_shape == (2,)
    assert dist.rsample((5,)).shape == (5, 3, 2) and dist.sample().shape == (3, 2)
    wide = dist.expand((6, 3))
    assert wide.batch_shape == (6, 3) and wide.component_grad == "graves"
    assert wide.rsample().shape == (6, 3, 2) and wide.log_prob(wide.sample()).shape == (6, 3)
    # broadcast batch shapes: logits [4] with loc [3, 4, 2]
    dist = DiagNormalMixture(logits[0], loc, scale)
    assert dist.batch_shape == (3,)
    with pytest.raises(ValueError):
        DiagNormalMixture(logits, loc, -scale, validate_args=True)


def test_rsample_gradient_flows_to_every_parameter():
    logits, loc, scale = random_mixture((3,), 4, 5, seed=45)
    for component_grad in COMPONENT_GRADS:
        params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
        x = DiagNormalMixture(*params, component_grad=component_grad).rsample((2,))  # [2, 3, D]
        x.square().sum().backward()
        for p in params:
            assert p.grad is not None and p.grad.shape == p.shape and torch.isfinite(p.grad).all()


# ---------------------------------------------------------------------------------------------------
# second order and torch.func (new-style autograd.Function: setup_context, jvp, generate_vmap_rule)


def quantile_path(logits, loc, scale, u, component_grad="implicit", component=None, block_size=3):
    """x(theta) = T_theta^{-1}(u) with u fixed, carrying the reparameterization gradient."""
    x0 = mixture_quantile(logits, loc, scale, u)  # [..., D]

    def x_of_theta(a, m, s):
        x = mixture_quantile(a.detach(), m.detach(), s.detach(), u, init=x0)  # [..., D]
        return reparameterize(a, m, s, x, component, component_grad, block_size)

    return x_of_theta, x0


U_FIXED = torch.tensor([[0.2, 0.7, 0.45, 0.9], [0.6, 0.1, 0.35, 0.55]], dtype=torch.float64)  # [2, D]


def test_gradgradcheck_implicit_float64():
    # the backward is itself differentiable (Normal.rsample has double backward too)
    logits, loc, scale = random_mixture((2,), 3, 4, seed=1)
    x_of_theta, _ = quantile_path(logits, loc, scale, U_FIXED)
    params = tuple(p.clone().requires_grad_() for p in (logits, loc, scale))
    assert torch.autograd.gradgradcheck(x_of_theta, params, eps=1e-6, atol=1e-5, rtol=1e-4)


def test_forward_mode_gradcheck_float64():
    logits, loc, scale = random_mixture((2,), 3, 4, seed=1)
    x_of_theta, _ = quantile_path(logits, loc, scale, U_FIXED)
    params = tuple(p.clone().requires_grad_() for p in (logits, loc, scale))
    assert torch.autograd.gradcheck(
        x_of_theta,
        params,
        eps=1e-6,
        atol=1e-6,
        rtol=1e-5,
        check_forward_ad=True,
        check_backward_ad=False,
        check_undefined_grad=False,
        check_batched_grad=False,
    )


@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
def test_func_grad_matches_autograd(component_grad):
    logits, loc, scale = random_mixture((2,), 3, 4, seed=2)
    x = mixture_quantile(logits, loc, scale, U_FIXED)  # [2, D]
    component = torch.tensor([0, 2])  # [2]

    def cost(a, m, s):
        return reparameterize(a, m, s, x, component, component_grad).sin().sum()

    got = torch.func.grad(cost, argnums=(0, 1, 2))(logits, loc, scale)
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    want = torch.autograd.grad(cost(*params), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-14)


def test_func_vmap_matches_loop():
    logits, loc, scale = random_mixture((2,), 3, 4, seed=3)
    x = mixture_quantile(logits, loc, scale, U_FIXED)  # [2, D]
    stack = [torch.stack([t * (1.0 + 0.1 * i) for i in range(4)]) for t in (logits, loc, scale)]  # [4, ...]

    def grad_of(a, m, s):
        return torch.func.grad(lambda a, m, s: reparameterize(a, m, s, x).square().sum(), argnums=(0, 1, 2))(
            a, m, s
        )

    batched = torch.func.vmap(grad_of)(*stack)
    for i in range(4):
        for a, b in zip(batched, grad_of(*(t[i] for t in stack))):
            torch.testing.assert_close(a[i], b, rtol=1e-12, atol=1e-12)
    # rsample itself under vmap (fresh randomness per batch entry)
    out = torch.func.vmap(
        torch.func.grad(lambda a, m, s: DiagNormalMixture(a, m, s).rsample().sum()), randomness="different"
    )(*stack)
    assert out.shape == stack[0].shape and torch.isfinite(out).all()


@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
def test_func_jvp_adjoint_and_finite_differences(component_grad):
    logits, loc, scale = random_mixture((2,), 3, 4, seed=4)
    component = torch.tensor([1, 0])  # [2]
    x = mixture_quantile(logits, loc, scale, U_FIXED)  # [2, D]
    gen = torch.Generator().manual_seed(0)
    tangent = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in (logits, loc, scale))
    _, xdot = torch.func.jvp(
        lambda a, m, s: reparameterize(a, m, s, x, component, component_grad), (logits, loc, scale), tangent
    )
    # <J t, g> = <t, J^T g>: forward mode is the transpose of the hand-written backward
    g = torch.randn(x.shape, generator=gen, dtype=torch.float64)  # [2, D]
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    vjp = torch.autograd.grad(reparameterize(*params, x, component, component_grad), params, g)
    torch.testing.assert_close((xdot * g).sum(), sum((a * b).sum() for a, b in zip(vjp, tangent)))
    if component_grad == "implicit":  # and it is the derivative of x(theta) = T^{-1}(u) itself
        h = 1e-6
        moved = [(p + h * t, p - h * t) for p, t in zip((logits, loc, scale), tangent)]
        up = mixture_quantile(*(m[0] for m in moved), U_FIXED, init=x)  # [2, D]
        down = mixture_quantile(*(m[1] for m in moved), U_FIXED, init=x)  # [2, D]
        torch.testing.assert_close(xdot, (up - down) / (2 * h), rtol=1e-6, atol=1e-7)


def test_func_jacfwd_jacrev_and_hessian():
    # forward mode (jvp + vmap) and reverse mode give one Jacobian; forward-over-reverse (func.hessian)
    # matches reverse-over-reverse (double backward)
    logits, loc, scale = random_mixture((2,), 3, 4, seed=5)
    x = mixture_quantile(logits, loc, scale, U_FIXED)  # [2, D]

    def f(a, m, s):
        return reparameterize(a, m, s, x)

    for a, b in zip(
        torch.func.jacfwd(f, argnums=(0, 1, 2))(logits, loc, scale),
        torch.func.jacrev(f, argnums=(0, 1, 2))(logits, loc, scale),
    ):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)

    def cost(a):
        return reparameterize(a, loc, scale, x).square().sum()

    want = torch.autograd.functional.hessian(cost, logits)  # reverse over reverse
    torch.testing.assert_close(torch.func.hessian(cost)(logits), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
@pytest.mark.parametrize("sample_shape", [(), (5,)])
def test_one_component_rsample_is_the_custom_function(component_grad, sample_shape):
    # K = 1 takes plain autograd operations (x = mu + sigma eps): the same draws, values, first and second
    # derivatives as the custom Function, and an exactly zero logits gradient
    logits, loc, scale = random_mixture((3,), 1, 4, seed=95)
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    dist = DiagNormalMixture(*params, component_grad=component_grad)
    torch.manual_seed(95)
    x = dist.rsample(sample_shape)  # [*S, 3, D]
    torch.manual_seed(95)
    drawn, component, _ = dist._draw(torch.Size(sample_shape))
    via_function = reparameterize(*params, drawn, component, component_grad)  # [*S, 3, D]
    assert torch.equal(x, drawn)
    weight = torch.randn(x.shape, generator=torch.Generator().manual_seed(96), dtype=x.dtype)
    grads = [
        torch.autograd.grad((weight * y.square()).sum(), params, create_graph=True) for y in (x, via_function)
    ]
    assert torch.equal(grads[0][0], torch.zeros_like(logits))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    second = [torch.autograd.grad(g[1].sum() + g[2].square().sum(), params[1:]) for g in grads]
    for a, b in zip(*second):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("sample_shape", [(), (5,)])
def test_one_component_draws_are_normal_draws(sample_shape):
    # K = 1 draws no component index: rsample and sample consume the generator exactly as Normal.rsample
    logits, loc, scale = random_mixture((3,), 1, 4, seed=97)
    dist = DiagNormalMixture(logits, loc, scale)
    normal = torch.distributions.Normal(loc[..., 0, :], scale[..., 0, :])
    for draw in (dist.rsample, dist.sample):
        torch.manual_seed(97)
        x = draw(sample_shape)  # [*S, 3, D]
        state = torch.get_rng_state()
        torch.manual_seed(97)
        assert torch.equal(x, normal.rsample(sample_shape))
        assert torch.equal(state, torch.get_rng_state())  # nothing else drawn


def test_one_component_with_an_infinite_logit_samples_finite_values():
    logits = torch.tensor([[math.inf], [-math.inf]], requires_grad=True)  # [2, 1]
    x = DiagNormalMixture(logits, torch.zeros(2, 1, 3), torch.ones(2, 1, 3)).rsample()  # [2, 3]
    assert torch.isfinite(x).all()
    assert torch.equal(torch.autograd.grad(x.sum(), logits)[0], torch.zeros(2, 1))


@pytest.mark.slow
def test_compiled_backward_matches_eager():
    # torch.compile of the backward (opt-in): the same gradients; the compile takes ~20-30 s on 2 busy cores
    logits, loc, scale = random_mixture((8,), 3, 4, dtype=torch.float32, seed=90)
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    grads = []
    for compile_backward in (False, True):
        torch.manual_seed(90)
        x = DiagNormalMixture(*params, compile_backward=compile_backward).rsample()  # [8, D]
        grads.append(torch.autograd.grad(x.square().sum(), params))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------------
# cdf, icdf, mode, entropy


def test_cdf_one_dimension_matches_mixture_same_family():
    logits, loc, scale = random_mixture((3,), 4, 1, seed=80)
    dist = DiagNormalMixture(logits, loc, scale)
    msf = MixtureSameFamily(Categorical(logits=logits), Normal(loc[..., 0], scale[..., 0]))
    x = torch.linspace(-8, 8, 41, dtype=torch.float64).reshape(41, 1, 1)  # [41, 1, D]
    torch.testing.assert_close(dist.cdf(x), msf.cdf(x[..., 0]), rtol=1e-12, atol=1e-14)


def test_cdf_joint_matches_sample_frequency():
    logits, loc, scale = random_mixture((), 3, 2, seed=81)
    dist = DiagNormalMixture(logits, loc, scale)
    torch.manual_seed(81)
    samples = dist.sample((200_000,))  # [N, D]
    points = torch.tensor([[0.0, 0.0], [-1.0, 2.0], [1.5, -0.5], [3.0, 3.0]], dtype=torch.float64)  # [P, D]
    below = (samples.unsqueeze(1) <= points).all(-1).double()  # [N, P]
    assert z_scores(below, dist.cdf(points)).abs().max() < Z_MAX


def test_icdf_inverts_cdf_with_gradients():
    logits, loc, scale = random_mixture((3,), 4, 1, seed=82)
    dist = DiagNormalMixture(logits, loc, scale)
    u = torch.tensor([1e-6, 0.01, 0.3, 0.5, 0.97, 1 - 1e-6], dtype=torch.float64).reshape(6, 1, 1)
    u = u.expand(6, 3, 1).clone().requires_grad_()  # [6, 3, 1]
    x = dist.icdf(u)  # [6, 3, 1]
    torch.testing.assert_close(dist.cdf(x.detach()).unsqueeze(-1), u.detach(), rtol=1e-10, atol=1e-13)
    (grad_u,) = torch.autograd.grad(x.sum(), u)
    torch.testing.assert_close(grad_u, dist.log_prob(x.detach()).exp().reciprocal().unsqueeze(-1))

    def x_of_theta(a, m, s):
        return DiagNormalMixture(a, m, s).icdf(u.detach()[2:4])

    params = tuple(p.clone().requires_grad_() for p in (logits, loc, scale))
    assert torch.autograd.gradcheck(x_of_theta, params, eps=1e-6, atol=1e-6, rtol=1e-5)
    with pytest.raises(NotImplementedError, match="D = 1"):
        DiagNormalMixture(*random_mixture((), 2, 3)).icdf(torch.full((3,), 0.5, dtype=torch.float64))


def test_mode_is_the_highest_local_maximum():
    # one dimension: the mode found must be the argmax of the density on a fine grid
    logits, loc, scale = random_mixture((5,), 4, 1, seed=83)
    dist = DiagNormalMixture(logits, loc, scale)
    grid = torch.linspace(-10, 10, 200_001, dtype=torch.float64).reshape(-1, 1, 1)  # [G, 1, D]
    best = grid[dist.log_prob(grid).argmax(0), 0]  # [5, D]
    torch.testing.assert_close(dist.mode, best, rtol=0, atol=2e-4)
    # several dimensions: a local maximum (no direction increases the density)
    dist = DiagNormalMixture(*random_mixture((3,), 4, 3, seed=84))
    mode = dist.mode  # [3, D]
    for step in (1e-4, 1e-2):
        for direction in torch.eye(3, dtype=torch.float64):
            for sign in (1.0, -1.0):
                assert (dist.log_prob(mode + sign * step * direction) <= dist.log_prob(mode)).all()


def test_entropy_says_no_closed_form():
    with pytest.raises(NotImplementedError, match="no closed form"):
        DiagNormalMixture(*random_mixture((), 2, 3)).entropy()


# ---------------------------------------------------------------------------------------------------
# numerics in float32


def extreme_mixture(d: int):
    """Scales 1e-4 .. 1e4, components 1e3 apart, log-weights down to -80."""
    logits = torch.tensor([0.0, -80.0, -5.0, -40.0])  # [K]
    scale = torch.tensor([1e-4, 1e4, 1e-2, 1e2]).unsqueeze(-1).expand(4, d).contiguous()  # [K, D]
    loc = torch.tensor([0.0, 1e3, -1e3, 3e3]).unsqueeze(-1) + torch.arange(d) * 0.5  # [K, D]
    return logits, loc, scale


@pytest.mark.parametrize("d", [1, 3, 20])
@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
def test_float32_extreme_mixture_sampled(d, component_grad):
    logits, loc, scale = extreme_mixture(d)
    # a second, benign batch entry where every component is sampled
    logits = torch.stack([logits, torch.zeros(4)])  # [2, K]
    loc, scale = loc.expand(2, 4, d), scale.expand(2, 4, d)  # [2, K, D]
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    dist = DiagNormalMixture(*params, component_grad=component_grad)
    torch.manual_seed(50)
    x = dist.rsample((500,))  # [N, 2, D]
    assert torch.isfinite(x).all() and torch.isfinite(dist.log_prob(x)).all()
    (x * torch.randn_like(x)).sum().backward()
    for p in params:
        assert torch.isfinite(p.grad).all()


@pytest.mark.parametrize("d", [1, 4])
@pytest.mark.parametrize("component_grad", COMPONENT_GRADS)
def test_float32_eight_sigma_samples(d, component_grad):
    logits, loc, scale = extreme_mixture(d)
    k = logits.shape[0]
    signs = torch.tensor([1.0, -1.0] * d)[:d]  # [D], alternate sides of the component
    xs, comps = [], []
    for comp in range(k):
        for flip in (1.0, -1.0):
            xs.append(loc[comp] + flip * signs * 8.0 * scale[comp])  # [D]
            comps.append(comp)
    x = torch.stack(xs)  # [2K, D]
    component = torch.tensor(comps)  # [2K]
    dist = DiagNormalMixture(logits, loc, scale)
    assert torch.isfinite(dist.log_prob(x)).all()
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    xr = reparameterize(*params, x, component=component, component_grad=component_grad)  # [2K, D]
    grads = torch.autograd.grad(xr, params, grad_outputs=torch.ones_like(xr))
    assert all(torch.isfinite(g).all() for g in grads)


def test_float32_tails_accurate():
    # benign components, samples 8 sigma out: float32 must keep its digits (no 1 - 1 cancellation)
    logits = torch.tensor([0.2, -0.3, 0.0], dtype=torch.float64)  # [K]
    loc = torch.tensor([[-3.0, 0.0], [0.0, 2.0], [4.0, -1.0]], dtype=torch.float64)  # [K, D]
    scale = torch.tensor([[0.5, 1.0], [1.0, 0.7], [2.0, 1.5]], dtype=torch.float64)  # [K, D]
    x = torch.stack([loc[c] + sgn * 8.0 * scale[c] for c in range(3) for sgn in (1.0, -1.0)])  # [6, D]
    g = torch.ones_like(x)  # [6, D]
    want = implicit_grad_structured(logits, loc, scale, x, g)[:3]
    got = implicit_grad_structured(logits.float(), loc.float(), scale.float(), x.float(), g.float())[:3]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_float32_matches_float64_on_benign_mixtures():
    logits, loc, scale = random_mixture((16,), 5, 10, seed=60)
    x = DiagNormalMixture(logits, loc, scale).sample()  # [16, D]
    g = torch.randn_like(x)  # [16, D]
    want = implicit_grad_structured(logits, loc, scale, x, g)[:3]
    got = implicit_grad_structured(logits.float(), loc.float(), scale.float(), x.float(), g.float())[:3]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


def test_valley_between_far_components_is_clamped_not_inf():
    # a point between two components 40 sigma apart: density ~ e^-200, the true gradient overflows
    # float32; the documented clamp keeps it finite.
    logits = torch.zeros(2)  # [K]
    loc = torch.tensor([[-20.0], [20.0]])  # [K, 1]
    scale = torch.ones(2, 1)  # [K, 1]
    x = torch.tensor([[0.0], [1.0]])  # [2, 1]
    params = [p.clone().requires_grad_() for p in (logits, loc, scale)]
    xr = reparameterize(*params, x)  # [2, 1]
    grads = torch.autograd.grad(xr, params, grad_outputs=torch.ones_like(xr))
    assert all(torch.isfinite(g).all() for g in grads)


# ---------------------------------------------------------------------------------------------------
# input errors


def test_bad_component_grad_names_the_choices():
    logits, loc, scale = random_mixture((), 2, 3)
    with pytest.raises(ValueError, match="implicit.*graves"):
        DiagNormalMixture(logits, loc, scale, component_grad="score")
    with pytest.raises(ValueError, match="implicit.*graves"):
        reparameterize(logits, loc, scale, torch.zeros(3, dtype=torch.float64), component_grad="nope")
    with pytest.raises(ValueError, match="component"):
        reparameterize(logits, loc, scale, torch.zeros(3, dtype=torch.float64), component_grad="graves")


@pytest.mark.parametrize(
    "shapes",
    [
        ((3,), (2, 4), (2, 4)),  # K differs between logits and loc
        ((2,), (2, 4), (2, 5)),  # D differs between loc and scale
        ((2,), (2, 4), (3, 4)),  # K differs between loc and scale
        ((2,), (4,), (4,)),  # loc and scale without a component dim
        ((5, 2), (3, 2, 4), (3, 2, 4)),  # batch shapes that do not broadcast
    ],
)
def test_mismatched_shapes_raise(shapes):
    logits, loc, scale = (torch.zeros(s) for s in shapes)
    with pytest.raises(ValueError):
        DiagNormalMixture(logits, loc, scale.exp())


def test_from_mixture_same_family_rejects_other_components():
    msf = MixtureSameFamily(Categorical(logits=torch.zeros(3)), Normal(torch.zeros(3), torch.ones(3)))
    with pytest.raises(ValueError):
        DiagNormalMixture.from_mixture_same_family(msf)


# ---------------------------------------------------------------------------------------------------
# CUDA (skipped without one)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_matches_cpu(dtype):
    logits, loc, scale = random_mixture((64,), 10, 40, dtype=dtype, seed=70)
    x = DiagNormalMixture(logits, loc, scale).sample()  # [64, D]
    g = torch.randn_like(x)  # [64, D]
    want = implicit_grad_structured(logits, loc, scale, x, g)[:3]
    got = implicit_grad_structured(*(t.cuda() for t in (logits, loc, scale, x, g)))[:3]
    tol = 1e-10 if dtype == torch.float64 else 1e-3
    for a, b in zip(got, want):
        torch.testing.assert_close(a.cpu(), b, rtol=tol, atol=tol * b.abs().max().item())
    params = [p.cuda().requires_grad_() for p in (logits, loc, scale)]
    DiagNormalMixture(*params).rsample((8,)).sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in params)
