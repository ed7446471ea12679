"""The CPU fast path: fused C++ kernels, compiled on first use and loaded with ctypes.

Why ctypes and not a torch extension: the source needs no torch headers, so it compiles in about two
seconds (a torch extension takes about a minute on two cores), works with any torch version, and cannot
break on torch's C++ ABI. Threads come from OpenMP: on Linux the library links `libgomp.so.1`, the very
runtime torch has already loaded, so the kernels share torch's thread pool and follow
`torch.set_num_threads` (the thread count is passed on every call). ctypes releases the GIL during calls.

The shared library is cached in torch's extension cache (`$TORCH_EXTENSIONS_DIR`, else
`~/.cache/torch_extensions`), under `gpart_cpu/`, named by a hash of the source, the compiler's version,
the flags and the CPU's feature flags: a home directory shared between machines with different CPUs gets
one build per CPU kind (the build uses `-march=native`, or `-march=$GPART_KERNELS_MARCH`). Each build is
written to a temporary file and renamed into place, so concurrent first uses (one per DDP rank, say) are
safe.

Every library that loads passes a self-test against the reference (gpart.partition) before it is used.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import itertools
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch

from ..partition import VERSIONS, Partition, domain_bits, grid_shape

ABI = 4
# The kernels' C++ source, shipped inside the package; its text is part of the build cache key.
SOURCE_PATH = Path(__file__).with_name("cpu_kernels.cpp")
SOURCE = SOURCE_PATH.read_text()
# ids are computed as uint32, so the fast path needs d <= 2^32 (theta would hold 17 GB beyond that)
MAX_GROUPS = 1 << 32

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


class KernelBuildError(RuntimeError):
    """The C++ kernels could not be compiled or loaded on this machine."""


class _Params(ctypes.Structure):
    # must match struct GPartParams in cpu_kernels.cpp
    _fields_ = [
        ("D", ctypes.c_uint64),
        ("d", ctypes.c_uint64),
        ("keys", ctypes.c_uint32 * 4),
        ("a", ctypes.c_uint32),
        ("b", ctypes.c_uint32),
        ("drop", ctypes.c_uint32),
        ("drop_klo", ctypes.c_uint32),
        ("drop_khi", ctypes.c_uint32),
        ("version", ctypes.c_uint32),
        ("drop_thr", ctypes.c_uint64),
        ("drop_scale", ctypes.c_float),
        ("drop_zero", ctypes.c_float),
        ("nthreads", ctypes.c_int32),
        ("pad2", ctypes.c_int32),
        ("grid_p", ctypes.c_uint32),
        ("grid_B", ctypes.c_uint32),
    ]


# ---- building ----------------------------------------------------------------------------------------


def _compiler() -> str | None:
    for cand in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def _cache_dir() -> str:
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:
        try:
            from torch.utils.cpp_extension import get_default_build_root

            root = get_default_build_root()
        except Exception:  # pragma: no cover - very old or stripped torch
            root = os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions")
    return os.path.join(root, "gpart_cpu")


def _cpu_fingerprint() -> str:
    """What -march=native depends on: the CPU's model and feature flags."""
    parts = [platform.machine(), platform.system()]
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key in ("flags", "Features", "model name", "CPU part"):
                    parts.append(line.strip())
                if line.strip() == "":
                    break  # the first processor is enough
    except OSError:
        parts.append(platform.processor())
    return "\n".join(parts)


def _flag_sets() -> list[list[str]]:
    """Compiler flags to try, fastest first. $GPART_KERNELS_MARCH replaces -march=native (e.g.
    x86-64-v3 for one build that runs on every AVX2 machine of a cluster)."""
    base = ["-O3", "-std=c++17", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math"]
    native = [f"-march={os.environ.get('GPART_KERNELS_MARCH', '').strip() or 'native'}"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        native.append("-mprefer-vector-width=512")
    omp = ["-fopenmp"]
    return [base + native + omp, base + omp, base + native, base]


def _try_compile(cxx: str, flags: list[str], src_path: str, out_path: str) -> str | None:
    """Compile; return None on success, else the compiler's message."""
    try:
        proc = subprocess.run([cxx, *flags, src_path, "-o", out_path], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.SubprocessError) as exc:
        return str(exc)
    return None if proc.returncode == 0 else (proc.stderr or proc.stdout or f"exit code {proc.returncode}")[-2000:]


def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def build(verbose: bool = False) -> str:
    """Compile the kernels (or find the cached build) and return the path of the shared library."""
    cxx = _compiler()
    if cxx is None:
        raise KernelBuildError("no C++ compiler found (looked for $CXX, c++, g++, clang++)")
    version = _compiler_version(cxx)
    cache = _cache_dir()
    try:
        os.makedirs(cache, exist_ok=True)
        if not os.access(cache, os.W_OK):
            raise PermissionError(cache)
    except OSError:  # read-only home: build in the temporary directory instead
        cache = os.path.join(tempfile.gettempdir(), f"gpart_cpu_{os.getuid() if hasattr(os, 'getuid') else 0}")
        os.makedirs(cache, exist_ok=True)
    errors = []
    for flags in _flag_sets():
        ident = "\0".join([SOURCE, cxx, version, " ".join(flags), _cpu_fingerprint(), sys.platform])
        key = hashlib.sha256(ident.encode())
        path = os.path.join(cache, f"gpart_cpu_{key.hexdigest()[:20]}.so")
        if os.path.exists(path):
            return path
        fd, tmp = tempfile.mkstemp(dir=cache, suffix=".so.tmp")
        os.close(fd)
        try:
            if verbose:
                print(f"gpart: compiling CPU kernels: {cxx} {' '.join(flags)}", file=sys.stderr)
            # the shipped file itself, so compiler messages point at its real lines
            err = _try_compile(cxx, flags, str(SOURCE_PATH), tmp)
            if err is None:
                os.replace(tmp, path)  # atomic: concurrent builders all end with one complete file
                return path
            errors.append(f"{' '.join(flags)}:\n{err}")
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise KernelBuildError(f"{cxx} could not compile the kernels:\n" + "\n".join(errors[-1:]))


# ---- loading -------------------------------------------------------------------------------------------

_lock = threading.Lock()
_lib = None
_error: Exception | None = None


_vp, _P, _int = ctypes.c_void_p, ctypes.POINTER(_Params), ctypes.c_int
_SIGNATURES = {  # name: (restype, argtypes)
    "gpart_abi": (_int, []),
    "gpart_ids": (_int, [_P, ctypes.c_uint64, _vp, ctypes.c_int64, _vp]),
    "gpart_gather": (_int, [_P, ctypes.c_uint64, _vp, ctypes.c_int64, _vp, _vp, _int, _vp, _int]),
    "gpart_scatter": (_int, [_P, ctypes.c_uint64, _vp, ctypes.c_int64, _vp, _int, _vp]),
    "gpart_merge_scatter": (_int, [_P, ctypes.c_uint64, _vp, ctypes.c_int64, _vp, _vp, _int, _vp, _int, _vp, _int,
                                   _vp]),
}


def _declare_one(lib, name: str) -> None:
    fn = getattr(lib, name)
    fn.restype, fn.argtypes = _SIGNATURES[name]


def _declare(lib) -> None:
    for name in _SIGNATURES:
        _declare_one(lib, name)


def _self_test(lib) -> None:
    """The loaded library must reproduce the reference ids (cycle-walking included) on both paths."""
    cases = [
        (3, 1000, 7, 0, 1000),
        (11, 85_000_000, 131072, 12_345_678, 30_000),  # long enough for the first-round table
        (5, (1 << 33) + 5, 524288, (1 << 33) - 995, 1000),
    ]
    for (seed, D, d, start, n), version in itertools.product(cases, VERSIONS):
        part = Partition(seed, D, d, version)
        out = torch.empty(n, dtype=torch.int64)
        rc = lib.gpart_ids(ctypes.byref(_params(part, None)), start, None, n, out.data_ptr())
        if rc != 0 or not torch.equal(out, part.ids(start, n)):
            raise KernelBuildError(f"self-test failed for Partition({seed}, {D}, {d}, version {version}): "
                                   "the build is miscompiled")


def load():
    """The loaded library; builds it on first use. Raises KernelBuildError when that is impossible."""
    global _lib, _error
    if _lib is not None:
        return _lib
    if _error is not None:
        raise _error
    with _lock:
        if _lib is None and _error is None:
            try:
                lib = ctypes.CDLL(build())
                _declare(lib)
                if lib.gpart_abi() != ABI:
                    raise KernelBuildError("stale build: ABI mismatch")
                _self_test(lib)
                _lib = lib
            except Exception as exc:  # anything at all: the caller falls back to the reference
                _error = exc if isinstance(exc, KernelBuildError) else KernelBuildError(f"{type(exc).__name__}: {exc}")
        if _error is not None:
            raise _error
    return _lib


def available() -> bool:
    try:
        load()
        return True
    except KernelBuildError:
        return False


def load_error() -> Exception | None:
    """Why the library could not be loaded (None: it loaded, or no load was tried yet)."""
    return _error


# ---- parameters ----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def _domain(D: int) -> tuple[int, int, int, int]:
    """(a, b) of the Feistel halves and version 2's grid (p, B) for a flattening of length D."""
    return (*domain_bits(D), *grid_shape(D))


def _params(part: Partition, drop, nthreads: int = 1) -> _Params:
    prm = _Params()
    prm.D, prm.d = part.D, part.d
    prm.keys = (ctypes.c_uint32 * 4)(*part.keys)
    prm.a, prm.b, grid_p, grid_B = _domain(part.D)
    prm.version = part.version
    if part.version == 2:
        prm.grid_p, prm.grid_B = grid_p, grid_B
    prm.nthreads = nthreads
    prm.drop = drop is not None
    if drop is not None:
        # functional.DropConnect computes these when the mask is drawn
        prm.drop_klo, prm.drop_khi, prm.drop_thr, prm.drop_scale, prm.drop_zero = drop.scalars
    return prm


def supports(part: Partition) -> bool:
    return part.d <= MAX_GROUPS


def _positions(positions: torch.Tensor) -> torch.Tensor:
    return positions.reshape(-1).to(torch.int64).contiguous()


# ---- the kernels ---------------------------------------------------------------------------------------


def ids(part: Partition, start: int, length: int, positions: torch.Tensor | None = None) -> torch.Tensor | None:
    """Group ids (int64) of positions start..start+length-1, or of `positions`; None when unsupported."""
    lib = load()
    if not supports(part):
        return None
    pos = None if positions is None else _positions(positions)
    n = length if pos is None else pos.numel()
    out = torch.empty(n, dtype=torch.int64)
    rc = lib.gpart_ids(ctypes.byref(_params(part, None, torch.get_num_threads())), start,
                       None if pos is None else pos.data_ptr(), n, out.data_ptr())
    return out if rc == 0 else None


def gather(theta_s: torch.Tensor, part: Partition, start: int, length: int, *, positions=None, drop=None,
           base: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor | None:
    """base + theta_s[g(i)] * keep(i) for each position, as a flat tensor of `out_dtype`.

    theta_s: contiguous fp32 (d,); base: None or a tensor of `length` elements (fp32, bf16 or fp16).
    Returns None when this case is not supported (the caller uses the reference).
    """
    lib = load()
    if not supports(part) or theta_s.dtype != torch.float32 or out_dtype not in _DTYPE_CODES:
        return None
    pos = None if positions is None else _positions(positions)
    n = length if pos is None else pos.numel()
    bdt = 0
    if base is not None:
        if base.dtype not in _DTYPE_CODES or base.numel() != n:
            return None
        base = base.reshape(-1)
        if not base.is_contiguous():
            base = base.contiguous()
        bdt = _DTYPE_CODES[base.dtype]
    out = torch.empty(n, dtype=out_dtype)
    theta_s = theta_s.contiguous()
    rc = lib.gpart_gather(
        ctypes.byref(_params(part, drop, torch.get_num_threads())), start, None if pos is None else pos.data_ptr(), n,
        theta_s.data_ptr(), None if base is None else base.data_ptr(), bdt, out.data_ptr(), _DTYPE_CODES[out_dtype],
    )
    return out if rc == 0 else None


def merge_scatter(theta_s: torch.Tensor, part: Partition, start: int, base: torch.Tensor, grad: torch.Tensor,
                  acc: torch.Tensor, *, drop=None, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """The backward's two sweeps in one: returns base + theta_s[g(i)] * keep(i) (a new tensor of base's
    shape in `out_dtype`, as gather(base=...)) and adds grad[i] * keep(i) to acc[g(i)] in place (as scatter), for the
    positions [start, start + base.numel()), computing each id once. Results are bit-identical to those two
    calls. None when not supported (nothing was done).
    """
    lib = load()
    out_dtype = base.dtype if out_dtype is None else out_dtype
    if (not supports(part) or theta_s.dtype != torch.float32 or out_dtype not in _DTYPE_CODES
            or base.dtype not in _DTYPE_CODES or grad.dtype not in _DTYPE_CODES
            or acc.dtype != torch.float32 or not acc.is_contiguous()):
        return None
    n, shape = base.numel(), base.shape
    if grad.numel() != n:
        return None
    base = base.reshape(-1).contiguous()
    flat = grad.reshape(-1).contiguous()
    theta_s = theta_s.contiguous()
    out = torch.empty(n, dtype=out_dtype)
    rc = lib.gpart_merge_scatter(
        ctypes.byref(_params(part, drop, torch.get_num_threads())), start, None, n, theta_s.data_ptr(),
        base.data_ptr(), _DTYPE_CODES[base.dtype], out.data_ptr(), _DTYPE_CODES[out_dtype], flat.data_ptr(),
        _DTYPE_CODES[flat.dtype], acc.data_ptr(),
    )
    return out.view(shape) if rc == 0 else None


def scatter(acc: torch.Tensor, grad: torch.Tensor, part: Partition, start: int, *, positions=None,
            drop=None) -> bool:
    """acc[g(i)] += grad[i] * keep(i) in fp32, in place; False when not supported (nothing was done).

    acc: contiguous fp32 (d,); grad: fp32, bf16 or fp16.
    """
    lib = load()
    if not supports(part) or acc.dtype != torch.float32 or not acc.is_contiguous() or grad.dtype not in _DTYPE_CODES:
        return False
    pos = None if positions is None else _positions(positions)
    flat = grad.reshape(-1).contiguous()
    n = flat.numel()
    if pos is not None and pos.numel() != n:
        return False
    rc = lib.gpart_scatter(
        ctypes.byref(_params(part, drop, torch.get_num_threads())), start, None if pos is None else pos.data_ptr(), n,
        flat.data_ptr(), _DTYPE_CODES[flat.dtype], acc.data_ptr(),
    )
    return rc == 0
