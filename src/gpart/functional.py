"""GPart's method in one file: Delta_W = P theta for one adapted tensor, the exact gradient P^T vec(dL/dW),
and the autograd operations that use them (docs/method.md, "Forward and backward").

Every adapted tensor is a slice [start, start + numel) of the flattening of length D that a projection P
(Partition, GainedPartition, Fastfood) maps theta to. Its plain-PyTorch methods delta / transpose_add are
the reference the kernels are tested against; `delta` and `transpose_add` below are their only callers and
run a fused kernel (gpart.kernels) where one applies. Nothing proportional to the weight is kept between
forward and backward: backward rebuilds Delta_W from (theta, slice) and frees it after the GEMMs.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from . import kernels
from .partition import M32, hash64

# dtypes in which W0 + Delta_W keeps a small update; half precision would round most of it away
EXACT_MERGE_DTYPES = (torch.float32, torch.float64)


@dataclass(frozen=True)
class DropConnect:
    """DropConnect on Delta_W: each position is kept with probability 1 - p, decided by a keyed hash of
    (key, position), so backward rebuilds the very mask forward used without storing it."""

    p: float
    key: int

    def __post_init__(self) -> None:
        # what the kernels take, computed once when the mask is drawn: the key's two 32-bit halves, the keep
        # threshold on the hash, and the factors of kept and dropped positions
        threshold = max(0, int(self.p * (1 << 32)))
        scalars = (self.key & M32, (self.key >> 32) & M32, threshold, *_drop_factors(float(self.p)))
        object.__setattr__(self, "scalars", scalars)

    def keep_scale(self, positions: torch.Tensor) -> torch.Tensor:
        keep = hash64(positions, self.key) >= int(self.p * (1 << 32))
        return keep.to(torch.float32) / (1.0 - self.p)


@functools.lru_cache(maxsize=64)
def _drop_factors(p: float) -> tuple[float, float]:
    """keep_scale's two values exactly as it rounds them: float32 divisions of 1 and 0 by (1 - p)."""
    scale = (torch.ones(1, dtype=torch.float32) / (1.0 - p)).item()
    zero = (torch.zeros(1, dtype=torch.float32) / (1.0 - p)).item()
    return scale, zero


def draw_dropconnect(p: float, training: bool) -> DropConnect | None:
    """A fresh mask key per forward call, drawn from torch's CPU generator so that torch.manual_seed and
    checkpoint recomputation (which restores RNG state) reproduce it."""
    if not training or p <= 0.0:
        return None
    return DropConnect(p, int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item()))


@dataclass(frozen=True)
class TensorSlice:
    """Where one adapted tensor sits in the flattening of the weights `projection` maps theta to, and which
    slice of theta that projection reads: theta[theta_offset : theta_offset + projection.d] (all of theta
    under the global scope; a block's share under gpart.scope's block scope)."""

    projection: object
    start: int
    shape: tuple[int, ...]
    theta_offset: int = 0

    def window(self, theta: torch.Tensor) -> torch.Tensor:
        return theta.narrow(0, self.theta_offset, self.projection.d)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class AdapterUpdate:
    """One adapter's update of one layer for one call: its slices, theta's column scales, the DropConnect."""

    weight_slice: TensorSlice
    bias_slice: TensorSlice | None
    scales: torch.Tensor
    drop: DropConnect | None = None

    def theta_s(self, theta: torch.Tensor) -> torch.Tensor:
        """theta * scales in fp32: the value every member of group j receives from the partition."""
        return theta.float() * self.scales


def _keep(drop: DropConnect, sl: TensorSlice, n: int, positions, device):
    if positions is None:
        positions = torch.arange(sl.start, sl.start + n, device=device)
    return drop.keep_scale(positions.reshape(-1))


def delta(theta_s, sl: TensorSlice, drop=None, *, positions=None, base=None, dtype=torch.float32, grad=None,
          grad_theta_s=None) -> torch.Tensor:
    """Delta_W (times the DropConnect factors), or base + Delta_W summed in fp32 (fp64 if base or dtype is)
    and cast once to `dtype`, in the slice's shape or at `positions` (global positions, e.g. embedding rows).
    With grad it also adds P^T vec(grad) to grad_theta_s, in the same sweep over the ids where a kernel can."""
    shape = sl.shape if positions is None else positions.shape
    n = sl.numel if positions is None else positions.numel()
    fast = kernels.kernel_for(sl.projection, theta_s, positions, base)
    out = None
    if grad is not None:
        if fast is not None and fast.merge_scatter is not None and base is not None:
            out = fast.merge_scatter(sl.window(theta_s), sl.projection, sl.start, base, grad, sl.window(grad_theta_s),
                                     drop=drop, out_dtype=dtype)
        if out is None:
            transpose_add(grad_theta_s, grad, sl, drop)
    theta_s = sl.window(theta_s)
    if out is None and fast is not None:
        out = fast.gather(theta_s, sl.projection, sl.start if positions is None else 0, n, positions=positions,
                          drop=drop, base=base, out_dtype=dtype)
    if out is None:
        out = sl.projection.delta(theta_s, sl.start, n, positions)
        if drop is not None:
            out = out * _keep(drop, sl, n, positions, out.device)
        if base is not None:
            wide = torch.float64 if torch.float64 in (base.dtype, dtype) else torch.float32
            out = base.reshape(-1).to(wide) + out.to(wide)
        out = out.to(dtype)
    return out.view(shape)


def transpose_add(grad_theta_s, grad, sl: TensorSlice, drop=None, *, positions=None) -> None:
    """grad_theta_s += P^T vec(grad) (times the DropConnect factors) for one tensor, in fp32, in place."""
    grad_theta_s = sl.window(grad_theta_s)
    fast = kernels.kernel_for(sl.projection, grad_theta_s, grad, positions)
    if fast is not None and fast.scatter(grad_theta_s, grad, sl.projection, sl.start if positions is None else 0,
                                         positions=positions, drop=drop):
        return
    if drop is not None:
        grad = grad.reshape(-1).float() * _keep(drop, sl, grad.numel(), positions, grad.device)
    sl.projection.transpose_add(grad_theta_s, grad, sl.start, positions)


def compute_dtype(x: torch.Tensor, weight: torch.Tensor | None) -> torch.dtype:
    """The dtype a layer computes in: autocast's when it is on, else the weight's (x's without one)."""
    if torch.is_autocast_enabled(x.device.type) and (weight is None or weight.dtype.is_floating_point):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype if weight is None else weight.dtype


def forward_operands(theta, weight, bias, update: AdapterUpdate, cdt: torch.dtype):
    """(w, b, dw) in compute dtype cdt for op(x, w, b) + op(x, dw) (apply_operands), from theta, W0 (None: the
    update alone) and b0: W0 + Delta_W merged into w in EXACT_MERGE_DTYPES, else Delta_W kept apart as dw.
    They depend on their arguments alone, which lets the eval cache keep them and give the very same bits."""
    theta_s = update.theta_s(theta.detach())
    b = None if bias is None else bias.to(cdt)
    if update.bias_slice is not None:
        db = delta(theta_s, update.bias_slice, update.drop, dtype=cdt)
        b = db if b is None else b + db
    if weight is not None and cdt in EXACT_MERGE_DTYPES:
        return delta(theta_s, update.weight_slice, update.drop, base=weight, dtype=cdt), b, None
    dw = delta(theta_s, update.weight_slice, update.drop).to(cdt)
    return (None if weight is None else weight.to(cdt)), b, dw


class LayerProduct(torch.autograd.Function):
    """y = op(x, W0 + Delta_W, b0 + Delta_b), or op(x, Delta_W, Delta_b) when weight is None (beside a base
    output computed elsewhere: bitsandbytes, stacked wrappers). `layer` supplies op and its two gradients.
    In half precision the input gradient uses the merged weight; dL/dtheta is always reduced in fp32."""

    @staticmethod
    def forward(ctx, x, theta, weight, bias, update: AdapterUpdate, layer):
        cdt = compute_dtype(x, weight)
        with torch.autocast(x.device.type, enabled=False):
            y = apply_operands(layer, x, forward_operands(theta, weight, bias, update, cdt))
        ctx.save_for_backward(x, theta, weight)
        ctx.update, ctx.layer, ctx.cdt = update, layer, cdt
        return y

    @staticmethod
    def backward(ctx, gy):
        x, theta, weight = ctx.saved_tensors
        update, layer, cdt = ctx.update, ctx.layer, ctx.cdt
        theta_s = update.theta_s(theta)
        grad_theta_s = torch.zeros_like(theta_s)
        gy, xc = gy.to(cdt), x.to(cdt)
        gw, gb = layer.weight_grads(gy, xc, update.bias_slice is not None)
        gx = None
        if ctx.needs_input_grad[0]:
            # the merged weight and the scatter of dL/dW share one sweep over the ids (the fused kernel)
            w = delta(theta_s, update.weight_slice, update.drop, base=weight, dtype=cdt, grad=gw, grad_theta_s=grad_theta_s)
            gx = layer.input_grad(gy, xc, w).to(x.dtype)
            del w
        else:
            transpose_add(grad_theta_s, gw, update.weight_slice, update.drop)
        del gw
        if gb is not None:
            transpose_add(grad_theta_s, gb, update.bias_slice, update.drop)
        return gx, (grad_theta_s * update.scales).to(theta.dtype), None, None, None, None


def apply_operands(layer, x, operands):
    """op(x, w, b) [+ op(x, dw)] for the operands of forward_operands; x is cast to their dtype."""
    w, b, dw = operands
    xc = x.to(dw.dtype if w is None else w.dtype)
    if w is None:
        return layer.op(xc, dw, b)
    y = layer.op(xc, w, b)
    return y if dw is None else y + layer.op(xc, dw, None)


class RowLookup(torch.autograd.Function):
    """y = base_out + Delta_W[tokens]: only the rows that are looked up are drawn from theta."""

    @staticmethod
    def forward(ctx, tokens, theta, base_out, update: AdapterUpdate, padding_idx):
        rows, inverse = torch.unique(tokens, return_inverse=True)
        positions = _row_positions(update.weight_slice, rows)
        delta_rows = delta(update.theta_s(theta), update.weight_slice, update.drop, positions=positions)
        ctx.save_for_backward(theta, rows, inverse)
        ctx.update, ctx.padding_idx = update, padding_idx
        return base_out + delta_rows[inverse].to(base_out.dtype)

    @staticmethod
    def backward(ctx, gy):
        theta, rows, inverse = ctx.saved_tensors
        update = ctx.update
        dim = update.weight_slice.shape[1]
        grad_rows = torch.zeros(rows.shape[0], dim, dtype=torch.float32, device=gy.device)
        grad_rows.index_add_(0, inverse.reshape(-1), gy.reshape(-1, dim).float())
        if ctx.padding_idx is not None:
            grad_rows[rows == ctx.padding_idx] = 0  # like nn.Embedding, the padding row receives no update
        grad_theta_s = torch.zeros(theta.shape[0], dtype=torch.float32, device=gy.device)
        transpose_add(grad_theta_s, grad_rows, update.weight_slice, update.drop, positions=_row_positions(update.weight_slice, rows))
        return None, (grad_theta_s * update.scales).to(theta.dtype), gy, None, None


def _row_positions(sl: TensorSlice, rows: torch.Tensor) -> torch.Tensor:
    dim = sl.shape[1]
    return sl.start + rows[:, None] * dim + torch.arange(dim, device=rows.device)


class TensorDelta(torch.autograd.Function):
    """Delta_W of one tensor as a differentiable function of theta (tensors whose use is unknown)."""

    @staticmethod
    def forward(ctx, theta, update: AdapterUpdate, dtype):
        ctx.save_for_backward(theta)
        ctx.update = update
        return delta(update.theta_s(theta), update.weight_slice, update.drop, dtype=dtype)

    @staticmethod
    def backward(ctx, g):
        (theta,) = ctx.saved_tensors
        grad_theta_s = torch.zeros(theta.shape[0], dtype=torch.float32, device=g.device)
        transpose_add(grad_theta_s, g, ctx.update.weight_slice, ctx.update.drop)
        return (grad_theta_s * ctx.update.scales).to(theta.dtype), None, None
