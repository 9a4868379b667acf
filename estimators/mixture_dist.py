"""``DiagNormalMixture``: a mixture of diagonal Gaussians with an unbiased reparameterized ``rsample``.

    p(x) = sum_k pi_k prod_d N(x_d; mu_kd, sigma_kd),                      pi = softmax(a)

The distributional transform T(x) = (F_1(x_1), F_2(x_2 | x_1), ..., F_D(x_D | x_<D)) sends x ~ p to
u ~ Uniform[0, 1]^D, with conditional CDFs and weights

    F_d(x_d | x_<d) = sum_k w_kd Phi((x_d - mu_kd) / sigma_kd),
    w_.d            = softmax_k(a_k + sum_{h<d} log N(x_h; mu_kh, sigma_kh))   (an exclusive cumsum).

Holding u = T(x(theta), theta) fixed and differentiating gives the implicit reparameterization gradient

    dx/dtheta = -J^{-1} dT/dtheta,       J = dT/dx lower triangular,  J_dd = f_d(x_d | x_<d) > 0,
    J_dh      = sum_k w_kd s_kh (Phi_kd - F_d)   (d > h),             s_kh = -(x_h - mu_kh) / sigma_kh^2,

(Graves 2016, "Stochastic Backpropagation through Mixture Density Distributions", arXiv:1607.05690,
eqs. for dx_d/dtheta; the same gradient is the implicit reparameterization of Figurnov, Mohamed & Mnih
2018, "Implicit Reparameterization Gradients", eq. 5, applied to T). The forward pass draws an exact
sample (k ~ Categorical(pi), x = mu_k + sigma_k eps) and the backward pass computes g^T dx/dtheta.
Unbiased: E[g^T dx/dtheta] = d/dtheta E[c(x)] for smooth c, for both ``component_grad`` choices:

* ``"implicit"``: logits, loc and scale all through T (every component receives gradient each step;
  what TensorFlow Probability's ``MixtureSameFamily(reparameterize=True)`` does).
* ``"graves"``: logits through T; loc and scale by the ordinary reparameterization x = mu_k + sigma_k eps
  of the sampled component k only (Graves' combination; each part is unbiased on its own).

The vector-Jacobian product needs v = J^{-T} g. J's strictly lower part is a sum of K rank-one terms,
so with u_d = f_d v_d and c~_kd = w_kd (Phi_kd - F_d) / f_d the system J^T v = g reads

    u_h + sum_k s_kh R_kh = g_h,          R_kh = sum_{d>h} u_d c~_kd   (a running sum over d, in reverse),

and then, with the same running sums (they are the terms through w_.d' for d' > d),

    dL/da_k      = -sum_d u_d c~_kd,
    dL/dmu_kd    = u_d r_kd - R_kd z_kd / sigma_kd,      r_kd = w_kd N(x_d; mu_kd, sigma_kd) / f_d,
    dL/dsigma_kd = u_d r_kd z_kd - R_kd (z_kd^2 - 1) / sigma_kd.

Cost O(D K) per sample for everything except the solve. The solve is a linear recurrence with a K-vector
state and rank-one transitions (I - s_h c~_h^T), which no cumulative sum can express for K > 1; it runs
in blocks of ``block_size`` coordinates: inside a block a [P, P] unit upper-triangular system (a batched
matmul and a triangular solve, O(P K) per coordinate), across blocks the K-vector R is carried. That is a
Python loop over D / P blocks, not over D (the chunked-scan trick of linear-attention kernels). The D x D
Jacobian is never formed (``implicit_grad_dense_reference`` does that, for tests and benchmarks only).
Forward mode (``jvp``) solves J xdot = -dT/dtheta t by the transposed recurrence (``_solve_forward``).

Autograd: ``_MixtureRsample`` is a new-style ``autograd.Function`` (``setup_context``): its backward is
made of differentiable ops on the *output* x, so double backward works (gradgradcheck in the tests), and
``torch.func.grad``, ``vmap`` (``generate_vmap_rule``) and ``jvp`` apply. On CPU a first-order backward
(no graph needed through it) runs the same formulas as one fused C kernel per call (``estimators/native.py``:
one pass per sample in double precision, built on first use with the system's C compiler, the torch
operations otherwise; ``GRADEST_NATIVE_MIXTURE=0`` switches it off). ``compile_backward=True`` runs the
first-order backward through ``torch.compile`` instead.

Distribution API beyond rsample/log_prob: ``cdf`` (closed form, the joint CDF), ``icdf`` (D = 1, by
bisection and Newton, differentiable), ``mode`` (numerical: mean-shift from every mean), ``entropy``
(NotImplementedError: no closed form).

Numerics: weights and densities in log space. Phi_kd - F_d = sum_j w_j (Phi_kd - Phi_jd) is formed
against one reference component r (the largest weight) as G_k - sum_j w_j G_j, G_j = Phi_j - Phi_r, each
G_j from z_j - z_r computed without cancellation and an interval formula that keeps its digits for short
intervals (a series) and far tails (log CDFs); see ``_cdf_gaps``. Subtracting F from Phi directly loses all
digits where one component dominates or where components overlap at a large scale (measured in float32
before this form: logits gradients off by up to 28x with two components at scale 1e6 and O(1) locations;
``tests/test_mixture_float32.py`` bounds the float32 error by the gradient's own conditioning). The loc
gradient of the component with the largest responsibility is written without the u r - A cancellation
(see ``implicit_grad_structured``). The one ill-conditioned quantity is 1 / f_d: the factor w e^M / f of
c~ = w (Phi - F) / f is formed in log space and clamped at sqrt(finfo.max) (~1.8e19 in float32). In the
tails of a component the true ratio is a Mills ratio (about sigma / |z|) and stays far below the clamp;
it is reached only where the conditional density underflows relative to the weights, i.e. in deep
valleys between far-apart components, which the sampler reaches with vanishing probability. There the
gradient is clamped (finite, slightly biased) instead of being inf / nan (in float64, a sample thousands
of scales from every component can still overflow the solve: such x are not drawn in float64 either).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as nnf
from torch import Tensor
from torch.autograd.function import FunctionCtx
from torch.distributions import (
    Categorical,
    Distribution,
    Independent,
    MixtureSameFamily,
    Normal,
    constraints,
)

from estimators import native as _native

__all__ = [
    "COMPONENT_GRADS",
    "DiagNormalMixture",
    "implicit_grad_dense_reference",
    "implicit_grad_structured",
    "implicit_jvp_structured",
    "mixture_cdf_transform",
    "mixture_quantile",
    "reparameterize",
]

COMPONENT_GRADS = ("implicit", "graves")
# Coordinates per block of the transposed triangular solve (1 is the plain running-sum loop over D).
# Measured on a shared 2-core CPU (1 thread, B = 256, K in {10, 100}, D in {32, 128, 512}): 1 was 1.2-1.5x
# slower than 16, sizes 4 to 64 were within the (large) timing noise of each other. In-block work grows
# as O(P K) per coordinate, Python iterations as D / P; on a GPU larger blocks (fewer kernel launches)
# probably pay, which is not measured here.
DEFAULT_BLOCK_SIZE = 16
_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)
_MODE_ITERS = 200  # mean-shift steps for DiagNormalMixture.mode (linear convergence)


def _check_component_grad(component_grad: str) -> None:
    if component_grad not in COMPONENT_GRADS:
        raise ValueError(f"component_grad must be one of {COMPONENT_GRADS}, got {component_grad!r}")


def _broadcast_shapes(*shapes: Sequence[int]) -> torch.Size:
    """``torch.broadcast_shapes`` without its first-call import of ``torch._refs`` (seconds on CPU)."""
    ndim = max(len(shape) for shape in shapes)
    out = [1] * ndim
    for shape in shapes:
        for i, size in enumerate(shape, start=ndim - len(shape)):
            if size != 1 and out[i] not in (1, size):
                raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
            out[i] = size if size != 1 else out[i]
    return torch.Size(out)


def _check_shapes(logits: Tensor, loc: Tensor, scale: Tensor) -> tuple[torch.Size, int, int]:
    """Batch shape, K and D of mixture parameters ``[..., K]``, ``[..., K, D]``, ``[..., K, D]``."""
    if logits.dim() < 1 or loc.dim() < 2 or scale.dim() < 2:
        raise ValueError(
            "expected logits [..., K], loc [..., K, D] and scale [..., K, D]; got shapes "
            f"{tuple(logits.shape)}, {tuple(loc.shape)}, {tuple(scale.shape)}"
        )
    k, d = loc.shape[-2:]
    if logits.shape[-1] != k or scale.shape[-2:] != loc.shape[-2:]:
        raise ValueError(
            "logits [..., K], loc [..., K, D] and scale [..., K, D] must agree on K and D; got shapes "
            f"{tuple(logits.shape)}, {tuple(loc.shape)}, {tuple(scale.shape)}"
        )
    batch_shape = _broadcast_shapes(logits.shape[:-1], loc.shape[:-2], scale.shape[:-2])
    return batch_shape, k, d


def _exclusive_cumsum(t: Tensor) -> Tensor:
    """sum_{h<d} t_h along the last dim (shifted, not ``cumsum - t``, which cancels catastrophically)."""
    return nnf.pad(t[..., :-1].cumsum(-1), (1, 0))  # [..., D]


def _reverse_exclusive_cumsum(t: Tensor) -> Tensor:
    """sum_{d>h} t_d along the last dim."""
    return nnf.pad(t[..., 1:].flip(-1).cumsum(-1).flip(-1), (0, 1))  # [..., D]


def _exp(t: Tensor) -> Tensor:
    """exp flushed to zero below e times the smallest normal number (float32: 3.2e-38): CPU exp takes a
    slow path for arguments whose result is subnormal or 0 (measured 6.8 ms against 0.28 ms on
    [256, 10, 128] float32 log-weights), so those arguments are clamped and their results zeroed."""
    floor = math.log(torch.finfo(t.dtype).tiny) + 1.0
    return t.clamp(min=floor).exp() * _mask(t > floor, t)


def _mask(condition: Tensor, like: Tensor) -> Tensor:
    """A 0/1 mask in ``like``'s dtype, for ``_select``."""
    return condition.to(like.dtype)


def _select(mask: Tensor, yes: Tensor | float, no: Tensor | float) -> Tensor:
    """``torch.where`` for a 0/1 float mask and finite branches: yes m + no (1 - m) is exact (x 1 = x,
    x 0 = 0) and costs a fraction of ``torch.where`` on CPU (measured 0.8 ms against 2.5 ms on
    [256, 10, 128] float32). Not a + m (b - a), which rounds a small b next to a huge a away."""
    return yes * mask + no * (1.0 - mask)


def _logsumexp(t: Tensor, dim: int) -> Tensor:
    """``t.logsumexp(dim, keepdim=True)`` for finite t, written out: torch's kernel costs ~180 us even on
    [256, 2, 2] (measured), and the exp of shifted arguments takes ``_exp``'s fast path. The shift is
    detached: the value and gradient of log-sum-exp do not depend on it."""
    top = t.amax(dim, keepdim=True).detach()  # [..., 1, ...]
    return top + _exp(t - top).sum(dim, keepdim=True).log()  # [..., 1, ...]


def _log_weights(logits: Tensor, loc: Tensor, scale: Tensor, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Standardized residuals z, log N(x_d; mu_kd, sigma_kd) and log conditional weights log w_kd."""
    z = (x.unsqueeze(-2) - loc) / scale  # [..., K, D]
    log_n = -0.5 * z.square() - scale.log() - _HALF_LOG_2PI  # [..., K, D]
    # w_.d = softmax_k(a_k + sum_{h<d} log N_kh): the posterior of the component given x_<d
    log_w = logits.unsqueeze(-1) + _exclusive_cumsum(log_n)  # [..., K, D]
    # (not log_softmax: its CPU kernel wakes the thread pool even for tiny tensors)
    log_w = log_w - _logsumexp(log_w, -2)  # [..., K, D]
    return z, log_n, log_w


def mixture_cdf_transform(logits: Tensor, loc: Tensor, scale: Tensor, x: Tensor) -> Tensor:
    """T(x)_d = F_d(x_d | x_<d) = sum_k w_kd Phi(z_kd); plain torch ops, differentiable by autograd.

    logits ``[..., K]``, loc/scale ``[..., K, D]``, x ``[..., D]`` (leading dims broadcast) -> ``[..., D]``.
    """
    z, _, log_w = _log_weights(logits, loc, scale, x)  # [..., K, D] x3
    return (log_w + torch.special.log_ndtr(z)).logsumexp(-2).exp()  # [..., D]


@torch.no_grad()
def mixture_quantile(
    logits: Tensor,
    loc: Tensor,
    scale: Tensor,
    u: Tensor,
    init: Tensor | None = None,
    iters: int = 100,
    newton_steps: int = 4,
) -> Tensor:
    """T^{-1}(u): solve F_d(x_d | x_<d) = u_d coordinate by coordinate.

    Bisection (``iters`` halvings of a bracket 50 sigma wide around every component) and then
    ``newton_steps`` Newton steps; with ``init`` (a nearby solution, e.g. for slightly perturbed
    parameters) Newton steps only. Sequential over D and without gradient: it exists so that tests can
    hold u fixed and check the implicit gradient against finite differences of x(theta).
    """
    batch_shape, k, d = _check_shapes(logits, loc, scale)
    lead = _broadcast_shapes(batch_shape, u.shape[:-1])
    logits = logits.expand(*lead, k)  # [..., K]
    loc = loc.expand(*lead, k, d)  # [..., K, D]
    scale = scale.expand(*lead, k, d)  # [..., K, D]
    u = u.expand(*lead, d)  # [..., D]
    x = torch.zeros_like(u) if init is None else init.expand(*lead, d).clone()  # [..., D]
    lower = (loc - 50.0 * scale).amin(-2)  # [..., D], F_d = 0 to working precision below
    upper = (loc + 50.0 * scale).amax(-2)  # [..., D]
    log_prev = torch.zeros_like(logits)  # [..., K], sum_{h<d} log N(x_h; mu_kh, sigma_kh)
    for i in range(d):
        log_w = logits + log_prev  # [..., K]
        # (not log_softmax: its CPU kernel wakes the thread pool even for tiny tensors, slow in a loop)
        log_w = log_w - log_w.logsumexp(-1, keepdim=True)  # [..., K]
        mu, sigma = loc[..., i], scale[..., i]  # [..., K], [..., K]
        xi = x[..., i]  # [...]
        if init is None:
            lo, hi = lower[..., i], upper[..., i]  # [...], [...]
            for _ in range(iters):
                mid = 0.5 * (lo + hi)  # [...]
                z = (mid.unsqueeze(-1) - mu) / sigma  # [..., K]
                below = (log_w + torch.special.log_ndtr(z)).logsumexp(-1).exp() < u[..., i]  # [...]
                lo = torch.where(below, mid, lo)  # [...]
                hi = torch.where(below, hi, mid)  # [...]
            xi = 0.5 * (lo + hi)  # [...]
        for _ in range(newton_steps):
            z = (xi.unsqueeze(-1) - mu) / sigma  # [..., K]
            cdf = (log_w + torch.special.log_ndtr(z)).logsumexp(-1).exp()  # [...]
            dens = (log_w - 0.5 * z.square() - sigma.log() - _HALF_LOG_2PI).logsumexp(-1).exp()  # [...]
            xi = xi - (cdf - u[..., i]) / dens  # [...]
        x[..., i] = xi
        z = (xi.unsqueeze(-1) - mu) / sigma  # [..., K]
        log_prev = log_prev - 0.5 * z.square() - sigma.log() - _HALF_LOG_2PI  # [..., K]
    return x


def _solve_transposed(ctil: Tensor, s: Tensor, g: Tensor, block_size: int) -> Tensor:
    """Solve u_h + sum_{d>h} (sum_k s_kh c~_kd) u_d = g_h for u, i.e. J^T v = g with u = f v.

    ctil, s ``[N, K, D]``, g ``[N, D]`` -> u ``[N, D]``. Blocks of ``block_size`` coordinates, last first.
    Built from differentiable ops only (no in-place writes), so autograd can differentiate the solve
    again (double backward through ``rsample``).
    """
    n, k, d = ctil.shape
    blocks = []  # u of each block, last block first
    carry = g.new_zeros(n, k, 1)  # [N, K, 1], R_k = sum_{d >= end of block} u_d c~_kd
    for end in range(d, 0, -block_size):
        start = max(0, end - block_size)
        c_blk = ctil[:, :, start:end]  # [N, K, P]
        s_blk = s[:, :, start:end].transpose(1, 2)  # [N, P, K]
        rhs = g[:, start:end].unsqueeze(-1) - s_blk @ carry  # [N, P, 1], coupling to later blocks
        if end - start == 1:
            u_blk = rhs  # [N, 1, 1]; a one-coordinate block has no coupling inside it
        else:
            # coupling inside the block; triu: only d > h couples (the unit diagonal is u_h itself)
            a_blk = torch.triu(s_blk @ c_blk, diagonal=1)  # [N, P, P]
            u_blk = torch.linalg.solve_triangular(a_blk, rhs, upper=True, unitriangular=True)  # [N, P, 1]
        blocks.append(u_blk.squeeze(-1))  # [N, P]
        carry = carry + c_blk @ u_blk  # [N, K, 1]
    return torch.cat(blocks[::-1], dim=-1)  # [N, D]


def _solve_forward(ctil: Tensor, s: Tensor, rho: Tensor, block_size: int) -> Tensor:
    """Solve t_d + sum_{h<d} (sum_k c~_kd s_kh) t_h = rho_d for t, i.e. J t = f rho (the jvp's solve).

    ctil, s ``[N, K, D]``, rho ``[N, D]`` -> t ``[N, D]``. The transpose of ``_solve_transposed``:
    blocks first to last, the carried K-vector is Q_k = sum_{h < start of block} s_kh t_h.
    """
    n, k, d = ctil.shape
    blocks = []  # t of each block, first block first
    carry = rho.new_zeros(n, k, 1)  # [N, K, 1]
    for start in range(0, d, block_size):
        end = min(d, start + block_size)
        c_blk = ctil[:, :, start:end].transpose(1, 2)  # [N, P, K]
        s_blk = s[:, :, start:end]  # [N, K, P]
        rhs = rho[:, start:end].unsqueeze(-1) - c_blk @ carry  # [N, P, 1]
        if end - start == 1:
            t_blk = rhs  # [N, 1, 1]
        else:
            a_blk = torch.tril(c_blk @ s_blk, diagonal=-1)  # [N, P, P], only h < d couples
            t_blk = torch.linalg.solve_triangular(a_blk, rhs, upper=False, unitriangular=True)  # [N, P, 1]
        blocks.append(t_blk.squeeze(-1))  # [N, P]
        carry = carry + s_blk @ t_blk  # [N, K, 1]
    return torch.cat(blocks, dim=-1)  # [N, D]


def _interval_constants(dtype: torch.dtype) -> tuple[float, float]:
    """(series radius, far-tail cut) of ``_log_normal_interval`` for a dtype."""
    return (0.05, -36.0) if dtype == torch.float64 else (0.5, -12.0)


def _interval_series(m: Tensor, delta: Tensor) -> Tensor:
    """log(Phi(m + delta) - Phi(m - delta)) by the series, for delta (|m| + 2) <= radius (finite anywhere)."""
    radius, _ = _interval_constants(m.dtype)
    d_s = delta.clamp(min=torch.finfo(m.dtype).tiny, max=radius)  # [...]
    p2 = (d_s * m).clamp(min=-radius, max=radius).square()  # [...], (delta m)^2, bounded
    q = d_s.square()  # [...]
    he = (
        (p2 - q) / 6.0
        + (p2.square() - 6.0 * p2 * q + 3.0 * q.square()) / 120.0
        + (p2 * p2.square() - 15.0 * p2.square() * q + 45.0 * p2 * q.square() - 15.0 * q * q.square())
        / 5040.0
    )  # [...], sum_{n = 2, 4, 6} He_n(m) delta^n / (n + 1)!
    m_s = m.clamp(min=-1e15, max=1e15)  # [...], so that m^2 stays finite
    return torch.log(2.0 * d_s) - 0.5 * m_s.square() - _HALF_LOG_2PI + torch.log1p(he)  # [...]


def _interval_lower_side(z_a: Tensor, z_b: Tensor) -> tuple[Tensor, Tensor]:
    """End points (lo, hi) reflected to the lower side: Phi(hi) - Phi(lo) = Phi(-lo) - Phi(-hi)."""
    lo, hi = torch.minimum(z_a, z_b), torch.maximum(z_a, z_b)  # [...], [...]
    upper = _mask(lo + hi > 0, lo)  # [...]
    return _select(upper, -hi, lo), _select(upper, -lo, hi)  # [...], [...]


def _interval_near(z_a: Tensor, z_b: Tensor, m: Tensor) -> Tensor:
    """log|Phi(z_b) - Phi(z_a)| from erfc on the lower side (m: the midpoint; upper side reflected):
    1/2 |erfc(c z_a / sqrt 2) - erfc(c z_b / sqrt 2)|, c = -1 where m <= 0, +1 where m > 0, so every
    erfc with a sizeable value has a positive argument (accurate relative to its value). For the tail
    branch: ends well separated, the one nearer the mean above the far-tail cut.

    The difference is clamped at finfo.tiny, which the branch's own elements never reach (there
    Phi(hi) - Phi(lo) > 0.28 Phi(cut) > 1e-34), so the value is finite for every input."""
    c = (2.0 * _SQRT_HALF) * _mask(m > 0, m) - _SQRT_HALF  # [...], +-1 / sqrt 2
    diff = torch.special.erfc(c * z_a) - torch.special.erfc(c * z_b)  # [...]
    return (0.5 * diff.abs()).clamp(min=torch.finfo(z_a.dtype).tiny).log()  # [...]


def _interval_far(lo: Tensor, hi: Tensor, delta: Tensor) -> Tensor:
    """log(Phi(hi) - Phi(lo)) for hi <= cut (Phi(hi) underflows): the asymptotic series, as a difference."""
    _, cut = _interval_constants(lo.dtype)
    hi_f, lo_f = hi.clamp(max=cut), lo.clamp(max=cut)  # [...], [...]
    inv_hi, inv_lo = hi_f.square().reciprocal(), lo_f.square().reciprocal()  # [...], [...]
    series_hi, series_lo = torch.ones_like(inv_hi), torch.ones_like(inv_lo)  # [...], [...]
    for n in range(8 if lo.dtype == torch.float64 else 5, 0, -1):
        series_hi = 1.0 - (2 * n - 1) * inv_hi * series_hi  # [...]
        series_lo = 1.0 - (2 * n - 1) * inv_lo * series_lo  # [...]
    # dL = log Phi(hi) - log Phi(lo) without subtracting two large logs: (lo^2 - hi^2) / 2 = 2 delta |m|
    # from delta itself (lo and hi may round to one number at |z| ~ 1e12 while delta is exact); >= 0.09
    # wherever this branch is used, so the clamp only keeps unused elements finite
    d_log = 2.0 * delta * (-0.5 * (lo_f + hi_f)) + (lo_f / hi_f).log() + (series_hi / series_lo).log()
    d_log = d_log.clamp(min=1e-3)  # [...]
    log_phi_hi = -0.5 * hi_f.square() - (-hi_f).log() - _HALF_LOG_2PI + series_hi.log()  # [...]
    return log_phi_hi + torch.log(-torch.expm1(-d_log))  # [...]


def _log_normal_interval(z_a: Tensor, z_b: Tensor, dz: Tensor) -> Tensor:
    """log|Phi(z_b) - Phi(z_a)| given dz = z_b - z_a (computed without cancellation by the caller).

    Where the interval is short, delta (|m| + 2) <= radius (m = z_a + dz / 2, delta = |dz| / 2; radius
    0.5 in float32, 0.05 in float64): the Taylor series of the integral of phi around m, 2 delta phi(m)
    sum_{n even} He_n(m) delta^n / (n + 1)!, to He_6 (the He_8 term is below the dtype's epsilon at that
    radius). Elsewhere the two tails are well separated (Phi(lo) / Phi(hi) < 0.72 on the lower side), so
    Phi(hi) - Phi(lo) from erfc keeps its digits, or, where even Phi(hi) would underflow (hi below -12,
    float64 -36), log Phi(hi) + log(1 - e^{-dL}) with dL = log Phi(hi) - log Phi(lo) from the asymptotic
    series written as a difference; on the upper side (positive midpoint) the same with reflected end
    points. The end points are the z themselves (rebuilding them from m and delta would lose a small end
    point next to a huge one). dz = 0 gives a finite value far below any true gap.

    Eager on CPU and unbatched, the series and far-tail branches run on their own elements only
    (gathered by index) over the erfc branch, which runs on all. Under ``torch.compile`` or
    ``torch.func`` transforms (no data-dependent shapes there) and on accelerators (no host syncs)
    every branch runs on every element and 0/1 masks blend them; every branch is finite on every
    input, so values and gradients stay finite.
    """
    radius, cut = _interval_constants(dz.dtype)
    z_a, z_b = z_a.expand_as(dz), z_b.expand_as(dz)  # [...], [...]
    delta = 0.5 * dz.abs()  # [...]
    m = z_a + 0.5 * dz  # [...], the midpoint (accurate where the interval is short)
    series = delta * (m.abs() + 2.0) <= radius  # [...]
    # dense on accelerators too: the subset path reads counts back to the host (a sync per call)
    if dz.device.type != "cpu" or torch.compiler.is_compiling() or _functorch_active():
        series_f = _mask(series, dz)  # [...]
        lo, hi = _interval_lower_side(z_a, z_b)  # [...], [...]
        log_tail = _select(_mask(hi > cut, dz), _interval_near(z_a, z_b, m), _interval_far(lo, hi, delta))
        return _select(series_f, _interval_series(m, delta), log_tail)  # [...]
    shape = dz.shape
    z_a, z_b, delta, m, series = (t.reshape(-1) for t in (z_a, z_b, delta, m, series))  # [P] x5
    # the erfc branch on every element (most elements are in it; finite on all), then the others
    # written over it on their own elements
    out = _interval_near(z_a, z_b, m)  # [P]
    (idx,) = (series & (delta > 0)).nonzero(as_tuple=True)  # [P_s]
    out = out.index_put((idx,), _interval_series(m[idx], delta[idx]))  # [P]
    # dz = 0 (the reference component itself, 1 / K of all elements): a stand-in below any true gap
    # instead of the series (the series' own value there, log(2 tiny) - m^2 / 2; sign(0) zeroes it)
    (idx,) = (delta == 0).nonzero(as_tuple=True)  # [P_0]
    stand_in = math.log(2.0 * torch.finfo(dz.dtype).tiny) - 0.5 * m[idx].clamp(min=-1e15, max=1e15).square()
    out = out.index_put((idx,), stand_in)  # [P]
    # far tails: both ends on one side of 0, the nearer one beyond the cut
    far = (torch.minimum(z_a.abs(), z_b.abs()) >= -cut) & ((z_a > 0) == (z_b > 0))  # [P]
    (idx,) = (far & ~series).nonzero(as_tuple=True)  # [P_f]
    if idx.numel() > 0:
        lo, hi = _interval_lower_side(z_a[idx], z_b[idx])  # [P_f], [P_f]
        out = out.index_put((idx,), _interval_far(lo, hi, delta[idx]))  # [P]
    return out.reshape(shape)  # [...]


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, jvp) is running; False on a torch without the query."""
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def _cdf_gaps(z: Tensor, loc: Tensor, scale: Tensor, log_w: Tensor) -> tuple[Tensor, Tensor]:
    """(Phi_kd - F_d) e^{-M_d} and the scale M_d ``[N, 1, D]``, without cancellation.

    Phi_k - F = sum_j w_j (Phi_k - Phi_j) is formed against one reference component r per coordinate
    (the largest weight): Phi_k - F = G_k - sum_j w_j G_j with G_j = Phi_j - Phi_r. Each G_j comes from
    z_j - z_r computed from the parameters, ((mu_r - mu_j) + z_r (sigma_r - sigma_j)) / sigma_j, not as a
    difference of two nearly equal z (overlapping components at a large scale), and from
    ``_log_normal_interval`` (no difference of two nearly equal Phi). Where one component dominates,
    r is that component and Phi_r - F = -sum_{j != r} w_j G_j keeps its digits: subtracting F from Phi_r
    directly loses them. The G_j are scaled by e^{-M} (M = max_j log |G_j|) so that far-tail samples,
    where every G underflows, keep their digits.
    """
    ref = log_w.max(-2, keepdim=True).indices  # [N, 1, D], r (max: argmax over dim -2 is slower)
    z_r, loc_r, scale_r = (t.gather(-2, ref) for t in (z, loc, scale))  # [N, 1, D] x3
    # z_k - z_r two ways; each is used where its rounding error bound is the smaller one: from the
    # parameters (overlapping components at a large scale, where z_k - z_r cancels) or directly (a
    # narrow component next to a wide one, where rebuilding x from z_r cancels instead)
    loc_gap, scale_gap = loc_r - loc, z_r * (scale_r - scale)  # [N, K, D] x2
    via_params = _mask((loc_gap.abs() + 2.0 * scale_gap.abs()) / scale < z.abs() + z_r.abs(), z)  # [N, K, D]
    direct = z - z_r  # [N, K, D]
    dz = _select(via_params, (loc_gap + scale_gap) / scale, direct)  # [N, K, D], z_k - z_r
    # log |G|; at k = r (dz = 0) a finite stand-in far below every true gap, and sign(0) = 0 zeroes it
    log_gap = _log_normal_interval(z_r, z, dz)  # [N, K, D]
    # M cancels exactly in c~ (it scales Phi - F and is divided out again): no gradient needed through it
    scale_log = log_gap.amax(-2, keepdim=True).detach()  # [N, 1, D]
    gap = dz.sign() * _exp(log_gap - scale_log)  # [N, K, D], (Phi_k - Phi_r) e^{-M}
    mix_gap = (_exp(log_w) * gap).sum(-2, keepdim=True)  # [N, 1, D], (F - Phi_r) e^{-M}
    return gap - mix_gap, scale_log  # [N, K, D], [N, 1, D]


def _ctil(z: Tensor, loc: Tensor, scale: Tensor, log_w: Tensor, log_f: Tensor) -> Tensor:
    """c~_kd = w_kd (Phi_kd - F_d) / f_d ``[N, K, D]`` (K > 1), from ``_cdf_gaps``; log_f ``[N, 1, D]``."""
    diff, scale_log = _cdf_gaps(z, loc, scale, log_w)  # [N, K, D], [N, 1, D]
    # the factor w e^M / f in log space, clamped at sqrt(finfo.max) (see module docstring); |diff| <= 2
    log_ratio_max = 0.5 * math.log(torch.finfo(z.dtype).max)
    return diff * _exp((log_w + scale_log - log_f).clamp(max=log_ratio_max))  # [N, K, D]


def implicit_grad_structured(
    logits: Tensor,
    loc: Tensor,
    scale: Tensor,
    x: Tensor,
    grad_x: Tensor,
    block_size: int = DEFAULT_BLOCK_SIZE,
    need_components: bool = True,
    native: bool | None = None,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor]:
    """g^T dx/dtheta for the implicit gradient, O(D K) per sample plus the blocked solve.

    Arguments broadcast to a common leading shape ``L``; returns (grad_logits ``[*L, K]``, grad_loc and
    grad_scale ``[*L, K, D]`` or None when ``need_components`` is False, z ``[*L, K, D]``).

    ``native``: the fused C kernel (``estimators/native.py``, the same formulas in one pass per sample, in
    double precision) instead of the tensor operations below. None (default) takes it where it applies and
    nothing needs these operations' graph: K > 1, CPU, float32/float64, gradient mode off (a first-order
    backward), outside ``torch.func`` transforms and ``torch.compile``; True insists (ValueError where it
    cannot run), False never.
    """
    batch_shape, k, d = _check_shapes(logits, loc, scale)
    lead = _broadcast_shapes(batch_shape, x.shape[:-1], grad_x.shape[:-1])
    if native is None:
        native = (
            k > 1
            and not torch.is_grad_enabled()
            and not _functorch_active()
            and not torch.compiler.is_compiling()
            and _native.applies(logits, loc, scale, x, grad_x)
        )
    elif native and not (k > 1 and _native.applies(logits, loc, scale, x, grad_x)):
        raise ValueError(
            "native=True: the native mixture backward needs K > 1, CPU float32/float64 tensors, a C compiler "
            "and GRADEST_NATIVE_MIXTURE not set to 0"
        )
    if native:
        grad_logits, grad_loc, grad_scale = _native.implicit_grad(
            logits, loc, scale, x, grad_x, lead, need_components
        )  # [*L, K], [*L, K, D] x2 or None
        z = ((x.unsqueeze(-2) - loc) / scale).expand(*lead, k, d)  # [*L, K, D]
        return grad_logits, grad_loc, grad_scale, z
    logits = logits.expand(*lead, k).reshape(-1, k)  # [N, K]
    loc = loc.expand(*lead, k, d).reshape(-1, k, d)  # [N, K, D]
    scale = scale.expand(*lead, k, d).reshape(-1, k, d)  # [N, K, D]
    x = x.expand(*lead, d).reshape(-1, d)  # [N, D]
    g = grad_x.expand(*lead, d).reshape(-1, d)  # [N, D]

    if k == 1:
        # one component: w = 1, F = Phi, so c~ = 0, J is diagonal, u = g, r = 1 and no running sums:
        # the ordinary reparameterization gradient
        z = (x.unsqueeze(-2) - loc) / scale  # [N, 1, D]
        grad_loc = g.unsqueeze(-2)  # [N, 1, D]
        grad_scale = (grad_loc * z).reshape(*lead, k, d) if need_components else None  # [*L, 1, D]
        grad_loc = grad_loc.reshape(*lead, k, d) if need_components else None  # [*L, 1, D]
        return g.new_zeros(*lead, k), grad_loc, grad_scale, z.reshape(*lead, k, d)

    z, log_n, log_w = _log_weights(logits, loc, scale, x)  # [N, K, D] x3
    log_q = log_w + log_n  # [N, K, D], log of component k's share of the conditional density f_d
    log_f = _logsumexp(log_q, -2)  # [N, 1, D]
    ctil = _ctil(z, loc, scale, log_w, log_f)  # [N, K, D]
    s = -z / scale  # [N, K, D], d log N(x_h; mu_kh, sigma_kh) / d x_h
    u = _solve_transposed(ctil, s, g, block_size)  # [N, D]

    uc = u.unsqueeze(-2) * ctil  # [N, K, D], u_d c~_kd = -dL/d(a_k + sum_{h<d} log N_kh)
    grad_logits = -uc.sum(-1)  # [N, K]
    grad_loc = grad_scale = None
    if need_components:
        running = _reverse_exclusive_cumsum(uc)  # [N, K, D], R_kd: the terms through w_.d' for d' > d
        resp = _exp(log_q - log_f)  # [N, K, D], r_kd in [0, 1] (exact even where f_d underflows)
        # u_d = g_d + sum_j A_jd with A_jd = R_jd z_jd / sigma_jd (the solve's own equation), so
        # dL/dmu_kd = u_d r_kd - A_kd = g_d r_kd + (r_kd sum_j A_jd - A_kd). For the component with the
        # largest responsibility the bracket is r_k sum_{j != k} A_j - (sum_{j != k} r_j) A_k: written as
        # u r - A it is a difference of two large, nearly equal terms where r ~ 1 and sigma_k is tiny.
        big = running * (z / scale)  # [N, K, D], A_kd; d log N / d mu = z / sigma
        top = resp.max(-2, keepdim=True).indices == torch.arange(k, device=z.device).unsqueeze(-1)
        top = _mask(top, z)  # [N, K, D], 1 at argmax_k r_kd
        rest = 1.0 - top  # [N, K, D]
        others_big = (big * rest).sum(-2, keepdim=True)  # [N, 1, D], sum_{j != top} A_j
        others_resp = (resp * rest).sum(-2, keepdim=True)  # [N, 1, D], 1 - r_top
        at_top = resp * others_big - others_resp * big  # [N, K, D], used at the top component
        elsewhere = resp * (others_big + (big * top).sum(-2, keepdim=True)) - big  # [N, K, D]
        bracket = _select(top, at_top, elsewhere)  # [N, K, D]
        grad_loc = g.unsqueeze(-2) * resp + bracket  # [N, K, D]
        # dL/dsigma = u r z - R (z^2 - 1) / sigma = z dL/dmu + R / sigma
        grad_scale = z * grad_loc + running / scale  # [N, K, D]
        grad_loc = grad_loc.reshape(*lead, k, d)  # [*L, K, D]
        grad_scale = grad_scale.reshape(*lead, k, d)  # [*L, K, D]
    return grad_logits.reshape(*lead, k), grad_loc, grad_scale, z.reshape(*lead, k, d)


def _component_mask(component: Tensor, k: int, dtype: torch.dtype) -> Tensor:
    """One-hot ``[..., K, 1]`` of the sampled component (a comparison, so that vmap can batch it)."""
    return (component.unsqueeze(-1) == torch.arange(k, device=component.device)).to(dtype).unsqueeze(-1)


def implicit_jvp_structured(
    logits: Tensor,
    loc: Tensor,
    scale: Tensor,
    x: Tensor,
    tangents: tuple[Tensor | None, Tensor | None, Tensor | None],
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tensor:
    """dx/dtheta t for the implicit gradient (forward mode), the transpose of ``implicit_grad_structured``.

    With rho_d = -(dT_d/dtheta t) / f_d = -sum_k c~_kd psi_kd + sum_k r_kd (t_mu_kd + z_kd t_sigma_kd),
    psi_kd = t_a_k + sum_{h<d} (z_kh t_mu_kh + (z_kh^2 - 1) t_sigma_kh) / sigma_kh (the tangent of the
    log-weight), the tangent xdot solves J xdot = f rho, a forward substitution with the same rank-K
    structure (``_solve_forward``). Returns ``[*L, D]``.
    """
    batch_shape, k, d = _check_shapes(logits, loc, scale)
    lead = _broadcast_shapes(batch_shape, x.shape[:-1])
    t_a, t_mu, t_sigma = (
        torch.zeros_like(p) if t is None else t for t, p in zip(tangents, (logits, loc, scale))
    )
    logits, t_a = (t.expand(*lead, k).reshape(-1, k) for t in (logits, t_a))  # [N, K] x2
    loc, scale, t_mu, t_sigma = (
        t.expand(*lead, k, d).reshape(-1, k, d) for t in (loc, scale, t_mu, t_sigma)
    )  # [N, K, D] x4
    x = x.expand(*lead, d).reshape(-1, d)  # [N, D]
    z, log_n, log_w = _log_weights(logits, loc, scale, x)  # [N, K, D] x3
    log_q = log_w + log_n  # [N, K, D]
    log_f = _logsumexp(log_q, -2)  # [N, 1, D]
    resp = _exp(log_q - log_f)  # [N, K, D]
    rho = (resp * (t_mu + z * t_sigma)).sum(-2)  # [N, D], direct term through Phi_kd
    if k > 1:
        ctil = _ctil(z, loc, scale, log_w, log_f)  # [N, K, D]
        d_log_n = (z * t_mu + (z.square() - 1.0) * t_sigma) / scale  # [N, K, D]
        psi = t_a.unsqueeze(-1) + _exclusive_cumsum(d_log_n)  # [N, K, D]
        rho = rho - (ctil * psi).sum(-2)  # [N, D]
        rho = _solve_forward(ctil, -z / scale, rho, block_size)  # [N, D]
    return rho.reshape(*lead, d)


_COMPILED_GRAD = None


def _compiled_grad():
    """``implicit_grad_structured`` through ``torch.compile`` (built on first use; one fused kernel for
    the elementwise passes; a compile per new shape, tens of seconds on a busy 2-core CPU)."""
    global _COMPILED_GRAD
    if _COMPILED_GRAD is None:
        _COMPILED_GRAD = torch.compile(implicit_grad_structured)
    return _COMPILED_GRAD


class _MixtureRsample(torch.autograd.Function):
    """Identity on a given sample x; backward is the implicit (or Graves') reparameterization gradient.

    New-style (``forward`` without ctx plus ``setup_context``) so that ``torch.func`` transforms apply:
    the backward is written in differentiable torch ops and reads the *output* x, so a second backward
    differentiates it, x's own dependence on theta included (double backward, ``torch.func.grad`` of
    a gradient); ``jvp`` gives forward mode (``torch.func.jvp``, ``jacfwd``); ``generate_vmap_rule``
    lets ``torch.func.vmap`` run forward, backward and jvp on batched tensors (every op in them has a
    batching rule; nothing reads tensor values into Python).
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        logits: Tensor,
        loc: Tensor,
        scale: Tensor,
        x: Tensor,
        component: Tensor | None,
        component_grad: str,
        block_size: int,
        compile_backward: bool,
    ) -> Tensor:
        return x.clone()  # [..., D]; a new tensor, so autograd can attach this node to it

    @staticmethod
    def setup_context(ctx: FunctionCtx, inputs: tuple, output: Tensor) -> None:
        logits, loc, scale, x, component, component_grad, block_size, compile_backward = inputs
        # the output, not the input x: its grad_fn is this node, so double backward sees dx/dtheta
        ctx.save_for_backward(logits, loc, scale, output, component)
        ctx.save_for_forward(logits, loc, scale, x, component)
        ctx.component_grad = component_grad
        ctx.block_size = block_size
        ctx.compile_backward = compile_backward

    @staticmethod
    def backward(ctx: FunctionCtx, grad_x: Tensor) -> tuple[Tensor | None, ...]:
        logits, loc, scale, x, component = ctx.saved_tensors
        graves = ctx.component_grad == "graves"
        need_loc = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        grad_fn = implicit_grad_structured
        # the compiled kernel serves first-order backward outside torch.func transforms only: a graph for
        # double backward, or batched tensors under vmap, take the eager ops (the same function)
        if ctx.compile_backward and not torch.is_grad_enabled() and not _functorch_active():
            grad_fn = _compiled_grad()
        grad_logits, grad_loc, grad_scale, z = grad_fn(
            logits, loc, scale, x, grad_x, ctx.block_size, need_components=need_loc and not graves
        )  # [*L, K], [*L, K, D] x3
        if graves and need_loc:
            # ordinary reparameterization x = mu_k + sigma_k eps of the sampled component only
            onehot = _component_mask(component, loc.shape[-2], grad_x.dtype)  # [*L, K, 1]
            grad_loc = onehot * grad_x.unsqueeze(-2)  # [*L, K, D]
            grad_scale = grad_loc * z  # [*L, K, D]; z of the sampled component is its eps
        return (
            grad_logits.sum_to_size(logits.shape) if ctx.needs_input_grad[0] else None,  # [..., K]
            grad_loc.sum_to_size(loc.shape) if ctx.needs_input_grad[1] else None,  # [..., K, D]
            grad_scale.sum_to_size(scale.shape) if ctx.needs_input_grad[2] else None,  # [..., K, D]
            None,
            None,
            None,
            None,
            None,
        )

    @staticmethod
    def jvp(ctx: FunctionCtx, t_logits, t_loc, t_scale, t_x, t_component, _cg, _bs, _cb) -> Tensor:
        logits, loc, scale, x, component = ctx.saved_tensors
        if ctx.component_grad != "graves":
            return implicit_jvp_structured(logits, loc, scale, x, (t_logits, t_loc, t_scale), ctx.block_size)
        out = implicit_jvp_structured(logits, loc, scale, x, (t_logits, None, None), ctx.block_size)
        if t_loc is not None or t_scale is not None:
            onehot = _component_mask(component, loc.shape[-2], x.dtype)  # [*L, K, 1]
            z = (x.unsqueeze(-2) - loc) / scale  # [*L, K, D]
            comp_t = (0.0 if t_loc is None else t_loc) + (0.0 if t_scale is None else z * t_scale)
            out = out + (onehot * comp_t).sum(-2)  # [*L, D]
        return out


# torch's Function.apply binds the arguments of a new-style forward to its signature on every call
# (torch.autograd.function._bind_default_args), and inspect.signature rebuilds it each time: 41 -> 15 us per
# call with it cached (measured on this 2-core CPU, loaded), of a 0.3-0.5 ms rsample + backward at K, D <= 2.
# inspect returns a function's __signature__ when it has one: computed once here.
_MixtureRsample.forward.__signature__ = inspect.signature(_MixtureRsample.forward)


def reparameterize(
    logits: Tensor,
    loc: Tensor,
    scale: Tensor,
    x: Tensor,
    component: Tensor | None = None,
    component_grad: str = "implicit",
    block_size: int = DEFAULT_BLOCK_SIZE,
    compile_backward: bool = False,
) -> Tensor:
    """Return x (a sample drawn without gradient) with the reparameterization gradient attached.

    logits ``[..., K]``, loc/scale ``[..., K, D]``, x ``[..., D]`` broadcasting against them; ``component``
    ``[...]`` (the index each x was drawn from) is needed for ``component_grad="graves"`` only.
    """
    _check_component_grad(component_grad)
    _check_shapes(logits, loc, scale)
    if component_grad == "graves" and component is None:
        raise ValueError('component_grad="graves" needs the sampled component indices')
    if block_size < 1:
        raise ValueError(f"block_size must be a positive integer, got {block_size}")
    return _MixtureRsample.apply(
        logits, loc, scale, x.detach(), component, component_grad, block_size, compile_backward
    )


def implicit_grad_dense_reference(
    logits: Tensor, loc: Tensor, scale: Tensor, x: Tensor, grad_x: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Dense reference for tests and benchmarks: -(J^{-T} g)^T dT/dtheta with J from autograd.

    Builds every sample's D x D Jacobian of T with ``torch.autograd.functional.jacobian``, solves
    J^T v = g with ``torch.linalg.solve_triangular`` and backpropagates -v through T. O(D^2 K) per sample
    and O(D^2) memory. Returns gradients shaped like logits, loc and scale.
    """
    _, k, d = _check_shapes(logits, loc, scale)
    params = [p.detach().requires_grad_(True) for p in (logits, loc, scale)]
    x = x.detach()
    lead = _broadcast_shapes(logits.shape[:-1], loc.shape[:-2], scale.shape[:-2], x.shape[:-1])
    x = x.expand(*lead, d)  # [*L, D]
    with torch.no_grad():
        frozen = [p.detach() for p in params]

        def summed_transform(xx: Tensor) -> Tensor:
            # T of different samples do not interact, so the Jacobian of the sum holds every block
            return mixture_cdf_transform(*frozen, xx).reshape(-1, d).sum(0)  # [D]

    with torch.enable_grad():
        jac = torch.autograd.functional.jacobian(summed_transform, x, vectorize=True)  # [D, *L, D]
    jac = jac.reshape(d, -1, d).transpose(0, 1)  # [N, D, D], jac[n, i, j] = dT_ni / dx_nj
    g = grad_x.expand(*lead, d).reshape(-1, d, 1)  # [N, D, 1]
    v = torch.linalg.solve_triangular(jac.transpose(1, 2), g, upper=True)  # [N, D, 1]
    with torch.enable_grad():
        t = mixture_cdf_transform(*params, x)  # [*L, D]
        grads = torch.autograd.grad(t, params, grad_outputs=-v.reshape(*lead, d))
    return grads[0], grads[1], grads[2]


class DiagNormalMixture(Distribution):
    """Mixture of K diagonal Gaussians in D dimensions with reparameterized sampling.

    logits ``[..., K]``, loc and scale ``[..., K, D]``; batch shape ``...`` (broadcast), event shape
    ``(D,)``. ``component_grad`` chooses how loc and scale get gradient (``"implicit"``: through T;
    ``"graves"``: reparameterization of the sampled component); logits always go through T.
    On CPU the first-order backward runs the fused C kernel of ``estimators/native.py`` where it could be
    built (see the module docstring). ``compile_backward=True`` runs it through ``torch.compile`` instead
    (measured 1.7-2.1x faster than the torch operations at D >= 16 on CPU, after a compile of 7-50 s per new
    shape; ``bench/bench_mixture.py``; on CUDA the choice between the two is unmeasured); double backward
    and second derivatives through ``torch.func`` use the differentiable torch operations.
    """

    arg_constraints = {
        "logits": constraints.real_vector,
        "loc": constraints.independent(constraints.real, 2),
        "scale": constraints.independent(constraints.positive, 2),
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        logits: Tensor,
        loc: Tensor,
        scale: Tensor,
        validate_args: bool | None = None,
        *,
        component_grad: str = "implicit",
        block_size: int = DEFAULT_BLOCK_SIZE,
        compile_backward: bool = False,
    ) -> None:
        _check_component_grad(component_grad)
        if block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size}")
        batch_shape, k, d = _check_shapes(logits, loc, scale)
        self.logits = logits.expand(*batch_shape, k)  # [..., K]
        self.loc = loc.expand(*batch_shape, k, d)  # [..., K, D]
        self.scale = scale.expand(*batch_shape, k, d)  # [..., K, D]
        self.component_grad = component_grad
        self.block_size = block_size
        self.compile_backward = compile_backward
        super().__init__(batch_shape, torch.Size((d,)), validate_args=validate_args)

    @classmethod
    def from_mixture_same_family(
        cls, msf: MixtureSameFamily, validate_args: bool | None = None, **kwargs: object
    ) -> DiagNormalMixture:
        """From ``MixtureSameFamily(Categorical(logits), Independent(Normal(loc, scale), 1))``."""
        comp = msf.component_distribution
        if not (
            isinstance(comp, Independent)
            and isinstance(comp.base_dist, Normal)
            and comp.reinterpreted_batch_ndims == 1
        ):
            raise ValueError(
                "expected MixtureSameFamily(Categorical, Independent(Normal(loc, scale), 1)); "
                f"got component distribution {comp!r}"
            )
        logits = msf.mixture_distribution.logits  # [..., K]
        return cls(logits, comp.base_dist.loc, comp.base_dist.scale, validate_args, **kwargs)

    def to_mixture_same_family(self) -> MixtureSameFamily:
        """The same mixture as torch's ``MixtureSameFamily`` (no rsample there)."""
        return MixtureSameFamily(
            Categorical(logits=self.logits), Independent(Normal(self.loc, self.scale), 1)
        )

    @property
    def num_components(self) -> int:
        return self.loc.shape[-2]

    def expand(self, batch_shape: Sequence[int], _instance: DiagNormalMixture | None = None):
        new = self._get_checked_instance(DiagNormalMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        k, d = self.loc.shape[-2:]
        new.logits = self.logits.expand(batch_shape + (k,))  # [*batch_shape, K]
        new.loc = self.loc.expand(batch_shape + (k, d))  # [*batch_shape, K, D]
        new.scale = self.scale.expand(batch_shape + (k, d))  # [*batch_shape, K, D]
        new.component_grad = self.component_grad
        new.block_size = self.block_size
        new.compile_backward = self.compile_backward
        super(DiagNormalMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    @property
    def mixture_probs(self) -> Tensor:
        return torch.softmax(self.logits, dim=-1)  # [..., K]

    @property
    def mean(self) -> Tensor:
        return (self.mixture_probs.unsqueeze(-1) * self.loc).sum(-2)  # [..., D]

    @property
    def variance(self) -> Tensor:
        # sum_k pi_k (sigma^2 + mu^2) - mean^2, written around the mean so nothing cancels
        probs = self.mixture_probs.unsqueeze(-1)  # [..., K, 1]
        centred = self.loc - self.mean.unsqueeze(-2)  # [..., K, D]
        return (probs * (self.scale.square() + centred.square())).sum(-2)  # [..., D]

    def _draw(self, sample_shape: torch.Size) -> tuple[Tensor, Tensor, Tensor]:
        """Exact sample without gradient: k ~ Categorical(pi), x = mu_k + sigma_k eps; returns x, k and eps."""
        shape = self._extended_shape(sample_shape)  # [*S, *B, D]
        k, d = self.loc.shape[-2:]
        with torch.no_grad():
            if k == 1:  # one component: no index to draw (the draw is then one randn, as Normal's)
                eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)  # [*S, *B, D]
                component = torch.zeros(shape[:-1], dtype=torch.long, device=self.loc.device)  # [*S, *B]
                return self.loc[..., 0, :] + self.scale[..., 0, :] * eps, component, eps
            # Gumbel-max (argmax of logits + Gumbel noise is an exact categorical draw): Categorical's
            # logit normalisation costs ~0.2 ms even for tiny batches (torch's logsumexp kernel)
            u = torch.rand(
                *sample_shape, *self.logits.shape, dtype=self.logits.dtype, device=self.logits.device
            )
            component = (self.logits - (-u.log()).log()).argmax(-1)  # [*S, *B]
            index = component[..., None, None].expand(*component.shape, 1, d)  # [*S, *B, 1, D]
            loc = self.loc.expand(*sample_shape, *self.loc.shape)  # [*S, *B, K, D]
            scale = self.scale.expand(*sample_shape, *self.scale.shape)  # [*S, *B, K, D]
            eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)  # [*S, *B, D]
            x = loc.gather(-2, index).squeeze(-2) + scale.gather(-2, index).squeeze(-2) * eps  # [*S, *B, D]
        return x, component, eps

    def rsample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        x, component, eps = self._draw(torch.Size(sample_shape))  # [*S, *B, D], [*S, *B], [*S, *B, D]
        if self.loc.shape[-2] == 1:
            # One component: both gradient modes reduce to the ordinary reparameterization x = mu + sigma eps
            # (implicit_grad_structured's K = 1 branch), here in plain autograd operations: the same value as
            # x above, the same draws, and 1.7-1.9x faster than the custom Function at B = 256, D <= 16
            # (measured on this CPU). The logits stay in the graph with an exactly zero gradient, as for K > 1
            # (nan_to_num: a non-finite logit of a one-component mixture leaves x finite, as the draw does).
            zero = 0.0 * self.logits.nan_to_num(0.0, 0.0, 0.0)  # [..., 1]
            return self.loc[..., 0, :] + self.scale[..., 0, :] * eps + zero  # [*S, *B, D]
        return _MixtureRsample.apply(
            self.logits,
            self.loc,
            self.scale,
            x,
            component,
            self.component_grad,
            self.block_size,
            self.compile_backward,
        )  # [*S, *B, D]

    def sample(self, sample_shape: Sequence[int] = torch.Size()) -> Tensor:
        return self._draw(torch.Size(sample_shape))[0]  # [*S, *B, D]

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        z = (value.unsqueeze(-2) - self.loc) / self.scale  # [..., K, D]
        log_n = (-0.5 * z.square() - self.scale.log() - _HALF_LOG_2PI).sum(-1)  # [..., K]
        return (torch.log_softmax(self.logits, dim=-1) + log_n).logsumexp(-1)  # [...]

    def cdf(self, value: Tensor) -> Tensor:
        """Joint CDF P(X <= value) = sum_k pi_k prod_d Phi(z_kd) (closed form), in log space."""
        if self._validate_args:
            self._validate_sample(value)
        z = (value.unsqueeze(-2) - self.loc) / self.scale  # [..., K, D]
        log_cdf = torch.special.log_ndtr(z).sum(-1)  # [..., K]
        return (torch.log_softmax(self.logits, dim=-1) + log_cdf).logsumexp(-1).exp()  # [...]

    def icdf(self, value: Tensor) -> Tensor:
        """Quantile of a one-dimensional mixture (D = 1): x with F(x) = value, ``[..., 1]`` -> ``[..., 1]``.

        Bisection on a bracket 50 scales around every component, then Newton steps
        (``mixture_quantile``). Differentiable: to the parameters by the implicit gradient
        dx/dtheta = -(dF/dtheta) / f (exact for D = 1), to ``value`` by 1 / f(x). For D > 1 the quantile
        of a joint distribution is not defined; ``cdf_transform``'s inverse is ``mixture_quantile``.
        """
        if self.event_shape[0] != 1:
            raise NotImplementedError(
                f"icdf needs a one-dimensional mixture (D = 1), got D = {self.event_shape[0]}; the inverse "
                "of the coordinate-wise transform T is mixture_quantile"
            )
        x = mixture_quantile(self.logits, self.loc, self.scale, value.detach())  # [..., 1]
        x = reparameterize(self.logits, self.loc, self.scale, x, block_size=self.block_size)  # [..., 1]
        if value.requires_grad:
            density = self.log_prob(x.detach()).exp().unsqueeze(-1)  # [..., 1], f(x) > 0
            # zero in value, 1 / f(x) in gradient: dx/du of F(x) = u
            x = x + (value - value.detach()) / density  # [..., 1]
        return x

    @property
    def mode(self) -> Tensor:
        """The highest mode found by mean-shift from every component mean (numerical, ``[..., D]``).

        A mixture of Gaussians has no closed-form mode. Gaussian mean-shift, x <- sum_k r_k(x) mu_k /
        sigma_k^2 / sum_k r_k(x) / sigma_k^2 per coordinate (r: responsibilities), is an EM algorithm
        and increases the density monotonically (Carreira-Perpinan 2007, "Gaussian mean-shift is an EM
        algorithm"); it runs from each of the K means for ``_MODE_ITERS`` steps and the start with the
        highest density wins. Every mode reached this way is a local maximum; that it is the global one
        is not guaranteed (in D >= 2 a mixture can have modes that no mean's basin leads to), which is
        why this is documented as numerical. No gradient (a mode of a mixture moves discontinuously).
        """
        with torch.no_grad():
            x = self.loc  # [..., K, D]: one start per component mean
            loc = self.loc.unsqueeze(-3)  # [..., 1, K, D]
            prec = self.scale.square().reciprocal().unsqueeze(-3)  # [..., 1, K, D]
            log_pi = torch.log_softmax(self.logits, dim=-1).unsqueeze(-2)  # [..., 1, K]
            for _ in range(_MODE_ITERS):
                z = (x.unsqueeze(-2) - loc) * prec.sqrt()  # [..., S, K, D], S = K starts
                log_r = log_pi + (-0.5 * z.square() + 0.5 * prec.log()).sum(-1)  # [..., S, K]
                r = torch.softmax(log_r, dim=-1).unsqueeze(-1)  # [..., S, K, 1]
                x = (r * prec * loc).sum(-2) / (r * prec).sum(-2)  # [..., S, D]
            best = self.log_prob(x.movedim(-2, 0)).movedim(0, -1).argmax(-1)  # [...]
            index = best[..., None, None].expand(*best.shape, 1, x.shape[-1])  # [..., 1, D]
            return x.gather(-2, index).squeeze(-2)  # [..., D]

    def entropy(self) -> Tensor:
        raise NotImplementedError(
            "the entropy of a Gaussian mixture has no closed form; estimate it as -log_prob(x).mean() over "
            "x = rsample((n,)) (unbiased, differentiable), or bound it (e.g. Huber et al. 2008)"
        )

    def cdf_transform(self, value: Tensor) -> Tensor:
        """T(x) = (F_1(x_1), F_2(x_2 | x_1), ..., F_D(x_D | x_<D)); uniform on [0, 1]^D for x ~ self."""
        return mixture_cdf_transform(self.logits, self.loc, self.scale, value)  # [..., D]
