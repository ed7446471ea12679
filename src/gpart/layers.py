"""Wrappers that add GPart's update to one module (or one parameter) of the base model.

A wrapper owns no trainable tensor: theta lives once on the tuner (GPartModel.gpart_theta) and the
wrapper looks it up at call time through an unregistered reference, which keeps the saved file to
theta alone and keeps FSDP2 from seeing a parameter shared between blocks.

In eval mode without autograd a wrapper keeps the tensors its forward builds from theta (GPartLayer._cached),
so generation with an unmerged adapter costs what the base model costs; docs/llm.md says what that holds.
"""

from __future__ import annotations

import math
import os
import warnings
import weakref
from contextlib import contextmanager

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from . import functional as Fn
from . import quantization as Q
from .slices import Slice

# Relative norm of Delta_W that may be lost when a merge casts to the base dtype before we warn.
MERGE_LOSS_WARN = 0.01

# Environment switch of the eval-mode cache: 0/off turns it off, 1/on forces it on (also in distributed runs).
EVAL_CACHE_ENV = "GPART_EVAL_CACHE"
_OFF, _ON = ("0", "false", "off", "no"), ("1", "true", "on", "yes")


def eval_cache_enabled(owner) -> bool:
    """Whether wrappers owned by `owner` may keep what their eval-mode forward builds.

    The tuner's `eval_cache` attribute (True/False) wins; else GPART_EVAL_CACHE; else on, except in a
    distributed run: FSDP2 and ZeRO-3 gather each weight for one forward only, and keeping whole weights
    would undo their sharding.
    """
    setting = getattr(owner, "eval_cache", None)
    if setting is not None:
        return bool(setting)
    env = os.environ.get(EVAL_CACHE_ENV, "").strip().lower()
    if env in _OFF:
        return False
    if env in _ON:
        return True
    if env:
        raise ValueError(f"{EVAL_CACHE_ENV}={env!r} is not understood; set it to 0 (off) or 1 (on), or unset it.")
    return not (torch.distributed.is_available() and torch.distributed.is_initialized())


class _EvalCache(dict):
    """(adapter, tag) -> (key, value) of GPartLayer._cached. A copy or a pickle starts empty: the keys hold
    weak references (which cannot be pickled), and a deep copy should not double the kept memory."""

    def __reduce__(self):
        return (_EvalCache, ())


def clear_gpart_cache(module: nn.Module) -> None:
    """Free what every GPart wrapper inside `module` keeps for eval mode (a PeftModel, the tuner, any part)."""
    for m in module.modules():
        if isinstance(m, GPartLayer):
            m.clear_gpart_cache()


def _tensor_key(t: torch.Tensor | None):
    """What identifies a tensor's current contents: its storage (held weakly, so that the address of a freed
    storage cannot pass for it; two weak references are equal only while they point to the same live
    storage), where it starts, its version counter (bumped by every in-place op that autograd sees:
    optimizer steps, copy_, load_state_dict), dtype, device, shape and strides. Raises RuntimeError for an
    inference tensor, which has no version counter."""
    if t is None:
        return None
    return weakref.ref(t.untyped_storage()), t.data_ptr(), t._version, t.dtype, t.device, t.shape, t.stride()


def _offloaded(module: nn.Module) -> bool:
    """An accelerate hook moves this layer's weights in for each forward and out again: keeping whole
    weights would undo the offloading."""
    hook = module.__dict__.get("_hf_hook")
    return hook is not None and any(getattr(h, "offload", False) for h in getattr(hook, "hooks", (hook,)))


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
        self._gpart_cache = _EvalCache()
        object.__setattr__(self, "_gpart_owner", owner)

    # -- what this wrapper contributes to the flattening ---------------------------------------------

    partition_bias = False  # weight-and-bias wrappers set it from the config

    def adapted_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """(suffix, tensor) of the tensors this wrapper adds to the partition, in canonical order: the base
        layer's weight, then its bias when the config puts biases into the partition."""
        base = self.get_base_layer()
        tensors = [("weight", base.weight)]
        if self.partition_bias:
            tensors.append(("bias", base.bias))
        return tensors

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
        self.clear_gpart_cache(adapter_name)
        self.gpart_dropout.pop(adapter_name, None)
        super().delete_adapter(adapter_name)

    def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
        before = list(self.active_adapters)
        super().set_adapter(adapter_names, inference_mode=inference_mode)
        if list(self.active_adapters) != before:
            self.clear_gpart_cache()

    def enable_adapters(self, enabled: bool) -> None:
        if not enabled:
            self.clear_gpart_cache()
        super().enable_adapters(enabled)

    # -- eval-mode cache ----------------------------------------------------------------------------

    def _cache_allowed(self, base: nn.Module, *tensors: torch.Tensor | None) -> bool:
        """Whether this forward may reuse (and fill) the cache: eval mode, no tensor that autograd must
        track, not while torch.compile traces, no offloading, and the switch on. Training mode frees it."""
        if self.training:
            if self._gpart_cache:
                self.clear_gpart_cache()
            return False
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
            return False
        return not torch.compiler.is_compiling() and eval_cache_enabled(self._gpart_owner) and not _offloaded(base)

    def _cached(self, adapter_name: str, tag, build, *key_tensors: torch.Tensor | None):
        """build()'s value, kept and reused while nothing it depends on changes.

        An entry is keyed by the adapter, `tag` (what is built and its compute dtype), the adapter's
        slices, and the storage, offset, version, dtype, device and shape of each key tensor (theta, the
        base weight, the bias): an optimizer step, copy_ or load_state_dict bumps a version, .to() or
        `.data =` swaps a storage, and the entry is rebuilt. Edits through `.data` bypass the version
        counter; call clear_gpart_cache() after those. A stale value is dropped before the new one is
        built, so a rebuild never holds two.
        """
        slot = (adapter_name, tag)
        try:
            key = (self.gpart_slices.get(adapter_name), *map(_tensor_key, key_tensors))
        except RuntimeError:  # an inference tensor: nothing to key on, so build every time
            return build()
        entry = self._gpart_cache.get(slot)
        if entry is not None:
            if entry[0] == key:
                return entry[1]
            del self._gpart_cache[slot], entry
        value = build()
        self._gpart_cache[slot] = (key, value)
        object.__setattr__(self._gpart_owner, "_gpart_cache_used", True)
        return value

    def clear_gpart_cache(self, adapter_name: str | None = None) -> None:
        """Free what this wrapper keeps for eval mode (all adapters, or one)."""
        if adapter_name is None:
            self._gpart_cache.clear()
            return
        for slot in [s for s in self._gpart_cache if s[0] == adapter_name]:
            del self._gpart_cache[slot]

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
        self.clear_gpart_cache()  # the merged weights are edited through .data, which no version counter sees
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
        self.clear_gpart_cache()
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
        thetas = [self._theta(a) for a in adapters]
        if self._cache_allowed(base, x, base.weight, base.bias, *thetas):
            return self._cached_forward(x, base, adapters, thetas, args, kwargs)
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
        cdt = Fn._compute_dtype(x, self.get_base_layer().weight)
        return self._apply_update(x, self._update_operands(spec, theta, cdt), cdt)

    def _update_operands(self, spec, theta, cdt):
        """(Delta_W, Delta_b or None) in compute dtype cdt, differentiable in theta."""
        dw = Fn.gpart_delta(theta, spec, torch.float32)
        db = None
        if spec.bias is not None:
            bspec = Fn._Spec(spec.bias, None, spec.drop, spec.kind, spec.scales)
            db = Fn.gpart_delta(theta, bspec, torch.float32).to(cdt)
        return dw.to(cdt), db

    def _apply_update(self, x, operands, cdt) -> torch.Tensor:
        dw, db = operands
        if self.kind == "conv":
            return self.get_base_layer()._conv_forward(x.to(cdt), dw, db)
        return Fn._linear(x.to(cdt), dw, db, self.kind)

    def _cached_forward(self, x, base, adapters, thetas, args, kwargs) -> torch.Tensor:
        """The eval-mode forward from kept operands: the very tensors the uncached path builds, applied in
        the same order, so the output has the same bits; a step then costs the base layer's GEMM (fp32),
        plus one product with Delta_W per adapter in half precision or for every adapter after the first."""
        weight, bias = base.weight, base.bias
        extra = {"conv_args": self._conv_args()} if self.kind == "conv" else {}
        cdt = Fn._compute_dtype(x, weight)
        first, theta = adapters[0], thetas[0]
        if self.base_layer is base and extra.get("conv_args", ()) is not None:

            def build():
                spec = self._spec(first, self.kind, theta, None, **extra)
                w, b, dw = Fn.forward_operands(theta, weight, bias, spec, cdt)
                # W0 cast to a half dtype under autocast is not kept: it is the base layer's own per-call cast
                return (w if dw is None or w is weight else None), b, dw

            w, b, dw = self._cached(first, ("op", cdt), build, theta, weight, bias)
            ops = (weight.to(cdt) if w is None else w, b, dw)
            if torch.is_autocast_enabled(x.device.type):
                with torch.autocast(x.device.type, enabled=False):
                    y = Fn.apply_operands(x, ops, self.kind, extra.get("conv_args"))
            else:
                y = Fn.apply_operands(x, ops, self.kind, extra.get("conv_args"))
        else:
            y = self.base_layer(x, *args, **kwargs) + self._cached_update(x, first, theta, cdt, extra)
        for name, theta in zip(adapters[1:], thetas[1:]):
            y = y + self._cached_update(x, name, theta, cdt, extra)
        return y

    def _cached_update(self, x, name, theta, cdt, extra) -> torch.Tensor:
        def build():
            return self._update_operands(self._spec(name, self.kind, theta, None, **extra), theta, cdt)

        return self._apply_update(x, self._cached(name, ("update", cdt), build, theta), cdt)

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
        thetas = [self._theta(a) for a in adapters]
        cached = self._cache_allowed(self.get_base_layer(), x, *thetas)
        for name, theta in zip(adapters, thetas):
            if cached:  # eval mode: the kept Delta_W (compute dtype), the same product as below
                y = y + self._cached_update(x, name, theta).to(y.dtype)
            else:
                spec = self._spec(name, "linear", theta, self._drop(name))
                y = y + Fn.gpart_update_product(x, theta, spec).to(y.dtype)
        return y

    def _cached_update(self, x, name, theta) -> torch.Tensor:
        cdt = Fn._product_dtype(x)
        dw, db = self._cached(name, ("update", cdt), lambda: Fn.update_operands(
            theta, self._spec(name, "linear", theta, None), cdt), theta)
        with torch.autocast(x.device.type, enabled=False):
            return Fn._linear(x.to(cdt), dw, db, "linear")

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
        self.clear_gpart_cache()
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
        self.clear_gpart_cache()
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
        thetas = [self._theta(a) for a in adapters]
        if self._cache_allowed(self.get_base_layer(), w, *thetas):
            value = self._cached(adapters[0], ("param", tuple(adapters)), lambda: self._value(w, adapters, thetas),
                                 w, *thetas)
        else:
            value = self._value(w, adapters, thetas)
        with self._swapped(value):
            return self.base_layer(*args, **kwargs)

    def _value(self, w, adapters, thetas) -> torch.Tensor:
        """W0 + the active adapters' updates, in W0's dtype."""
        value = w
        for name, theta in zip(adapters, thetas):
            spec = self._spec(name, "param", theta, self._drop(name))
            value = value + Fn.gpart_delta(theta, spec, torch.float32).to(w.dtype)
        return value

    def __repr__(self) -> str:
        return "gpart." + super().__repr__()
