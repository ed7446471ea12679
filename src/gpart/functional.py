"""GPart's autograd: Delta_W = P theta for one adapted tensor, and the exact gradient P^T vec(dL/dW).

Every function here works on one tensor's slice [start, start + numel) of the global flattening.
Nothing proportional to the weight is kept between forward and backward: backward recomputes the
update from (theta, partition, slice) and frees it as soon as the GEMMs are done.

Cost per linear layer (DESIGN.md, cost model):
- fp32 compute: forward one GEMM with W0 + Delta_W; backward two GEMMs (grad_x with the merged weight,
  and dL/dW); that is the floor of 3.
- half-precision compute: W0 + Delta_W rounded to bf16 would lose most of a small update, so the
  forward adds x Delta_W^T as a separate product (4 GEMMs in all; the input gradient uses the merged
  weight, whose rounding is of the order of W0's own).
- dL/dtheta is reduced in fp32 whatever the weight dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import kernels
from .partition import Partition
# Slice and DropConnect live one floor below (gpart.slices); re-exported here for existing imports
from .slices import DropConnect, Slice, reference_accumulate_grad, reference_delta_flat  # noqa: F401


def draw_dropconnect(p: float, training: bool) -> DropConnect | None:
    """A fresh mask key per forward call, drawn from torch's CPU generator so that torch.manual_seed and
    checkpoint recomputation (which restores RNG state) reproduce it."""
    if not training or p <= 0.0:
        return None
    key = int(torch.randint(0, 1 << 62, (1,), dtype=torch.int64).item())
    return DropConnect(p, key)


def _own_transform(projection) -> bool:
    """True for projections that bring their own transform (gpart.fastfood); the partition (and its
    gained variant) goes through the id kernels below."""
    return not isinstance(projection, Partition)


def scaled_theta(theta: torch.Tensor, partition: Partition, scales: torch.Tensor | None = None) -> torch.Tensor:
    """theta_j / sqrt(n_j) in fp32: the value every member of group j receives."""
    if scales is None:
        scales = partition.scales(device=theta.device)
    return theta.float() * scales


def delta_flat(theta_s: torch.Tensor, sl: Slice, drop: DropConnect | None = None) -> torch.Tensor:
    """vec(Delta_W) for one slice, in fp32: a fast kernel where one applies, else the reference sweep."""
    if _own_transform(sl.partition):
        return sl.partition.delta(theta_s, sl.start, sl.numel, drop)
    fast = kernels.delta_flat(theta_s, sl.partition, sl.start, sl.numel, drop)
    return fast if fast is not None else reference_delta_flat(theta_s, sl, drop)


def delta_at(theta_s: torch.Tensor, partition: Partition, positions: torch.Tensor, drop: DropConnect | None = None):
    """Delta values at arbitrary global positions (used for embedding rows)."""
    if _own_transform(partition):
        return partition.delta_at(theta_s, positions, drop)
    fast = kernels.delta_at(theta_s, partition, positions, drop)
    if fast is not None:
        return fast

    ids = partition.ids_at(positions)
    vals = theta_s[ids]
    if drop is not None:
        vals = vals * drop.keep_scale(positions.reshape(-1))
    return vals.view(positions.shape)


def accumulate_grad(grad_theta_s: torch.Tensor, grad_w: torch.Tensor, sl: Slice, drop: DropConnect | None = None):
    """grad_theta_s[g(i)] += vec(grad_w)[i] for the slice, accumulated in fp32."""
    if _own_transform(sl.partition):
        return sl.partition.accumulate(grad_theta_s, grad_w, sl.start, drop)
    if not kernels.accumulate_grad(grad_theta_s, grad_w, sl.partition, sl.start, drop):
        reference_accumulate_grad(grad_theta_s, grad_w, sl, drop)


def accumulate_grad_at(grad_theta_s, grad_vals, partition: Partition, positions, drop: DropConnect | None = None):
    """grad_theta_s[g(p)] += grad_vals[p] for arbitrary global positions."""
    if _own_transform(partition):
        return partition.accumulate_at(grad_theta_s, grad_vals, positions, drop)
    if kernels.accumulate_grad_at(grad_theta_s, grad_vals, partition, positions, drop):
        return

    ids = partition.ids_at(positions)
    vals = grad_vals.reshape(-1).float()
    if drop is not None:
        vals = vals * drop.keep_scale(positions.reshape(-1))
    grad_theta_s.index_add_(0, ids, vals)


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the layer computes in: the autocast dtype when autocast is on, else the weight's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and weight.dtype.is_floating_point:
        return torch.get_autocast_dtype(device_type)
    return weight.dtype


class _Spec:
    """Everything the autograd functions need besides tensors (kept off the tensor argument list)."""

    __slots__ = ("weight", "bias", "drop", "kind", "conv_args", "scales", "compute_dtype", "padding_idx")

    def __init__(self, weight: Slice, bias: Slice | None, drop, kind: str, scales, conv_args=None, padding_idx=None):
        self.weight, self.bias, self.drop, self.kind = weight, bias, drop, kind
        self.scales, self.conv_args, self.padding_idx = scales, conv_args, padding_idx
        self.compute_dtype = None


def _weight_update(theta_s, spec: _Spec, dtype: torch.dtype) -> torch.Tensor:
    return delta_flat(theta_s, spec.weight, spec.drop).view(spec.weight.shape).to(dtype)


def _bias_update(theta_s, spec: _Spec, dtype: torch.dtype) -> torch.Tensor | None:
    if spec.bias is None:
        return None
    return delta_flat(theta_s, spec.bias, spec.drop).to(dtype)


def _add_bias(bias, dbias):
    if dbias is None:
        return bias
    return dbias if bias is None else bias + dbias


def _linear(x, w, b, kind):
    # transformers' Conv1D stores the weight as (in, out): y = x W + b.
    return F.linear(x, w.t() if kind == "conv1d" else w, b)


def _conv(x, w, b, conv_args):
    stride, padding, dilation, groups, nd = conv_args
    fn = (F.conv1d, F.conv2d, F.conv3d)[nd - 1]
    return fn(x, w, b, stride, padding, dilation, groups)


def forward_operands(theta, weight, bias, spec: _Spec, cdt: torch.dtype):
    """(w, b, dw): the tensors the forward applies to x in compute dtype cdt, built from theta, W0 and b0.

    y = op(x, w, b) + op(x, dw) (the second product only where dw is not None). fp32 and fp64 compute use
    one product with the merged weight w = W0 + Delta_W; half-precision compute keeps x Delta_W^T as a
    separate product (exact: not swamped by W0's rounding), so w is W0 in cdt and dw is Delta_W in cdt.
    They depend on nothing but (theta, W0, b0, the slices, cdt), which is what lets an eval-mode wrapper
    keep them (GPartLayer._cached) and get the very bits this function gives.
    """
    theta_s = scaled_theta(theta, spec.weight.partition, spec.scales)
    wc = weight.to(cdt)
    b0 = None if bias is None else bias.to(cdt)
    b = _add_bias(b0, _bias_update(theta_s, spec, cdt))
    if cdt == torch.float32 and wc.dtype == torch.float32:
        return _merged(theta_s, spec, weight, cdt), b, None
    if cdt == torch.float64:
        return wc + _weight_update(theta_s, spec, cdt), b, None
    return wc, b, _weight_update(theta_s, spec, torch.float32).to(cdt)


def apply_operands(xc, operands, kind: str, conv_args=None):
    """op(x, w, b) [+ op(x, dw)] for the operands of forward_operands; x is cast to their dtype."""
    w, b, dw = operands
    if xc.dtype != w.dtype:
        xc = xc.to(w.dtype)
    y = _apply_kind(xc, w, b, kind, conv_args)
    if dw is not None:
        y = y + _apply_kind(xc, dw, None, kind, conv_args)
    return y


class _GPartOp(torch.autograd.Function):
    """y = op(x, W0 + Delta_W, b0 + Delta_b) for linear, Conv1D and convolution layers."""

    @staticmethod
    def forward(ctx, x, theta, weight, bias, spec: _Spec):
        cdt = _compute_dtype(x, weight)
        spec.compute_dtype = cdt
        with torch.autocast(x.device.type, enabled=False):
            y = apply_operands(x, forward_operands(theta, weight, bias, spec, cdt), spec.kind, spec.conv_args)
        ctx.save_for_backward(x, theta, weight)
        ctx.spec, ctx.has_bias = spec, bias is not None
        return y

    @staticmethod
    def backward(ctx, gy):
        x, theta, weight = ctx.saved_tensors
        spec: _Spec = ctx.spec
        cdt = spec.compute_dtype
        sl = spec.weight
        theta_s = scaled_theta(theta, sl.partition, spec.scales)
        gy = gy.to(cdt)
        xc = x.to(cdt)
        need_gx = ctx.needs_input_grad[0]
        grad_theta_s = torch.zeros_like(theta_s)
        if spec.kind == "conv":
            stride, padding, dilation, groups, nd = spec.conv_args
            gx, gw, gb = torch.ops.aten.convolution_backward(
                gy, xc, _merged(theta_s, spec, weight, cdt), None, list(stride), list(padding), list(dilation), False,
                [0] * nd, groups, [need_gx, True, spec.bias is not None],
            )
            accumulate_grad(grad_theta_s, gw, sl, spec.drop)
        else:
            g2 = gy.reshape(-1, gy.shape[-1])
            x2 = xc.reshape(-1, xc.shape[-1])
            gw = (x2.t() @ g2) if spec.kind == "conv1d" else (g2.t() @ x2)
            gb = g2.sum(0) if spec.bias is not None else None
            # dL/dW first, so that the merged weight for the input gradient and the scatter of dL/dW into
            # dL/dtheta share one sweep over the ids (the fused kernel); else two sweeps.
            wm = None
            if need_gx and not _own_transform(sl.partition):
                wm = kernels.merged_weight_and_grad(theta_s, sl.partition, sl.start, weight, gw, grad_theta_s,
                                                    spec.drop, out_dtype=cdt)
            if wm is None:
                accumulate_grad(grad_theta_s, gw, sl, spec.drop)
                if need_gx:
                    wm = _merged(theta_s, spec, weight, cdt)
            del gw
            gx = None
            if need_gx:
                gx = (gy @ wm.t()) if spec.kind == "conv1d" else (gy @ wm)
            del wm
        if spec.bias is not None:
            accumulate_grad(grad_theta_s, gb, spec.bias, spec.drop)
        grad_theta = (grad_theta_s * spec.scales).to(theta.dtype)
        gx = None if gx is None else gx.to(x.dtype)
        return gx, grad_theta, None, None, None


def _merged(theta_s, spec: _Spec, weight: torch.Tensor, cdt: torch.dtype) -> torch.Tensor:
    """W0 + Delta_W in dtype cdt: one fused sweep where a fast kernel applies."""
    if weight.dtype == torch.float64 or cdt == torch.float64:
        return (weight.double() + _weight_update(theta_s, spec, torch.float64)).to(cdt)
    sl = spec.weight
    if _own_transform(sl.partition):
        return (weight.float() + _weight_update(theta_s, spec, torch.float32)).to(cdt)
    return kernels.merged_weight(theta_s, sl.partition, sl.start, weight, spec.drop, out_dtype=cdt)


def _apply_kind(x, w, b, kind: str, conv_args=None):
    if kind == "conv":
        return _conv(x, w, b, conv_args)
    return _linear(x, w, b, kind)


def gpart_linear(x, theta, weight, bias, spec: _Spec):
    return _GPartOp.apply(x, theta, weight, bias, spec)


def _product_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype of an update product beside a base output computed elsewhere: autocast's, else x's."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


class _GPartUpdateProduct(torch.autograd.Function):
    """y = x Delta_W^T + Delta_b (linear layout; x Delta_W for Conv1D's (in, out) layout).

    The adapter's share of a layer's output when the base output comes from elsewhere: a quantized
    kernel (bitsandbytes), a stacked wrapper, an exotic convolution. Only x and theta are kept for
    backward; Delta_W is built in forward, freed, and rebuilt in backward for the input gradient only.
    dL/dW = gy^T x is scattered into dL/dtheta in fp32 by the same kernels as the merged path.
    """

    @staticmethod
    def forward(ctx, x, theta, spec: _Spec):
        cdt = _product_dtype(x)
        spec.compute_dtype = cdt
        with torch.autocast(x.device.type, enabled=False):
            dw, db = update_operands(theta, spec, cdt)
            y = _linear(x.to(cdt), dw, db, spec.kind)
        del dw
        ctx.save_for_backward(x, theta)
        ctx.spec = spec
        return y

    @staticmethod
    def backward(ctx, gy):
        x, theta = ctx.saved_tensors
        spec: _Spec = ctx.spec
        cdt = spec.compute_dtype
        theta_s = scaled_theta(theta, spec.weight.partition, spec.scales)
        gy = gy.to(cdt)
        g2 = gy.reshape(-1, gy.shape[-1])
        x2 = x.to(cdt).reshape(-1, x.shape[-1])
        grad_theta_s = torch.zeros_like(theta_s)
        gw = (x2.t() @ g2) if spec.kind == "conv1d" else (g2.t() @ x2)
        accumulate_grad(grad_theta_s, gw, spec.weight, spec.drop)
        del gw, x2
        if spec.bias is not None:
            accumulate_grad(grad_theta_s, g2.sum(0), spec.bias, spec.drop)
        gx = None
        if ctx.needs_input_grad[0]:
            dw = _weight_update(theta_s, spec, torch.float32).to(cdt)
            gx = ((gy @ dw.t()) if spec.kind == "conv1d" else (gy @ dw)).to(x.dtype)
            del dw
        grad_theta = (grad_theta_s * spec.scales).to(theta.dtype)
        return gx, grad_theta, None


def update_operands(theta, spec: _Spec, cdt: torch.dtype):
    """(Delta_W, Delta_b or None) in dtype cdt, not tracked by autograd: what the update product multiplies
    x by (and what an eval-mode cache keeps, so the cached product has the same bits)."""
    theta_s = scaled_theta(theta.detach(), spec.weight.partition, spec.scales)
    return _weight_update(theta_s, spec, torch.float32).to(cdt), _bias_update(theta_s, spec, cdt)


def gpart_update_product(x, theta, spec: _Spec):
    """x Delta_W^T + Delta_b (linear or Conv1D layout), differentiable in x and theta."""
    return _GPartUpdateProduct.apply(x, theta, spec)


class _GPartEmbedding(torch.autograd.Function):
    """y = W0[tokens] + Delta_W[tokens]: only the rows that are looked up are drawn from theta."""

    @staticmethod
    def forward(ctx, tokens, theta, base_out, spec: _Spec):
        dim = spec.weight.shape[1]
        theta_s = scaled_theta(theta, spec.weight.partition, spec.scales)
        rows, inverse = torch.unique(tokens, return_inverse=True)
        positions = spec.weight.start + rows[:, None] * dim + torch.arange(dim, device=tokens.device)
        delta_rows = delta_at(theta_s, spec.weight.partition, positions, spec.drop)
        ctx.save_for_backward(theta, rows, inverse)
        ctx.spec = spec
        return base_out + delta_rows[inverse].to(base_out.dtype)

    @staticmethod
    def backward(ctx, gy):
        theta, rows, inverse = ctx.saved_tensors
        spec: _Spec = ctx.spec
        dim = spec.weight.shape[1]
        grad_rows = torch.zeros(rows.shape[0], dim, dtype=torch.float32, device=gy.device)
        grad_rows.index_add_(0, inverse.reshape(-1), gy.reshape(-1, dim).float())
        if spec.padding_idx is not None:
            # like nn.Embedding, the padding row receives no update
            grad_rows[rows == spec.padding_idx] = 0
        positions = spec.weight.start + rows[:, None] * dim + torch.arange(dim, device=gy.device)
        grad_theta_s = torch.zeros(theta.shape[0], dtype=torch.float32, device=gy.device)
        accumulate_grad_at(grad_theta_s, grad_rows, spec.weight.partition, positions, spec.drop)
        return None, (grad_theta_s * spec.scales).to(theta.dtype), gy, None


def gpart_embedding(tokens, theta, base_out, spec: _Spec):
    return _GPartEmbedding.apply(tokens, theta, base_out, spec)


class _GPartDelta(torch.autograd.Function):
    """Delta_W for one tensor as a differentiable function of theta (for arbitrary target parameters)."""

    @staticmethod
    def forward(ctx, theta, spec: _Spec, dtype):
        theta_s = scaled_theta(theta, spec.weight.partition, spec.scales)
        ctx.save_for_backward(theta)
        ctx.spec = spec
        return _weight_update(theta_s, spec, dtype)

    @staticmethod
    def backward(ctx, g):
        (theta,) = ctx.saved_tensors
        spec: _Spec = ctx.spec
        grad_theta_s = torch.zeros(theta.shape[0], dtype=torch.float32, device=g.device)
        accumulate_grad(grad_theta_s, g, spec.weight, spec.drop)
        return (grad_theta_s * spec.scales).to(theta.dtype), None, None


def gpart_delta(theta, spec: _Spec, dtype=torch.float32):
    return _GPartDelta.apply(theta, spec, dtype)
