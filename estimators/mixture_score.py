"""Score function on the mixture index, reparameterization inside the component.

    k ~ Categorical(pi),  z = mu_k + sigma_k eps,  eps ~ N(0, I)
    g = grad_theta f(z)  +  grad_theta log pi_k * (f(z) - b)

The mixture is sampled in two stages: the discrete index by the likelihood ratio (Williams 1992), the
Gaussian given the index by the pathwise derivative (Kingma & Welling 2014); REFERENCE.md Sec. 5 lists it
as the baseline against Graves 2016. ``b`` does not depend on (k, eps) of the sample it multiplies, so the
estimator is unbiased:

* ``baseline: ma``   a moving average of f (the ``C`` baseline of NVIL), read before this step updates it;
* ``baseline: loo``  leave-one-out over the S samples of an example, b_s = mean_{s' != s} f_s' (needs S >= 2;
  Kool et al. 2019, "Buy 4 REINFORCE samples, get a baseline for free");
* ``baseline: none``.

Gaussian sites are plain reparameterized samples (no index, no score term).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.distributions import Categorical, Distribution, MixtureSameFamily

from estimators.base import CostFn, Estimate, Estimator, MovingAverage, Trace
from estimators.implicit_mixture import is_gaussian, mixture_parameters, unsupported_site

BASELINES = ("ma", "loo", "none")


class MixtureScore(Estimator):
    supports = frozenset({"mixture", "normal"})
    unbiased = True

    def __init__(
        self,
        n_samples: int = 1,
        baseline: str = "ma",
        decay: float = 0.9,
        context_dim: int | None = None,
        name: str | None = None,
    ):
        super().__init__(n_samples=n_samples, context_dim=context_dim, name=name)
        if baseline not in BASELINES:
            raise ValueError(f"estimator.baseline={baseline!r}: choose one of {', '.join(BASELINES)}")
        if baseline == "loo" and self.n_samples < 2:
            raise ValueError(f"estimator.baseline=loo needs estimator.n_samples >= 2, got {self.n_samples}")
        self.baseline = baseline
        self.average = MovingAverage(decay)

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        log_pi: list[Tensor] = []  # log pi_k of the sampled index, one [S, B] per mixture site

        def draw(name: str, dist: Distribution) -> Tensor:
            if isinstance(dist, MixtureSameFamily):
                logits, loc, scale = mixture_parameters(name, dist)  # [S, B, K], [S, B, K, D] x2
                index = Categorical(logits=logits).sample()  # [S, B], no gradient path
                log_pi.append(
                    torch.log_softmax(logits, -1).gather(-1, index.unsqueeze(-1)).squeeze(-1)
                )  # [S, B]
                pick = index[..., None, None].expand(*index.shape, 1, loc.shape[-1])  # [S, B, 1, D]
                mu = loc.gather(-2, pick).squeeze(-2)  # [S, B, D]
                sigma = scale.gather(-2, pick).squeeze(-2)  # [S, B, D]
                return mu + sigma * torch.randn_like(mu)  # [S, B, D], pathwise in mu_k, sigma_k
            if is_gaussian(dist):
                return dist.rsample()  # [S, B, D]
            raise unsupported_site(name, dist)

        cost = cost_fn(Trace(draw), self.n_samples)  # [S, B]
        signal = cost.detach()  # [S, B]; a constant weight on grad log pi: no gradient through it
        if self.baseline == "ma":
            # [], a copy taken before this step's costs enter the average (update is in place): a baseline
            # that saw the current sample would bias the estimate
            b = self.average.value.clone()
            if self.update_state:
                self.average.update(signal)
        elif self.baseline == "loo":
            s = signal.shape[0]
            b = (signal.sum(0, keepdim=True) - signal) / (s - 1)  # [S, B], other samples of the example
        else:
            b = 0.0
        advantage = signal - b  # [S, B]
        score = sum(log_pi) if log_pi else torch.zeros_like(signal)  # [S, B]
        # cost: pathwise gradient through z = mu_k + sigma_k eps and the explicit theta-dependence of f
        # (log q); + score * advantage: the likelihood-ratio term of the index (plus: we minimise cost).
        surrogate = (cost + score * advantage).mean()
        diag = {
            "signal_mean": signal.detach().mean(),
            "advantage_std": advantage.detach().std() if advantage.numel() > 1 else 0.0,
        }
        return Estimate(signal, surrogate, diag)
