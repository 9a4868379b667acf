"""The structured-output SBN (models/sbn_sp.py): shapes, the cost and the bound checked by hand, baselines'
context, recognition parameters, and one step with every Bernoulli estimator in conf/estimator."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from models.base import exact_sample
from models.sbn_sp import SBNSP
from tests.exact import Z_MAX, enumerate_states, exact_objective, flat_grad, mc_gradients, z_scores

CONF = Path(__file__).resolve().parents[1] / "conf"
ESTIMATORS = sorted(p.stem for p in (CONF / "estimator").glob("*.yaml"))


def bernoulli_estimators() -> list[str]:
    out = []
    for name in ESTIMATORS:
        cls = instantiate(OmegaConf.load(CONF / "estimator" / f"{name}.yaml"), _partial_=True).func
        if "bernoulli" in cls.supports:
            out.append(name)
    return out


def tiny(layers=(2,), x_dim: int = 6, nonlinear: bool = False, seed: int = 0):
    """A float64 model with random non-trivial parameters and a batch of 3 binary examples."""
    torch.manual_seed(seed)
    mean = torch.rand(x_dim) * 0.8 + 0.1  # [X]
    model = SBNSP(x_dim, layers=list(layers), nonlinear=nonlinear, hidden=4, train_mean=mean).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    x = torch.bernoulli(torch.full((3, x_dim), 0.5)).double()  # [B, X]
    return model, x


def test_shapes_and_sites():
    model = SBNSP(784, layers=[200, 200, 200], train_mean=torch.full((784,), 0.13))
    x = torch.bernoulli(torch.full((5, 784), 0.13))  # [B, X]
    names = []

    def sample(name, dist):
        names.append((name, tuple(dist.batch_shape), tuple(dist.event_shape)))
        return dist.sample()

    cost = model.cost(x, sample, n_samples=4)
    assert cost.shape == (4, 5)
    assert names == [("h1", (4, 5), (200,)), ("h2", (4, 5), (200,)), ("h3", (4, 5), (200,))]
    assert model.bound(x, n_samples=7, chunk=3).shape == (5,)
    assert model.elbo(x).shape == (5,)
    assert model.latent_kind == "bernoulli" and model.layers == [200, 200, 200]
    assert model.context(x).shape == (5, 784) and model.context_dim == 784
    # pixels 0..391 in, 392..783 out
    assert model.hidden_layers[0].in_features == 392 and model.output.out_features == 392


def test_extra_leading_sample_dims_broadcast():
    """An estimator may hand back [K, S, B, D] samples: the cost must keep the extra dimension."""
    model, x = tiny(layers=(2, 3))

    def sample(name, dist):
        z = dist.sample()  # [S, B, D] or already [2, S, B, D]
        return z.expand(2, *z.shape) if name == "h1" else z  # [2, S, B, D] from the first site on

    assert model.cost(x, sample, 4).shape == (2, 4, 3)


def test_cost_is_minus_log_p_y_given_h_by_hand():
    model, x = tiny(layers=(2,), x_dim=6)
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)  # [B, D]
    seen = {}

    def sample(name, dist):
        seen[name] = dist
        return h.expand(*dist.batch_shape, 2)  # [S, B, D]

    cost = model.cost(x, sample, 1)[0]  # [B]
    W1, b1 = model.hidden_layers[0].weight, model.hidden_layers[0].bias
    Wo, bo = model.output.weight, model.output.bias
    x_u, y = x[:, :3] - model.x_mean[:3], x[:, 3:]
    # p(h1 | x_u): logits W1 (x_u - mean) + b1
    torch.testing.assert_close(seen["h1"].base_dist.logits[0], x_u @ W1.T + b1)
    a = h @ Wo.T + bo  # [B, 3]
    p = torch.sigmoid(a)
    by_hand = -(y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum(-1)  # [B]
    torch.testing.assert_close(cost, by_hand)


def test_bound_is_log_mean_p_y_given_h_by_hand():
    model, x = tiny(layers=(2,), x_dim=6, seed=3)
    m = 5
    torch.manual_seed(11)
    bound = model.bound(x, n_samples=m, chunk=m)  # [B]
    torch.manual_seed(11)  # replay the same draws by hand
    logits = model.hidden_layers[0](x[:, :3] - model.x_mean[:3])  # [B, D]
    h = torch.bernoulli(torch.sigmoid(logits).expand(m, 3, 2))  # [m, B, D]
    p = torch.sigmoid(model.output(h))  # [m, B, 3]
    y = x[:, 3:]
    log_p = (y * torch.log(p) + (1 - y) * torch.log(1 - p)).sum(-1)  # [m, B]
    torch.testing.assert_close(bound, torch.logsumexp(log_p, 0) - math.log(m))
    # m = 1: the bound is the single-sample objective -cost
    torch.manual_seed(12)
    b1 = model.bound(x, n_samples=1)
    torch.manual_seed(12)
    torch.testing.assert_close(b1, -model.cost(x, exact_sample, 1)[0])


def test_bound_approaches_exact_conditional_likelihood():
    """log p(y | x_u) = log sum_h p(h | x_u) p(y | h) by enumeration; the m-sample bound is below it and
    close for large m."""
    model, x = tiny(layers=(3,), x_dim=6, seed=4)
    states = enumerate_states(3)  # [8, D]
    logits = model.hidden_layers[0](x[:, :3] - model.x_mean[:3])  # [B, D]
    log_ph = (
        states[:, None] * torch.nn.functional.logsigmoid(logits)
        + (1 - states[:, None]) * torch.nn.functional.logsigmoid(-logits)
    ).sum(-1)  # [8, B]
    p = torch.sigmoid(model.output(states))  # [8, 3]
    y = x[:, 3:]
    log_py = (y[None] * torch.log(p[:, None]) + (1 - y[None]) * torch.log(1 - p[:, None])).sum(-1)  # [8, B]
    exact = torch.logsumexp(log_ph + log_py, 0)  # [B]
    torch.manual_seed(0)
    bound = model.bound(x, n_samples=20000, chunk=5000)
    assert (bound <= exact + 1e-2).all()
    torch.testing.assert_close(bound, exact, atol=2e-2, rtol=0)


def test_context_recognition_parameters_and_output_bias():
    mean = torch.linspace(0.05, 0.95, 8)  # [X]
    model = SBNSP(8, layers=[3, 2], train_mean=mean)
    x = torch.ones(2, 8)
    torch.testing.assert_close(model.context(x), (x - mean).expand(2, 8))
    rec = {id(p) for p in model.recognition_parameters()}
    assert rec == {id(p) for p in model.hidden_layers.parameters()}
    assert not rec & {id(p) for p in model.output.parameters()}
    assert len(rec) == 4  # two linear maps, weight and bias each
    lower = mean[4:]
    torch.testing.assert_close(model.output.bias.detach(), torch.log(lower) - torch.log1p(-lower))
    nonlinear = SBNSP(8, layers=[3], nonlinear=True, hidden=5, train_mean=mean)
    torch.testing.assert_close(nonlinear.output[-1].bias.detach(), torch.log(lower) - torch.log1p(-lower))


def test_bad_input_raises():
    with pytest.raises(ValueError, match="layers"):
        SBNSP(8, layers=[])
    with pytest.raises(ValueError, match="even"):
        SBNSP(7, layers=[2])


def test_config_builds_model():
    cfg = OmegaConf.load(CONF / "model" / "sbn_sp.yaml")
    model = instantiate(cfg, x_dim=784, train_mean=torch.full((784,), 0.2))
    assert isinstance(model, SBNSP) and model.layers == [200, 200]


@pytest.mark.parametrize("est_name", bernoulli_estimators())
def test_one_step_with_every_bernoulli_estimator(est_name: str):
    model, x = tiny(layers=(2, 3), x_dim=6, seed=5)
    est = instantiate(OmegaConf.load(CONF / "estimator" / f"{est_name}.yaml"), context_dim=model.context_dim)
    est = est.double()
    out = est(model.cost_fn(x), model.context(x))
    assert out.cost.shape[-1] == 3 and not out.cost.requires_grad
    assert out.surrogate.dim() == 0
    out.surrogate.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # the recognition part gets a gradient through the discrete samples
    assert any(p.grad.abs().sum() > 0 for p in model.recognition_parameters())


def test_reinforce_unbiased_on_enumerable_sp_model():
    """The model works with the enumeration helpers: REINFORCE's gradient matches the exact one."""
    model, x = tiny(layers=(2, 2), x_dim=6, seed=6)
    params = list(model.parameters())
    exact = flat_grad(exact_objective(model, x), params)  # [P]
    est = instantiate(
        OmegaConf.load(CONF / "estimator" / "reinforce_ma.yaml"), context_dim=model.context_dim
    ).double()
    torch.manual_seed(7)
    g = mc_gradients(model, est, x, groups=100, replicas=100)  # [G, P]
    assert z_scores(g, exact).abs().max() < Z_MAX
