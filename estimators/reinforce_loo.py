"""REINFORCE with the leave-one-out baseline (S >= 2 samples per example).

    g = 1/S sum_s grad_theta log p_theta(z_s) * (f(z_s) - 1/(S-1) sum_{s' != s} f(z_s'))
      + 1/S sum_s grad_theta f(z_s; theta)                    (direct dependence, samples held fixed)

Kool, van Hoof, Welling, "Buy 4 REINFORCE samples, get a baseline for free!", ICLR 2019 workshop;
the same per-sample leave-one-out baseline as VIMCO (Mnih & Rezende 2016), applied to the single-sample
objective. **Unbiased**: the baseline of sample s is built from the other, independent samples
only, so E[grad log p(z_s) * b_s] = E[grad log p(z_s)] E[b_s] = 0. Works for any latent with ``log_prob``.
"""

from __future__ import annotations

from torch import Tensor

from estimators.base import CostFn, Estimate, Estimator, Trace, draw_detached, site_log_prob


class ReinforceLOO(Estimator):
    supports = frozenset({"bernoulli", "normal", "mixture"})
    unbiased = True
    min_samples = 2

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        trace = Trace(draw_detached)  # exact samples, no gradient through their values
        cost = cost_fn(trace, self.n_samples)  # [S, B]
        log_p = sum(site_log_prob(d, z) for d, z in trace.sites.values())  # [S, B], differentiable in theta
        f = cost.detach()  # [S, B]; the learning signal is a constant weight on grad log p
        s = f.shape[0]
        loo = (f.sum(0, keepdim=True) - f) / (s - 1)  # [S, B] mean of the other S-1 samples
        adv = f - loo  # [S, B] = S/(S-1) (f - mean f)
        # + cost: direct gradient of f at the fixed samples; + log_p * adv: score-function term (minimising:
        # a sample costlier than its peers gets its log-probability pushed down)
        surrogate = (cost + log_p * adv).mean()
        return Estimate(f, surrogate, {"advantage_std": adv.detach().std() if adv.numel() > 1 else 0.0})
