"""Variance reduction for score-function learning signals, as named in MuProp and NVIL.

Given a per-example learning signal ``l`` ([S, B]; the cost for REINFORCE, the Taylor residual for MuProp)
and the input ``x`` of each example, produce the centred, normalised signal ``A`` that multiplies
``grad log p(z)``:

* ``C``   centring: subtract ``c``, a moving average of ``l - B(x)``;
* ``IDB`` input-dependent baseline: also subtract ``B_psi(x)``, a one-hidden-layer net (100 tanh units)
  trained to minimise ``E[(l - c - B_psi(x))^2]``;
* ``VN``  variance normalisation: divide by ``max(1, sqrt(v))``, ``v`` a moving average of the variance of
  the centred signal.

Mnih & Gregor 2014 (NVIL), Sec. 3; Gu et al. 2016 (MuProp), Sec. 4. Subtracting anything that does not
depend on the sample ``z`` keeps the estimator unbiased; dividing by ``max(1, sqrt(v))`` rescales the
gradient by a positive factor shared by all parameters of a step (NVIL's choice; the direction is unbiased).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from estimators.base import MovingAverage
from models.members import Linear, member_mean, member_std, n_members, rows


class InputBaseline(nn.Module):
    """B_psi(x): context [B, C] -> baseline [B]."""

    def __init__(self, context_dim: int, hidden: int = 100):
        super().__init__()
        self.net = nn.Sequential(Linear(context_dim, hidden), nn.Tanh(), Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)  # start as the zero baseline: the first steps are plain C
        nn.init.zeros_(self.net[2].bias)

    def forward(self, context: Tensor) -> Tensor:
        return self.net(context).squeeze(-1)  # [B]


class SignalProcessor(nn.Module):
    """C / VN / IDB applied to a learning signal; all state lives here and is checkpointed with it."""

    def __init__(
        self,
        centre: bool = False,
        normalise: bool = False,
        input_baseline: bool = False,
        context_dim: int | None = None,
        hidden: int = 100,
        decay: float = 0.9,
    ):
        super().__init__()
        if input_baseline and not context_dim:
            raise ValueError(
                "an input-dependent baseline (idb: true) needs context_dim, the size of its input"
            )
        self.centre, self.normalise = bool(centre), bool(normalise)
        self.mean = MovingAverage(decay)
        self.var = MovingAverage(decay)
        self.baseline = InputBaseline(context_dim, hidden) if input_baseline else None

    def forward(
        self, signal: Tensor, context: Tensor | None, update: bool = True
    ) -> tuple[Tensor, Tensor, dict]:
        """Returns (A detached [S, B], baseline-net loss scalar, diagnostics).

        In a pack stepped with a member dimension the rows (last dimension) are M members' and the moving
        averages stacked ``[M]``: every statistic is each member's own (models/members.py)."""
        signal = (
            signal.detach()
        )  # the learning signal is a constant weight on grad log p: no gradient through it
        m = n_members(self.mean.value, 0)  # None: one run
        a = signal  # [S, B]
        loss = signal.new_zeros(())
        if self.baseline is not None:
            if context is None:
                raise ValueError("an input-dependent baseline needs the example context; pass context=x")
            b_x = self.baseline(context)  # [B]
            centred_target = signal - (rows(self.mean.value, signal) if self.centre else 0.0)  # [S, B]
            # trains psi only: the target is detached, b_x depends on psi and the input alone
            loss = ((centred_target - b_x) ** 2).mean()
            a = a - b_x.detach()  # [S, B]; detached: A is a constant in the score-function term
        # The running statistics are used *before* they see this step's signal: a baseline that depended on
        # the current sample would bias the estimate.
        if self.centre:
            centred = a - rows(self.mean.value, a)  # [S, B]
            if update:
                self.mean.update(a)
            a = centred
        if self.normalise:
            scale = rows(self.scale(), a)  # [] or [S, B]
            if update:
                self.var.update(a.pow(2))
            a = a / scale  # [S, B]
        diag = {
            "signal_mean": member_mean(signal, m),
            "advantage_std": member_std(a, m) if a.numel() > 1 else 0.0,
        }
        return a, loss, diag

    def scale(self) -> Tensor:
        """The VN divisor max(1, sqrt(v)) (``[M]`` in a pack stepped with a member dimension), detached."""
        return torch.clamp(self.var.value.sqrt(), min=1.0).detach()
