"""MuProp rollout (estimators/muprop_rollout.py).

* unbiasedness by exact enumeration on tiny 1-, 2- and 3-layer SBNs (the 3-layer one nonlinear, so f is far from
  multilinear), with the centring baseline warmed up so that it is not zero; z-test of tests/exact.py
  (false-failure rate below 1e-2 per run, fixed seeds);
* one exact one-sample test on a two-layer toy where every rollout is written out by hand: layer 1 expands
  around the full mean-field pass (total derivative through the mean of layer 2), layer 2 around the mean of
  layer 2 given the *sampled* layer 1;
* the moving-average baseline is in the state_dict.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.distributions import Bernoulli, Independent

from tests.exact import Z_MAX, exact_objective, flat_grad, mc_gradients, tiny_sbn, z_scores
from tests.exact_discrete import build, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

CASES = {"1layer": ([3], False), "2layer": ([2, 2], False), "3layer_nonlinear": ([2, 2, 2], True)}


@pytest.mark.parametrize("case", list(CASES))
def test_unbiased_on_enumerable_sbn(case: str):
    layers, nonlinear = CASES[case]
    model, x = tiny_sbn(layers, nonlinear=nonlinear, seed=6)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)  # [P]
    est = build("muprop_rollout", model.context_dim)
    torch.manual_seed(7)
    for _ in range(3):  # warm the centring baseline up: it must not depend on the sample, whatever its value
        est(model.cost_fn(x), model.context(x))
    assert float(est.baseline.value) != 0.0
    g = mc_gradients(model, est, x, groups=200, replicas=100)  # [G, P]
    z = z_scores(g, exact)
    assert z.abs().max() < Z_MAX, f"muprop_rollout on {case}: max |z| = {z.abs().max():.2f}"


class Toy2(nn.Module):
    """Two Bernoulli layers, batch of 2: l1 = theta + offset_b, l2 = W z1 + c,
    f(z1, z2; v) = a^T z1 + z1^T M z2 + v z2_0 + v^2, so df/dz1 = a + M z2 and df/dz2 = M^T z1 + v e_0."""

    B = 2

    def __init__(self):
        super().__init__()
        d = torch.float64
        self.theta = nn.Parameter(torch.tensor([0.3, -0.6], dtype=d))  # [D1]
        self.offset = torch.tensor([[0.0, 0.0], [0.8, -0.4]], dtype=d)  # [B, D1]
        self.W = nn.Parameter(torch.tensor([[1.2, -0.7], [0.5, 0.9]], dtype=d))  # [D2, D1]
        self.c = nn.Parameter(torch.tensor([-0.2, 0.4], dtype=d))  # [D2]
        self.v = nn.Parameter(torch.tensor(0.7, dtype=d))
        self.a = torch.tensor([1.5, -2.0], dtype=d)  # [D1]
        self.M = torch.tensor([[2.0, -1.0], [0.5, 3.0]], dtype=d)  # [D1, D2]
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def f(self, z1, z2, v):
        return (z1 * self.a).sum(-1) + ((z1 @ self.M) * z2).sum(-1) + v * z2[..., 0] + v**2  # [S, B]

    def cost_fn(self, sample, n_samples: int):
        l1 = (self.theta + self.offset).expand(n_samples, self.B, 2)  # [S, B, D1]
        z1 = sample("z1", Independent(Bernoulli(logits=l1, validate_args=False), 1))  # [S, B, D1]
        z2 = sample("z2", Independent(Bernoulli(logits=z1 @ self.W.T + self.c, validate_args=False), 1))
        self.seen.append((z1.detach().clone(), z2.detach().clone()))
        return self.f(z1, z2, self.v)  # [S, B]


def test_rollout_exact_two_layers():
    toy, est = Toy2(), build("muprop_rollout", centre=False)
    torch.manual_seed(8)
    out = est(toy.cost_fn, None)
    b1, b2 = toy.seen[0]  # the stochastic pass comes first
    sig = torch.sigmoid
    with torch.no_grad():
        W, c, v, M, a = toy.W, toy.c, toy.v, toy.M, toy.a
        e0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
        f_b = toy.f(b1, b2, v)  # [1, B]
        # rollout 1: the whole mean-field network; total derivative through mu_2(mu_1)
        mu1 = sig(toy.theta + toy.offset).unsqueeze(0)  # [1, B, D1]
        pre = mu1 @ W.T + c  # [1, B, D2]
        m2 = sig(pre)
        f1 = toy.f(mu1, m2, v)
        fp1 = (a + m2 @ M.T) + ((m2 * (1 - m2)) * (mu1 @ M + v * e0)) @ W  # [1, B, D1]
        r1 = f_b - f1 - (fp1 * (b1 - mu1)).sum(-1)  # [1, B]
        # rollout 2: layer 1 sampled, layer 2 at its mean given b1
        mu2 = sig(b1 @ W.T + c)  # [1, B, D2]
        f2 = toy.f(b1, mu2, v)
        fp2 = b1 @ M + v * e0  # [1, B, D2]
        r2 = f_b - f2 - (fp2 * (b2 - mu2)).sum(-1)
        g_l1 = (b1 - mu1) * r1.unsqueeze(-1) + mu1 * (1 - mu1) * fp1  # [1, B, D1] d/d logits of layer 1
        g_l2 = (b2 - mu2) * r2.unsqueeze(-1) + mu2 * (1 - mu2) * fp2  # [1, B, D2]
        g_theta = g_l1.mean((0, 1))
        g_W = (g_l2.unsqueeze(-1) * b1.unsqueeze(-2)).mean((0, 1))  # [D2, D1]
        g_c = g_l2.mean((0, 1))
        g_v = (b2[..., 0] + 2 * v).mean()
    got = torch.autograd.grad(out.surrogate, [toy.theta, toy.W, toy.c, toy.v])
    for g, want in zip(got, [g_theta, g_W, g_c, g_v]):
        torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-12)
    # the rollout call saw block 1 = (mu1, m2) and block 2 = (b1, mu2)
    z1_roll, z2_roll = toy.seen[1]
    torch.testing.assert_close(z1_roll, torch.cat([mu1, b1]))
    torch.testing.assert_close(z2_roll, torch.cat([m2, mu2]))


def test_baseline_in_state_dict():
    model, x = tiny_sbn([2, 2], seed=0)
    est = build("muprop_rollout", model.context_dim)
    est(model.cost_fn(x), model.context(x))
    state = est.state_dict()
    assert {"baseline.value", "baseline.initialised"} <= set(state)
    fresh = build("muprop_rollout", model.context_dim)
    fresh.load_state_dict(state)
    assert float(fresh.baseline.value) == float(est.baseline.value) != 0.0
