"""The one interface every gradient estimator implements.

Shape legend used across the code base:
    S  samples per example        B  batch            D  latent units of one layer
    K  mixture components         X  pixels / observed units

A *model* describes what is random and what it costs; an *estimator* decides how samples are drawn and
how the gradient gets through them. They meet in two callables:

``Sampler = Callable[[str, Distribution], Tensor]``
    Handed to the model at every stochastic layer: ``z = sample("z1", Bernoulli(logits=...))``. The
    estimator chooses what comes back: a detached sample (score function), a reparameterized sample, a
    relaxed sample, a straight-through sample, or the mean (mean-field pass).

``CostFn = Callable[[Sampler, int], Tensor]``
    ``cost_fn(sample, n_samples) -> [S, B]``: runs the model once with the given sampler and ``S =
    n_samples`` samples per example and returns the per-example cost to *minimise* (negative ELBO, negative
    log-likelihood). It may be called any number of times (MuProp calls it twice, ARM once per antithetic
    branch); given the same samples it must return the same cost.

An estimator is an ``nn.Module`` (so its baselines and control-variate nets are saved in the same
checkpoint) whose ``forward(cost_fn, context)`` returns an :class:`Estimate`:

* ``cost``: the detached per-example cost ``[S, B]`` (what the runner reports; ELBO = -cost);
* ``surrogate``: a scalar whose gradient, with respect to the model's parameters, is the gradient estimate
  of ``E[cost].mean()``, and with respect to the estimator's own parameters, their training gradient;
* ``diagnostics``: a dict of detached scalar tensors (or floats) for logging, read on log steps only (no host
  synchronisation in the step).

Using an estimator outside the runner takes three lines: build it, give it a cost function, backprop the
surrogate (see the README).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.distributions import Bernoulli, Distribution, Independent, OneHotCategorical

from models.members import member_mean, n_members

Sampler = Callable[[str, Distribution], Tensor]
CostFn = Callable[[Sampler, int], Tensor]


@dataclass
class Estimate:
    """What an estimator returns: report ``cost``, differentiate ``surrogate``."""

    cost: Tensor  # [S, B], detached
    surrogate: Tensor  # [], differentiable
    diagnostics: dict[str, Tensor | float] = field(default_factory=dict)  # read on log steps only


class Estimator(nn.Module):
    """Base class. Subclasses set ``supports`` and implement ``forward``.

    Args:
        n_samples: samples per example drawn for one gradient estimate (S).
        context_dim: size of the per-example input that input-dependent baselines see (known only at run
            time: the runner passes the model's ``context_dim``).
    """

    #: the kinds of latent variable this estimator can differentiate through (``bernoulli``, ``categorical``
    #: (one-hot), ``normal``, ``mixture``): checked against ``model.latent_kind`` before any data is loaded.
    supports: ClassVar[frozenset[str]] = frozenset()
    #: whether the estimate is unbiased for grad E[cost]; tests assert the bias of the biased ones. A YAML
    #: option can change it (variance normalisation), so instances may override it: read it on an instance.
    unbiased: bool = True
    #: minimum number of samples per example (leave-one-out needs 2)
    min_samples: ClassVar[int] = 1
    #: whether a pack may step its members together with a member dimension (``train.member_dim``,
    #: models/members.py): draws go through ``draw_detached``, batch reductions through ``member_mean`` /
    #: ``member_std`` / ``rows`` of the moving averages' stacked values, and the surrogate is a mean over rows
    member_dim: ClassVar[bool] = False

    def __init__(self, n_samples: int = 1, context_dim: int | None = None, name: str | None = None):
        super().__init__()
        if int(n_samples) < self.min_samples:
            raise ValueError(
                f"{type(self).__name__}: n_samples must be >= {self.min_samples}, got {n_samples}. "
                f"Set estimator.n_samples to a value >= {self.min_samples}."
            )
        self.n_samples = int(n_samples)
        self.context_dim = context_dim
        self.name = name or type(self).__name__.lower()
        #: set by the runner; estimators with schedules (temperature, slope) read it
        self.register_buffer("step", torch.zeros((), dtype=torch.long), persistent=True)
        #: when False, moving averages and other running state are not updated (variance measurement)
        self.update_state = True

    def forward(self, cost_fn: CostFn, context: Tensor | None = None) -> Estimate:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def check_supports(cls, latent_kind: str) -> None:
        """Raise ``ValueError`` when this estimator cannot serve a model with latents of ``latent_kind``."""
        if latent_kind not in cls.supports:
            raise ValueError(
                f"estimator {cls.__name__} cannot differentiate through {latent_kind} latents "
                f"(it supports: {', '.join(sorted(cls.supports))})."
            )


# --------------------------------------------------------------------------------------------------
# Small shared pieces: samplers and running statistics
# --------------------------------------------------------------------------------------------------


class Trace:
    """A sampler that records what it sampled.

    ``Trace(draw)`` wraps a function ``draw(dist) -> z``; calling the trace as a sampler stores the
    distribution and the returned value per site name, in order, so that estimators can form
    ``log p(z | parents)`` terms and replay samples.
    """

    def __init__(self, draw: Callable[[str, Distribution], Tensor]):
        self.draw = draw
        self.sites: dict[str, tuple[Distribution, Tensor]] = {}

    def __call__(self, name: str, dist: Distribution) -> Tensor:
        if name in self.sites:
            raise ValueError(f"stochastic site {name!r} sampled twice in one pass; site names must be unique")
        z = self.draw(name, dist)
        self.sites[name] = (dist, z)
        return z

    def log_prob_sum(self) -> Tensor:
        """Sum over sites of log p(z_i | parents) of the recorded values, per example: [S, B].

        Sites are event-shaped distributions (``Independent(Bernoulli(...), 1)``, a mixture, ...), so each
        ``log_prob`` is already per example.
        """
        return sum(site_log_prob(d, z) for d, z in self.sites.values())  # [S, B]


def site_log_prob(dist: Distribution, z: Tensor) -> Tensor:
    """log p(z) of one site, checked to be per example ([S, B])."""
    log_p = dist.log_prob(z)  # [S, B]
    assert log_p.dim() == 2, (
        f"site log_prob must be [S, B], got {tuple(log_p.shape)}: use Independent(..., 1)"
    )
    return log_p


def bernoulli_logits(dist: Distribution) -> Tensor:
    """The per-unit logits of a (possibly ``Independent``-wrapped) Bernoulli site: [S, B, D]."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if not isinstance(base, Bernoulli):
        raise ValueError(f"expected a Bernoulli site, got {type(base).__name__}")
    return base.logits


def categorical_logits(dist: Distribution) -> Tensor:
    """The normalised log-probabilities of a (possibly ``Independent``-wrapped) one-hot categorical site:
    [S, B, V, K] (V variables of K classes)."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if not isinstance(base, OneHotCategorical):
        raise ValueError(f"expected a OneHotCategorical site, got {type(base).__name__}")
    return base.logits


def discrete_kind(dist: Distribution) -> str:
    """``"bernoulli"`` or ``"categorical"`` (one-hot) for a discrete site; ValueError naming both otherwise."""
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if isinstance(base, Bernoulli):
        return "bernoulli"
    if isinstance(base, OneHotCategorical):
        return "categorical"
    raise ValueError(
        f"expected a Bernoulli or a OneHotCategorical site (possibly in Independent), got {type(base).__name__}"
    )


Turns = Callable[[int, Callable[[], Tensor]], Tensor | None]
#: while a pack steps its M members together (runners/train.py): (M, turns), where ``turns(m, draw)`` runs
#: ``draw()`` on member ``m``'s own random stream (None: it failed for that member, e.g. a diverged member's NaN
#: probabilities; the runner stops that member after the step, and its rows are zeros meanwhile); None otherwise
_member_turns: ContextVar[tuple[int, Turns] | None] = ContextVar("member_turns", default=None)


@contextmanager
def member_streams(n: int, turns: Turns):
    """Within this block, sites hold ``n`` members' rows and each member's are drawn on its own stream
    (``turns(m, draw)``; see :func:`draw_detached`)."""
    token = _member_turns.set((n, turns))
    try:
        yield
    finally:
        _member_turns.reset(token)


def active_members() -> int | None:
    """M while a pack's members are stepped together (:func:`member_streams`), None otherwise."""
    members = _member_turns.get()
    return None if members is None else members[0]


def draw_detached(name: str, dist: Distribution) -> Tensor:
    """Exact sample, no gradient path through the value (score-function estimators).

    In a pack stepped with a member dimension (``[S, M*B, D]`` sites, models/members.py), each member's rows
    are drawn on its own stream with the call a single run makes, so a member draws what it would alone."""
    members = _member_turns.get()
    if members is None:
        return dist.sample()
    n, turns = members
    base = dist.base_dist if isinstance(dist, Independent) else dist
    if not isinstance(base, Bernoulli):
        raise NotImplementedError(
            f"site {name!r}: member-wise draws are implemented for Bernoulli sites only"
        )
    probs = base.probs  # [S, M*B, D]
    rows = []
    for m, chunk in enumerate(probs.detach().split(probs.shape[-2] // n, dim=-2)):  # M x [S, B, D]
        z = turns(m, lambda c=chunk: torch.bernoulli(c.contiguous()))  # what the member's single run draws
        rows.append(torch.zeros_like(chunk) if z is None else z)
    return torch.cat(rows, dim=-2)  # [S, M*B, D]


def draw_rsample(name: str, dist: Distribution) -> Tensor:
    """Reparameterized sample (pathwise gradient)."""
    if not dist.has_rsample:
        raise ValueError(
            f"site {name!r}: {type(dist).__name__} has no rsample; use a score-function estimator"
        )
    return dist.rsample()


def draw_mean(name: str, dist: Distribution) -> Tensor:
    """Mean in place of a sample (mean-field pass)."""
    return dist.mean


class MovingAverage(nn.Module):
    """Exponential moving average of a scalar, saved in the estimator's checkpoint (the ``C`` baseline)."""

    def __init__(self, decay: float = 0.9):
        super().__init__()
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"moving-average decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.register_buffer("value", torch.zeros(()))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        """Average in the mean of ``x`` (a pack's stacked average ``[M]``: each member's rows' mean, rows last)."""
        x = member_mean(x.detach(), n_members(self.value, 0))
        # on the device, no host synchronisation: the first value is taken as is, later ones averaged in
        self.value.copy_(torch.where(self.initialised, self.decay * self.value + (1 - self.decay) * x, x))
        self.initialised.fill_(True)


def parameters_of(modules: Iterable[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]
