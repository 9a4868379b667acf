"""Exact answers for estimator tests: enumeration of tiny SBNs and z-scores of Monte Carlo gradients.

False-failure rate: each parameter's check is |z| < Z_MAX with z = (MC mean - exact) / (MC std / sqrt(G)),
G independent group means (each the average of R replicated examples, so close to normal). With G = 200
the t distribution with 199 degrees of freedom gives P(|z| > 5) ~ 1.3e-6 per parameter; over the ~50
parameters of a tiny model and a few dozen (estimator, model) pairs the chance that any correct estimator
fails is below 1e-2 in a run, and the seeds are fixed, so a pass is reproducible.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from estimators.base import Estimator
from models.base import LatentVariableModel

Z_MAX = 5.0


def enumerate_states(n: int) -> Tensor:
    """All 2^n binary vectors, [2^n, n]."""
    return torch.tensor(list(itertools.product([0.0, 1.0], repeat=n)), dtype=torch.float64)


def exact_objective(model: LatentVariableModel, x: Tensor) -> Tensor:
    """E_q[cost] averaged over the batch, by enumerating every joint state of the model's Bernoulli sites.

    The joint states are laid out along the sample dimension: for a model with sites of sizes D_1..D_L,
    S = 2^(D_1 + ... + D_L) and site i gets its slice of each state. Differentiable in the parameters.
    """
    sizes = getattr(model, "layers", None)
    assert sizes is not None, "exact_objective needs a model with Bernoulli layers listed in .layers"
    states = enumerate_states(sum(sizes)).to(x.dtype)  # [S, sum D]
    chunks = list(states.split(list(sizes), dim=1))  # [S, D_i] each
    log_q = []

    def sample(name: str, dist):
        z = chunks[len(log_q)].unsqueeze(1).expand(-1, x.shape[0], -1)  # [S, B, D_i]
        log_q.append(dist.log_prob(z))  # [S, B]
        return z

    cost = model.cost(x, sample, states.shape[0])  # [S, B]
    weight = torch.stack(log_q).sum(0).exp()  # [S, B] joint probability of the state under q
    return (weight * cost).sum(0).mean()


def flat_grad(loss: Tensor, params: list[torch.nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat(
        [(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]
    )


def mc_gradients(
    model: LatentVariableModel, estimator: Estimator, x: Tensor, groups: int = 200, replicas: int = 500
) -> Tensor:
    """[G, P]: G independent gradient estimates, each averaged over ``replicas`` copies of the batch."""
    params = list(model.parameters())
    x_rep = x.repeat(replicas, 1)  # [R*B, X]
    out = []
    for _ in range(groups):
        est = estimator(model.cost_fn(x_rep), model.context(x_rep))
        out.append(flat_grad(est.surrogate, params))
    return torch.stack(out)  # [G, P]


def z_scores(samples: Tensor, exact: Tensor) -> Tensor:
    """Per-parameter z of the sample mean against the exact value; exact zeros with zero spread give 0."""
    g = samples.shape[0]
    mean, std = samples.mean(0), samples.std(0)  # [P]
    diff = mean - exact
    z = diff / (std / g**0.5)
    return torch.where(
        std > 0, z, torch.where(diff.abs() < 1e-9, torch.zeros_like(z), torch.full_like(z, float("inf")))
    )


def tiny_sbn(layers: list[int], x_dim: int = 5, nonlinear: bool = False, seed: int = 0):
    """A tiny float64 SBN and a batch of 3 binary inputs, with non-trivial random parameters."""
    from models.sbn import SBN

    torch.manual_seed(seed)
    model = SBN(x_dim, layers, nonlinear=nonlinear, hidden=4).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)  # larger than the default init, so every gradient is far from zero
    x = (torch.rand(3, x_dim) < 0.5).double()  # [B, X]
    return model, x
