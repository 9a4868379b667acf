"""VIMCO: the multi-sample bound with per-sample leave-one-out learning signals.

    L(h_1..h_K) = log (1/K) sum_k w_k,     w_k = p(x, h_k) / q(h_k | x) = exp(-cost_k),  h_k ~ q iid
    grad L = sum_k [L - L_{-k}] grad log q(h_k | x)  +  sum_k w~_k grad log w_k,      w~_k = w_k / sum_j w_j
    L_{-k} = log (1/K) (sum_{j != k} w_j + w^_{-k}),   w^_{-k} = exp((1 / (K - 1)) sum_{j != k} log w_j)

Mnih & Rezende, "Variational inference for Monte Carlo objectives", ICML 2016: the multi-sample bound, its
gradient, and the per-sample leave-one-out learning signal with the geometric mean w^_{-k} of the other K - 1
weights standing in for w_k (equation numbers not given: they could not be checked against the paper offline). **Unbiased for the gradient of E[L], the K-sample bound, not of the ELBO E[-cost]**:
it trains a different objective, so the instance says ``unbiased = False`` (tests/test_biased.py checks that
this difference shows against the ELBO gradient; tests/test_vimco.py checks unbiasedness for E[L] by
enumerating the K-tuples). L_{-k} does not depend on h_k, so subtracting it keeps the estimate unbiased.

What is reported: ``cost`` holds the K per-sample costs -log w_k ([K, B]), so the runner's ``train/elbo`` is
the single-sample ELBO averaged over the K samples, comparable with every other estimator's; the K-sample
bound VIMCO actually maximises is ``diagnostics["vimco_bound"]`` (batch mean of L, logged as
``train/vimco_bound``; it is the last step's, while ``train/elbo`` is the runner's mean over its log window) and
``vimco_ess`` the effective sample size 1 / sum_k w~_k^2 (between 1 and K, batch mean). The IW bounds of
evaluation are unchanged (the runner's ``test/bound_m``).
Passes: one model evaluation with K samples per example.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from estimators.base import CostFn, Estimate, Estimator, Trace, draw_detached


def vimco_signals(log_w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """From log weights [K, B]: the bound L [B], the local signals L - L_{-k} [K, B] and w~ [K, B]."""
    k = log_w.shape[0]
    bound = torch.logsumexp(log_w, 0) - math.log(k)  # [B]
    others_mean = (log_w.sum(0, keepdim=True) - log_w) / (k - 1)  # [K, B]: mean of log w_j over j != k
    eye = torch.eye(k, dtype=torch.bool, device=log_w.device).unsqueeze(-1)  # [K, K, 1]
    # row k: the K log weights with entry k replaced by the geometric-mean stand-in log w^_{-k}
    replaced = torch.where(eye, others_mean.unsqueeze(1), log_w.unsqueeze(0))  # [K, K, B]
    loo = torch.logsumexp(replaced, 1) - math.log(k)  # [K, B] = L_{-k}
    return bound, bound.unsqueeze(0) - loo, torch.softmax(log_w, 0)  # [B], [K, B], [K, B]


class VIMCO(Estimator):
    # only log q of the sampled latents is needed: any latent with a log-density and a sampler qualifies
    supports = frozenset({"bernoulli", "normal"})
    unbiased = False  # unbiased for grad E[L_K], not for grad E[cost] (see the module docstring)
    min_samples = 2  # the leave-one-out signal needs K >= 2

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:
        trace = Trace(draw_detached)  # h_k ~ q exactly, no gradient through their values
        cost = cost_fn(trace, self.n_samples)  # [K, B]; graph: direct dependence of log w_k on theta
        log_w = -cost.detach()  # [K, B]
        bound, signal, w_tilde = vimco_signals(log_w)  # [B], [K, B], [K, B]; constants of the surrogate
        log_q = trace.log_prob_sum()  # [K, B], grad in theta at the sampled parents
        # - signal * log q: the cost is -L, so a high local signal pushes log q(h_k) up;
        # + w~ * cost: grad log w_k = -grad cost_k with h_k fixed, weighted by the normalised weights
        surrogate = (-(signal * log_q).sum(0) + (w_tilde * cost).sum(0)).mean()
        diag = {
            "vimco_bound": bound.detach().mean(),
            "vimco_ess": (1 / w_tilde.square().sum(0)).detach().mean(),
        }
        return Estimate(cost.detach(), surrogate, diag)
