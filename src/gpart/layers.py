"""Wrappers that add GPart's update to one module (or one parameter) of the base model.

A wrapper owns no trainable tensor: theta lives once on the tuner (GPartModel.gpart_theta) and the
wrapper looks it up at call time through an unregistered reference, which keeps the saved file to
theta alone and keeps FSDP2 from seeing a parameter shared between blocks.
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import functional as Fn
from . import quantization as Q
from .slices import Slice

# Relative norm of Delta_W that may be lost when a merge casts to the base dtype before we warn.
MERGE_LOSS_WARN = 0.01


class GPartLayer(BaseTunerLayer):
    """Shared logic of every GPart wrapper: per-adapter slices, merge, unmerge, delta weights."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names = ("gpart_slices",)

    def _init_gpart(self, base_layer: nn.Module, owner) -> None:
        self.base_layer = base_layer
        # adapter name -> (weight Slice | None, bias Slice | None); filled once the layout is known
        self.gpart_slices: dict[str, tuple[Slice | None, Slice | None]] = {}
        self.gpart_dropout: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        object.__setattr__(self, "_gpart_owner", owner)

    # -- what this wrapper contributes to the flattening ---------------------------------------------

    def adapted_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(suffix, tensor) of the tensors this wrapper adds to the partition, in canonical order."""
        raise NotImplementedError

    def adapted_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """(suffix, logical shape) of the adapted tensors: what the layout records and the slices cover."""
        return [(suffix, tensor_shape(t)) for suffix, t in self.adapted_tensors()]

    def update_layer(self, adapter_name: str, config) -> None:
        self.gpart_slices[adapter_name] = (None, None)
        self.gpart_dropout[adapter_name] = float(config.dropout)
        self.set_adapter(self.active_adapters)

    def _get_available_adapters(self) -> set[str]:
        return set(self.gpart_slices)

    def _all_available_adapter_names(self) -> list[str]:
        return sorted(self.gpart_slices)

    def delete_adapter(self, adapter_name: str) -> None:
        self.gpart_dropout.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    # -- looking up theta ----------------------------------------------------------------------------

    def _theta(self, adapter_name: str) -> torch.Tensor:
        return self._gpart_owner.gpart_theta[adapter_name]

    def _spec(self, adapter_name: str, kind: str, theta: torch.Tensor, drop=None, **extra) -> Fn._Spec:
        wslice, bslice = self.gpart_slices[adapter_name]
        scales = self._gpart_owner.scales_for(adapter_name, theta.device)
        return Fn._Spec(wslice, bslice, drop, kind, scales, **extra)

    def _drop(self, adapter_name: str):
        return Fn.draw_dropconnect(self.gpart_dropout.get(adapter_name, 0.0), self.training)

    def _adapters_to_apply(self) -> list[str]:
        """The active adapters this forward must add; empty when the base layer alone gives the output
        (adapters disabled, which first undoes a merge, or already merged into the weights)."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return []
        if self.merged:
            return []
        return [a for a in self.active_adapters if a in self.gpart_slices and self.gpart_slices[a][0] is not None]

    # -- updates as plain tensors (merge, get_delta_weight) ------------------------------------------

    def _delta(self, adapter_name: str, which: int) -> torch.Tensor | None:
        """Delta for weight (which=0) or bias (which=1) in fp32, in the tensor's own shape."""
        sl = self.gpart_slices[adapter_name][which]
        if sl is None:
            return None
        theta = self._theta(adapter_name).detach()
        theta_s = Fn.scaled_theta(theta, sl.partition, self._gpart_owner.scales_for(adapter_name, theta.device))
        return Fn.delta_flat(theta_s, sl).view(sl.shape)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta_W of `adapter_name` in the base weight's shape and dtype."""
        w = self.adapted_tensors()[0][1]
        return self._delta(adapter_name, 0).to(w.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        tensors = [t for _, t in self.adapted_tensors()]
        for name in adapter_names:
            if name not in self.gpart_slices:
                continue
            updates = [self._delta(name, k) for k in range(len(tensors))]
            merged = []
            for tensor, upd in zip(tensors, updates):
                if upd is None:
                    merged.append(None)
                    continue
                # merge in fp32, cast once
                new = (tensor.detach().float() + upd.to(tensor.device)).to(tensor.dtype)
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(
                        f"NaNs or infs detected in the merged weights of adapter '{name}'; the base weights were left "
                        "untouched. Check theta for non-finite values."
                    )
                _warn_if_merge_loses(name, tensor, new, upd)
                merged.append(new)
            for tensor, new in zip(tensors, merged):
                if new is not None:
                    tensor.data.copy_(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        tensors = [t for _, t in self.adapted_tensors()]
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for k, tensor in enumerate(tensors):
                upd = self._delta(name, k)
                if upd is not None:
                    tensor.data.copy_((tensor.detach().float() - upd.to(tensor.device)).to(tensor.dtype))


def tensor_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    # under DeepSpeed ZeRO-3 the local tensor is a shard; ds_shape is the real shape
    return tuple(int(s) for s in getattr(tensor, "ds_shape", tensor.shape))


def _lost_fraction(realised: torch.Tensor, update: torch.Tensor) -> float | None:
    """||realised change - Delta_W|| / ||Delta_W||, or None when Delta_W is zero or not finite."""
    norm = update.norm().item()
    if norm == 0.0 or not math.isfinite(norm):
        return None
    return (realised.float() - update.to(realised.device)).norm().item() / norm


def _warn_if_merge_loses(name: str, before: torch.Tensor, after: torch.Tensor, update: torch.Tensor) -> None:
    """Warn when casting W0 + Delta_W to the base dtype loses more than 1% of Delta_W's norm."""
    if before.dtype == torch.float32 or before.dtype == torch.float64:
        return
    lost = _lost_fraction(after.float() - before.float(), update)
    if lost is not None and lost > MERGE_LOSS_WARN:
        warnings.warn(
            f"Merging adapter '{name}' into {before.dtype} weights loses {lost:.1%} of the update's norm "
            f"(Delta_W is small next to W0 and {before.dtype} keeps few significant bits). Merge into a float32 "
            "copy of the model, or keep the adapter unmerged, to keep the update exact."
        )


class LinearLike(nn.Module, GPartLayer):
    """torch.nn.Linear, transformers Conv1D ((in, out) weight layout) and nn.Conv1d/2d/3d."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, owner, config, kind: str) -> None:
        super().__init__()
        self._init_gpart(base_layer, owner)
        self.kind = kind
        self.partition_bias = bool(config.partition_bias) and getattr(base_layer, "bias", None) is not None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)
        if hasattr(base_layer, "in_features"):
            self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def adapted_tensors(self):
        base = self.get_base_layer()
        tensors = [("weight", base.weight)]
        if self.partition_bias:
            tensors.append(("bias", base.bias))
        return tensors

    def _conv_args(self):
        base = self.get_base_layer()
        if base.padding_mode != "zeros" or isinstance(base.padding, str) and base.padding != "valid":
            return None
        nd = base.weight.dim() - 2
        padding = base.padding if not isinstance(base.padding, str) else (0,) * nd
        return (tuple(base.stride), tuple(padding), tuple(base.dilation), base.groups, nd)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._adapters_to_apply()
        if not adapters:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        first, rest = adapters[0], adapters[1:]
        extra = {}
        if self.kind == "conv":
            extra["conv_args"] = self._conv_args()
        theta = self._theta(first)
        spec = self._spec(first, self.kind, theta, self._drop(first), **extra)
        bias = base.bias
        if self.base_layer is base and (self.kind != "conv" or extra["conv_args"] is not None):
            y = Fn.gpart_linear(x, theta, base.weight, bias, spec)
        else:
            # stacked wrappers or exotic conv padding: base output plus an explicit update product
            y = self.base_layer(x, *args, **kwargs) + self._update_product(x, first, spec, theta)
        for name in rest:
            theta = self._theta(name)
            y = y + self._update_product(x, name, self._spec(name, self.kind, theta, self._drop(name), **extra), theta)
        return y

    def _update_product(self, x, name, spec, theta) -> torch.Tensor:
        """op(x, Delta_W) + Delta_b (one extra product). Linear layouts keep nothing per weight for
        backward (gpart_update_product); convolutions go through the generic differentiable delta."""
        if self.kind != "conv":
            return Fn.gpart_update_product(x, theta, spec)
        base = self.get_base_layer()
        dw = Fn.gpart_delta(theta, spec, torch.float32)
        cdt = Fn._compute_dtype(x, base.weight)
        db = None
        if spec.bias is not None:
            bspec = Fn._Spec(spec.bias, None, spec.drop, spec.kind, spec.scales)
            db = Fn.gpart_delta(theta, bspec, torch.float32).to(cdt)
        return base._conv_forward(x.to(cdt), dw.to(cdt), db)

    def __repr__(self) -> str:
        return "gpart." + super().__repr__()


class QuantizedLinear(nn.Module, GPartLayer):
    """A bitsandbytes 4-bit (Linear4bit) or 8-bit (Linear8bitLt) linear layer.

    y = base_layer(x) + x Delta_W^T (+ Delta_b): the base output is bitsandbytes' own quantized matmul (and
    its own input gradient); the update product is one autograd function that keeps only x and theta for
    backward. The layout records the logical (out_features, in_features) shape, not the packed storage.
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, owner, config) -> None:
        super().__init__()
        self._init_gpart(base_layer, owner)
        self.quant_kind = Q.bnb_kind(base_layer)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.partition_bias = bool(config.partition_bias) and getattr(base_layer, "bias", None) is not None
        # the quantized weight (and bias) from before the first merge: unmerge puts them back exactly
        self._premerge = None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def adapted_tensors(self):
        base = self.get_base_layer()
        tensors = [("weight", base.weight)]
        if self.partition_bias:
            tensors.append(("bias", base.bias))
        return tensors

    def adapted_shapes(self):
        shapes = [("weight", (self.out_features, self.in_features))]
        if self.partition_bias:
            shapes.append(("bias", (self.out_features,)))
        return shapes

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._adapters_to_apply()
        if torch.is_grad_enabled() and self.quant_kind == Q.BNB_4BIT:
            Q.unpack_cpu_4bit(self.get_base_layer())  # a repacked weight passes no gradient to x
        y = self.base_layer(x, *args, **kwargs)
        if not adapters:
            return y
        if self.quant_kind == Q.BNB_4BIT:
            y = y.clone()  # as PEFT does for 4-bit outputs (backprop through bitsandbytes' result view)
        for name in adapters:
            theta = self._theta(name)
            spec = self._spec(name, "linear", theta, self._drop(name))
            y = y + Fn.gpart_update_product(x, theta, spec).to(y.dtype)
        return y

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta_W of `adapter_name`, (out_features, in_features), float32 (the base weight is not float)."""
        return self._delta(adapter_name, 0)

    def _updates(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Sum of Delta_W and of Delta_b over `names`, fp32."""
        dw, db = None, None
        for name in names:
            w, b = self._delta(name, 0), self._delta(name, 1)
            dw = w if dw is None else dw + w
            if b is not None:
                db = b if db is None else db + b
        return dw, db

    def to_float_linear(self, dtype: torch.dtype, adapter_names: list[str] | None = None) -> nn.Linear:
        """A plain nn.Linear holding W + Delta_W (and b + Delta_b) of the given (default: active) adapters,
        computed in float32 from the weight as it was before any merge, cast once to `dtype`."""
        if self.merged:
            self.unmerge()
        names = [n for n in (adapter_names or self.active_adapters) if n in self.gpart_slices]
        base = self.get_base_layer()
        w = Q.dequantize(base)
        bias = None if base.bias is None else base.bias.detach().float()
        dw, db = self._updates(names)
        if dw is not None:
            w = w + dw.to(w.device)
        if db is not None:
            bias = bias + db.to(bias.device)
        return Q.to_linear(w, bias, dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Dequantize (fp32), add Delta_W, re-quantize. Re-quantization rounds most of a small Delta_W away
        (measured, with a warning); unmerge restores the weight from before the merge exactly."""
        names = [n for n in check_adapters_to_merge(self, adapter_names) if n in self.gpart_slices]
        if not names:
            return
        base = self.get_base_layer()
        w0 = Q.dequantize(base)
        dw, db = self._updates(names)
        new = w0 + dw.to(w0.device)
        if safe_merge and not (torch.isfinite(new).all() and (db is None or torch.isfinite(db).all())):
            raise ValueError(
                f"NaNs or infs detected in the merged weights of adapter(s) {names}; the base weights were left "
                "untouched. Check theta for non-finite values."
            )
        if self._premerge is None:
            bias = base.bias
            self._premerge = (Q.snapshot(base), None if bias is None else bias.detach().clone())
        Q.requantize(base, new)
        if db is not None:
            base.bias.data.copy_((base.bias.detach().float() + db.to(base.bias.device)).to(base.bias.dtype))
        lost = _lost_fraction(Q.dequantize(base) - w0, dw)
        if lost is not None and lost > MERGE_LOSS_WARN:
            warnings.warn(
                f"Merging adapter(s) {names} into {self.quant_kind} weights loses {lost:.1%} of the update's norm "
                "(re-quantization rounds Delta_W to the quantization grid). Keep the adapter unmerged, or export a "
                "float model with gpart.merge_and_dequantize, to keep the update exact."
            )
        self.merged_adapters.extend(names)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        base = self.get_base_layer()
        (snap, bias), self._premerge = self._premerge, None
        if snap[0].device == base.weight.device:
            Q.restore(base, snap)
            if bias is not None:
                base.bias.data.copy_(bias.to(base.bias.device))
        else:  # moved since the merge: subtract and re-quantize (a second rounding)
            dw, db = self._updates(self.merged_adapters)
            Q.requantize(base, Q.dequantize(base) - dw.to(base.weight.device))
            if db is not None:
                base.bias.data.copy_((base.bias.detach().float() - db.to(base.bias.device)).to(base.bias.dtype))
        self.merged_adapters.clear()

    def __repr__(self) -> str:
        return "gpart." + super().__repr__()


class Embedding(nn.Module, GPartLayer):
    """nn.Embedding: only the looked-up rows of Delta_W are drawn from theta."""

    def __init__(self, base_layer: nn.Embedding, adapter_name: str, owner, config) -> None:
        super().__init__()
        self._init_gpart(base_layer, owner)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def adapted_tensors(self):
        return [("weight", self.get_base_layer().weight)]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapters = self._adapters_to_apply()
        y = self.base_layer(x, *args, **kwargs)
        if not adapters:
            return y
        base = self.get_base_layer()
        for name in adapters:
            theta = self._theta(name)
            spec = self._spec(name, "embedding", theta, self._drop(name), padding_idx=base.padding_idx)
            y = Fn.gpart_embedding(x, theta, y, spec)
        return y

    def __repr__(self) -> str:
        return "gpart." + super().__repr__()


class ParamWrapper(nn.Module, GPartLayer):
    """Adapts one named parameter of a module (e.g. MoE expert tensors, norm weights) whose use we do not know:
    during the wrapped module's forward the parameter is replaced by W0 + Delta_W."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, owner, config, parameter_name: str) -> None:
        super().__init__()
        self._init_gpart(base_layer, owner)
        self.parameter_name = parameter_name
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def adapted_tensors(self):
        return [(self.parameter_name, getattr(self.get_base_layer(), self.parameter_name))]

    @contextmanager
    def _swapped(self, value: torch.Tensor):
        holder = self.get_base_layer()
        original = holder._parameters[self.parameter_name]
        holder._parameters[self.parameter_name] = value
        try:
            yield
        finally:
            holder._parameters[self.parameter_name] = original

    def forward(self, *args, **kwargs):
        adapters = self._adapters_to_apply()
        if not adapters:
            return self.base_layer(*args, **kwargs)
        w = self.adapted_tensors()[0][1]
        value = w
        for name in adapters:
            theta = self._theta(name)
            spec = self._spec(name, "param", theta, self._drop(name))
            value = value + Fn.gpart_delta(theta, spec, torch.float32).to(w.dtype)
        with self._swapped(value):
            return self.base_layer(*args, **kwargs)

    def __repr__(self) -> str:
        return "gpart." + super().__repr__()
