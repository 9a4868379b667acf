"""The mixture's fused CPU backward (``csrc/mixture_grad.c``), built on first use and called through ctypes.

``DiagNormalMixture.rsample``'s first-order backward on CPU spends its time in ~300 small tensor operations
(``implicit_grad_structured``): per-operation overhead at small K and D, ~100 passes over memory at large
ones. The C file does one sample's whole backward in one pass, in double precision, with the same formulas.
It is used when all of these hold, and the torch path (the same function, in tensor operations) runs
otherwise:

* CPU tensors of float32 or float64, K > 1;
* first-order backward outside ``torch.func`` transforms (double backward, ``vmap``, ``jvp`` need the
  differentiable torch ops);
* a C compiler (``$CC``, else ``cc`` / ``gcc``) built the library (once per source version and machine,
  cached under ``$GRADEST_CACHE`` or ``~/.cache/gradest``, a few seconds);
* it is not switched off: ``GRADEST_NATIVE_MIXTURE=0`` in the environment, or :func:`set_enabled`.

A build that fails is reported once (a warning naming the compiler's message) and the torch path is used:
nothing else changes. No torch headers and no Python extension ABI are involved, so the build takes a
second and does not depend on the installed torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

import torch
from torch import Tensor

SOURCE = Path(__file__).resolve().parent / "csrc" / "mixture_grad.c"
CFLAGS = ("-O2", "-shared", "-fPIC", "-std=c99", "-pthread")
# below this many K * D numbers in a call, threads cost more than they save (thread start ~20-50 us)
MIN_WORK_PER_THREAD = 32_768

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False
_enabled = os.environ.get("GRADEST_NATIVE_MIXTURE", "1").strip().lower() not in ("0", "false", "no", "off")


def set_enabled(enabled: bool) -> bool:
    """Switch the native backward on or off for this process; returns the previous setting."""
    global _enabled
    previous, _enabled = _enabled, bool(enabled)
    return previous


def enabled() -> bool:
    """Whether the native backward is switched on (it may still be unavailable: see :func:`available`)."""
    return _enabled


def compiler() -> str | None:
    """The C compiler used to build the kernel: ``$CC``, else ``cc`` or ``gcc`` on PATH; None if none."""
    cc = os.environ.get("CC")
    if cc:
        return cc
    return shutil.which("cc") or shutil.which("gcc")


def _cache_dir() -> Path:
    root = os.environ.get("GRADEST_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "gradest")
    return Path(root)


def _library_path(cc: str) -> Path:
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    key.update(" ".join((cc, *CFLAGS, platform.machine(), platform.system(), sys.platform)).encode())
    return _cache_dir() / f"mixture_grad-{key.hexdigest()[:16]}.so"


def build(cc: str | None = None) -> Path:
    """Compile the kernel (if its cached library is missing) and return the library's path.

    The library is written to a temporary file and renamed into place, so concurrent builds (test
    workers, the members of a parallel sweep) never load a half-written file. Raises RuntimeError with
    the compiler's message when the build fails.
    """
    cc = cc or compiler()
    if cc is None:
        raise RuntimeError("no C compiler found: set CC or install cc/gcc")
    path = _library_path(cc)
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [*cc.split(), *CFLAGS, "-o", tmp, str(SOURCE), "-lm"], capture_output=True, text=True
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{cc} failed to build {SOURCE.name}:\n{proc.stderr.strip()[-2000:]}")
        # a library that does not load or lacks the entry point never reaches the cache (a broken compiler
        # wrapper that exits 0 would otherwise leave a file every later process fails on)
        _ = ctypes.CDLL(tmp).mixture_implicit_grad
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def _load() -> ctypes.CDLL | None:
    """The loaded library, building it on first call; None (after one warning) when it cannot be had."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if _tried:
            return _lib
        try:
            lib = ctypes.CDLL(str(build()))
            fn = lib.mixture_implicit_grad
            fn.restype = ctypes.c_int
            ptr = ctypes.c_void_p
            i64, i32 = ctypes.c_int64, ctypes.c_int
            fn.argtypes = [i64, i32, i32, i32, ptr, i64, ptr, i64, ptr, i64, ptr, ptr, ctypes.c_double]
            fn.argtypes += [i32, ptr, ptr, ptr, i32]
            _lib = lib
        except (OSError, RuntimeError, subprocess.SubprocessError) as err:
            warnings.warn(
                f"DiagNormalMixture: the native CPU backward is unavailable ({err}); using the torch "
                "implementation (same results, slower). Set GRADEST_NATIVE_MIXTURE=0 to silence this.",
                RuntimeWarning,
                stacklevel=3,
            )
            _lib = None
        _tried = True
    return _lib


def available() -> bool:
    """Whether the kernel is switched on and built (builds it on first call)."""
    return _enabled and _load() is not None


def applies(*tensors: Tensor) -> bool:
    """Whether the native backward serves these tensors (CPU, float32/float64, switched on and built)."""
    if not _enabled:
        return False
    for t in tensors:
        if t.device.type != "cpu" or t.dtype not in (torch.float32, torch.float64):
            return False
    return _load() is not None


def _operand(t: Tensor, lead: torch.Size, event: tuple[int, ...], dtype: torch.dtype) -> tuple[Tensor, int]:
    """``t`` ``[..., *event]`` as a C-contiguous buffer and its per-sample stride: the tensor itself when it
    has the full leading shape or none (stride 0: one parameter set shared by every sample), else expanded
    and copied."""
    size = math.prod(event)
    if t.numel() == size:
        return t.detach().reshape(event).to(dtype).contiguous(), 0
    if t.shape[: t.dim() - len(event)] != lead:
        t = t.expand(*lead, *event)
    return t.detach().reshape(-1, *event).to(dtype).contiguous(), size


def implicit_grad(
    logits: Tensor,
    loc: Tensor,
    scale: Tensor,
    x: Tensor,
    grad_x: Tensor,
    lead: torch.Size,
    need_components: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """grad_logits ``[*L, K]`` and (when ``need_components``) grad_loc, grad_scale ``[*L, K, D]`` of g^T dx/dtheta.

    logits ``[..., K]``, loc/scale ``[..., K, D]``, x/grad_x ``[..., D]`` broadcasting to the leading shape
    ``lead`` (L), K > 1; parameters without leading dimensions are read once, not copied per sample.
    Results in the parameters' (promoted) dtype. Call only where :func:`applies` is True.
    """
    lib = _load()
    assert lib is not None, "call native.implicit_grad only where native.applies(...) is True"
    k, d = loc.shape[-2:]
    dtype = torch.promote_types(torch.promote_types(logits.dtype, loc.dtype), scale.dtype)
    n = math.prod(lead)
    a, stride_a = _operand(logits, lead, (k,), dtype)
    mu, stride_mu = _operand(loc, lead, (k, d), dtype)
    sg, stride_sg = _operand(scale, lead, (k, d), dtype)
    xs = x.detach().expand(*lead, d).to(dtype).contiguous()
    gs = grad_x.detach().expand(*lead, d).to(dtype).contiguous()
    grad_logits = torch.empty(*lead, k, dtype=dtype)
    grad_loc = torch.empty(*lead, k, d, dtype=dtype) if need_components else None
    grad_scale = torch.empty(*lead, k, d, dtype=dtype) if need_components else None
    threads = max(1, min(torch.get_num_threads(), (n * k * d) // MIN_WORK_PER_THREAD))
    status = lib.mixture_implicit_grad(
        n,
        k,
        d,
        int(dtype == torch.float32),
        a.data_ptr(),
        stride_a,
        mu.data_ptr(),
        stride_mu,
        sg.data_ptr(),
        stride_sg,
        xs.data_ptr(),
        gs.data_ptr(),
        0.5 * math.log(torch.finfo(dtype).max),
        int(need_components),
        grad_logits.data_ptr(),
        grad_loc.data_ptr() if grad_loc is not None else None,
        grad_scale.data_ptr() if grad_scale is not None else None,
        threads,
    )
    if status != 0:
        raise MemoryError("the native mixture backward could not allocate its work space")
    return grad_logits, grad_loc, grad_scale
