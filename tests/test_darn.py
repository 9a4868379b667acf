"""The DARN ("1/2") estimator on multi-layer networks: f'_i(z) through the conditional means of the layers above.

* one sample, S = 1, on 2- and 3-layer Bernoulli chains (tests/exact_discrete.py ``Chain``, whose cost does not
  read z_1 directly): the estimate equals the formula written out by hand, one signal per unit,
  signal_ij = f'_ij(z) (z_ij - 1/2),
  with f'_i = u_i + W_{i+1}^T [sigmoid'(l_{i+1}(z_i)) f'_{i+1}];
* its exact expectation (every joint state enumerated, no Monte Carlo) equals the expectation of that formula,
  and differs from the exact gradient (the estimator is biased: the formula is what is tested);
* the structured-prediction model's first layer h1 now gets a gradient (it got exactly zero with the partial
  derivative, so it never trained).
"""

from __future__ import annotations

import pytest
import torch

import estimators.darn as darn_module
from tests.exact_discrete import Chain, build, expected_gradient, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)


def darn_signals(chain: Chain, zs):
    fp = chain.f_prime_chain(zs)  # f'_i at the sample, through the conditional means above
    return [p * (z - 0.5) for p, z in zip(fp, zs)], [torch.zeros_like(z) for z in zs]  # per unit [S, B, D_i]


@pytest.mark.parametrize("sizes", [[2, 2], [2, 1, 2], [1, 2, 2]])
def test_darn_chain_one_sample_exact(sizes):
    chain, est = Chain(sizes, seed=5), build("darn")
    torch.manual_seed(13)
    out = est(chain.cost_fn, None)
    (zs,) = chain.seen  # one pass
    signals, no_correction = darn_signals(chain, zs)
    hand = chain.score_grads(zs, signals, no_correction)
    got = torch.autograd.grad(out.surrogate, chain.flat_params())
    for g, h in zip(got, hand):
        torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out.cost, chain.f(zs))


@pytest.mark.parametrize("sizes", [[2, 2], [1, 2, 2]])
def test_darn_chain_exact_expectation(sizes, monkeypatch):
    chain, est = Chain(sizes, seed=6), build("darn")
    got = expected_gradient(
        est, chain.example_cost_fns(), sizes, chain.flat_params(), monkeypatch, darn_module
    )
    zs, weights = chain.states()  # [N, B, D_i], [N, B]
    signals, no_correction = darn_signals(chain, zs)
    hand = torch.cat([g.reshape(-1) for g in chain.score_grads(zs, signals, no_correction, weights)])
    torch.testing.assert_close(got, hand, rtol=1e-10, atol=1e-12)
    exact = chain.exact()
    # biased through the layers above (the conditional means' slopes stand in for finite differences); the
    # last layer, where the chain's cost is linear in each unit given the others, is exact per unit
    assert float((got - exact).abs().max()) > 1e-3
    n_theta = sizes[0]
    assert float(got[:n_theta].abs().min()) > 1e-4  # z_1 (not read by f directly) gets a gradient


def test_structured_prediction_h1_gets_gradient():
    """392-200-200-392 shape in miniature: the first layer's parameters get a non-zero DARN gradient."""
    from models.sbn_sp import SBNSP

    torch.manual_seed(0)
    model = SBNSP(20, [4, 4], train_mean=torch.full((20,), 0.3))
    x = (torch.rand(8, 20) < 0.3).float()
    est = build("darn").float()
    g = torch.stack(
        [
            torch.cat(
                [
                    p.reshape(-1)
                    for p in torch.autograd.grad(
                        est(model.cost_fn(x), model.context(x)).surrogate, model.hidden_layers[0].parameters()
                    )
                ]
            )
            for _ in range(20)
        ]
    )  # [20, P_h1]
    assert float(g.abs().sum(1).min()) > 0  # every draw moves h1
