"""The DARN estimator, "1/2" in MuProp's tables: a Taylor expansion of f at the sample, centred at x_bar.

    g = sum_i sum_j grad_theta log p(z_ij | pa_i) * f'_ij(z) (z_ij - x_bar)  +  grad_theta f(z; theta)

Gregor, Danihelka, Mnih, Blundell, Wierstra, "Deep AutoRegressive Networks", ICML 2014 (Sec. 3, the
gradient of the description length with a first-order expansion of f around the sample); "1/2" in Gu et al.
2016 (MuProp, Sec. 5 baselines and Tables 2-3). x_bar = 1/2 for Bernoulli units and x_bar = 1/k for one-hot
categorical variables of k classes (the MuProp paper's choice for its categorical model). **Biased**: for a
Bernoulli unit f'(z)(z - 1/2) averages to the finite difference f(1) - f(0) only when f is linear in that
unit given the others (multilinear f of one layer); biased otherwise, and always through the layers above.

One signal per unit, as DARN's local learning signals: unit j of layer i is scored with its own
f'_ij (z_ij - 1/2), not with the layer's sum f'_i^T (z_i - 1/2). The layer sum (used here before) multiplies
each unit's score by every other unit's term: for f = z_j z_k it adds p_j (1 - p_j)(p_k - 1/2) to the
gradient of l_j (biased even for this quadratic f, which the per-unit form gets exactly) and a variance that
grows with the layer width. Measured on SBN 200-784 (``python -m runners.reproduce muprop_table3 --rows
sbn_1layer --steps 20000 --seeds 1 --lrs 1e-3``, SGD): the layer-sum form ended at a test -ELBO of 238.7
nats, worse than at initialisation (213.1); see results/muprop_table3.md for the per-unit form.

f'_i(z) on multi-layer networks. f'_i is the derivative of f with respect to z_i at the sample, *through the
conditional means of the layers above*, as DARN and the straight-through estimator define the backward pass of
a stochastic layer: every later sample z_j (j > i) is differentiated as its conditional mean,
dz_j / dz_{j-1} := d mu_j(z_{j-1}) / dz_{j-1}, evaluated at the sampled parents. For a chain,

    f'_L = df/dz_L,     f'_i = df/dz_i|_direct + (d mu_{i+1}(z_i) / dz_i)^T f'_{i+1}.

(The partial derivative with z_{i+1..L} held fixed, used before, is identically zero for h1 of the
structured-prediction model x -> h1 -> h2 -> y, whose cost reads only h2: h1 never trained. Measured with
``bench/forms_training.py``, 392-200-200-392, 3000 Adam steps, seeds 0-2: test NLL (m = 100, first 1000 test
examples) 101.5 +- 0.7 nats with this form against 136.0 +- 1.8 with the partial one.)

Implementation, one pass: the sampler draws an exact sample b_i (``draw_detached``) and returns b_i + e_i,
e_i a zero leaf, so f is a function of the e_i with no path to theta through the sample values. Then

1. autograd.grad of f with respect to the e_i gives the direct (partial) derivatives df/dz_i|_direct;
2. top down, j = L .. 2: f'_j is complete, and the vector-Jacobian product of the conditional mean
   mu_j(pa_j) (the site's ``dist.mean``, computed from the sampled parents b + e) with f'_j is added to the
   f' of every earlier layer it reads (its parents: autograd finds them; one layer below in a chain).

The surrogate reuses the same pass: ``f`` differentiates only through the direct dependence on theta and
log p(z_i | pa_i) is taken at the sampled parents (the e_i carry no theta).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Distribution, Independent

from estimators.base import CostFn, Estimate, Estimator, Trace, active_members, discrete_kind, draw_detached
from models.members import member_std


def centre_of(dist: Distribution, z: Tensor) -> float:
    """x_bar of a site: 1/2 for Bernoulli units, 1/k for one-hot variables of k classes."""
    return 0.5 if discrete_kind(dist) == "bernoulli" else 1.0 / z.shape[-1]


class Darn(Estimator):
    supports = frozenset({"bernoulli", "categorical"})
    unbiased = False
    member_dim = True

    def f_primes(self, cost: Tensor, trace: Trace, es: list[Tensor]) -> list[Tensor]:
        """f'_i(z) of every site, in sampling order: direct derivatives, then the conditional means' VJPs."""
        names = list(trace.sites)
        # direct derivatives, per example (examples are independent); the graph is kept: the VJPs below and
        # the surrogate reuse it
        direct = torch.autograd.grad(cost.sum(), es, retain_graph=True, allow_unused=True)
        f_prime = [g if g is not None else torch.zeros_like(e) for g, e in zip(direct, es)]
        for j in range(len(names) - 1, 0, -1):  # top down: f'_j is complete before it is passed on
            mu = trace.sites[names[j]][0].mean  # [S, B, D_j], conditional mean at the sampled parents
            if not mu.requires_grad:
                continue
            # (d mu_j / d z_i)^T f'_j for every earlier layer i that mu_j reads (its parents)
            back = torch.autograd.grad(
                mu, es[:j], grad_outputs=f_prime[j], retain_graph=True, allow_unused=True
            )
            f_prime[:j] = [fp if g is None else fp + g for fp, g in zip(f_prime[:j], back)]
        return f_prime

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        leaves: dict[str, Tensor] = {}

        def draw(name: str, dist: Distribution) -> Tensor:
            b = draw_detached(name, dist)  # [S, B, D] (or [S, B, V, K]); exact, no gradient through its value
            leaves[name] = torch.zeros_like(b, requires_grad=True)  # e_i: where f'_i is read off
            return b + leaves[name]  # equal to b in value

        trace = Trace(draw)
        with torch.enable_grad():
            cost = cost_fn(trace, self.n_samples)  # [S, B]
            names = list(trace.sites)
            f_prime = self.f_primes(cost, trace, [leaves[n] for n in names])  # [S, B, D_i] each
        score_terms, signals = [], []
        for n, fp in zip(names, f_prime):
            dist, z = trace.sites[n]
            z = z.detach()  # b_i (e_i = 0)
            unit_dist = dist.base_dist if isinstance(dist, Independent) else dist
            # one learning signal per unit (per one-hot variable): f'_ij (z_ij - x_bar), summed over the
            # variable's own event (the k classes) only; autograd.grad returned no graph, so it is a constant
            signal = fp * (z - centre_of(dist, z))  # [S, B, D] or [S, B, V, K]
            if unit_dist.event_shape:
                signal = signal.flatten(-len(unit_dist.event_shape)).sum(-1)  # [S, B, V]
            log_p_unit = unit_dist.log_prob(z)  # [S, B, D] / [S, B, V], at the sampled parents
            score_terms.append((log_p_unit * signal).flatten(2).sum(-1))  # [S, B]
            signals.append(signal.flatten(2))
        # + cost: direct dependence of f on theta at the fixed sample (the e_i carry no theta);
        # + sum_ij log p(z_ij | pa) * signal_ij: each unit's score times its own Taylor signal (f is minimised)
        surrogate = (cost + torch.stack(score_terms).sum(0)).mean()
        flat = torch.cat(signals, -1)  # [S, B, sum of units]
        m = active_members()  # None: one run; else each member's own rows (dimension 1)
        return Estimate(
            cost.detach(),
            surrogate,
            {"signal_std": member_std(flat.detach(), m, dim=1) if flat.numel() > 1 else 0.0},
        )
