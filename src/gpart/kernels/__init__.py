"""Fast paths for GPart's element-wise work, each tested against the reference: the partition's own
delta / transpose_add methods, which gpart.functional runs when no fast path applies.

Per adapted tensor and training step GPart computes the group id of every weight (a keyed Feistel
permutation, gpart.partition) and then either gathers theta into Delta_W (forward, and again in
backward) or scatter-adds dL/dW into dL/dtheta. The reference does that with ~40 eager int64 torch ops
(~200 ns per weight on two CPU cores). The fast paths fuse it into one pass:

- ``cpp``: C++ kernels for CPU tensors (gpart.kernels.cpu), compiled on first use with the machine's
  C++ compiler and cached; ~1-2 ns per weight on two cores. See docs/performance.md.
- ``triton``: Triton kernels for CUDA tensors (gpart.kernels.triton_kernels); on CPU tensors only under
  Triton's interpreter (TRITON_INTERPRET=1), which is for tests.
- ``reference``: the projection's plain-PyTorch methods (gpart.partition.Partition.delta, .transpose_add).

Choosing: the environment variable GPART_KERNELS=auto|reference|cpp|triton, or set_backend() /
use_backend() from Python (these win over the variable). ``auto`` (the default) takes cpp for CPU
tensors and triton for CUDA tensors when they are available, otherwise the reference with one warning
per process. Naming a backend explicitly makes its absence an error (KernelUnavailableError) rather than
a silent slowdown; tensors on devices the named backend does not serve use the reference.

gather, scatter and merge_scatter (what gpart.functional calls) return None (or False) when no fast path
applies: a projection other than the partition (Fastfood brings its own transform), reference backend
chosen, unsupported dtype or device, theta needing autograd (grad mode on and theta_s.requires_grad),
d > 2^32. The caller then runs the reference.
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
from ..partition import Partition

ENV = "GPART_KERNELS"
BACKENDS = ("auto", "reference", "cpp", "triton")

__all__ = [
    "BACKENDS",
    "ENV",
    "KernelBuildError",
    "KernelUnavailableError",
    "backend_for",
    "build",
    "gather",
    "get_backend",
    "ids",
    "merge_scatter",
    "scatter",
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
    name = os.environ.get(ENV, "") or "auto"
    return name if name in BACKENDS else _check(name, ENV)


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
            raise KernelUnavailableError(f"{ENV}=cpp, but the C++ kernels are unavailable: {cpu.load_error()}")
        _warn_once(
            "cpp",
            f"gpart: the C++ kernels are unavailable ({str(cpu.load_error()).splitlines()[0]}); GPart runs its reference "
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


def build(verbose: bool = True) -> str:
    """Compile (or find in the cache) the C++ kernels now; returns the library's path."""
    path = cpu.build(verbose=verbose)
    cpu.load()
    return path


# ---- used by gpart.functional ------------------------------------------------------------------------


def _opaque(fn):
    """Keep torch.compile from tracing into the kernels (ctypes and Triton launches): a clean graph
    break instead of dynamo's warning about an unknown C function."""
    return torch.compiler.disable(fn)


def _call(device, method: str, *args, **kwargs):
    """impl.method(*args, **kwargs) on the backend for `device`; None when the reference must run.

    A compiled Triton kernel that fails (to compile, say, on a GPU it was never tried on) under `auto`
    disables Triton for the process with one warning; the call then takes the reference path. (Launch
    failures happen before anything is written.) Under an explicit GPART_KERNELS=triton it raises.
    """
    backend = backend_for(device)
    impl = cpu if backend == "cpp" else None
    if backend == "triton":
        impl = _triton_module(torch.device(device).type == "cpu")
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


_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _applies(projection, theta_s: torch.Tensor, *tensors) -> bool:
    """The kernels compute the partition's ids (not Fastfood's transform), from fp32 theta_s on one device,
    and are not differentiable: theta_s must not need autograd."""
    return (isinstance(projection, Partition) and theta_s.dtype == torch.float32
            and not (theta_s.requires_grad and torch.is_grad_enabled())
            and all(t is None or t.device == theta_s.device for t in tensors))


def _accumulates(grad_theta_s: torch.Tensor, grad: torch.Tensor) -> bool:
    # fp32 atomics on CUDA: in deterministic mode the reference's index_add_ is deterministic instead
    return (grad_theta_s.is_contiguous() and grad.dtype in _KERNEL_DTYPES
            and not (grad_theta_s.is_cuda and torch.are_deterministic_algorithms_enabled()))


@_opaque
def gather(theta_s, projection, start: int, length: int, positions=None, drop=None, base=None,
           out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """base + Delta (Delta alone when base is None) at positions [start, start + length) or at
    `positions` (int64), flat, in out_dtype; None when no kernel applies (the caller runs the reference)."""
    if not _applies(projection, theta_s, positions, base) or out_dtype not in _KERNEL_DTYPES:
        return None
    if positions is not None and positions.dtype != torch.int64:
        return None
    return _call(theta_s.device, "gather", theta_s, projection, start if positions is None else 0, length,
                 positions=positions, drop=drop, base=base, out_dtype=out_dtype)


@_opaque
def scatter(grad_theta_s, grad, projection, start: int, positions=None, drop=None) -> bool:
    """grad_theta_s += P^T vec(grad) (times the DropConnect factors) in place; False: nothing was done."""
    if not (_applies(projection, grad_theta_s, grad, positions) and _accumulates(grad_theta_s, grad)):
        return False
    if grad.requires_grad and torch.is_grad_enabled():
        return False
    if positions is not None and (positions.dtype != torch.int64 or positions.numel() != grad.numel()):
        return False
    return bool(_call(grad_theta_s.device, "scatter", grad_theta_s, grad, projection,
                      start if positions is None else 0, positions=positions, drop=drop))


@_opaque
def merge_scatter(theta_s, projection, start: int, base, grad, grad_theta_s, drop=None,
                  out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """The backward's element-wise work in one sweep that computes each id once: returns gather's
    base + Delta and does scatter's grad_theta_s += P^T vec(grad). None, having done nothing, when no
    fused kernel applies (today: anything but the C++ kernels)."""
    if base is None or base.numel() != grad.numel() or out_dtype not in _KERNEL_DTYPES:
        return None
    if not (_applies(projection, theta_s, base, grad) and _accumulates(grad_theta_s, grad)):
        return None
    if backend_for(theta_s.device) != "cpp":
        return None
    out = cpu.merge_scatter(theta_s, projection, start, base, grad, grad_theta_s, drop=drop, out_dtype=out_dtype)
    return None if out is None else out.view(base.shape)


@_opaque
def ids(partition, start: int, length: int, device=None) -> torch.Tensor:
    """partition.ids(start, length, device) through the fast path when one applies."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if backend_for(device) == "cpp":
        out = cpu.ids(partition, start, length)
    else:
        out = _call(device, "ids", partition, start, length, device=device)
    return out if out is not None else partition.ids(start, length, device=device)
