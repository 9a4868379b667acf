"""The torch side shared by the peer comparisons (bench/bench_pyro_compare.py, bench/bench_tfp_compare.py):
one (K, D) case's parameters, ours (``DiagNormalMixture.rsample`` + gradient of sum(x^2)) and the floor (a
plain ``Normal`` rsample + gradient of the same [B, D]), and the median-time helper."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.distributions import Normal
from torch.utils import benchmark

from estimators.mixture_dist import DiagNormalMixture


def parser(doc: str) -> argparse.ArgumentParser:
    """The options both comparisons take: --threads, --min-run-time, --only (K x D configurations)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--only", default="", help="K x D configurations, e.g. 10x16,2x128 (default: grid)")
    return ap


def median_ms(fn: Callable[[], object], min_run_time: float) -> float:
    """Median milliseconds of ``fn()`` (torch.utils.benchmark blocked_autorange), after one warm-up call."""
    fn()  # warm-up
    return 1e3 * benchmark.Timer("f()", globals={"f": fn}).blocked_autorange(min_run_time=min_run_time).median


@dataclass
class Case:
    """One mixture of K components in D dimensions (float32, CPU) and the two torch timings of it."""

    k: int
    d: int
    b: int

    def __post_init__(self) -> None:
        self.logits = torch.randn(self.k, requires_grad=True)  # [K]
        self.loc = torch.randn(self.k, self.d, requires_grad=True)  # [K, D]
        self.scale = (0.5 + torch.rand(self.k, self.d)).requires_grad_(True)  # [K, D]
        self.loc1 = self.loc[0].detach().clone().requires_grad_()  # [D]
        self.scale1 = self.scale[0].detach().clone().requires_grad_()  # [D]

    @property
    def params(self) -> list[Tensor]:
        return [self.logits, self.loc, self.scale]

    def ours(self) -> None:
        x = DiagNormalMixture(self.logits, self.loc, self.scale).rsample((self.b,))  # [B, D]
        torch.autograd.grad(x.square().sum(), self.params)

    def floor(self) -> None:
        x = Normal(self.loc1, self.scale1).rsample((self.b,))  # [B, D]
        torch.autograd.grad(x.square().sum(), [self.loc1, self.scale1])
