"""MuProp with rollouts: one mean-field branch from every sampled layer, each layer's Taylor expansion its own.

    g = sum_i grad log p(z_i | z_<i) * [f(z) - f_i(z_bar_i) - f_i'(z_bar_i)^T (z_i - z_bar_i)]
      + sum_i f_i'(z_bar_i)^T grad mu_i(z_<i)
      + grad_theta f(z; theta)                                         (direct dependence, samples held fixed)

    f_i(y) = f(z_<i, y, MF_>i(y)),   z_bar_i = mu_i(z_<i)       (the rollout of layer i)

where z_<i are the *sampled* layers below i and MF_>i(y) propagates means instead of samples through every
layer above i. Gu, Levine, Sutskever, Mnih, "MuProp: Unbiased Backpropagation for Stochastic Neural Networks",
ICLR 2016: the extension proposed in Sec. 6 and drawn in Fig. 1 (right), never run in the paper (so issue 11
cites it; the paper's text could not be checked offline, so this is the construction as read here): instead of
one mean-field network for all layers (Algorithm 1, whose expansion point for layer i ignores the samples
below it), expand layer i's cost around the mean-field continuation *from the sampled prefix*. Layer 1's
rollout is Algorithm 1's mean-field pass. f_i' is the total derivative of the rollout f_i (through the
mean-field layers above i). **Unbiased**: f_i(z_bar_i), f_i'(z_bar_i) and z_bar_i depend on z_<i only, so
given z_<i the control variate is linear in z_i and E[grad log p(z_i | z_<i) * CV_i | z_<i] = f_i'^T grad mu_i,
which the second line adds back exactly (for any distribution with mean mu_i: Bernoulli or Gaussian).

Cost in passes: branch i replays z_<i and runs the mean-field network from layer i up, i.e. L - i + 1 of the
L stochastic layers plus the generative part: sum_i (L - i + 1) = L (L + 1) / 2 layer evaluations, O(L^2)
against MuProp's L. Through the ``cost_fn`` interface the model re-evaluates the replayed layers as well, so a
step costs one stochastic pass (S samples) plus one rollout call of L * S samples (block i is branch i) and
its backward to the L expansion points (no parameter gradient): for L = 1 exactly MuProp's cost, for
L = 2 one more full pass per sample. ``centre`` subtracts a moving average of the residuals (as MuProp-C: one
baseline shared by all layers, which keeps it unbiased because it does not depend on the sample).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import CostFn, Estimate, Estimator, MovingAverage, Trace, draw_detached, site_log_prob


class MuPropRollout(Estimator):
    supports = frozenset({"bernoulli", "normal"})
    unbiased = True

    def __init__(
        self,
        n_samples: int = 1,
        centre: bool = True,
        decay: float = 0.9,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        self.centre = bool(centre)
        self.baseline = MovingAverage(decay)

    def rollouts(self, cost_fn: CostFn, trace: Trace) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor]]:
        """f_i(z_bar_i) [L, S, B], z_bar_i [S, B, D_i] and f_i'(z_bar_i) [S, B, D_i], all detached."""
        names = list(trace.sites)
        n_layers, s = len(names), self.n_samples
        leaves: dict[str, Tensor] = {}

        def draw_rollouts(name: str, dist: Distribution) -> Tensor:
            """All L branches in one call: block i replays z_<i, expands at z_bar_i, mean-field above."""
            if name not in trace.sites:
                raise ValueError(
                    f"site {name!r} was not sampled in the stochastic pass; sites must not depend on samples"
                )
            k = names.index(name)
            rows = dist.mean  # [L*S, B, D]: means at each block's parents, differentiable through them
            blocks = []
            for i in range(n_layers):
                if k < i:  # below branch i's expansion layer: replay the sample
                    blocks.append(trace.sites[name][1])
                elif k == i:
                    # z_bar_k = mu_k(z_<k) of the stochastic pass, detached: the expansion point of branch k
                    # is an input of f_k, a leaf that autograd.grad can reach
                    leaf = trace.sites[name][0].mean.detach().requires_grad_(True)  # [S, B, D]
                    leaves[name] = leaf
                    blocks.append(leaf)
                else:  # above it: mean-field continuation, a function of the leaf (total derivative)
                    blocks.append(rows[i * s : (i + 1) * s])
            return torch.cat(blocks, 0)  # [L*S, B, D]

        with torch.enable_grad():
            f_roll = cost_fn(Trace(draw_rollouts), n_layers * s).reshape(n_layers, s, -1)  # [L, S, B]
            # rows do not mix and leaf k feeds only block k: the gradient of the sum is each branch's f_k'
            # (only the leaves are asked for, so no parameter gradient is computed or accumulated)
            grads = torch.autograd.grad(f_roll.sum(), [leaves[n] for n in names], allow_unused=True)
        z_bar = {n: leaves[n].detach() for n in names}
        f_prime = {n: (g if g is not None else torch.zeros_like(z_bar[n])) for n, g in zip(names, grads)}
        return f_roll.detach(), z_bar, f_prime  # detached: the rollouts are a control variate only

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        trace = Trace(draw_detached)  # exact samples, no gradient through their values
        cost = cost_fn(trace, self.n_samples)  # [S, B], differentiable in theta through the direct path
        f_z = cost.detach()  # [S, B]
        names = list(trace.sites)
        f_roll, z_bar, f_prime = self.rollouts(cost_fn, trace)  # [L, S, B], [S, B, D_i], [S, B, D_i]
        residual = torch.stack(
            [
                f_z - f_roll[i] - (f_prime[n] * (trace.sites[n][1] - z_bar[n])).flatten(2).sum(-1)
                for i, n in enumerate(names)
            ]
        )  # [L, S, B]
        adv = residual - self.baseline.value if self.centre else residual  # [L, S, B]; c is sample-free
        if self.centre and self.update_state:
            self.baseline.update(residual)
        log_p = torch.stack([site_log_prob(*trace.sites[n]) for n in names])  # [L, S, B], grad in theta
        mu_dot_fp = torch.stack(
            [(trace.sites[n][0].mean * f_prime[n]).flatten(2).sum(-1) for n in names]
        )  # [L, S, B]; mu_i at the sampled parents: the path the Taylor term integrates analytically
        # + cost: direct dependence; + log_p * adv: score times the rollout residual (a constant weight);
        # + mu^T f_i': adds back the control variate's expectation
        surrogate = (cost + (log_p * adv.detach()).sum(0) + mu_dot_fp.sum(0)).mean()
        diag = {
            "residual_std": residual.detach().std() if residual.numel() > 1 else 0.0,
            "cost_minus_rollout": (f_z - f_roll[0]).detach().mean(),
        }
        return Estimate(f_z, surrogate, diag)
