"""Exact marginalisation over the mixture index, reparameterization inside every component.

    E_q[f] = sum_k pi_k E_{N(mu_k, sigma_k)}[f],    z_k = mu_k + sigma_k eps,  eps ~ N(0, I)
    g = grad_theta sum_k pi_k f(z_k)

The sum over the K components is done exactly (REFERENCE.md Sec. 5, "exact marginalisation over
components"; the Rao-Blackwellisation of the score-function estimator of ``mixture_score``), each
component's expectation by the pathwise derivative (Kingma & Welling 2014). Unbiased, and K times the work
of one sample: the model runs once on z of shape ``[K, S, B, D]`` (costs broadcast over leading dims,
models/base.py) and returns ``[K, S, B]``.

All components share one eps per (s, b): common random numbers, so f(z_k) are positively correlated
across k and the logits' gradient sum_k (d pi_k) f(z_k), whose weights sum to zero, loses that common part.
Each component's term is still an unbiased estimate, so the sum is unbiased.

One mixture site per model (the product over several sites would need K^L evaluations); Gaussian sites
are plain reparameterized samples.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, MixtureSameFamily

from estimators.base import CostFn, Estimate, Estimator, Trace
from estimators.implicit_mixture import is_gaussian, mixture_parameters, unsupported_site


class MixtureExact(Estimator):
    supports = frozenset({"mixture", "normal"})
    unbiased = True

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        weights: list[Tensor] = []  # pi of the (single) mixture site, [K, S, B]

        def draw(name: str, dist: Distribution) -> Tensor:
            if isinstance(dist, MixtureSameFamily):
                if weights:
                    raise ValueError(
                        f"site {name!r}: mixture_exact marginalises one mixture site per model; this model has "
                        "more. Use implicit_mixture or mixture_score."
                    )
                logits, loc, scale = mixture_parameters(name, dist)  # [S, B, K], [S, B, K, D] x2
                weights.append(torch.softmax(logits, -1).movedim(-1, 0))  # [K, S, B]
                eps = torch.randn_like(loc[..., 0, :])  # [S, B, D], shared by the components
                return (loc + scale * eps.unsqueeze(-2)).movedim(-2, 0)  # [K, S, B, D]
            if is_gaussian(dist):
                return dist.rsample()  # [S, B, D]; broadcasts against the [K] dim of a mixture site
            raise unsupported_site(name, dist)

        per_component = cost_fn(Trace(draw), self.n_samples)  # [K, S, B] (or [S, B] with no mixture site)
        if weights:
            assert per_component.dim() == 3, f"expected a [K, S, B] cost, got {tuple(per_component.shape)}"
            cost = (weights[0] * per_component).sum(0)  # [S, B]; pi differentiable: the logits' gradient
        else:
            cost = per_component  # [S, B]
        return Estimate(cost.detach(), cost.mean(), {})
