"""REINFORCE / likelihood ratio (LR) estimator, with the C, VN and IDB variance reductions.

    g = grad_theta log p_theta(z) * A(f(z)),    z ~ p_theta

where ``A`` is the (optionally centred, normalised, input-baselined) learning signal. Williams 1992;
as "LR" in Gu et al. 2016 (MuProp), Sec. 2; NVIL (Mnih & Gregor 2014) = LR-C-VN-IDB.
Unbiased (up to the positive VN scale); high variance. Works for any latent distribution with log_prob.

Variants are YAML files: ``reinforce`` (no baseline), ``reinforce_ma`` (moving-average baseline, C),
``nvil`` (C + VN + IDB), ...
"""

from __future__ import annotations

from torch import Tensor

from estimators.base import CostFn, Estimate, Estimator, Trace, draw_detached
from estimators.baselines import SignalProcessor


class Reinforce(Estimator):
    supports = frozenset({"bernoulli", "categorical", "normal", "mixture"})
    unbiased = True
    member_dim = True

    def __init__(
        self,
        n_samples: int = 1,
        centre: bool = False,
        normalise: bool = False,
        idb: bool = False,
        decay: float = 0.9,
        idb_hidden: int = 100,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        self.signal = SignalProcessor(centre, normalise, idb, context_dim, idb_hidden, decay)
        # VN divides the score-function term by max(1, sqrt(v)) while the pathwise terms keep their scale
        # (NVIL's choice): the direction of the score term is unbiased, the gradient as a whole is not.
        self.unbiased = not normalise

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        trace = Trace(draw_detached)
        cost = cost_fn(trace, self.n_samples)  # [S, B]
        log_p = trace.log_prob_sum()  # [S, B], differentiable in theta (samples are constants)
        adv, baseline_loss, diag = self.signal(cost, context, update=self.update_state)  # [S, B] detached
        # cost: direct gradient of f (e.g. the decoder, log q's explicit theta-dependence);
        # log_p * adv: the score-function term. baseline_loss: trains psi only.
        surrogate = (cost + log_p * adv).mean() + baseline_loss
        return Estimate(cost.detach(), surrogate, diag)
