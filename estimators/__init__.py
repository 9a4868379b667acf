"""Gradient estimators. One module per estimator; see ``estimators.base`` for the interface."""

from estimators.base import CostFn, Estimate, Estimator, Sampler, Trace
from estimators.mixture_dist import DiagNormalMixture
from estimators.reinforce import Reinforce
from estimators.reparam import Reparam

__all__ = ["CostFn", "DiagNormalMixture", "Estimate", "Estimator", "Reinforce", "Reparam", "Sampler", "Trace"]
