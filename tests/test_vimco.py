"""VIMCO (estimators/vimco.py) against the exact gradient of its own objective, the K-sample bound.

E[L_K] = sum over K-tuples (h_1..h_K) of prod_k q(h_k | x) * log (1/K) sum_k w_k, enumerated on tiny 1-, 2- and
3-layer SBNs; the Monte Carlo mean of VIMCO's estimate is z-tested against its gradient (tests/exact.py,
false-failure rate below 1e-2 per run, fixed seeds). The ELBO-gradient mismatch (VIMCO declares itself biased
for grad E[cost]) is tests/test_biased.py's job. Plus one exact one-sample test with the signals written out.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from estimators.vimco import VIMCO
from tests.exact import Z_MAX, enumerate_states, flat_grad, mc_gradients, tiny_sbn, z_scores
from tests.exact_discrete import Toy, build, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

# (layers, K): K^(2^sum D) tuples stay small
CASES = {"1layer": ([3], 3), "2layer": ([2, 2], 2), "3layer": ([1, 1, 1], 3)}


def exact_k_sample_bound(model, x, k: int) -> torch.Tensor:
    """E[log (1/K) sum_k exp(-cost(h_k))] averaged over the batch, h_k iid q, by enumerating the K-tuples."""
    sizes = model.layers
    states = enumerate_states(sum(sizes)).to(x.dtype)  # [N, sum D]
    chunks = list(states.split(list(sizes), dim=1))
    log_q = []

    def sample(name, dist):
        z = chunks[len(log_q)].unsqueeze(1).expand(-1, x.shape[0], -1)  # [N, B, D_i]
        log_q.append(dist.log_prob(z))  # [N, B]
        return z

    cost = model.cost(x, sample, states.shape[0])  # [N, B]
    log_q_joint = torch.stack(log_q).sum(0)  # [N, B]
    n = states.shape[0]
    idx = torch.tensor(list(itertools.product(range(n), repeat=k)))  # [N^K, K]
    log_w = -cost[idx]  # [N^K, K, B]
    bound = torch.logsumexp(log_w, 1) - math.log(k)  # [N^K, B]
    weight = log_q_joint[idx].sum(1).exp()  # [N^K, B]
    return (weight * bound).sum(0).mean()


@pytest.mark.parametrize("case", list(CASES))
def test_unbiased_for_the_k_sample_bound(case: str):
    layers, k = CASES[case]
    model, x = tiny_sbn(layers, seed=1)
    params = list(model.parameters())
    # the estimator minimises -L_K: its target is minus the gradient of the bound
    exact = -flat_grad(exact_k_sample_bound(model, x, k), params)  # [P]
    est = build("vimco", model.context_dim, n_samples=k)
    torch.manual_seed(2)
    g = mc_gradients(model, est, x, groups=200, replicas=100)  # [G, P]
    z = z_scores(g, exact)
    assert z.abs().max() < Z_MAX, f"VIMCO K={k} on {case}: max |z| = {z.abs().max():.2f}"
    # and the same samples are far from the ELBO's gradient (a different objective)
    if case == "1layer":
        from tests.exact import exact_objective  # noqa: PLC0415

        elbo_grad = flat_grad(exact_objective(model, x), params)
        assert z_scores(g, elbo_grad).abs().max() > Z_MAX


def test_vimco_exact():
    toy, est = Toy(), build("vimco", n_samples=3)
    torch.manual_seed(4)
    out = est(toy.cost_fn, None)
    (z,) = toy.seen  # [3, B, D]
    mu = torch.sigmoid(toy.logits()).detach()  # [B, D]
    with torch.no_grad():
        f = toy.f(z)  # [3, B] costs, log w = -f
        log_w = -f
        bound = torch.log(log_w.exp().mean(0))  # [B]
        signal = torch.zeros(3, Toy.B, dtype=torch.float64)
        for k in range(3):
            others = [j for j in range(3) if j != k]
            geo = log_w[others].mean(0)  # log of the geometric mean of the other weights
            loo = torch.log((log_w[others].exp().sum(0) + geo.exp()) / 3)  # [B]
            signal[k] = bound - loo
        w_tilde = log_w.exp() / log_w.exp().sum(0)  # [3, B]
        # d(-L)/dl = -sum_k signal_k (z_k - mu); d(-L)/dw = sum_k w~_k df_k/dw, averaged over the batch
        g_theta = -(signal.unsqueeze(-1) * (z - mu)).sum(0).mean(0)  # [D]
        g_w = (w_tilde * (z[..., 2] + 2 * toy.w)).sum(0).mean()
    gt, gw = toy.grads(out.surrogate)
    torch.testing.assert_close(gt, g_theta, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, g_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.cost, f)
    assert out.diagnostics["vimco_bound"] == pytest.approx(float(bound.mean()), rel=1e-12)


def test_needs_two_samples():
    with pytest.raises(ValueError, match="n_samples"):
        VIMCO(n_samples=1)
