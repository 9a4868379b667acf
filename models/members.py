"""The member dimension: M members of a packed run (same model and estimator, their own parameters) in one pass.

The runner's packed step (``train.member_dim``, runners/train.py) swaps each member's parameters in stacked,
``[M, ...]``, and concatenates the members' minibatches along the batch dimension, member after member: row
``m * B + b`` of every ``[..., M*B, ...]`` tensor is example ``b`` of member ``m``. Models and estimators keep
their code and their ``[S, B]`` shapes; the few operations that mix parameters with rows, or rows with each
other, read the number of members off the stacked tensor they hold and act per member:

* :class:`Linear` (an ``nn.Linear``, same state dict) multiplies each member's rows by its own weight with one
  ``baddbmm`` over ``[M, in, out]`` (CORL's ``VectorizedLinear``) when its weight is ``[M, out, in]``;
* :func:`rows` spreads a per-member value (``[M, ...]``: a prior's logits, a moving average) over the rows;
* :func:`member_mean` / :func:`member_std` reduce over each member's rows alone (a batch mean over ``M*B``
  rows would couple the members).

With an unstacked (single-run) parameter every function here is the plain operation, so a single run is the
pack of one member it always was.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _MemberMatmul(torch.autograd.Function):
    """``x [M, N, in] @ weight[m].T (+ bias[m])`` per member, with the weight's gradient computed in its own
    ``[M, out, in]`` layout (autograd's ``bmm`` backward yields it transposed, and the copy into the
    parameter's layout cost 30 % of a training step on CPU). ``tests/test_members.py`` gradchecks it."""

    @staticmethod
    def forward(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        wt = weight.transpose(1, 2)  # [M, in, out]
        return torch.bmm(x, wt) if bias is None else torch.baddbmm(bias.unsqueeze(1), x, wt)  # [M, N, out]

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        x, weight, bias = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, weight)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = torch.bmm(grad, weight) if need_x else None  # [M, N, in]
        grad_w = torch.bmm(grad.transpose(1, 2), x) if need_w else None  # [M, out, in]
        grad_b = grad.sum(1) if need_b and ctx.has_bias else None  # [M, out]
        return grad_x, grad_w, grad_b


def member_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x [*lead, M*B, in]`` times member ``m``'s ``weight[m] [out, in]`` (plus ``bias[m] [out]``) on its rows."""
    m, n_out, n_in = weight.shape
    *lead, n, _ = x.shape
    per = x.reshape(-1, m, n // m, n_in).transpose(0, 1).reshape(m, -1, n_in)  # [M, L*B, in]
    y = _MemberMatmul.apply(per, weight, bias)  # [M, L*B, out]
    return y.reshape(m, -1, n // m, n_out).transpose(0, 1).reshape(*lead, n, n_out)  # [*lead, M*B, out]


class Linear(nn.Linear):
    """``nn.Linear`` that also serves a pack: with a stacked weight ``[M, out, in]`` each member's rows of the
    batch dimension (the second last) get their own member's weight (:func:`member_linear`)."""

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dim() == 2:
            return F.linear(x, self.weight, self.bias)
        return member_linear(x, self.weight, self.bias)


def n_members(stacked: Tensor, plain_dim: int) -> int | None:
    """Members of a tensor whose single-run form has ``plain_dim`` dimensions: None when it is unstacked."""
    return stacked.shape[0] if stacked.dim() == plain_dim + 1 else None


def rows(value: Tensor, like: Tensor, plain_dim: int = 0) -> Tensor:
    """``value`` for every row of ``like [*lead, M*B, *rest]``: as is when unstacked (it broadcasts), else member
    ``m``'s ``value[m]`` on its rows. ``plain_dim``: the dimensions of the single-run value (0: a scalar, 1: a
    vector over ``like``'s last dimension)."""
    m = n_members(value, plain_dim)
    if m is None:
        return value
    batch_dim = like.dim() - 1 - plain_dim
    per_row = value.repeat_interleave(like.shape[batch_dim] // m, dim=0)  # [M*B, *plain]
    return per_row.expand(*like.shape[:batch_dim], *per_row.shape)


def _per_member(x: Tensor, m: int, dim: int) -> Tensor:
    """``x`` with ``M*B`` rows along ``dim`` as ``[M, rest]``: each member's entries in one row."""
    x = x.movedim(dim, -1)
    return x.reshape(*x.shape[:-1], m, x.shape[-1] // m).movedim(-2, 0).reshape(m, -1)


def member_mean(x: Tensor, m: int | None, dim: int = -1) -> Tensor:
    """Mean of ``x`` (rows along ``dim``) over everything but the members: ``[M]``, or the plain mean when ``m``
    is None."""
    return x.mean() if m is None else _per_member(x, m, dim).mean(1)


def member_std(x: Tensor, m: int | None, dim: int = -1) -> Tensor:
    """As :func:`member_mean`, for the (unbiased) standard deviation."""
    return x.std() if m is None else _per_member(x, m, dim).std(1)
