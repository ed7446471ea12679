"""Fast paths for GPart's element-wise work, each tested against the reference in gpart.functional.

Per adapted tensor and training step GPart computes the group id of every weight (a keyed Feistel
permutation, gpart.partition) and then either gathers theta into Delta_W (forward, and again in
backward) or scatter-adds dL/dW into dL/dtheta. The reference does that with ~40 eager int64 torch ops
(~200 ns per weight on two CPU cores). The fast paths fuse it into one pass:

- ``cpp``: C++ kernels for CPU tensors (gpart.kernels.cpu), compiled on first use with the machine's
  C++ compiler and cached; ~1-2 ns per weight on two cores. See docs/performance.md.
- ``triton``: Triton kernels for CUDA tensors (gpart.kernels.triton_kernels); on CPU tensors only under
  Triton's interpreter (TRITON_INTERPRET=1), which is for tests.
- ``reference``: the plain-PyTorch code in gpart.functional.

Choosing: the environment variable GPART_KERNELS=auto|reference|cpp|triton, or set_backend() /
use_backend() from Python (these win over the variable). ``auto`` (the default) takes cpp for CPU
tensors and triton for CUDA tensors when they are available, otherwise the reference with one warning
per process. Naming a backend explicitly makes its absence an error (KernelUnavailableError) rather than
a silent slowdown; tensors on devices the named backend does not serve use the reference.

The functions used by gpart.functional return None (or False) when no fast path applies: reference
backend chosen, unsupported dtype or device, theta needing autograd (grad mode on and
theta_s.requires_grad), d > 2^32. The caller then runs the reference code.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import warnings

import torch

from . import cpu
from .cpu import KernelBuildError
from ..slices import Slice, reference_delta_flat

ENV = "GPART_KERNELS"
BACKENDS = ("auto", "reference", "cpp", "triton")

__all__ = [
    "BACKENDS",
    "ENV",
    "KernelBuildError",
    "KernelUnavailableError",
    "accumulate_grad",
    "accumulate_grad_at",
    "backend_for",
    "build",
    "delta_at",
    "delta_flat",
    "get_backend",
    "ids",
    "merged_weight",
    "merged_weight_and_grad",
    "set_backend",
    "use_backend",
]


class KernelUnavailableError(RuntimeError):
    """A backend was named explicitly (GPART_KERNELS or set_backend) but cannot run here."""


_override: str | None = None
_warned: set[str] = set()
_lock = threading.Lock()


def _check(name: str, source: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"{source}={name!r} is not a GPart kernel backend; choose one of {', '.join(BACKENDS)}")
    return name


def get_backend() -> str:
    """The configured choice: set_backend()'s, else $GPART_KERNELS, else "auto"."""
    if _override is not None:
        return _override
    return _check(os.environ.get(ENV, "") or "auto", ENV)


def set_backend(name: str | None) -> None:
    """Choose the backend for this process (None: back to $GPART_KERNELS / auto)."""
    global _override
    _override = None if name is None else _check(name, "set_backend")


@contextlib.contextmanager
def use_backend(name: str):
    """Temporarily choose a backend: `with gpart.kernels.use_backend("reference"): ...`."""
    global _override
    previous = _override
    set_backend(name)
    try:
        yield
    finally:
        _override = previous


def _warn_once(key: str, message: str) -> None:
    with _lock:
        if key in _warned:
            return
        _warned.add(key)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_triton_modules: dict[bool, object] = {}
_triton_errors: dict[bool, Exception] = {}


def _triton_module(interpret: bool):
    """gpart.kernels.triton_kernels, compiled (interpret=False) or interpreted (True).

    triton.jit decides at decoration time from TRITON_INTERPRET, so the file is loaded once per mode
    under its own module name, with the variable set accordingly for the duration of the load.
    """
    if interpret in _triton_modules:
        return _triton_modules[interpret]
    if interpret in _triton_errors:
        raise _triton_errors[interpret]
    with _lock:
        if interpret not in _triton_modules and interpret not in _triton_errors:
            name = f"{__name__}._triton_{'interpreted' if interpret else 'compiled'}"
            path = os.path.join(os.path.dirname(__file__), "triton_kernels.py")
            saved = os.environ.get("TRITON_INTERPRET")
            try:
                os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
                spec = importlib.util.spec_from_file_location(name, path)
                module = importlib.util.module_from_spec(spec)
                sys.modules[name] = module
                spec.loader.exec_module(module)
                _triton_modules[interpret] = module
            except Exception as exc:  # ImportError (no triton) and anything triton raises on import
                sys.modules.pop(name, None)
                _triton_errors[interpret] = exc
            finally:
                if saved is None:
                    os.environ.pop("TRITON_INTERPRET", None)
                else:
                    os.environ["TRITON_INTERPRET"] = saved
    if interpret in _triton_errors:
        raise _triton_errors[interpret]
    return _triton_modules[interpret]


def _triton_ok(interpret: bool) -> bool:
    try:
        _triton_module(interpret)
        return True
    except Exception:
        return False


def backend_for(device) -> str:
    """The backend that runs for tensors on `device` now: "cpp", "triton" or "reference"."""
    choice = get_backend()
    kind = torch.device(device).type
    if choice == "reference":
        return "reference"
    if kind == "cpu":
        if choice == "triton":
            return "triton" if _interpreting() and _triton_ok(True) else "reference"
        if cpu.available():
            return "cpp"
        if choice == "cpp":
            raise KernelUnavailableError(f"{ENV}=cpp, but the C++ kernels are unavailable: {cpu._error}")
        _warn_once(
            "cpp",
            f"gpart: the C++ kernels are unavailable ({str(cpu._error).splitlines()[0]}); GPart runs its reference "
            f"path on CPU, about 100x slower per weight. Install a C++ compiler (g++ or clang++), or set "
            f"{ENV}=reference to silence this warning.",
        )
        return "reference"
    if kind == "cuda":
        if choice == "cpp":
            return "reference"
        if _triton_ok(False):
            return "triton"
        if choice == "triton":
            raise KernelUnavailableError(f"{ENV}=triton, but Triton is unavailable: {_triton_errors.get(False)}")
        _warn_once(
            "triton",
            f"gpart: Triton is unavailable ({_triton_errors.get(False)}); GPart runs its reference path on CUDA. "
            f"Install triton, or set {ENV}=reference to silence this warning.",
        )
        return "reference"
    return "reference"


def _impl(device):
    """The kernel module for tensors on `device`, or None for the reference."""
    backend = backend_for(device)
    if backend == "cpp":
        return cpu
    if backend == "triton":
        return _triton_module(torch.device(device).type == "cpu")
    return None


def build(verbose: bool = True) -> str:
    """Compile (or find in the cache) the C++ kernels now; returns the library's path."""
    path = cpu.build(verbose=verbose)
    cpu.load()
    return path


# ---- used by gpart.functional ------------------------------------------------------------------------


def _opaque(fn):
    """Keep torch.compile from tracing into the kernels (ctypes and Triton launches): a clean graph
    break instead of dynamo's warning about an unknown C function. (Registering them as torch.library
    custom ops would let compiled graphs keep them instead; not done yet.)"""
    disable = getattr(getattr(torch, "compiler", None), "disable", None)
    return disable(fn) if disable is not None else fn


def _call(device, method: str, *args, **kwargs):
    """impl.method(*args, **kwargs) on the backend for `device`; None when the reference must run.

    A compiled Triton kernel that fails (to compile, say, on a GPU it was never tried on) under `auto`
    disables Triton for the process with one warning; the call then takes the reference path. (Launch
    failures happen before anything is written.) Under an explicit GPART_KERNELS=triton it raises.
    """
    impl = _impl(device)
    if impl is None or impl is cpu or impl is _triton_modules.get(True):
        return None if impl is None else getattr(impl, method)(*args, **kwargs)
    try:
        return getattr(impl, method)(*args, **kwargs)
    except Exception as exc:
        if get_backend() == "triton":
            raise
        with _lock:
            _triton_modules.pop(False, None)
            _triton_errors[False] = exc
        _warn_once("triton-failed", f"gpart: a Triton kernel failed ({type(exc).__name__}: {exc}); GPart uses "
                                    f"its reference path on CUDA from now on.")
        return None


def _theta_ok(theta_s: torch.Tensor) -> bool:
    # the reference's theta_s[ids] is differentiable; the kernels are not
    return theta_s.dtype == torch.float32 and not (theta_s.requires_grad and torch.is_grad_enabled())


@_opaque
def delta_flat(theta_s: torch.Tensor, partition, start: int, numel: int, drop=None) -> torch.Tensor | None:
    """vec(Delta_W) of positions [start, start + numel) in fp32, or None (use the reference)."""
    if not _theta_ok(theta_s):
        return None
    return _call(theta_s.device, "gather", theta_s, partition, start, numel, drop=drop)


@_opaque
def delta_at(theta_s: torch.Tensor, partition, positions: torch.Tensor, drop=None) -> torch.Tensor | None:
    """Delta values at arbitrary global positions, shaped like `positions`, or None."""
    if not _theta_ok(theta_s) or positions.device != theta_s.device or positions.dtype != torch.int64:
        return None
    out = _call(theta_s.device, "gather", theta_s, partition, 0, positions.numel(), positions=positions, drop=drop)
    return None if out is None else out.view(positions.shape)


def _grad_ok(grad_theta_s: torch.Tensor, grad: torch.Tensor) -> bool:
    return (
        grad_theta_s.dtype == torch.float32
        and grad_theta_s.is_contiguous()
        and grad.device == grad_theta_s.device
        and not (torch.is_grad_enabled() and (grad.requires_grad or grad_theta_s.requires_grad))
    )


@_opaque
def accumulate_grad(grad_theta_s: torch.Tensor, grad_w: torch.Tensor, partition, start: int, drop=None) -> bool:
    """grad_theta_s[g(i)] += vec(grad_w)[i] (times the DropConnect factor) in place; False: nothing done."""
    if not _grad_ok(grad_theta_s, grad_w):
        return False
    if grad_theta_s.is_cuda and torch.are_deterministic_algorithms_enabled():
        return False  # fp32 atomics; the reference's index_add_ is deterministic in this mode
    return bool(_call(grad_theta_s.device, "scatter", grad_theta_s, grad_w, partition, start, drop=drop))


@_opaque
def accumulate_grad_at(grad_theta_s: torch.Tensor, grad_vals: torch.Tensor, partition, positions: torch.Tensor,
                       drop=None) -> bool:
    """grad_theta_s[g(p)] += grad_vals[p] for arbitrary global positions, in place; False: nothing done."""
    if not _grad_ok(grad_theta_s, grad_vals) or positions.device != grad_theta_s.device:
        return False
    if positions.dtype != torch.int64 or positions.numel() != grad_vals.numel():
        return False
    if grad_theta_s.is_cuda and torch.are_deterministic_algorithms_enabled():
        return False
    return bool(_call(grad_theta_s.device, "scatter", grad_theta_s, grad_vals, partition, 0, positions=positions,
                      drop=drop))


# ---- building blocks for the autograd functions --------------------------------------------------------


@_opaque
def merged_weight(theta_s: torch.Tensor, partition, start: int, base: torch.Tensor, drop=None,
                  out_dtype: torch.dtype | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """(base.float() + Delta_W).to(out_dtype) in one pass, shaped like `base` (out_dtype: base's dtype).

    This is the forward's `W0 + Delta_W` (fp32) and the backward's `(W0.float() + Delta_W).to(bf16)`
    without the fp32 Delta_W in between. out: a contiguous tensor to write into (may be `base` itself:
    W0 += Delta_W in place). Always returns a tensor: it falls back to the reference composite when no
    fast path applies.
    """
    out_dtype = base.dtype if out_dtype is None else out_dtype
    res = None
    if _theta_ok(theta_s) and base.device == theta_s.device:
        res = _call(theta_s.device, "gather", theta_s, partition, start, base.numel(), drop=drop, base=base,
                    out_dtype=out_dtype, out=out)
    if res is None:
        delta = reference_delta_flat(theta_s, Slice(partition, start, tuple(base.shape)), drop)
        res = (base.float() + delta.view(base.shape)).to(out_dtype)
        if out is not None:
            out.copy_(res.view(out.shape))
            res = out
    return res.view(base.shape)


@_opaque
def merged_weight_and_grad(theta_s: torch.Tensor, partition, start: int, base: torch.Tensor, grad_w: torch.Tensor,
                           grad_theta_s: torch.Tensor, drop=None, out_dtype: torch.dtype | None = None):
    """The backward's element-wise work in one sweep that computes each id once: returns
    (base.float() + Delta_W).to(out_dtype) shaped like `base` (as merged_weight) and adds
    P^T vec(grad_w) (times the DropConnect factor) to grad_theta_s in place (as accumulate_grad).

    Returns None, having done nothing, when no fused path applies (today: anything but the C++ kernels);
    the caller then calls merged_weight and accumulate_grad.
    """
    if not (_theta_ok(theta_s) and _grad_ok(grad_theta_s, grad_w)) or base.device != theta_s.device:
        return None
    if base.numel() != grad_w.numel() or backend_for(theta_s.device) != "cpp":
        return None
    out_dtype = base.dtype if out_dtype is None else out_dtype
    res = cpu.merge_scatter(theta_s, partition, start, base, grad_w, grad_theta_s, drop=drop, out_dtype=out_dtype)
    return None if res is None else res.view(base.shape)


@_opaque
def ids(partition, start: int, length: int, device=None) -> torch.Tensor:
    """partition.ids(start, length, device) through the fast path when one applies."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend_for(device) == "cpp":
        out = cpu.ids(partition, start, length)
    else:
        out = _call(device, "ids", partition, start, length, device=device)
    return out if out is not None else partition.ids(start, length, device=device)
