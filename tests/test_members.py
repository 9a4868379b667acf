"""The member dimension (models/members.py): M members' rows in one pass equal each member's own pass.

Exact answers: member_linear against ``F.linear`` per member, its hand-written backward by ``gradcheck``; the
per-member reductions against the plain ones on each member's rows; the SignalProcessor and MovingAverage
with stacked state against one instance per member; and a draw made per member on its own stream against the
single run's ``dist.sample()``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Bernoulli, Independent

from estimators.base import MovingAverage, draw_detached, member_streams
from estimators.baselines import SignalProcessor
from models.members import Linear, member_linear, member_mean, member_std, rows

M, B = 3, 4


@pytest.mark.parametrize("lead", [(), (1,), (2,)], ids=["[MB,in]", "[1,MB,in]", "[2,MB,in]"])
@pytest.mark.parametrize("bias", [True, False])
def test_member_linear_is_each_members_linear(lead, bias):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*lead, M * B, 5, generator=g, dtype=torch.float64)
    w = torch.randn(M, 7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(M, 7, generator=g, dtype=torch.float64) if bias else None
    y = member_linear(x, w, b)  # [*lead, M*B, 7]
    for m in range(M):
        own = F.linear(x[..., m * B : (m + 1) * B, :], w[m], None if b is None else b[m])
        torch.testing.assert_close(y[..., m * B : (m + 1) * B, :], own, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
def test_member_linear_backward_gradcheck(bias):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, M * B, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(M, 7, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(M, 7, generator=g, dtype=torch.float64, requires_grad=True) if bias else None
    assert torch.autograd.gradcheck(member_linear, (x, w, b))
    assert torch.autograd.gradgradcheck(member_linear, (x, w, b))


def test_linear_with_an_unstacked_weight_is_nn_linear():
    torch.manual_seed(0)
    ours, theirs = Linear(5, 7), torch.nn.Linear(5, 7)
    theirs.load_state_dict(ours.state_dict())  # same parameters, same state dict keys
    x = torch.randn(2, 4, 5)
    assert torch.equal(ours(x), theirs(x))


def test_rows_and_per_member_reductions():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, M * B, generator=g, dtype=torch.float64)  # [S, M*B]
    stat = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)  # [M]
    spread = rows(stat, x)  # [S, M*B]
    assert spread.shape == x.shape and torch.equal(spread[1, B : 2 * B], torch.full((B,), 2.0, dtype=x.dtype))
    vec = torch.randn(M, 6, generator=g)  # [M, D] a per-member vector, e.g. a prior's logits
    like = torch.zeros(2, M * B, 6)
    assert torch.equal(rows(vec, like, 1)[1, 2 * B], vec[2])
    assert rows(torch.tensor(5.0), x).dim() == 0  # unstacked: as is
    for m in range(M):
        own = x[:, m * B : (m + 1) * B]
        torch.testing.assert_close(member_mean(x, M)[m], own.mean(), rtol=1e-12, atol=0)
        torch.testing.assert_close(member_std(x, M)[m], own.std(), rtol=1e-12, atol=0)
    assert torch.equal(member_mean(x, None), x.mean()) and torch.equal(member_std(x, None), x.std())
    units = torch.randn(2, M * B, 5, generator=g, dtype=torch.float64)  # [S, M*B, U]: rows along dim 1
    for m in range(M):
        own = units[:, m * B : (m + 1) * B]
        torch.testing.assert_close(member_std(units, M, dim=1)[m], own.std(), rtol=1e-12, atol=0)


@pytest.mark.parametrize(
    "centre,normalise,idb", [(True, False, False), (True, True, True), (False, True, True)]
)
def test_signal_processor_with_stacked_state_is_each_members(centre, normalise, idb):
    """Three steps of a stacked SignalProcessor (moving averages [M], IDB weights [M, ...]) give each member
    what its own processor gives on its own rows: advantages, baseline loss gradient, statistics."""
    torch.manual_seed(3)
    own = [SignalProcessor(centre, normalise, idb, context_dim=5, hidden=4).double() for _ in range(M)]
    for p in own:  # distinct IDB weights (the output layer starts at zero)
        for q in p.parameters():
            torch.nn.init.normal_(q)
    stacked = SignalProcessor(centre, normalise, idb, context_dim=5, hidden=4).double()
    tensors = {
        k: torch.stack([dict(p.named_parameters())[k] for p in own]) for k, _ in stacked.named_parameters()
    }
    stats = {k: torch.stack([dict(p.named_buffers())[k] for p in own]) for k, _ in stacked.named_buffers()}
    for step in range(3):
        signal = torch.randn(2, M * B, dtype=torch.float64) * 10 + step  # [S, M*B]
        context = torch.randn(M * B, 5, dtype=torch.float64)
        a, loss, diag = torch.func.functional_call(stacked, {**tensors, **stats}, (signal, context))
        grads = torch.autograd.grad(loss * M, list(tensors.values())) if idb else None
        for m, p in enumerate(own):
            sl = slice(m * B, (m + 1) * B)
            a_m, loss_m, diag_m = p(signal[:, sl], context[sl])
            torch.testing.assert_close(a[:, sl], a_m, rtol=1e-12, atol=1e-12)
            for k in diag_m:
                torch.testing.assert_close(diag[k][m], diag_m[k], rtol=1e-12, atol=1e-12)
            for k, v in p.named_buffers():
                torch.testing.assert_close(stats[k][m], v, rtol=1e-12, atol=0)
            if idb:
                for g, q in zip(grads, torch.autograd.grad(loss_m, list(p.parameters()))):
                    torch.testing.assert_close(g[m], q, rtol=1e-10, atol=1e-12)


def test_moving_average_with_stacked_state():
    ma = MovingAverage(0.9)
    ma.value, ma.initialised = (
        torch.zeros(M),
        torch.zeros(M, dtype=torch.bool),
    )  # stacked, as in a pack's step
    x = torch.arange(2.0 * M * B).view(2, M * B)  # [S, M*B]
    ma.update(x)
    ma.update(x.flip(1) * 2)
    for m in range(M):
        own = MovingAverage(0.9)
        own.update(x[:, m * B : (m + 1) * B])
        own.update(x.flip(1)[:, m * B : (m + 1) * B] * 2)
        torch.testing.assert_close(ma.value[m], own.value)


def test_member_draws_are_each_members_single_run_draws():
    """Inside ``member_streams`` each member's rows of a Bernoulli site come from its own stream, by the call a
    single run makes: equal to that member's ``dist.sample()`` on its own rows and stream."""
    logits = torch.randn(2, M * B, 6)
    seeds = [11, 12, 13]
    states = [torch.Generator().manual_seed(s).get_state() for s in seeds]

    def turns(i, draw):
        keep = torch.get_rng_state()
        torch.set_rng_state(states[i])
        try:
            return draw()
        finally:
            states[i] = torch.get_rng_state()
            torch.set_rng_state(keep)

    with member_streams(M, turns):
        z = draw_detached("z", Independent(Bernoulli(logits=logits, validate_args=False), 1))
        z2 = draw_detached("z", Independent(Bernoulli(logits=logits, validate_args=False), 1))
    for m, s in enumerate(seeds):
        torch.manual_seed(s)
        site = Independent(Bernoulli(logits=logits[:, m * B : (m + 1) * B], validate_args=False), 1)
        assert torch.equal(z[:, m * B : (m + 1) * B], site.sample())
        assert torch.equal(z2[:, m * B : (m + 1) * B], site.sample())  # the stream goes on
