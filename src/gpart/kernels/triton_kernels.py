"""The GPU fast path: Triton kernels for ids + gather (+ DropConnect) (+ base weight) and ids + scatter-add.

The arithmetic matches gpart.partition bit for bit (both partition versions): the round function in uint32
wrap-around arithmetic, the Feistel halves (version 1) or the grid's column and row (version 2) as uint32
values, the whole value as uint32 when D <= 2^32 and uint64 otherwise,
cycle-walking as a loop over the lanes still outside [0, D), and an exact integer `%`. Float work is one
multiply (DropConnect) and one add (base weight) with FMA contraction disabled, so the values equal the
reference's too.

The same functions run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1), which is how the
tests check them on machines without a GPU. gpart.kernels loads this file twice when needed: compiled
for CUDA tensors, interpreted for CPU tensors.

scatter uses fp32 atomics, like torch's CUDA index_add_: sums are exact up to the order of fp32
additions, which varies between runs. Under torch.use_deterministic_algorithms(True) scatter
declines on CUDA and the reference runs, whose index_add_ is then deterministic.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..partition import Partition, domain_bits, grid_shape

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BLOCK = 1024
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SCALARS = ["start", "n", "D", "Dm1", "d", "k0", "k1", "k2", "k3", "b", "ma", "mb", "klo", "khi", "thr"]


@triton.jit
def _rf(x, key):
    # the reference's _round_function: uint32 wrap-around arithmetic
    x = x + key
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _or(a, b):
    return a | b


# The standard library's sum combine when there is one: the interpreter reduces with numpy when it sees
# it (and calls any other combine function once per element). tl.max/tl.sum themselves are jit
# functions that the interpreter cannot call when triton was imported without TRITON_INTERPRET.
_COMBINE = getattr(tl.standard, "_sum_combine", None) or _or


@triton.jit
def _any(mask):
    return tl.reduce(mask.to(tl.int32), 0, _COMBINE) != 0


@triton.jit
def _feistel_narrow(x, k0, k1, k2, k3, b, ma, mb):
    # x: uint32 holding a value of a + b <= 32 bits
    left = x >> b
    right = x & mb
    t = left ^ (_rf(right, k0) & ma)
    left = right
    right = t
    t = left ^ (_rf(right, k1) & mb)
    left = right
    right = t
    t = left ^ (_rf(right, k2) & ma)
    left = right
    right = t
    t = left ^ (_rf(right, k3) & mb)
    left = right
    right = t
    return (left << b) | right


@triton.jit
def _feistel_wide(x, k0, k1, k2, k3, b, ma, mb):
    # x: uint64 holding a value of a + b <= 64 bits; halves of at most 32 bits each
    left = (x >> b.to(tl.uint64)).to(tl.uint32)
    right = (x & mb.to(tl.uint64)).to(tl.uint32)
    t = left ^ (_rf(right, k0) & ma)
    left = right
    right = t
    t = left ^ (_rf(right, k1) & mb)
    left = right
    right = t
    t = left ^ (_rf(right, k2) & ma)
    left = right
    right = t
    t = left ^ (_rf(right, k3) & mb)
    left = right
    right = t
    return (left.to(tl.uint64) << b.to(tl.uint64)) | right.to(tl.uint64)


@triton.jit
def _grid_round_pair(col, row, kc, kr, mask, B, WIDE: tl.constexpr):
    # version 2: column += F(row) mod 2^p, then row += spread(F(column)) mod B; uint32 col and row.
    # spread's product fits 32 bits when D <= 2^32 (B <= 2^16), else it is taken in 64.
    col = (col + _rf(row, kc)) & mask
    if WIDE:
        row = row + ((_rf(col, kr) >> 16).to(tl.uint64) * B.to(tl.uint64) >> 16).to(tl.uint32)
    else:
        row = row + ((_rf(col, kr) >> 16) * B >> 16)
    return col, tl.where(row >= B, row - B, row)


@triton.jit
def _grid_narrow(v, k0, k1, k2, k3, p, mask, B):
    # uint32 v = row * 2^p + column (D <= 2^32)
    col, row = _grid_round_pair(v & mask, v >> p, k0, k1, mask, B, False)
    col, row = _grid_round_pair(col, row, k2, k3, mask, B, False)
    return (row << p) | col


@triton.jit
def _grid_wide(v, k0, k1, k2, k3, p, mask, B):
    # uint64 v; the column has p <= 32 bits and the row is below B <= 2^31
    col = (v & mask.to(tl.uint64)).to(tl.uint32)
    row = (v >> p.to(tl.uint64)).to(tl.uint32)
    col, row = _grid_round_pair(col, row, k0, k1, mask, B, True)
    col, row = _grid_round_pair(col, row, k2, k3, mask, B, True)
    return (row.to(tl.uint64) << p.to(tl.uint64)) | col.to(tl.uint64)


@triton.jit
def _permute_narrow(x, k0, k1, k2, k3, b, ma, mb, GRID: tl.constexpr):
    if GRID:
        return _grid_narrow(x, k0, k1, k2, k3, b, ma, mb)
    return _feistel_narrow(x, k0, k1, k2, k3, b, ma, mb)


@triton.jit
def _permute_wide(x, k0, k1, k2, k3, b, ma, mb, GRID: tl.constexpr):
    if GRID:
        return _grid_wide(x, k0, k1, k2, k3, b, ma, mb)
    return _feistel_wide(x, k0, k1, k2, k3, b, ma, mb)


@triton.jit
def _group_ids(pos, live, D, Dm1, d, k0, k1, k2, k3, b, ma, mb, NARROW: tl.constexpr, WALK: tl.constexpr,
               IDENTITY: tl.constexpr, GRID: tl.constexpr):
    """Group ids (int64) of int64 positions `pos` (lanes where `live` is false give unspecified ids in [0, d)).
    Version 1 (GRID false): b, ma, mb are the low half's width and the two half masks; version 2: the
    grid's p, the column mask 2^p - 1 and the row count B."""
    k0 = k0.to(tl.uint32)
    k1 = k1.to(tl.uint32)
    k2 = k2.to(tl.uint32)
    k3 = k3.to(tl.uint32)
    b = b.to(tl.uint32)
    ma = ma.to(tl.uint32)
    mb = mb.to(tl.uint32)
    if NARROW:
        x = tl.where(live, pos, 0).to(tl.uint32)
        v = _permute_narrow(x, k0, k1, k2, k3, b, ma, mb, GRID)
        if WALK:
            lim = Dm1.to(tl.uint32)
            out = (v > lim) & live
            while _any(out):
                v = tl.where(out, _permute_narrow(v, k0, k1, k2, k3, b, ma, mb, GRID), v)
                out = (v > lim) & live
        if IDENTITY:
            g = v.to(tl.int64)
        else:
            g = (v % d.to(tl.uint32)).to(tl.int64)
    else:
        x = tl.where(live, pos, 0).to(tl.uint64)
        v = _permute_wide(x, k0, k1, k2, k3, b, ma, mb, GRID)
        if WALK:
            lim = D.to(tl.uint64)
            out = (v >= lim) & live
            while _any(out):
                v = tl.where(out, _permute_wide(v, k0, k1, k2, k3, b, ma, mb, GRID), v)
                out = (v >= lim) & live
        if IDENTITY:
            g = v.to(tl.int64)
        else:
            g = (v % d.to(tl.uint64)).to(tl.int64)
    return g


@triton.jit
def _keep_factor(pos, klo, khi, thr, scale, zero):
    # the reference's DropConnect.keep_scale
    lo = (pos & 0xFFFFFFFF).to(tl.uint32)
    hi = (pos >> 32).to(tl.uint32)
    bits = _rf(_rf(lo, klo.to(tl.uint32)) ^ hi, khi.to(tl.uint32))
    return tl.where(bits.to(tl.int64) >= thr, scale, zero)


@triton.jit
def _bf16_bits(x):
    # float32 -> bfloat16 bits, rounding to nearest even like torch (c10::BFloat16); done in integers
    # because the interpreter's own cast truncates
    u = x.to(tl.uint32, bitcast=True)
    r = (u + (((u >> 16) & 1) + 0x7FFF)) >> 16
    r = tl.where((u & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.int16)


@triton.jit(do_not_specialize=_SCALARS)
def _ids_kernel(pos_ptr, out_ptr, start, n, D, Dm1, d, k0, k1, k2, k3, b, ma, mb, klo, khi, thr,
                HAS_POS: tl.constexpr, NARROW: tl.constexpr, WALK: tl.constexpr, IDENTITY: tl.constexpr,
                GRID: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    if HAS_POS:
        pos = tl.load(pos_ptr + offs, mask=live, other=0)
    else:
        pos = start + offs
    valid = live & (pos >= 0) & (pos < D)  # positions outside [0, D) would cycle-walk forever
    g = _group_ids(pos, valid, D, Dm1, d, k0, k1, k2, k3, b, ma, mb, NARROW, WALK, IDENTITY, GRID)
    tl.store(out_ptr + offs, g, mask=live)


@triton.jit(do_not_specialize=_SCALARS)
def _gather_kernel(pos_ptr, theta_ptr, base_ptr, out_ptr, start, n, D, Dm1, d, k0, k1, k2, k3, b, ma, mb,
                   klo, khi, thr, scale, zero,
                   HAS_POS: tl.constexpr, HAS_BASE: tl.constexpr, DROP: tl.constexpr, OUT_BF16: tl.constexpr,
                   NARROW: tl.constexpr, WALK: tl.constexpr, IDENTITY: tl.constexpr, GRID: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    if HAS_POS:
        pos = tl.load(pos_ptr + offs, mask=live, other=0)
    else:
        pos = start + offs
    valid = live & (pos >= 0) & (pos < D)  # positions outside [0, D) get 0 instead of a hang
    g = _group_ids(pos, valid, D, Dm1, d, k0, k1, k2, k3, b, ma, mb, NARROW, WALK, IDENTITY, GRID)
    val = tl.load(theta_ptr + g, mask=valid, other=0.0)
    if DROP:
        val = val * _keep_factor(pos, klo, khi, thr, scale, zero)
    if HAS_BASE:
        val = tl.load(base_ptr + offs, mask=live, other=0.0).to(tl.float32) + val
    if OUT_BF16:
        tl.store(out_ptr + offs, _bf16_bits(val), mask=live)  # out_ptr: the int16 view of a bf16 tensor
    else:
        tl.store(out_ptr + offs, val.to(out_ptr.dtype.element_ty), mask=live)


@triton.jit(do_not_specialize=_SCALARS)
def _scatter_kernel(pos_ptr, grad_ptr, acc_ptr, start, n, D, Dm1, d, k0, k1, k2, k3, b, ma, mb,
                    klo, khi, thr, scale, zero,
                    HAS_POS: tl.constexpr, DROP: tl.constexpr, NARROW: tl.constexpr, WALK: tl.constexpr,
                    IDENTITY: tl.constexpr, GRID: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    live = offs < n
    if HAS_POS:
        pos = tl.load(pos_ptr + offs, mask=live, other=0)
    else:
        pos = start + offs
    valid = live & (pos >= 0) & (pos < D)  # positions outside [0, D) are skipped
    g = _group_ids(pos, valid, D, Dm1, d, k0, k1, k2, k3, b, ma, mb, NARROW, WALK, IDENTITY, GRID)
    val = tl.load(grad_ptr + offs, mask=valid, other=0.0).to(tl.float32)
    if DROP:
        val = val * _keep_factor(pos, klo, khi, thr, scale, zero)
    tl.atomic_add(acc_ptr + g, val, mask=valid)


# ---- launchers -----------------------------------------------------------------------------------------


def supports(part: Partition) -> bool:
    return part.D < 1 << 63


NO_DROP = (0, 0, 0, 0.0, 0.0)


def _common(part: Partition, drop):
    if part.version == 2:
        p, B = grid_shape(part.D)
        shape, domain = dict(b=p, ma=(1 << p) - 1, mb=B), (1 << p) * B
    else:
        a, b = domain_bits(part.D)
        shape, domain = dict(b=b, ma=(1 << a) - 1, mb=(1 << b) - 1), 1 << (a + b)
    scalars = dict(D=part.D, Dm1=part.D - 1, d=part.d, k0=part.keys[0], k1=part.keys[1], k2=part.keys[2],
                   k3=part.keys[3], **shape)
    flags = dict(NARROW=part.D <= 1 << 32, WALK=part.D != domain, IDENTITY=part.d == part.D, GRID=part.version == 2)
    # drop.scalars: functional.DropConnect's, computed when the mask was drawn
    scalars["klo"], scalars["khi"], scalars["thr"], scale, zero = NO_DROP if drop is None else drop.scalars
    return scalars, flags, scale, zero


def _launch_opts() -> dict:
    # the reference multiplies and adds separately: no FMA contraction (the interpreter never fuses)
    return {} if INTERPRETED else {"enable_fp_fusion": False, "num_warps": 4}


def _positions(positions, device):
    return positions.reshape(-1).to(device=device, dtype=torch.int64).contiguous()


def ids(part: Partition, start: int, length: int, positions=None, device=None) -> torch.Tensor | None:
    if not supports(part):
        return None
    pos = None if positions is None else _positions(positions, positions.device)
    device = pos.device if pos is not None else torch.device(device if device is not None else "cuda")
    n = length if pos is None else pos.numel()
    out = torch.empty(n, dtype=torch.int64, device=device)
    if n == 0:
        return out
    scalars, flags, _, _ = _common(part, None)
    _ids_kernel[(triton.cdiv(n, BLOCK),)](
        pos if pos is not None else out, out, start, n, **scalars, HAS_POS=pos is not None, **flags, BLOCK=BLOCK,
        **_launch_opts(),
    )
    return out


def gather(theta_s: torch.Tensor, part: Partition, start: int, length: int, *, positions=None, drop=None,
           base: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32):
    if not supports(part) or theta_s.dtype != torch.float32 or out_dtype not in KERNEL_DTYPES:
        return None
    device = theta_s.device
    pos = None if positions is None else _positions(positions, device)
    n = length if pos is None else pos.numel()
    if base is not None:
        if base.numel() != n or not base.dtype.is_floating_point:
            return None
        base = base.reshape(-1).contiguous()
    theta_s = theta_s.contiguous()
    out = torch.empty(n, dtype=out_dtype, device=device)
    if n == 0:
        return out
    scalars, flags, scale, zero = _common(part, drop)
    bf16 = out_dtype == torch.bfloat16
    _gather_kernel[(triton.cdiv(n, BLOCK),)](
        pos if pos is not None else theta_s, theta_s, base if base is not None else theta_s,
        out.view(torch.int16) if bf16 else out, start, n, **scalars, scale=scale, zero=zero,
        HAS_POS=pos is not None, HAS_BASE=base is not None, DROP=drop is not None, OUT_BF16=bf16, **flags,
        BLOCK=BLOCK, **_launch_opts(),
    )
    return out


def scatter(acc: torch.Tensor, grad: torch.Tensor, part: Partition, start: int, *, positions=None,
            drop=None) -> bool:
    if not supports(part) or acc.dtype != torch.float32 or not acc.is_contiguous() or grad.dtype not in KERNEL_DTYPES:
        return False
    if acc.is_cuda and torch.are_deterministic_algorithms_enabled():
            return False
    device = acc.device
    flat = grad.reshape(-1).contiguous()
    n = flat.numel()
    pos = None if positions is None else _positions(positions, device)
    if pos is not None and pos.numel() != n:
        return False
    if n == 0:
        return True
    scalars, flags, scale, zero = _common(part, drop)
    _scatter_kernel[(triton.cdiv(n, BLOCK),)](
        pos if pos is not None else flat, flat, acc, start, n, **scalars, scale=scale, zero=zero,
        HAS_POS=pos is not None, DROP=drop is not None, **flags, BLOCK=BLOCK, **_launch_opts(),
    )
    return True
