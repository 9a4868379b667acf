"""The DARN estimator, "1/2" in MuProp's tables: a Taylor expansion of f at the sample, centred at 1/2.

    g = sum_i grad_theta log p(z_i | pa_i) * f'_i(z)^T (z_i - 1/2)  +  grad_theta f(z; theta)

with f'_i(z) = d f(z) / d z_i at the sample (z_i treated as an input of f: a leaf, so the partial derivative
excludes the path through the layers sampled after it). Gregor, Danihelka, Mnih, Blundell, Wierstra,
"Deep AutoRegressive Networks", ICML 2014; "1/2" in Gu et al. 2016 (their baselines and Tables 1-2).
**Biased**: exact in expectation when f is multilinear in the units of a layer (for a Bernoulli unit
f'(z)(z - 1/2) averages to the finite difference f(1) - f(0) only then), biased otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import CostFn, Estimate, Estimator, Trace, site_log_prob


class Darn(Estimator):
    supports = frozenset({"bernoulli"})
    unbiased = False

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        def draw(name: str, dist: Distribution) -> Tensor:
            # detached: an exact sample, no gradient to theta through its value; a leaf requiring grad so
            # that autograd.grad can return d f / d z_i at the sample
            return dist.sample().requires_grad_(True)  # [S, B, D]

        trace = Trace(draw)
        with torch.enable_grad():
            cost = cost_fn(trace, self.n_samples)  # [S, B]
            names = list(trace.sites)
            zs = [trace.sites[n][1] for n in names]
            # per-example gradient (examples are independent); retain the graph: the surrogate below
            # differentiates the same cost again for its direct dependence on theta
            grads = torch.autograd.grad(cost.sum(), zs, retain_graph=True, allow_unused=True)
        signal = torch.stack(
            [
                ((g if g is not None else torch.zeros_like(z)) * (z.detach() - 0.5)).sum(-1)  # [S, B]
                for g, z in zip(grads, zs)
            ]
        )  # [L, S, B]; autograd.grad returns no graph, so the signal is a constant of the surrogate
        log_p = torch.stack(
            [site_log_prob(trace.sites[n][0], z.detach()) for n, z in zip(names, zs)]
        )  # [L, S, B]
        # + cost: direct dependence of f on theta at the fixed sample (z is a leaf: no path to theta);
        # + log_p * signal: score function times the Taylor learning signal (f is minimised)
        surrogate = (cost + (log_p * signal).sum(0)).mean()
        return Estimate(
            cost.detach(), surrogate, {"signal_std": float(signal.std()) if signal.numel() > 1 else 0.0}
        )
