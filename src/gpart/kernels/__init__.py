"""Fast paths for GPart's element-wise work (the group ids, then the gather of theta into Delta_W or the
scatter-add of dL/dW into dL/dtheta), each tested against the reference: the projection's own delta /
transpose_add methods, which gpart.functional runs when no fast path applies (docs/performance.md).

- ``cpp``: C++ kernels for CPU tensors (gpart.kernels.cpu), compiled on first use and cached.
- ``triton``: Triton kernels for CUDA tensors (gpart.kernels.triton_kernels); on CPU tensors only under
  Triton's interpreter (TRITON_INTERPRET=1), which is for tests.
- ``reference``: the projection's plain-PyTorch methods.

GPART_KERNELS=auto|reference|cpp|triton, or set_backend() / use_backend() (which win), chooses. ``auto``
takes cpp for CPU and triton for CUDA tensors where available, else the reference with one warning per
process; a backend named explicitly makes its absence an error (KernelUnavailableError) rather than a
silent slowdown. Each kernel returns None (or False) for what it does not support; the caller then runs
the reference.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import sys
import threading
import warnings
from typing import Callable, NamedTuple

import torch

from . import cpu
from .cpu import KernelBuildError
from ..partition import Partition

ENV = "GPART_KERNELS"
BACKENDS = ("auto", "reference", "cpp", "triton")

__all__ = ["BACKENDS", "ENV", "KernelBuildError", "KernelUnavailableError", "Kernels", "backend_for", "build",
           "get_backend", "kernel_for", "set_backend", "use_backend"]


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


_triton_modules: dict[bool, object] = {}
_triton_errors: dict[bool, Exception] = {}


def _triton_module(interpret: bool):
    """gpart.kernels.triton_kernels, compiled (interpret=False) or interpreted (True). triton.jit decides at
    decoration time from TRITON_INTERPRET, so the file is loaded once per mode under its own module name,
    with the variable set accordingly while it loads."""
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
            interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
            return "triton" if interpreting and _triton_ok(True) else "reference"
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


class Kernels(NamedTuple):
    """One backend's fused kernels, as gpart.kernels.cpu defines them (merge_scatter None: not fused)."""

    gather: Callable
    scatter: Callable
    merge_scatter: Callable | None


def _guarded(fn):
    """A compiled Triton kernel that fails (to compile, say, on a GPU it was never tried on) under `auto`
    disables Triton for the process with one warning and returns None (the reference runs); under an
    explicit GPART_KERNELS=triton it raises. Launch failures happen before anything is written."""

    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if get_backend() == "triton":
                raise
            with _lock:
                _triton_modules.pop(False, None)
                _triton_errors[False] = exc
                _chosen.clear()
            _warn_once("triton-failed", f"gpart: a Triton kernel failed ({type(exc).__name__}: {exc}); GPart "
                                        f"uses its reference path on CUDA from now on.")
            return None

    return call


def _choose(device: torch.device) -> Kernels | None:
    backend = backend_for(device)
    if backend == "reference":
        return None
    module = cpu if backend == "cpp" else _triton_module(device.type == "cpu")
    guard = backend == "triton" and device.type != "cpu"
    fns = [getattr(module, name, None) for name in Kernels._fields]
    # torch.compiler.disable: a clean graph break instead of dynamo tracing into ctypes or a Triton launch
    return Kernels(*(fn and torch.compiler.disable(_guarded(fn) if guard else fn) for fn in fns))


_chosen: dict[tuple, Kernels | None] = {}
_UNSET = object()


def kernel_for(projection, theta_s: torch.Tensor, *tensors: torch.Tensor | None) -> Kernels | None:
    """The kernels for a call on theta_s (or on the fp32 accumulator of dL/dtheta_s) and `tensors`, or None:
    the projection's reference runs. The kernels compute the partition's ids (not Fastfood's transform)
    from fp32 on one device and are not differentiable."""
    if not isinstance(projection, Partition) or theta_s.dtype != torch.float32:
        return None
    device = theta_s.device
    grad_on = torch.is_grad_enabled()
    for t in (theta_s, *tensors):
        if t is not None and (t.device != device or (grad_on and t.requires_grad)):
            return None
    key = (_override or os.environ.get(ENV), os.environ.get("TRITON_INTERPRET"), device.type)
    chosen = _chosen.get(key, _UNSET)
    if chosen is _UNSET:
        chosen = _chosen[key] = _choose(device)
    return chosen
