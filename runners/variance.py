"""Gradient variance at fixed parameters, as the field measures it (REFERENCE.md Sec. 4).

Draw M independent gradient estimates on one fixed minibatch at the current parameters, and report per
estimator: the mean over parameters of the per-parameter variance (all parameters, and the recognition
network only), its log10, and the mean signal-to-noise ratio |mean| / std. The estimator's running state
(moving averages, step) is left untouched and the global RNG is forked, so measuring never changes the
training trajectory.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from estimators.base import Estimator
from models.base import LatentVariableModel


def _flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def gradient_moments(
    model: LatentVariableModel, estimator: Estimator, x: Tensor, n_draws: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Mean and unbiased variance over ``n_draws`` estimates of d E[cost] / d params on minibatch ``x``; [P]
    each, float64. The estimator's running state is left untouched and the global RNG forked."""
    if n_draws < 2:
        raise ValueError(f"variance.samples must be >= 2 to estimate a variance, got {n_draws}")
    params = [p for p in model.parameters() if p.requires_grad]
    saved = {k: v.clone() for k, v in estimator.state_dict().items()}
    was_updating = estimator.update_state
    estimator.update_state = False
    devices = [x.device.index or 0] if x.device.type == "cuda" else []
    total = total_sq = None
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for _ in range(n_draws):
                est = estimator(model.cost_fn(x), model.context(x))
                g = _flat_grad(est.surrogate, params).double()  # [P]; float64 sums: variance by difference
                total = g if total is None else total + g
                total_sq = g * g if total_sq is None else total_sq + g * g
    finally:
        estimator.load_state_dict(saved)
        estimator.update_state = was_updating
    mean = total / n_draws  # [P]
    var = (total_sq / n_draws - mean * mean).clamp_min(0) * n_draws / (n_draws - 1)  # [P], unbiased
    return mean, var


def gradient_variance(
    model: LatentVariableModel,
    estimator: Estimator,
    x: Tensor,
    n_draws: int = 100,
    seed: int = 0,
) -> dict[str, float]:
    """Variance statistics of ``n_draws`` estimates of d E[cost] / d model parameters on minibatch ``x``."""
    params = [p for p in model.parameters() if p.requires_grad]
    rec_ids = {id(p) for p in model.recognition_parameters()}
    rec_mask = torch.cat(
        [torch.full((p.numel(),), id(p) in rec_ids, dtype=torch.bool) for p in params]
    )  # [P]
    mean, var = gradient_moments(model, estimator, x, n_draws, seed)  # [P] each
    snr = mean.abs() / var.sqrt().clamp_min(1e-30)  # [P]
    out = {"var": var.mean().item(), "snr": snr.mean().item()}
    if rec_mask.any():
        out["var_rec"] = var[rec_mask.to(var.device)].mean().item()
        out["snr_rec"] = snr[rec_mask.to(var.device)].mean().item()
    for k in [k for k in out if k.startswith("var")]:
        out["log10_" + k] = math.log10(out[k]) if out[k] > 0 else float("-inf")
    return out
