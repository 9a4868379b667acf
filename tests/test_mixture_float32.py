"""float32 digits of the implicit mixture gradient (``estimators.mixture_dist``), against float64 and mpmath.

The float32 gradient is compared with the float64 gradient of the *same* inputs (the float32 parameters,
sample and upstream gradient, cast up). How much any float32 computation can be trusted is limited by the
gradient's own sensitivity to rounding its inputs, so the bound is stated against that:

    well-conditioned element i:   kappa_i = spread_i / (eps32 |g64_i|) <= KAPPA_MAX,
    spread_i = max over P draws of |g64(theta (1 + eps32 U)) - g64(theta)|_i,   U ~ Uniform[-1, 1]^n,

i.e. the float64 gradient moves by at most KAPPA_MAX float32 epsilons (relative) when every input (logits,
loc, scale, x) is perturbed by one float32 rounding. The assertion, for every element, is

    |g32_i - g64_i| <= C (spread_i + eps32 |g64_i|) + FLOOR max_j |g64_j| + tiny32   (j: same sample),

so on well-conditioned elements the relative error is at most C (KAPPA_MAX + 1) eps32. FLOOR (1e-20 of the
sample's largest gradient) and tiny32 (float32's smallest normal number, 1.2e-38) only excuse
contributions that underflow float32 (weights below e^-87).
Deterministic: fixed seeds, no sampling statistics.
"""

from __future__ import annotations

import pytest
import torch

from estimators import native as native_kernel
from estimators.mixture_dist import (
    DiagNormalMixture,
    _log_normal_interval,
    implicit_grad_structured,
)

mp = pytest.importorskip("mpmath")  # a dependency of torch (through sympy)

EPS32 = torch.finfo(torch.float32).eps
C = 64.0  # measured maximum of the ratio over the fuzz below: 33 (K = 10, D = 16)
FLOOR = 1e-20
KAPPA_MAX = 100.0
TINY32 = torch.finfo(torch.float32).tiny  # below it float32 has no normal numbers


@pytest.fixture(params=["torch", "native"])
def native(request) -> bool:
    """Both implementations of the backward: the torch operations and the fused C kernel (computing in
    float64 whatever the input dtype; skipped only where no C compiler exists: tests/test_mixture_native.py
    fails if a compiler exists and the build does not)."""
    if request.param == "native":
        if not native_kernel.available():
            pytest.skip("the native mixture backward is unavailable here (no C compiler)")
        return True
    return False


def grads(params, x, g, native=False):
    return implicit_grad_structured(*params, x, g, native=native)[:3]


def perturbation_spread(params64, x64, g64, want, n_perturb=4, seed=0):
    """Largest change of the float64 gradient over ``n_perturb`` eps32-relative input perturbations."""
    gen = torch.Generator().manual_seed(seed)
    spread = [torch.zeros_like(w) for w in want]
    for _ in range(n_perturb):
        moved = [
            t * (1.0 + EPS32 * (2.0 * torch.rand(t.shape, generator=gen, dtype=torch.float64) - 1.0))
            for t in (*params64, x64)
        ]
        alt = grads(moved[:3], moved[3], g64)
        spread = [torch.maximum(s, (a - w).abs()) for s, a, w in zip(spread, alt, want)]
    return spread


def check_float32(params32, x32, g32, batch_dims=1, native=False):
    """Assert the bound of the module docstring; return the relative errors on well-conditioned elements.
    The float64 reference is always the torch implementation (checked against mpmath below)."""
    got = grads(params32, x32, g32, native)
    params64 = [p.double() for p in params32]
    x64, g64 = x32.double(), g32.double()
    want = grads(params64, x64, g64)
    spread = perturbation_spread(params64, x64, g64, want)
    rel_errors = []
    for name, a, w, s in zip(("logits", "loc", "scale"), got, want, spread):
        assert torch.isfinite(a).all() and torch.isfinite(w).all(), name
        a = a.double()
        flat = w.reshape(*w.shape[:batch_dims], -1)
        row_max = flat.abs().amax(-1).reshape(*w.shape[:batch_dims], *[1] * (w.dim() - batch_dims))
        allowed = C * (s + EPS32 * w.abs()) + FLOOR * row_max + TINY32
        ratio = (a - w).abs() / allowed
        assert ratio.max() <= 1.0, f"{name}: error {ratio.max().item():.3g} x the allowed bound"
        kappa = s / (EPS32 * w.abs())
        good = (kappa <= KAPPA_MAX) & (w.abs() > FLOOR * row_max) & (w.abs() > TINY32)
        rel_errors.append(((a - w).abs() / w.abs())[good])
    return rel_errors


# ---------------------------------------------------------------------------------------------------
# the regimes of issue 10


def regime(name: str, n: int = 400, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    if name == "mixed_scales":  # scales 1e-6 .. 1e6 in one mixture
        logits = torch.zeros(5)  # [K]
        scale = torch.tensor([1e-6, 1e-3, 1.0, 1e3, 1e6]).unsqueeze(-1).expand(5, 3)  # [K, D]
        loc = torch.randn(5, 3, generator=gen)  # [K, D]
    elif name == "dominant":  # one component holds all but e^-12 .. e^-16 of the weight
        logits = torch.tensor([0.0, -12.0, -14.0, -16.0])  # [K]
        loc = torch.randn(4, 3, generator=gen)  # [K, D]
        scale = 0.5 + torch.rand(4, 3, generator=gen)  # [K, D]
    elif name == "overlap_1e6":  # two components at scale 1e6 with O(1) locations
        logits = torch.tensor([0.0, 0.3])  # [K]
        loc = torch.randn(2, 3, generator=gen)  # [K, D]
        scale = torch.full((2, 3), 1e6)  # [K, D]
    elif name == "overlap_1e6_unequal":
        logits = torch.tensor([0.0, 0.3])  # [K]
        loc = torch.randn(2, 3, generator=gen)  # [K, D]
        scale = 1e6 * (1.0 + 0.1 * torch.rand(2, 3, generator=gen))  # [K, D]
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    x = DiagNormalMixture(logits, loc, scale).sample((n,))  # [N, D]
    g = torch.randn(x.shape, generator=gen)  # [N, D]
    return (logits, loc, scale), x, g


REGIMES = ["mixed_scales", "dominant", "overlap_1e6", "overlap_1e6_unequal"]


@pytest.mark.parametrize("name", REGIMES)
def test_float32_regimes_of_issue(name, native):
    params, x, g = regime(name)
    for r in check_float32(params, x, g, native=native):
        assert (r <= C * (KAPPA_MAX + 1) * EPS32).all()
    # Overlapping components at scale 1e6 are ill-conditioned in the sense above (a relative change of
    # eps32 in one scale moves z_k - z_r by eps32 * 1e6 / 1e6 * |z|, comparable to the O(1e-6) gap), yet
    # exactly representable inputs give an accurate gradient: each sample's gradient, normwise, to 1e-3
    # (before the fix the logits gradient there was off by up to 28x, measured).
    got = grads(params, x, g, native)
    want = grads([p.double() for p in params], x.double(), g.double())
    for a, w in zip(got, want):
        err = (a.double() - w).reshape(w.shape[0], -1).norm(dim=-1)  # [N]
        assert (err <= 1e-3 * w.reshape(w.shape[0], -1).norm(dim=-1) + 1e-300).all()
    # the logits gradient of every sample sums to zero (a shift of all logits changes nothing); measured
    # max |sum| / sum |.| after the fix 2.2e-4 (overlap_1e6_unequal), before it 0.51 (dominant), 1.0 (overlap)
    assert (got[0].sum(-1).abs() <= 1e-3 * got[0].abs().sum(-1)).all()


def fuzz_params(gen: torch.Generator, k: int, d: int, n: int):
    """Extreme but representable: logits ~ N(0, 8^2) (weights down to e^-60), scales 10^U(-6, 6) per
    coordinate, locations up to 1e6 but within 1e5 scales of zero (so that a float32 sample still
    resolves its component: beyond 1/eps32 scales x = mu + sigma eps rounds to mu)."""
    logits = 8.0 * torch.randn(n, k, generator=gen, dtype=torch.float64)  # [N, K]
    scale = 10.0 ** (12.0 * torch.rand(n, k, d, generator=gen, dtype=torch.float64) - 6.0)  # [N, K, D]
    size = 10.0 ** (12.0 * torch.rand(n, k, 1, generator=gen, dtype=torch.float64) - 6.0)  # [N, K, 1]
    loc = torch.randn(n, k, d, generator=gen, dtype=torch.float64) * torch.minimum(size, 1e5 * scale)
    return [t.float() for t in (logits, loc, scale)]


@pytest.mark.parametrize("k,d", [(2, 1), (2, 3), (3, 2), (5, 4), (4, 8), (10, 16)])
def test_float32_fuzz_extreme_parameters(k, d, native):
    gen = torch.Generator().manual_seed(100 * k + d)
    params = fuzz_params(gen, k, d, 1000)
    torch.manual_seed(k + d)
    x = DiagNormalMixture(*params).sample()  # [N, D]
    g = torch.randn(x.shape, generator=gen)  # [N, D]
    rel = check_float32(params, x, g, native=native)
    for r in rel:
        assert (r <= C * (KAPPA_MAX + 1) * EPS32).all()


# ---------------------------------------------------------------------------------------------------
# float64 against 50-digit arithmetic


def mp_gradient(logits, loc, scale, x, g, dps: int = 50):
    """The implicit gradient of one sample written out in mpmath: dense J, J^T v = g, -v^T dT/dtheta."""
    with mp.workdps(dps):
        k, d = loc.shape
        a = [mp.mpf(float(v)) for v in logits]
        mu = [[mp.mpf(float(loc[i, j])) for j in range(d)] for i in range(k)]
        sg = [[mp.mpf(float(scale[i, j])) for j in range(d)] for i in range(k)]
        xs, gs = [mp.mpf(float(v)) for v in x], [mp.mpf(float(v)) for v in g]
        z = [[(xs[j] - mu[i][j]) / sg[i][j] for j in range(d)] for i in range(k)]
        log_n = [
            [-(z[i][j] ** 2) / 2 - mp.log(sg[i][j] * mp.sqrt(2 * mp.pi)) for j in range(d)] for i in range(k)
        ]
        w, gap, f = [], [], []  # w_kd, Phi_kd - F_d, f_d
        for j in range(d):
            lw = [a[i] + sum(log_n[i][h] for h in range(j)) for i in range(k)]
            top = max(lw)
            e = [mp.exp(v - top) for v in lw]
            w.append([v / sum(e) for v in e])
            phi = [mp.ncdf(z[i][j]) for i in range(k)]
            big_f = sum(w[j][i] * phi[i] for i in range(k))
            gap.append([phi[i] - big_f for i in range(k)])
            f.append(sum(w[j][i] * mp.exp(log_n[i][j]) for i in range(k)))
        jac = mp.zeros(d, d)
        for j in range(d):
            jac[j, j] = f[j]
            for h in range(j):
                jac[j, h] = sum(w[j][i] * (-z[i][h] / sg[i][h]) * gap[j][i] for i in range(k))
        v = mp.lu_solve(jac.T, mp.matrix(gs))
        g_a = [-sum(v[j] * w[j][i] * gap[j][i] for j in range(d)) for i in range(k)]
        g_mu = [[0] * d for _ in range(k)]
        g_sg = [[0] * d for _ in range(k)]
        for i in range(k):
            for h in range(d):
                later = sum(v[j] * w[j][i] * gap[j][i] for j in range(h + 1, d))
                direct = v[h] * w[h][i] * mp.exp(log_n[i][h])
                g_mu[i][h] = direct - later * z[i][h] / sg[i][h]
                g_sg[i][h] = direct * z[i][h] - later * (z[i][h] ** 2 - 1) / sg[i][h]
        as_tensor = lambda rows: torch.tensor([[float(t) for t in r] for r in rows], dtype=torch.float64)  # noqa: E731
        return as_tensor([g_a])[0], as_tensor(g_mu), as_tensor(g_sg)


@pytest.mark.parametrize("name", REGIMES)
def test_float64_matches_mpmath(name, native):
    params, x, g = regime(name, n=6)
    params64 = [p.double() for p in params]
    got = grads(params64, x.double(), g.double(), native)
    for i in range(x.shape[0]):
        want = mp_gradient(*params64, x[i].double(), g[i].double())
        for a, b in zip(got, want):
            a = a[i] if a.dim() > b.dim() else a
            assert (a - b).norm() <= 1e-12 * b.norm() + 1e-300


# ---------------------------------------------------------------------------------------------------
# the building block


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_interval_against_mpmath(dtype):
    # short and long intervals, both sides, far tails, tiny gaps next to huge z
    mids = [0.0, 0.3, -1.0, 2.5, -6.0, 12.0, -30.0, 1e3]
    gaps = [1e-9, 1e-6, 3e-4, 0.01, 0.1, 0.7, 3.0, 25.0]
    rows = []
    for m in mids:
        for gap in gaps:
            rows.append((m - gap / 2, m + gap / 2))
    z_a = torch.tensor([r[0] for r in rows], dtype=dtype)  # [P]
    z_b = torch.tensor([r[1] for r in rows], dtype=dtype)  # [P]
    z_b = torch.where(z_b == z_a, torch.nextafter(z_a, z_a + 1), z_b)  # [P], a gap below eps |z|
    dz = (z_b.double() - z_a.double()).to(dtype)  # [P], the gap (its cast is the only rounding)
    got = _log_normal_interval(z_a, z_b, dz).double()  # [P]
    eps = torch.finfo(dtype).eps
    with mp.workdps(60):
        for i, (a, b) in enumerate(zip(z_a.tolist(), z_b.tolist())):
            want = mp.log(mp.ncdf(mp.mpf(b)) - mp.ncdf(mp.mpf(a)))
            if mp.isinf(want):
                continue
            # log-space error; the z^2 / 2 term carries eps |z|^2 of input rounding in any method
            tol = 64 * eps * (1.0 + abs(a) ** 2 + abs(float(want)))
            assert abs(got[i].item() - float(want)) <= tol, (a, dz[i].item(), got[i].item(), float(want))


@pytest.mark.parametrize("x0", [-25.0, -14.0, 30.0])
def test_float32_far_tail_of_every_component(x0, native):
    # x 14 to 33 scales from both components: every Phi and every gap underflows float32 (gaps ~ e^-400);
    # the e^{-M} scaling keeps the digits (a reference stand-in above the true gaps would zero them)
    logits = torch.tensor([0.0, 0.0])  # [K]
    loc = torch.tensor([[0.0, 0.0], [3.0, -1.0]])  # [K, D]
    scale = torch.ones(2, 2)  # [K, D]
    x = torch.tensor([[x0, 0.5], [x0, x0]])  # [N, D]
    g = torch.tensor([[1.0, -0.5], [0.3, 1.0]])  # [N, D]
    got = grads((logits, loc, scale), x, g, native)
    want = grads((logits.double(), loc.double(), scale.double()), x.double(), g.double())
    for a, w in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-6 * w.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dense_interval_path_matches_subset_path(monkeypatch, dtype):
    # the masked all-elements path (torch.compile, torch.func, CUDA) against the per-branch subsets (eager CPU)
    import estimators.mixture_dist as mixture_dist

    gen = torch.Generator().manual_seed(7)
    params = [p.to(dtype) for p in fuzz_params(gen, 5, 4, 500)]
    torch.manual_seed(7)
    x = DiagNormalMixture(*params).sample()  # [N, D]
    g = torch.randn(x.shape, generator=gen, dtype=dtype)  # [N, D]
    subset = grads(params, x, g)
    monkeypatch.setattr(mixture_dist, "_functorch_active", lambda: True)
    dense = grads(params, x, g)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for a, b in zip(dense, subset):
        assert torch.isfinite(a).all()
        rows = b.reshape(b.shape[0], -1)  # [N, P]
        scale = rows.abs().amax(-1).reshape(-1, *[1] * (b.dim() - 1))  # [N, 1, ...]
        assert ((a - b).abs() <= tol * scale + TINY32).all()
