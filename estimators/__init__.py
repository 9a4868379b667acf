"""Gradient estimators. One module per estimator; see ``estimators.base`` for the interface."""

from estimators.base import CostFn, Estimate, Estimator, Sampler, Trace
from estimators.reinforce import Reinforce
from estimators.reparam import Reparam

__all__ = ["CostFn", "Estimate", "Estimator", "Sampler", "Trace", "Reinforce", "Reparam"]

try:  # the mixture distribution lives in its own module (Graves 2016)
    from estimators.mixture_dist import DiagNormalMixture  # noqa: F401

    __all__.append("DiagNormalMixture")
except ImportError:  # pragma: no cover - only while the module is being written
    pass
