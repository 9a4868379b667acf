"""Gumbel-Softmax / binary Concrete relaxation of Bernoulli units, and its straight-through form.

    y = sigmoid((l + L) / tau),   L = log u - log(1 - u),  u ~ U(0, 1)      (logistic noise)
    relaxed:           g = grad_theta f(y)                 (the cost evaluated at the relaxed point y in (0, 1))
    straight-through:  forward b = 1[l + L > 0] ~ Bernoulli(sigmoid(l)),  backward dy/dtheta;  z = b + (y - SG(y))

One-hot categorical variables (logits l [K]) use the Gumbel-Softmax proper:

    y = softmax((l + G) / tau),   G = -log(-log u)                                  (Gumbel noise)
    straight-through:  forward b = one_hot(argmax(l + G)) ~ Categorical(softmax(l)), z = b + (y - SG(y))

Maddison, Mnih, Teh, "The Concrete Distribution", ICLR 2017 (binary Concrete relaxation); Jang, Gu, Poole,
"Categorical Reparameterization with Gumbel-Softmax", ICLR 2017 (straight-through Gumbel-Softmax and the
annealing schedule tau = max(tau_min, tau0 exp(-rate * step))). **Biased** for any tau > 0: the relaxed
form differentiates a different objective (f at relaxed values; the model's Bernoulli log-mass is evaluated at
y in (0, 1)), the ST form backpropagates that objective's gradient through a hard sample.
"""

from __future__ import annotations

import math

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
)


class GumbelSoftmax(Estimator):
    supports = frozenset({"bernoulli", "categorical"})
    unbiased = False

    def __init__(
        self,
        n_samples: int = 1,
        temperature: float = 1.0,
        min_temperature: float = 1.0,
        anneal_rate: float = 0.0,
        straight_through: bool = False,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        if not 0 < min_temperature <= temperature or anneal_rate < 0:
            raise ValueError(
                f"need 0 < min_temperature <= temperature and anneal_rate >= 0; got "
                f"temperature={temperature}, min_temperature={min_temperature}, anneal_rate={anneal_rate}"
            )
        self.temperature, self.min_temperature = float(temperature), float(min_temperature)
        self.anneal_rate, self.straight_through = float(anneal_rate), bool(straight_through)

    def current_temperature(self) -> float:
        """tau = max(min_temperature, temperature * exp(-anneal_rate * step)); without annealing the step
        (a device tensor) is not read: no host synchronisation in the step."""
        if self.anneal_rate == 0:
            return self.temperature
        return max(self.min_temperature, self.temperature * math.exp(-self.anneal_rate * float(self.step)))

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        tau = self.current_temperature()

        def draw(name: str, dist: Distribution) -> Tensor:
            if discrete_kind(dist) == "categorical":
                return draw_categorical(dist)
            logits = bernoulli_logits(dist)  # [S, B, D]
            tiny = torch.finfo(logits.dtype).tiny
            u = torch.rand_like(logits).clamp(tiny, 1.0 - torch.finfo(logits.dtype).eps)  # [S, B, D]
            noise = torch.log(u) - torch.log1p(-u)  # [S, B, D] logistic noise, a constant (no parameters)
            y = torch.sigmoid((logits + noise) / tau)  # [S, B, D], reparameterized relaxed sample
            if not self.straight_through:
                return y
            # detached: the hard sample 1[l + L > 0] is an exact Bernoulli(sigmoid(l)) sample with no gradient
            b = (logits.detach() + noise > 0).to(logits.dtype)  # [S, B, D]
            # + y - SG(y): zero in value (forward sees b), gradient of the relaxed sample backward
            return b + (y - y.detach())  # [S, B, D]

        def draw_categorical(dist: Distribution) -> Tensor:
            logits = categorical_logits(dist)  # [S, B, V, K]
            tiny = torch.finfo(logits.dtype).tiny
            u = torch.rand_like(logits).clamp(tiny, 1.0 - torch.finfo(logits.dtype).eps)  # [S, B, V, K]
            gumbel = -torch.log(-torch.log(u))  # [S, B, V, K] Gumbel noise, a constant (no parameters)
            y = torch.softmax((logits + gumbel) / tau, dim=-1)  # [S, B, V, K], relaxed one-hot sample
            if not self.straight_through:
                return y
            # detached: argmax(l + G) is an exact Categorical(softmax(l)) sample (Gumbel-max), no gradient
            index = (logits.detach() + gumbel).argmax(-1)  # [S, B, V]
            b = torch.nn.functional.one_hot(index, logits.shape[-1]).to(logits.dtype)  # [S, B, V, K]
            # + y - SG(y): zero in value (forward sees b), gradient of the relaxed sample backward
            return b + (y - y.detach())

        cost = cost_fn(Trace(draw), self.n_samples)  # [S, B], differentiable through the relaxed samples
        return Estimate(cost.detach(), cost.mean(), {"temperature": tau})
