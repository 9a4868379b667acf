"""The fused C backward of ``DiagNormalMixture`` (``estimators/native.py``) against the torch implementation.

The torch implementation (``implicit_grad_structured(native=False)``) is itself tested against the dense
autograd Jacobian, gradcheck and 50-digit mpmath (tests/test_mixture_dist.py, test_mixture_float32.py, which
also run their float32 and mpmath checks on the native kernel). Here: the two agree in float64 on ordinary
and extreme parameters, every branch of the kernel is reached, the kernel is what a first-order backward
runs (and not what double backward or ``torch.func`` run), threads change nothing, and a machine without a
working compiler falls back to the torch path with one warning.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from estimators import native
from estimators.mixture_dist import DiagNormalMixture, implicit_grad_structured, reparameterize

needs_native = pytest.mark.skipif(
    native.compiler() is None, reason="no C compiler: the native backward cannot be built here"
)


def test_native_builds_where_a_compiler_exists():
    if native.compiler() is None:
        pytest.skip("no C compiler on this machine")
    assert native.build().exists()  # raises with the compiler's message if the build fails
    assert native.available()


def random_case(k, d, n, seed, dtype=torch.float64, shared_logits=False):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(k if shared_logits else (n, k), generator=gen, dtype=dtype)
    loc = 2.0 * torch.randn(n, k, d, generator=gen, dtype=dtype)
    scale = 0.2 + torch.rand(n, k, d, generator=gen, dtype=dtype)
    torch.manual_seed(seed)
    x = DiagNormalMixture(logits, loc, scale).sample()  # [N, D]
    g = torch.randn(n, d, generator=gen, dtype=dtype)
    return (logits, loc, scale), x, g


def extreme_case(k, d, n, seed):
    """Weights down to e^-60, scales 1e-6..1e6, locations up to 1e6 (as tests/test_mixture_float32.py's
    fuzz): the series, far-tail and flushed-weight branches all occur (test_extreme_case_reaches_every_branch)."""
    gen = torch.Generator().manual_seed(seed)
    logits = 8.0 * torch.randn(n, k, generator=gen, dtype=torch.float64)
    scale = 10.0 ** (12.0 * torch.rand(n, k, d, generator=gen, dtype=torch.float64) - 6.0)
    size = 10.0 ** (12.0 * torch.rand(n, k, 1, generator=gen, dtype=torch.float64) - 6.0)
    loc = torch.randn(n, k, d, generator=gen, dtype=torch.float64) * torch.minimum(size, 1e5 * scale)
    torch.manual_seed(seed)
    x = DiagNormalMixture(logits, loc, scale).sample()  # [N, D]
    g = torch.randn(n, d, generator=gen, dtype=torch.float64)
    return (logits, loc, scale), x, g


def per_sample_rel(a, b):
    """max |a - b| / max |b| per sample (max norms: gradients here reach 1e300, where 2-norms overflow)."""
    a, b = a.reshape(a.shape[0], -1), b.reshape(b.shape[0], -1)
    return (a - b).abs().amax(-1) / b.abs().amax(-1).clamp(min=1e-300)


@needs_native
@pytest.mark.parametrize("k,d", [(2, 1), (2, 2), (3, 5), (10, 16), (5, 40), (50, 3)])
@pytest.mark.parametrize("shared_logits", [False, True])
def test_native_equals_torch_float64(k, d, shared_logits):
    params, x, g = random_case(k, d, 64, seed=10 * k + d, shared_logits=shared_logits)
    want = implicit_grad_structured(*params, x, g, native=False)
    got = implicit_grad_structured(*params, x, g, native=True)
    for a, w in zip(got, want):  # grad_logits, grad_loc, grad_scale, z
        assert a.shape == w.shape and a.dtype == w.dtype
        assert per_sample_rel(a, w).max() <= 1e-12
    # the logits-only call (Graves' mode) gives the same logits gradient and no component gradients
    only = implicit_grad_structured(*params, x, g, need_components=False, native=True)
    assert only[1] is None and only[2] is None
    assert per_sample_rel(only[0], want[0]).max() <= 1e-12


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_native_broadcasting_and_shared_parameters(dtype):
    # one mixture for all samples (read once by the kernel), per-sample parameters broadcast over a sample
    # dimension (copied), and a grad_x with more leading dimensions than x
    gen = torch.Generator().manual_seed(4)
    k, d = 3, 5
    logits, loc, scale = (
        torch.randn(k, dtype=dtype),
        torch.randn(k, d, dtype=dtype),
        torch.rand(k, d, dtype=dtype) + 0.3,
    )
    cases = []
    x = DiagNormalMixture(logits, loc, scale).sample((7,))  # [7, D]
    cases.append(((logits, loc, scale), x, torch.randn(7, d, generator=gen, dtype=dtype)))
    loc2 = torch.randn(2, 1, k, d, generator=gen, dtype=dtype)  # [2, 1, K, D]
    x2 = DiagNormalMixture(logits, loc2, scale).sample((1,)).squeeze(0).expand(2, 4, d)  # [2, 4, D]
    cases.append(((logits, loc2, scale), x2, torch.randn(2, 4, d, generator=gen, dtype=dtype)))
    cases.append(
        ((logits, loc, scale), x[0], torch.randn(6, d, generator=gen, dtype=dtype))
    )  # x [D], g [6, D]
    for params, xx, g in cases:
        want = implicit_grad_structured(*params, xx, g, native=False)
        got = implicit_grad_structured(*params, xx, g, native=True)
        for a, w in zip(got, want):
            assert a.shape == w.shape and a.dtype == w.dtype
            tol = 1e-12 if dtype == torch.float64 else 1e-5
            assert per_sample_rel(a, w).max() <= tol


@needs_native
@pytest.mark.parametrize("k,d", [(2, 3), (4, 8), (10, 16)])
def test_native_equals_torch_on_extreme_parameters(k, d):
    params, x, g = extreme_case(k, d, 2000, seed=k * 31 + d)
    want = implicit_grad_structured(*params, x, g, native=False)
    got = implicit_grad_structured(*params, x, g, native=True)
    for a, w in zip(got[:3], want[:3]):
        assert torch.isfinite(a).all()
        rel = per_sample_rel(a, w)
        # both are float64 computations of the same formulas in a different order: they agree to
        # rounding (measured: median 1e-17..1e-15, max 1e-13 over these cases)
        assert rel.median() <= 1e-14
        assert rel.max() <= 1e-11


def test_extreme_case_reaches_every_branch():
    # the case above must exercise the kernel's rare branches: short intervals (series), both ends beyond
    # the far-tail cut, weights flushed below e^-707 relative to the largest
    from estimators.mixture_dist import _log_weights

    params, x, _ = extreme_case(10, 16, 2000, seed=10 * 31 + 16)
    z, _, log_w = _log_weights(*params, x)
    ref = log_w.max(-2, keepdim=True).indices
    z_r = z.gather(-2, ref)
    dz = z - z_r
    delta, m = 0.5 * dz.abs(), z_r + 0.5 * dz
    assert ((delta > 0) & (delta * (m.abs() + 2.0) <= 0.05)).any()  # series
    assert ((torch.minimum(z.abs(), z_r.abs()) >= 36.0) & ((z > 0) == (z_r > 0)) & (delta > 0)).any()  # far
    assert (log_w < -707.0).any()  # flushed weights: the kernel's per-element factor path


def count_native_calls(monkeypatch):
    calls = []
    real = native.implicit_grad

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(native, "implicit_grad", counting)
    return calls


@needs_native
@pytest.mark.parametrize("component_grad", ["implicit", "graves"])
def test_first_order_backward_runs_the_kernel(monkeypatch, component_grad):
    calls = count_native_calls(monkeypatch)
    params, _, _ = random_case(4, 6, 32, seed=3, dtype=torch.float32)
    params = [p.requires_grad_() for p in params]

    def grad_of_rsample(enabled):
        previous = native.set_enabled(enabled)
        try:
            torch.manual_seed(0)
            x = DiagNormalMixture(*params, component_grad=component_grad).rsample()
            return torch.autograd.grad((x.square() * torch.linspace(0.5, 2.0, 6)).sum(), params)
        finally:
            native.set_enabled(previous)

    off = grad_of_rsample(False)
    assert not calls
    on = grad_of_rsample(True)
    assert len(calls) == 1
    for a, b in zip(on, off):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@needs_native
def test_double_backward_takes_the_torch_path(monkeypatch):
    calls = count_native_calls(monkeypatch)
    params, _, _ = random_case(3, 4, 8, seed=5)
    params = [p.requires_grad_() for p in params]
    torch.manual_seed(0)
    x = DiagNormalMixture(*params).rsample()
    (g_loc,) = torch.autograd.grad(x.square().sum(), [params[1]], create_graph=True)
    assert g_loc.requires_grad and not calls  # a graph for the second derivative: torch ops
    torch.autograd.grad(g_loc.sum(), params[2])

    def cost(loc):
        torch.manual_seed(0)
        return DiagNormalMixture(params[0].detach(), loc, params[2].detach()).rsample().square().sum()

    # torch.func.grad runs a first-order backward (no graph through it): the kernel may serve it
    got = torch.func.grad(cost)(params[1].detach())
    previous = native.set_enabled(False)
    try:
        want = torch.func.grad(cost)(params[1].detach())
    finally:
        native.set_enabled(previous)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    # ... while a second derivative through torch.func (hessian) takes the differentiable torch ops
    calls.clear()
    x0 = x.detach()[:1]

    def cost_at_fixed_sample(loc):  # no random draw inside the transform
        return reparameterize(params[0].detach()[:1], loc, params[2].detach()[:1], x0).square().sum()

    hess = torch.func.hessian(cost_at_fixed_sample)(params[1].detach()[:1])
    assert torch.isfinite(hess).all() and not calls


@needs_native
def test_threads_change_nothing(monkeypatch):
    params, x, g = random_case(5, 7, 257, seed=11)
    one = native.implicit_grad(*params, x, g, x.shape[:-1], True)
    monkeypatch.setattr(native, "MIN_WORK_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        many = native.implicit_grad(*params, x, g, x.shape[:-1], True)
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, many):
        assert torch.equal(a, b)  # samples are independent: bit for bit


def test_without_a_working_compiler_the_torch_path_runs(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setenv("GRADEST_CACHE", str(tmp_path))
    monkeypatch.setattr(native, "_tried", False)
    monkeypatch.setattr(native, "_lib", None)
    params, x, g = random_case(3, 4, 8, seed=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not native.available()
        assert not native.available()  # asked twice, built and reported once
    assert len([w for w in caught if "native CPU backward is unavailable" in str(w.message)]) == 1
    got = implicit_grad_structured(*params, x, g)  # auto: torch path
    want = implicit_grad_structured(*params, x, g, native=False)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="native=True"):
        implicit_grad_structured(*params, x, g, native=True)


def test_switched_off_by_set_enabled():
    previous = native.set_enabled(False)
    try:
        assert not native.available()
        params, x, g = random_case(2, 3, 4, seed=1)
        with pytest.raises(ValueError, match="GRADEST_NATIVE_MIXTURE"):
            implicit_grad_structured(*params, x, g, native=True)
    finally:
        native.set_enabled(previous)


def test_a_compiler_that_writes_no_library_leaves_nothing_in_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("CC", "true")  # exits 0 and writes nothing
    monkeypatch.setenv("GRADEST_CACHE", str(tmp_path))
    with pytest.raises(OSError):
        native.build()
    assert not list(tmp_path.iterdir())
