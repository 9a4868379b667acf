"""Straight-through (ST) estimator for Bernoulli units and one-hot categorical variables, and its slope-annealed variant.

    forward:  z = b ~ Bernoulli(sigmoid(l))                     (the exact sample)
    backward: dz/dtheta := d sigmoid(a * l) / dtheta = a sigmoid(a l)(1 - sigmoid(a l)) dl/dtheta
    g = f'(b)^T dmu/dtheta + grad_theta f(b; theta),           mu = sigmoid(a * l)

For a one-hot categorical variable with logits l [K]: b ~ Categorical(softmax(l)) one-hot forward, and
mu = softmax(a * l) backward (the class probabilities, MuProp's ST for its categorical model).

implemented as ``z = b + (mu - SG(mu))``. With slope a = 1 this is ST as in MuProp's tables (Gu et al. 2016,
baselines; Bengio, Leonard, Courville 2013). The
slope-annealed variant (Chung, Ahn, Bengio, "Hierarchical Multiscale RNNs", ICLR 2017, "slope annealing trick")
grows the slope with the training step, a = min(max_slope, 1 + slope_rate * step). The forward value is
always a sample of the model's own Bernoulli(sigmoid(l)), so the reported cost is the model's objective; the
slope only shapes the backward pass. **Biased** (f'(b) is not a finite difference of f).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import (
    CostFn,
    Estimate,
    Estimator,
    Trace,
    bernoulli_logits,
    categorical_logits,
    discrete_kind,
    draw_detached,
)


class StraightThrough(Estimator):
    supports = frozenset({"bernoulli", "categorical"})
    unbiased = False

    def __init__(
        self,
        n_samples: int = 1,
        slope: float = 1.0,
        slope_rate: float = 0.0,
        max_slope: float = 1.0,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        if slope <= 0 or max_slope < slope or slope_rate < 0:
            raise ValueError(
                f"need 0 < slope <= max_slope and slope_rate >= 0; got slope={slope}, "
                f"max_slope={max_slope}, slope_rate={slope_rate}"
            )
        self.slope, self.slope_rate, self.max_slope = float(slope), float(slope_rate), float(max_slope)
        # members stepped together share the first member's step counter: only without a slope schedule
        self.member_dim = self.slope_rate == 0

    def current_slope(self) -> float:
        """a = min(max_slope, slope + slope_rate * step); without a schedule the step (a device tensor) is not
        read: no host synchronisation in the step."""
        if self.slope_rate == 0:
            return self.slope
        return min(self.max_slope, self.slope + self.slope_rate * float(self.step))

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        a = self.current_slope()

        def draw(name: str, dist: Distribution) -> Tensor:
            b = draw_detached(name, dist)  # [S, B, D] (or [S, B, V, K]); exact, no gradient through its value
            if discrete_kind(dist) == "bernoulli":
                mu = torch.sigmoid(a * bernoulli_logits(dist))  # [S, B, D], the backward path
            else:
                mu = torch.softmax(a * categorical_logits(dist), dim=-1)  # [S, B, V, K], the backward path
            # + mu - SG(mu): zero in value (forward sees b), gradient of mu in the backward pass
            return b + (mu - mu.detach())  # [S, B, D]

        cost = cost_fn(Trace(draw), self.n_samples)  # [S, B], differentiable through the ST samples
        return Estimate(cost.detach(), cost.mean(), {"slope": a})
