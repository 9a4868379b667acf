"""Same-trajectory comparison: estimators measured at the same parameters, on the same minibatch.

Every ``variance.every`` steps the training loop (runners/train.py) freezes the running model and draws M
gradient estimates from the running estimator and from every estimator of ``variance.basket``, all at these
parameters and on one fixed minibatch (runners/variance.py: ``grad/<name>/log10_var``, ``_rec``, ``snr``).
With ``variance.bias`` set (``runner=trajectory`` turns it on) this module adds the **bias** of each of them
against a designated unbiased reference estimator averaged over many more draws (``variance.bias.samples``):

    d_p = mean_M(g_p) - mean_R(r_p)            per parameter p (g: the estimator, r: the reference)
    se_p^2 = var(g_p) / M + var(r_p) / R       the sampling variance of d_p if both are unbiased
    z2 = mean_p d_p^2 / se_p^2                 ~ 1 when the estimator is unbiased, >> 1 when it is biased
    rel_sq = (sum_p d_p^2 - sum_p se_p^2) / sum_p mean_R(r_p)^2
                                               an unbiased estimate of |bias|^2 / |gradient|^2
    cos = cosine(mean_M(g), mean_R(r))         how far the mean direction is off

Metrics ``bias/<name>/{z2, rel_sq, cos}`` go to the same metrics.jsonl at the same step. ``z2`` is a
per-parameter average of squared z-scores: parameters are correlated, so it is not chi-square with P degrees of
freedom, but its expectation for an unbiased estimator is 1 whatever the correlation, up to the small-sample
inflation of a z-score built on estimated variances (about (M-1)/(M-3): 1.12 for M = 20, 1.02 for M = 100);
a value of a few is a clear sign of bias. On a tiny SBN the exact gradient (enumeration of all latent states,
tests/exact.py) can be passed as the reference instead: then R = infinity, var(r) = 0.

Basket estimators with running state (moving-average baselines, input-dependent baseline nets, temperature
schedules) follow the trajectory too: runners/train.py ``follow_trajectory`` feeds each of them every training
minibatch (updating its averages, stepping its own nets, advancing its step) without touching the model, so
each is measured as it would be had it been training, not at its initial state. That costs one forward pass
(and a backward through the estimator's own nets) per basket estimator per step.

Measuring changes nothing in training: estimator state (moving averages, step) is restored and the RNG forked,
as in runners/variance.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from estimators.base import Estimator
from models.base import LatentVariableModel
from runners.variance import gradient_moments


def bias_stats(
    mean: Tensor, var: Tensor, n: int, ref_mean: Tensor, ref_var: Tensor | None, ref_n: int | None
) -> dict[str, float]:
    """``z2``, ``rel_sq`` and ``cos`` of one estimator's moments against the reference's (see the module doc).
    ``ref_var=None`` means the reference is exact."""
    diff = mean - ref_mean  # [P]
    se2 = var / n  # [P]
    if ref_var is not None:
        se2 = se2 + ref_var / ref_n  # [P]
    live = se2 > 0  # parameters the estimator moves at all
    z2 = (diff[live] ** 2 / se2[live]).mean().item() if live.any() else float("nan")
    ref_sq = (ref_mean * ref_mean).sum().item()
    rel_sq = ((diff * diff).sum() - se2.sum()).item() / ref_sq if ref_sq > 0 else float("nan")
    cos = torch.nn.functional.cosine_similarity(mean, ref_mean, dim=0).item()
    return {"z2": z2, "rel_sq": rel_sq, "cos": cos}


def bias_metrics(
    model: LatentVariableModel,
    estimators: dict[str, Estimator],
    x: Tensor,
    n_draws: int,
    reference: Estimator | Tensor,
    ref_draws: int = 1000,
    seed: int = 0,
) -> dict[str, float]:
    """``{"bias/<name>/z2": ..., ...}`` for every estimator against ``reference`` (an unbiased estimator,
    averaged over ``ref_draws`` estimates, or an exact gradient [P])."""
    if isinstance(reference, Tensor):
        ref_mean, ref_var, ref_n = reference.double(), None, None
    else:
        # a different seed from the estimators' draws: the reference must be independent of them
        ref_mean, ref_var = gradient_moments(model, reference, x, ref_draws, seed=seed + 7919)
        ref_n = ref_draws
    out = {}
    for name, est in estimators.items():
        mean, var = gradient_moments(model, est, x, n_draws, seed=seed)
        out.update(
            {
                f"bias/{name}/{k}": v
                for k, v in bias_stats(mean, var, n_draws, ref_mean, ref_var, ref_n).items()
            }
        )
    return out
