"""Small helpers for the discrete-estimator tests: a toy one-layer Bernoulli cost with a hand-written
derivative, YAML loading, and exact expectations of an estimator's gradient by enumeration of its samples.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.distributions import Bernoulli, Independent

from tests.exact import enumerate_states

CONF = Path(__file__).resolve().parents[1] / "conf" / "estimator"


def build(name: str, context_dim: int | None = None, **overrides):
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    for k, v in overrides.items():
        cfg[k] = v
    return instantiate(cfg, context_dim=context_dim).double()


class Toy(nn.Module):
    """One Bernoulli layer of D = 3 units, batch B = 2, cost with a direct parameter dependence:

        l = theta + offset_b,     f(z; w) = a^T z + c z_0 z_1 + w z_2 + w^2

    so f'(z) = (a_0 + c z_1, a_1 + c z_0, a_2 + w) and df/dw = z_2 + 2 w. Every value the sampler returns is
    recorded in ``seen`` (one entry per pass).
    """

    D, B = 3, 2

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor([0.4, -0.9, 0.2], dtype=torch.float64))  # [D]
        self.w = nn.Parameter(torch.tensor(0.6, dtype=torch.float64))
        self.offset = torch.tensor([[0.0, 0.0, 0.0], [-0.5, 0.7, 0.3]], dtype=torch.float64)  # [B, D]
        self.a = scale * torch.tensor([1.5, -2.0, 0.8], dtype=torch.float64)  # [D]
        self.c = scale * 1.7
        self.seen: list[Tensor] = []

    def logits(self) -> Tensor:
        return self.theta + self.offset  # [B, D]

    def f(self, z: Tensor, w: Tensor | None = None) -> Tensor:
        w = self.w if w is None else w
        return (z * self.a).sum(-1) + self.c * z[..., 0] * z[..., 1] + w * z[..., 2] + w**2  # [S, B]

    def f_prime(self, z: Tensor) -> Tensor:
        w = self.w.detach()
        return torch.stack(
            [
                self.a[0] + self.c * z[..., 1],
                self.a[1] + self.c * z[..., 0],
                self.a[2] + w.expand_as(z[..., 2]),
            ],
            -1,
        )  # [S, B, D]

    def cost_fn(self, sample, n_samples: int) -> Tensor:
        logits = self.logits().expand(n_samples, self.B, self.D)  # [S, B, D]
        z = sample("z1", Independent(Bernoulli(logits=logits, validate_args=False), 1))  # [S, B, D]
        self.seen.append(z.detach().clone())
        return self.f(z)  # [S, B]

    def grads(self, surrogate: Tensor) -> tuple[Tensor, Tensor]:
        g_theta, g_w = torch.autograd.grad(surrogate, [self.theta, self.w])
        return g_theta, g_w

    def exact(self) -> tuple[Tensor, Tensor]:
        """d E[f] / d (theta, w) by enumeration."""
        states = enumerate_states(self.D)  # [8, D]
        logits = self.logits()  # [B, D]
        log_p = Independent(Bernoulli(logits=logits.unsqueeze(0)), 1).log_prob(states.unsqueeze(1))  # [8, B]
        value = (log_p.exp() * self.f(states.unsqueeze(1).expand(-1, self.B, -1))).sum(0).mean()
        return torch.autograd.grad(value, [self.theta, self.w])


def expected_gradient(
    estimator, cost_fns: list[Callable], sizes: list[int], params: list[nn.Parameter], monkeypatch, module
) -> Tensor:
    """Exact E[estimate] of a score-function-type estimator that samples with ``module.draw_detached``.

    Every joint state of the Bernoulli sites (sizes D_1..D_L, same state for every example) is forced in turn
    through ``module.draw_detached``, the estimator is run once per state (S = 1) and its gradient is weighted
    by the state's probability. ``cost_fns`` holds one cost function per example (each a batch of one), so
    that each example's gradient gets its own state probabilities; the result is their mean.
    """
    states = enumerate_states(sum(sizes))  # [N, sum D]
    total = None
    for cost_fn in cost_fns:
        for state in states:
            chunks = list(state.split(sizes))
            weight = []

            def draw(name, dist, chunks=chunks, weight=weight):
                z = chunks[len(weight)].to(dist.mean.dtype).expand_as(dist.mean)  # [1, 1, D_i]
                weight.append(dist.log_prob(z).detach())  # [1, 1]
                return z

            monkeypatch.setattr(module, "draw_detached", draw)
            est = estimator(cost_fn, None)
            grads = torch.autograd.grad(est.surrogate, params, allow_unused=True)
            g = torch.cat(
                [(gi if gi is not None else torch.zeros_like(p)).reshape(-1) for gi, p in zip(grads, params)]
            )
            p_state = torch.stack(weight).sum().exp()
            total = p_state * g if total is None else total + p_state * g
    return total / len(cost_fns)


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny tensors (a few hundred rows, a handful of columns): intra-op threads only add overhead and, on
    shared busy cores, thrash. Restores the previous setting after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
