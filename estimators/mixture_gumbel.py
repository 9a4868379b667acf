"""Gumbel-Softmax (Concrete) relaxation of the mixture index.

    w = softmax((log pi + G) / tau),  G_k ~ Gumbel(0, 1),        (relaxed one-hot, [K])
    z = sum_k w_k (mu_k + sigma_k eps_k),  eps_k ~ N(0, I),       g = grad_theta f(z)

Jang, Gu & Poole 2017 ("Categorical Reparameterization with Gumbel-Softmax", eq. 1) and Maddison, Mnih &
Teh 2017 (the Concrete distribution) for w; Kingma & Welling 2014 for each component. **Biased**: z is not
a sample of the mixture (for tau > 0 it lies between components, and E[w] != pi), so both the reported
cost and the gradient are those of a different, relaxed objective; the bias vanishes only as tau -> 0,
where the variance diverges. The cost is evaluated at the relaxed z (including the model's log q(z)).

Unbounded in a VAE: the cost contains the exact mixture density log q(z), and a relaxed z between two
far-apart, narrow components has log q(z) -> -inf, so the relaxed objective can be driven to -inf by pulling
the components apart (measured: the mixture VAE's training "ELBO" reached +8e5 nats within 400 steps while
its exact ELBO fell to -9e3; bench/bench_mixture_estimators.py).

``hard: true`` is the straight-through variant (``mixture_gumbel_st.yaml``; Jang et al. 2017, Sec. 2.2): the
forward value uses the one-hot ``h = onehot(argmax w)``, an exact mixture sample (the argmax of Gumbel-perturbed
logits is Categorical(pi) at any tau), so the reported cost is the true one and cannot be exploited; the
backward pass uses the soft w (``h + w - SG(w)``). Still biased.

Temperature ``tau = max(min_temperature, temperature * exp(-anneal_rate * step))`` (Jang et al.'s
schedule; ``anneal_rate: 0`` keeps it fixed), all set in ``conf/estimator/mixture_gumbel.yaml``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.distributions import Distribution, MixtureSameFamily, RelaxedOneHotCategorical

from estimators.base import CostFn, Estimate, Estimator, Trace
from estimators.implicit_mixture import is_gaussian, mixture_parameters, unsupported_site


class MixtureGumbel(Estimator):
    supports = frozenset({"mixture"})
    unbiased = False

    def __init__(
        self,
        n_samples: int = 1,
        temperature: float = 0.5,
        anneal_rate: float = 0.0,
        min_temperature: float = 0.1,
        hard: bool = False,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        if not float(temperature) > 0:
            raise ValueError(f"estimator.temperature={temperature!r}: choose a number > 0")
        if not float(min_temperature) > 0:
            raise ValueError(f"estimator.min_temperature={min_temperature!r}: choose a number > 0")
        if float(anneal_rate) < 0:
            raise ValueError(f"estimator.anneal_rate={anneal_rate!r}: choose a number >= 0")
        self.temperature = float(temperature)
        self.anneal_rate = float(anneal_rate)
        self.min_temperature = float(min_temperature)
        self.hard = bool(hard)

    def current_temperature(self) -> float:
        if self.anneal_rate == 0:  # the step (a device tensor) is not read: no host synchronisation
            return self.temperature
        return max(self.min_temperature, self.temperature * math.exp(-self.anneal_rate * int(self.step)))

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        tau = self.current_temperature()

        def draw(name: str, dist: Distribution) -> Tensor:
            if isinstance(dist, MixtureSameFamily):
                logits, loc, scale = mixture_parameters(name, dist)  # [S, B, K], [S, B, K, D] x2
                temp = torch.tensor(tau, dtype=logits.dtype, device=logits.device)
                w = RelaxedOneHotCategorical(temp, logits=logits).rsample()  # [S, B, K], pathwise in logits
                if self.hard:
                    onehot = torch.zeros_like(w).scatter_(-1, w.argmax(-1, keepdim=True), 1.0)  # [S, B, K]
                    # value: the exact one-hot; gradient: that of the soft w (the detach cancels its value)
                    w = onehot + w - w.detach()  # [S, B, K]
                comp = loc + scale * torch.randn_like(loc)  # [S, B, K, D], one eps_k per component
                return (w.unsqueeze(-1) * comp).sum(-2)  # [S, B, D]
            if is_gaussian(dist):
                return dist.rsample()  # [S, B, D]
            raise unsupported_site(name, dist)

        cost = cost_fn(Trace(draw), self.n_samples)  # [S, B], the relaxed objective
        return Estimate(cost.detach(), cost.mean(), {"temperature": tau})
