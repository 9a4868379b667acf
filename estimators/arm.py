"""ARM (Augment-REINFORCE-Merge) for Bernoulli units with logits phi.

    d/dphi E_{z ~ Bern(sigmoid(phi))}[f(z)] = E_u[ (f(b1) - f(b2)) (u - 1/2) ],
    b1 = 1[u > sigmoid(-phi)],  b2 = 1[u < sigmoid(phi)],  u ~ U(0, 1)^D       (antithetic pair, shared u)

Yin & Zhou, "ARM: Augment-REINFORCE-Merge Gradient for Stochastic Binary Networks", ICLR 2019 (the ARM estimator
for a multivariate Bernoulli with a shared u, and its extension to T stochastic layers). **Unbiased**.
(Equation numbers not given: they could not be checked against the paper offline.)

Multi-layer SBNs (the per-layer scheme of Yin & Zhou and of Dong et al. 2020): one *base* trajectory draws every
layer with its own uniforms, z_j = 1[u_j < sigmoid(phi_j(pa_j))] (this is b2 at every layer). For each layer
i a *flipped* pass replays z_<i of the base trajectory by site name, takes the antithetic
b1 = 1[u_i > sigmoid(-phi_i)] at layer i, and continues above i with the *same* uniforms u_>i (common random
numbers) through the flipped values. So layer i's pair is (flipped pass i, base pass); the L flipped passes
run as one call of the cost with L * S samples (block i of the sample dimension flips layer i), without a
graph: two model evaluations per step whatever L.
Unbiased: given z_<i, u_i is independent of u_>i and each branch's continuation is an exact sample of
p(z_>i | z_<=i), so E[f(branch) | u_i] = E[f | z_<i, b] and the one-layer identity applies to layer i; the sum over layers
of unbiased per-layer terms is unbiased whatever their correlation. The θ-dependence of f that does not go
through the samples (decoder, explicit log q terms) gets its gradient from f at the base trajectory with the
samples held fixed. Estimators for phi_i are pushed into theta by the chain rule through phi_i(pa_i), the
logits the base pass computed at its (detached) sampled parents.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution

from estimators.base import CostFn, Estimate, Estimator, Trace, bernoulli_logits


class ARM(Estimator):
    supports = frozenset({"bernoulli"})
    unbiased = True

    def layer_gradient(
        self, f_flip: Tensor, f_base: Tensor, u: Tensor, logits: Tensor, b_flip: Tensor, b_base: Tensor
    ) -> Tensor:
        """ARM: estimate of d E[f] / d phi for one layer, [S, B, D]."""
        return (f_flip - f_base).unsqueeze(-1) * (u - 0.5)  # [S, B, D]

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        uniforms: dict[str, Tensor] = {}

        def draw_base(name: str, dist: Distribution) -> Tensor:
            logits = bernoulli_logits(dist)  # [S, B, D]
            u = torch.rand_like(logits)  # [S, B, D]
            uniforms[name] = u
            # detached: an exact sample, no gradient through its value; b2 = 1[u < sigmoid(phi)]
            return (u < torch.sigmoid(logits.detach())).to(logits.dtype)  # [S, B, D]

        base = Trace(draw_base)
        cost = cost_fn(base, self.n_samples)  # [S, B], graph for the direct dependence on theta
        f_base = cost.detach()  # [S, B]; a learning signal is a constant weight
        names = list(base.sites)
        n_layers, s = len(names), self.n_samples

        def draw_flips(name: str, dist: Distribution) -> Tensor:
            """All L flipped passes in one call: block i of the sample dimension flips layer i."""
            if name not in uniforms:
                raise ValueError(
                    f"site {name!r} was not sampled in the base pass; sites must not depend on samples"
                )
            k = names.index(name)
            u = uniforms[name]  # [S, B, D]
            z_base = base.sites[name][1]  # [S, B, D]
            logits = bernoulli_logits(dist)  # [L*S, B, D] at each block's parents
            blocks = []
            for i in range(n_layers):
                if k < i:  # below the flipped layer: replay the base trajectory
                    blocks.append(z_base)
                elif k == i:  # the antithetic b1 = 1[u > sigmoid(-phi)], phi of the base pass (same parents)
                    phi = bernoulli_logits(base.sites[name][0]).detach()  # [S, B, D]
                    blocks.append((u > torch.sigmoid(-phi)).to(phi.dtype))  # [S, B, D]
                else:  # above it: the same uniforms through the flipped branch's parents (CRN)
                    blocks.append(
                        (u < torch.sigmoid(logits[i * s : (i + 1) * s])).to(logits.dtype)
                    )  # [S, B, D]
            return torch.cat(blocks, 0)  # [L*S, B, D]

        with torch.no_grad():  # only the values of f at the flipped branches are used
            flips = Trace(draw_flips)
            f_flip = cost_fn(flips, n_layers * s).reshape(n_layers, s, -1)  # [L, S, B]; cost rows do not mix
        surrogate_terms = []
        flipped_fraction = []
        for i, name in enumerate(names):
            dist, b_base = base.sites[name]
            logits = bernoulli_logits(dist)  # [S, B, D], differentiable in theta at the sampled parents
            b_flip = flips.sites[name][1][i * s : (i + 1) * s]  # [S, B, D], b1 of layer i
            g = self.layer_gradient(
                f_flip[i], f_base, uniforms[name], logits.detach(), b_flip, b_base
            )  # [S, B, D]
            # + phi * g: g estimates d E[f] / d phi (f is minimised), pushed into theta by the chain rule
            surrogate_terms.append((logits * g.detach()).sum(-1))  # [S, B]; g is a constant weight
            flipped_fraction.append((b_flip != b_base).to(logits.dtype).mean().detach())
        # + cost: direct dependence of f on theta at the base sample (samples held fixed)
        surrogate = (cost + torch.stack(surrogate_terms).sum(0)).mean()
        return Estimate(f_base, surrogate, {"pair_differs": sum(flipped_fraction) / len(flipped_fraction)})
