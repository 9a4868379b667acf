"""Small helpers for the discrete-estimator tests: a toy one-layer Bernoulli cost with a hand-written
derivative, YAML loading, and exact expectations of an estimator's gradient by enumeration of its samples.
"""

from __future__ import annotations

import itertools
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
    # every joint state = one state per site, each site's 2^D_i states listed (the enumeration of the sites)
    site_states = [enumerate_states(d) for d in sizes]  # [2^D_i, D_i]
    return expected_gradient_sites(estimator, cost_fns, site_states, params, monkeypatch, module)


@pytest.fixture(autouse=False)
def one_thread():
    """Tiny tensors (a few hundred rows, a handful of columns): intra-op threads only add overhead and, on
    shared busy cores, thrash. Restores the previous setting after the test."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Chain(nn.Module):
    """A chain of Bernoulli layers z_1 -> z_2 -> ... -> z_L (batch B = 2) with a hand-written backward pass:

        l_1 = theta + offset_b,   l_i = W_i z_{i-1} + c_i  (i >= 2),   z_i ~ Bernoulli(sigmoid(l_i))
        f(z) = sum_i u_i^T z_i + q z_L,0 z_L,1

    ``u_1 = 0`` by default, so that, as in the structured-prediction model, f does not read z_1 directly: the
    partial derivative of f in z_1 is zero and every gradient reaching z_1 goes through the layers above.
    ``f_prime_partial`` is d f / d z_i with the other layers fixed; ``f_prime_chain`` adds the paths through
    the conditional means of the layers above, f'_i = u_i + W_{i+1}^T [sigmoid'(l_{i+1}) * f'_{i+1}], with the
    l_{i+1} computed from the given z_i (the mean-field point for MuProp, the sample for DARN).
    """

    B = 2

    def __init__(self, sizes: list[int], u1: float = 0.0, seed: int = 0):
        super().__init__()
        assert sizes[-1] >= 2, "the last layer needs two units for the product term"
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape):
            return torch.randn(*shape, generator=g, dtype=torch.float64)

        self.sizes = list(sizes)
        self.theta = nn.Parameter(0.5 * rnd(sizes[0]))  # [D_1]
        self.offset = 0.5 * rnd(self.B, sizes[0])  # [B, D_1]
        self.W = nn.ParameterList(nn.Parameter(rnd(sizes[i], sizes[i - 1])) for i in range(1, len(sizes)))
        self.c = nn.ParameterList(nn.Parameter(0.5 * rnd(sizes[i])) for i in range(1, len(sizes)))
        self.u = [rnd(d) for d in sizes]  # [D_i] each
        self.u[0] = torch.full((sizes[0],), float(u1), dtype=torch.float64)
        self.q = 1.3
        self.seen: list[list[Tensor]] = []  # one list of layer values per pass

    def first_logits(self) -> Tensor:
        return self.theta + self.offset  # [B, D_1]

    def logits(self, i: int, z_prev: Tensor) -> Tensor:
        """l_{i+1} from z_i (0-based i >= 1 is layer i + 1): [..., D_{i+1}]."""
        return z_prev @ self.W[i - 1].T + self.c[i - 1]

    def f(self, zs: list[Tensor]) -> Tensor:
        return sum((z * u).sum(-1) for z, u in zip(zs, self.u)) + self.q * zs[-1][..., 0] * zs[-1][..., 1]

    def f_prime_partial(self, zs: list[Tensor]) -> list[Tensor]:
        out = [u.expand_as(z).clone() for z, u in zip(zs, self.u)]
        out[-1][..., 0] += self.q * zs[-1][..., 1]
        out[-1][..., 1] += self.q * zs[-1][..., 0]
        return out  # [.., D_i] each

    def f_prime_chain(self, zs: list[Tensor]) -> list[Tensor]:
        out = self.f_prime_partial(zs)
        with torch.no_grad():
            for i in range(len(zs) - 2, -1, -1):  # top down: f'_{i+1} is complete before f'_i
                s = torch.sigmoid(self.logits(i + 1, zs[i]))  # [.., D_{i+1}]
                out[i] = out[i] + (s * (1 - s) * out[i + 1]) @ self.W[i]  # W^T [sigmoid' * f'_{i+1}]
        return out

    def cost_fn(self, sample, n_samples: int, example: int | None = None) -> Tensor:
        """The cost of the batch, or (``example`` = b) of example b alone as a batch of one."""
        l_1 = self.first_logits() if example is None else self.first_logits()[example : example + 1]
        z = sample("z1", Independent(Bernoulli(logits=l_1.expand(n_samples, *l_1.shape)), 1))
        zs = [z]  # [S, B, D_1]
        for i in range(1, len(self.sizes)):
            z = sample(f"z{i + 1}", Independent(Bernoulli(logits=self.logits(i, z), validate_args=False), 1))
            zs.append(z)  # [S, B, D_i]
        self.seen.append([v.detach().clone() for v in zs])
        return self.f(zs)  # [S, B]

    def score_grads(
        self, zs: list[Tensor], signals: list[Tensor], f_primes: list[Tensor], weights: Tensor | None = None
    ) -> list[Tensor]:
        """Gradient (theta, W_2.., c_2..) of the batch mean of sum_i [log p(z_i|z_{i-1}) signal_i + mu_i^T f'_i]
        with mu_i and log p at the given samples: d/dl_i = (z_i - mu_i) signal_i + mu_i (1 - mu_i) f'_i.

        Without ``weights`` the samples are averaged (S draws); with ``weights`` [S, B] (state probabilities
        when the S rows enumerate states) they are summed with those weights: an exact expectation."""
        with torch.no_grad():
            logits = [self.first_logits().expand_as(zs[0])] + [
                self.logits(i, zs[i - 1]) for i in range(1, len(zs))
            ]
            w = (
                torch.full(zs[0].shape[:2], 1.0 / zs[0].shape[0], dtype=zs[0].dtype)
                if weights is None
                else weights
            ) / zs[0].shape[1]  # [S, B]: the surrogate averages over the examples
            d_l = []
            for z, l_i, s, fp in zip(zs, logits, signals, f_primes):
                mu = torch.sigmoid(l_i)
                s = s if s.dim() == z.dim() else s.unsqueeze(-1)  # one signal per layer [S, B] or per unit
                d_l.append(w.unsqueeze(-1) * ((z - mu) * s + mu * (1 - mu) * fp))  # [S, B, D_i]
            g_theta = d_l[0].sum((0, 1))
            g_w = [torch.einsum("sbi,sbj->ij", d_l[i], zs[i - 1]) for i in range(1, len(zs))]
            g_c = [d_l[i].sum((0, 1)) for i in range(1, len(zs))]
        return [g_theta, *g_w, *g_c]

    def states(self) -> tuple[list[Tensor], Tensor]:
        """Every joint state, laid along the sample dimension for both examples: ([N, B, D_i] per layer,
        their probabilities [N, B])."""
        states = enumerate_states(sum(self.sizes))  # [N, sum D]
        zs = [c.unsqueeze(1).expand(-1, self.B, -1) for c in states.split(self.sizes, dim=1)]  # [N, B, D_i]
        with torch.no_grad():
            logits = [self.first_logits().expand_as(zs[0])] + [
                self.logits(i, zs[i - 1]) for i in range(1, len(zs))
            ]
            log_p = sum(Independent(Bernoulli(logits=l_i), 1).log_prob(z) for l_i, z in zip(logits, zs))
        return zs, log_p.exp()  # [N, B]

    def example_cost_fns(self) -> list[Callable]:
        """One cost function per example (batches of one), as ``expected_gradient`` needs."""
        return [lambda sample, n, b=b: self.cost_fn(sample, n, example=b) for b in range(self.B)]

    def flat_params(self) -> list[nn.Parameter]:
        return [self.theta, *self.W, *self.c]

    def exact(self) -> Tensor:
        """d E[f] / d params by enumeration, flattened as ``flat_params``."""
        states = enumerate_states(sum(self.sizes))  # [N, sum D]
        chunks = list(states.split(self.sizes, dim=1))  # [N, D_i]
        zs = [c.unsqueeze(1).expand(-1, self.B, -1) for c in chunks]  # [N, B, D_i]
        logits = [self.first_logits().expand_as(zs[0])] + [
            self.logits(i, zs[i - 1]) for i in range(1, len(zs))
        ]
        log_p = sum(Independent(Bernoulli(logits=l_i), 1).log_prob(z) for l_i, z in zip(logits, zs))  # [N, B]
        value = (log_p.exp() * self.f(zs)).sum(0).mean()
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(value, self.flat_params())])


def enumerate_one_hot(n_vars: int, k: int) -> Tensor:
    """All k^n joint states of n one-hot variables with k classes, [k^n, n, k] (float64)."""
    idx = torch.tensor(list(itertools.product(range(k), repeat=n_vars)), dtype=torch.long)  # [k^n, n]
    return torch.nn.functional.one_hot(idx, k).to(torch.float64)


def exact_objective_sites(cost_fn: Callable, site_states: list[Tensor], batch: int) -> Tensor:
    """E[cost] averaged over the batch, enumerating the joint states of sites given as lists of values.

    ``site_states[i]`` is [N_i, *event_i], every value of site i; the joint states (the product, N = prod N_i)
    are laid along the sample dimension and each site's log-probability weights them. Differentiable.
    """
    grids = torch.cartesian_prod(*[torch.arange(len(s)) for s in site_states])  # [N, L] (or [N] for one)
    grids = grids.reshape(len(grids), -1)
    log_q = []

    def sample(name: str, dist):
        i = len(log_q)
        z = site_states[i][grids[:, i]]  # [N, *event]
        z = z.unsqueeze(1).expand(z.shape[0], batch, *z.shape[1:])  # [N, B, *event]
        log_q.append(dist.log_prob(z))  # [N, B]
        return z

    cost = cost_fn(sample, grids.shape[0])  # [N, B]
    weight = torch.stack(log_q).sum(0).exp()  # [N, B]
    return (weight * cost).sum(0).mean()


def expected_gradient_sites(
    estimator,
    cost_fns: list[Callable],
    site_states: list[Tensor],
    params: list[nn.Parameter],
    monkeypatch,
    module,
) -> Tensor:
    """``expected_gradient`` for sites of any discrete kind: ``site_states[i]`` lists every value of site i
    ([N_i, *event_i], e.g. ``enumerate_one_hot``); every joint state is forced in turn through
    ``module.draw_detached`` (same state for the one example of each cost function) and weighted exactly."""
    total = None
    for cost_fn in cost_fns:
        for idx in itertools.product(*[range(len(s)) for s in site_states]):
            weight = []

            def draw(name, dist, idx=idx, weight=weight):
                i = len(weight)
                z = site_states[i][idx[i]].to(dist.mean.dtype).expand_as(dist.mean)  # [1, 1, *event_i]
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


def tiny_categorical(
    variables: int = 2, classes: int = 3, x_dim: int = 4, prior: str = "learned", seed: int = 0
):
    """A tiny float64 categorical model (models/sbn_categorical.py) and a batch of 3 binary inputs."""
    from models.sbn_categorical import SBNCategorical

    torch.manual_seed(seed)
    model = SBNCategorical(x_dim, variables, classes, prior=prior).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.7)  # larger than the default init, so every gradient is far from zero
    x = (torch.rand(3, x_dim) < 0.5).double()  # [B, X]
    return model, x
