"""Reparameterization (pathwise) estimator.

    g = grad_theta f(z(theta, eps)),    z = mu_theta + sigma_theta * eps,  eps ~ N(0, I)

Kingma & Welling 2014, Rezende et al. 2014. Unbiased; needs ``rsample`` on every stochastic site
(Gaussians; a ``DiagNormalMixture`` for mixture latents).
"""

from __future__ import annotations

from torch import Tensor

from estimators.base import CostFn, Estimate, Estimator, Trace, draw_rsample


class Reparam(Estimator):
    supports = frozenset({"normal"})
    unbiased = True

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        cost = cost_fn(Trace(draw_rsample), self.n_samples)  # [S, B], differentiable through the samples
        return Estimate(cost.detach(), cost.mean())
