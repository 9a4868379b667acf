"""REBAR and RELAX (estimators/rebar.py, estimators/relax.py).

* the closed-form slope dz_t/dl of the tied conditional sample against autograd of its construction;
* unbiasedness by exact enumeration on tiny 1-, 2- and 3-layer SBNs, with non-default temperatures and etas and
  (RELAX) a control-variate net whose output is not zero (the YAML's zero-initialised net would make RELAX
  REBAR); z-test of tests/exact.py, false-failure rate below 1e-2 per run (fixed seeds);
* one exact one-sample test each on the Toy of tests/exact_discrete.py: the model gradient and the gradient of
  the variance objective with respect to log tau, eta (and the net) against the formulas written out here;
* the learned parameters are in the state_dict, move under training and survive a save/load round trip.
"""

from __future__ import annotations

import io
import math

import pytest
import torch

from estimators.rebar import REBAR, conditional_logit_slope
from tests.exact import Z_MAX, exact_objective, flat_grad, mc_gradients, tiny_sbn, z_scores
from tests.exact_discrete import Toy, build, one_thread

pytestmark = pytest.mark.usefixtures(one_thread.__name__)

MODELS = {"1layer": [3], "2layer": [2, 2], "3layer": [2, 2, 2]}


def test_conditional_slope_matches_autograd():
    """z_t(v, l) built as in the reference (v = v(u) held fixed) equals z in value; its slope is the closed form."""
    torch.manual_seed(0)
    l = torch.randn(1000, dtype=torch.float64) * 2
    u = torch.rand(1000, dtype=torch.float64).clamp(1e-6, 1 - 1e-6)
    z = l + torch.log(u) - torch.log1p(-u)
    b = (z > 0).double()
    lv = l.clone().requires_grad_(True)
    u_prime = torch.sigmoid(-lv)  # 1 - p
    with torch.no_grad():  # the conditional noise v, fixed
        v1 = (u - u_prime) / (1 - u_prime)
        v0 = u / u_prime
    w = torch.where(b > 0.5, v1 * (1 - u_prime) + u_prime, v0 * u_prime)
    z_t = lv + torch.log(w) - torch.log1p(-w)
    torch.testing.assert_close(z_t.detach(), z, rtol=1e-9, atol=1e-7)
    (slope,) = torch.autograd.grad(z_t.sum(), lv)
    torch.testing.assert_close(conditional_logit_slope(u, b, torch.sigmoid(l)), slope, rtol=1e-7, atol=1e-7)
    # given b, v is uniform: its mean is 1/2 on both sides
    assert abs(float(torch.where(b > 0.5, v1, v0).mean()) - 0.5) < 0.03


def perturbed(name: str, context_dim: int, seed: int = 3):
    """The YAML's estimator with per-layer tau, eta away from their defaults and (RELAX) a non-zero net."""
    est = build(name, context_dim)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        est.log_temperature.copy_(
            torch.log(0.2 + torch.rand(est.max_layers, generator=gen, dtype=torch.float64))
        )
        est.eta.copy_(0.5 + torch.rand(est.max_layers, generator=gen, dtype=torch.float64))
        for net in getattr(est, "nets", []):
            net.out.weight.normal_(0, 0.3, generator=gen)
            net.out.bias.normal_(0, 0.3, generator=gen)
    return est


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("est_name", ["rebar", "relax"])
def test_unbiased_with_learned_parameters_away_from_init(est_name: str, model_name: str):
    model, x = tiny_sbn(MODELS[model_name], seed=4)
    exact = flat_grad(exact_objective(model, x), list(model.parameters()))  # [P]
    est = perturbed(est_name, model.context_dim)
    est.update_state = False  # the parameters stay where they were put (no optimiser runs here anyway)
    torch.manual_seed(5)
    g = mc_gradients(model, est, x, groups=200, replicas=100)  # [G, P]
    z = z_scores(g, exact)
    assert z.abs().max() < Z_MAX, f"{est_name} on {model_name}: max |z| = {z.abs().max():.2f}"


def test_z_test_catches_a_wrong_slope(monkeypatch):
    """The check above sees a bias in the conditional pathwise term (slope 0 in place of dz_t/dl)."""
    import estimators.rebar as rebar_module  # noqa: PLC0415

    monkeypatch.setattr(rebar_module, "conditional_logit_slope", lambda u, b, p: torch.zeros_like(u))
    model, x = tiny_sbn(MODELS["1layer"], seed=4)
    exact = flat_grad(exact_objective(model, x), list(model.parameters()))
    est = perturbed("rebar", model.context_dim)
    torch.manual_seed(5)
    g = mc_gradients(model, est, x, groups=200, replicas=100)
    assert z_scores(g, exact).abs().max() > Z_MAX


# --------------------------------------------------------------------------------------------------
# one exact one-sample test each


def hand_signal(toy: Toy, u, log_tau, eta, r=None, dr=None):
    """REBAR/RELAX per-unit signal g_l on the Toy, [1, B, D], differentiable in log_tau and eta.

    z = l + logit(u), b = H(z), y = sigmoid(z / tau), c = eta (f(y) + r(z)), G = dc/dz = eta (f'(y) y (1 - y) / tau
    + dr/dz), slope = dz_t/dl; g = (f(b) - c)(b - p) + G (1 - slope).
    """
    tau = log_tau.exp()
    l = toy.logits().detach().unsqueeze(0)  # [1, B, D]
    p = torch.sigmoid(l)
    z = l + torch.log(u) - torch.log1p(-u)
    b = (z > 0).double()
    y = torch.sigmoid(z / tau)
    w = toy.w.detach()
    f_b = toy.f(b, w)  # [1, B]
    f_y = toy.f(y, w)  # [1, B]
    G = toy.f_prime(y) * y * (1 - y) / tau  # [1, B, D]
    if r is not None:
        f_y, G = f_y + r, G + dr
    c, G = eta * f_y, eta * G
    slope = torch.where(b > 0.5, p - (1 - u) * (1 - p) / u, (1 - p) - u * p / (1 - u))
    return (f_b - c).unsqueeze(-1) * (b - p) + G * (1 - slope), b, y


def first_uniforms(seed: int):
    torch.manual_seed(seed)
    eps = torch.finfo(torch.float64).eps
    return torch.rand(1, Toy.B, Toy.D, dtype=torch.float64).clamp(eps, 1 - eps)  # the estimator's first draw


def test_rebar_exact():
    toy, est = Toy(), build("rebar")
    with torch.no_grad():
        est.log_temperature.fill_(math.log(0.7))
        est.eta.fill_(0.8)
        est.rms_log_temperature.fill_(4.0)  # running means of the squared variance gradient, as after a step
        est.rms_eta.fill_(9.0)
        est.rms_initialised.fill_(True)
    u = first_uniforms(11)
    torch.manual_seed(11)
    out = est(toy.cost_fn, None)
    log_tau = torch.tensor(0.7, dtype=torch.float64).log().requires_grad_(True)
    eta = torch.tensor(0.8, dtype=torch.float64, requires_grad=True)
    g, b, y = hand_signal(toy, u, log_tau, eta)
    torch.testing.assert_close(toy.seen[0], b)  # the hard pass saw b, the relaxed pass y
    torch.testing.assert_close(toy.seen[1], y.detach())
    g_theta, g_w = toy.grads(out.surrogate)
    torch.testing.assert_close(g_theta, g.detach().mean((0, 1)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, (b[..., 2] + 2 * toy.w).mean().detach(), rtol=1e-10, atol=1e-12)
    # the estimator's own parameters get dV/dphi / (sqrt(r) + 1e-8), V = sum_D g^2 averaged over S, B, with
    # r = 0.99 r_old + 0.01 (dV/dphi)^2 (RMSprop preconditioning)
    v = g.square().sum(-1).mean()
    dv_dlog_tau, dv_deta = torch.autograd.grad(v, [log_tau, eta])
    d_log_tau, d_eta = torch.autograd.grad(out.surrogate, [est.log_temperature, est.eta])

    def precondition(grad, r_old):
        return grad / ((0.99 * r_old + 0.01 * grad**2).sqrt() + 1e-8)

    torch.testing.assert_close(d_log_tau[0], precondition(dv_dlog_tau, 4.0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(d_eta[0], precondition(dv_deta, 9.0), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(est.rms_eta[0], 0.99 * 9.0 + 0.01 * dv_deta**2)
    assert float(d_log_tau[1:].abs().sum()) == 0.0 and float(d_eta[1:].abs().sum()) == 0.0  # unused layers
    assert out.diagnostics["variance_objective"] == pytest.approx(float(v.detach()))


def test_relax_exact():
    toy, est = Toy(), perturbed("relax", None, seed=7)
    tau0, eta0 = float(est.log_temperature[0].detach().exp()), float(est.eta[0].detach())
    net = est.nets[0]
    with torch.no_grad():  # running means of the squared variance gradient, as after a first step
        est.rms_eta.fill_(9.0)
        est.rms_nets_0_out_weight.fill_(2.0)
        est.rms_initialised.fill_(True)
    u = first_uniforms(12)
    torch.manual_seed(12)
    out = est(toy.cost_fn, None)
    l = toy.logits().detach().unsqueeze(0)
    z = l + torch.log(u) - torch.log1p(-u)  # [1, B, D], the net's only input (no context, no layer below)
    w1 = net.first.weight[:, : Toy.D].detach()  # [H, D]: the zero-padded input meets the first D columns
    w_out = net.out.weight.detach().requires_grad_(True)  # [1, H]
    pre = z @ w1.T + net.first.bias.detach()  # [1, B, H]
    r = (torch.relu(pre) @ w_out.T).squeeze(-1) + net.out.bias.detach()  # [1, B]
    dr = ((pre > 0).double() * w_out) @ w1  # [1, B, D]: dr/dz = W1^T (w_out * 1[pre > 0])
    log_tau = torch.tensor(tau0, dtype=torch.float64).log().requires_grad_(True)
    eta = torch.tensor(eta0, dtype=torch.float64, requires_grad=True)
    g, b, _ = hand_signal(toy, u, log_tau, eta, r, dr)
    g_theta, g_w = toy.grads(out.surrogate)
    torch.testing.assert_close(g_theta, g.detach().mean((0, 1)), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_w, (b[..., 2] + 2 * toy.w).mean().detach(), rtol=1e-10, atol=1e-12)
    v = g.square().sum(-1).mean() + 0.5 * est.weight_decay * w_out.square().sum()  # V plus weight decay
    dv_eta, dv_out = torch.autograd.grad(v, [eta, w_out])
    d_eta, d_out = torch.autograd.grad(out.surrogate, [est.eta, net.out.weight])
    torch.testing.assert_close(d_eta[0], dv_eta / ((0.99 * 9.0 + 0.01 * dv_eta**2).sqrt() + 1e-8))
    torch.testing.assert_close(d_out, dv_out / ((0.99 * 2.0 + 0.01 * dv_out**2).sqrt() + 1e-8))


# --------------------------------------------------------------------------------------------------
# state, training, plumbing


@pytest.mark.parametrize("est_name", ["rebar", "relax"])
def test_learned_parameters_train_and_survive_a_checkpoint(est_name: str):
    model, x = tiny_sbn([3, 2], seed=0)
    est = build(est_name, model.context_dim)
    keys = set(est.state_dict())
    assert {"log_temperature", "eta"} <= keys
    assert {"rms_eta", "rms_log_temperature", "rms_initialised"} <= keys
    if est_name == "relax":
        assert {
            "nets.0.first.weight",
            "nets.0.out.weight",
            "nets.1.out.bias",
            "rms_nets_0_first_weight",
        } <= keys
    before = {k: v.clone() for k, v in est.state_dict().items()}
    opt = torch.optim.Adam(est.parameters(), lr=0.05)  # the runner trains them from the same surrogate
    for _ in range(3):
        out = est(model.cost_fn(x), model.context(x))
        opt.zero_grad()
        out.surrogate.backward()
        opt.step()
    for k in ("log_temperature", "eta"):
        assert not torch.equal(est.state_dict()[k][:2], before[k][:2]), f"{k} did not move"
        assert torch.equal(est.state_dict()[k][2:], before[k][2:]), f"{k}: layers the model lacks moved"
    if est_name == "relax":
        assert not torch.equal(est.state_dict()["nets.0.out.weight"], before["nets.0.out.weight"])
    buf = io.BytesIO()
    torch.save({"estimator": est.state_dict()}, buf)
    buf.seek(0)
    fresh = build(est_name, model.context_dim)
    fresh.load_state_dict(torch.load(buf)["estimator"])
    for k, v in est.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[k], v)
    params = list(model.parameters())
    grads = []
    for e in (est, fresh):
        torch.manual_seed(9)
        grads.append(flat_grad(e(model.cost_fn(x), model.context(x)).surrogate, params))
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("est_name", ["rebar", "relax"])
def test_variance_objective_does_not_reach_the_model(est_name: str):
    """Same samples, with and without training the control variate: identical model gradients."""
    model, x = tiny_sbn([2, 2], seed=0)
    est = perturbed(est_name, model.context_dim)
    params = list(model.parameters())
    grads = []
    for update in (True, False):
        est.update_state = update
        torch.manual_seed(3)
        grads.append(flat_grad(est(model.cost_fn(x), model.context(x)).surrogate, params))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_too_deep_model_and_bad_options_raise():
    model, x = tiny_sbn([2, 2], seed=0)
    with pytest.raises(ValueError, match="max_layers"):
        build("rebar", model.context_dim, max_layers=1)(model.cost_fn(x), model.context(x))
    with pytest.raises(ValueError, match="max_input"):
        build("relax", model.context_dim, max_input=6)(model.cost_fn(x), model.context(x))
    with pytest.raises(ValueError, match="temperature"):
        REBAR(temperature=0.0)


def test_sgd_on_the_variance_objective_stays_finite():
    """The runner's SGD (lr 1e-3, momentum 0.9) on an MNIST-sized SBN 200-200-784: the raw dV/deta is ~1e5
    there; without the preconditioning eta left [0.5, 1.5] within a few steps (and the raw one reached NaN)."""
    from models.sbn import SBN  # noqa: PLC0415

    torch.manual_seed(0)
    x = (torch.rand(50, 784) < 0.3).float()  # [B, X]
    model = SBN(784, [200, 200])
    est = build("rebar", 784).float()
    opt = torch.optim.SGD([*model.parameters(), *est.parameters()], lr=1e-3, momentum=0.9)
    for _ in range(6):
        out = est(model.cost_fn(x), model.context(x))
        opt.zero_grad()
        out.surrogate.backward()
        opt.step()
    assert torch.isfinite(est.log_temperature).all() and torch.isfinite(est.eta).all()
    assert (est.eta[:2] - 1).abs().max() < 0.5 and (est.log_temperature[:2].exp() - 0.5).abs().max() < 0.2
