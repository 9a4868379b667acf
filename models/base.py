"""What every model offers the runner and the estimators.

A model describes what is random (``torch.distributions`` objects handed to ``sample`` at each stochastic
layer) and what it costs (per example, ``[S, B]``). It never knows which estimator is in use: the estimator
passes the ``sample`` function, and may run the model several times (a mean-field pass, antithetic
branches). Costs must broadcast over extra leading sample dimensions (an estimator may return ``[K, S, B,
D]`` from ``sample`` to marginalise a mixture index), so reduce only over the last dimension.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Distribution

# The two callables a model shares with the estimators (estimators/base.py documents them); spelled out
# here so that models import nothing from estimators.
Sampler = Callable[[str, Distribution], Tensor]  # sample(site_name, distribution) -> value
CostFn = Callable[[Sampler, int], Tensor]  # cost_fn(sample, n_samples) -> [S, B]


def exact_sample(name: str, dist: Distribution) -> Tensor:
    """Plain sampling for evaluation."""
    return dist.sample()


class LatentVariableModel(nn.Module):
    #: kind of latent variable (``bernoulli``, ``normal``, ``mixture``): decides which estimators can serve it
    latent_kind: ClassVar[str] = ""
    #: name of the metric the bound stands for (``elbo`` for generative models, ``cll`` for prediction)
    bound_name: ClassVar[str] = "elbo"
    #: the data it reads (``images``: binarized MNIST and MNIST; ``none``: data=synthetic), checked before loading
    data_kind: ClassVar[str] = "images"

    #: whether a pack may step its members together with a member dimension (``train.member_dim``,
    #: models/members.py): every map is a ``models.members.Linear`` and every parameter that meets the rows
    #: goes through ``members.rows``
    member_dim: ClassVar[bool] = False

    #: size of ``context(x)``, the per-example input that input-dependent baselines see
    context_dim: int

    def cost(self, x: Tensor, sample: Sampler, n_samples: int = 1) -> Tensor:  # pragma: no cover
        """Per-example cost to minimise, ``[S, B]`` (negative ELBO for generative models)."""
        raise NotImplementedError

    def context(self, x: Tensor) -> Tensor:
        """Input for input-dependent baselines, ``[B, C]``."""
        return x

    def recognition_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters of the recognition network (variance is reported for these separately)."""
        return iter(())

    def cost_fn(self, x: Tensor) -> CostFn:
        """The cost of this minibatch as the callable estimators expect."""
        return lambda sample, n_samples: self.cost(x, sample, n_samples)

    @torch.no_grad()
    def bound(self, x: Tensor, n_samples: int = 1000, chunk: int = 100) -> Tensor:
        """Importance-weighted bound log (1/m) sum_i exp(-cost_i) with m = n_samples exact samples, [B].

        For a generative model with cost log q(z|x) - log p(x, z) this is the IWAE bound on log p(x)
        (m = 1 gives the ELBO); for structured prediction with cost -log p(y|h), h ~ p(h|x), it is the
        paper's log (1/m) sum_i p(y|h_i). Samples are drawn in chunks so that m = 1000 fits in memory.
        """
        if n_samples < 1:
            raise ValueError(f"eval samples must be >= 1, got {n_samples}")
        parts = []
        for start in range(0, n_samples, chunk):
            s = min(chunk, n_samples - start)
            parts.append(-self.cost(x, exact_sample, s))  # [s, B]
        log_w = torch.cat(parts, dim=0)  # [m, B]
        return torch.logsumexp(log_w, dim=0) - math.log(n_samples)  # [B]

    @torch.no_grad()
    def elbo(self, x: Tensor, n_samples: int = 1) -> Tensor:
        """Single-sample bound (ELBO), averaged over ``n_samples`` draws: [B]."""
        return -self.cost(x, exact_sample, n_samples).mean(0)  # [B]


def expand_samples(x: Tensor, n_samples: int) -> Tensor:
    """[B, X] -> [S, B, X] (a view: no copy)."""
    return x.unsqueeze(0).expand(n_samples, *x.shape)  # [S, B, X]


def logit(p: Tensor, eps: float = 1e-3) -> Tensor:
    p = p.clamp(eps, 1 - eps)
    return torch.log(p) - torch.log1p(-p)
