"""GPartLayer: what every GPart wrapper shares (per-adapter slices, merge, unmerge, delta weights).

A wrapper owns no trainable tensor: theta lives once on the tuner (GPartModel.gpart_theta) and the
wrapper looks it up at call time through an unregistered reference, which keeps the saved file to
theta alone and keeps FSDP2 from seeing a parameter shared between blocks.
"""

from __future__ import annotations

import math
import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn

from .. import functional as Fn
from ..functional import AdapterUpdate, TensorSlice
from .cache import EvalCache

# Relative norm of Delta_W that may be lost when a merge casts to the base dtype before we warn.
MERGE_LOSS_WARN = 0.01


class GPartLayer(BaseTunerLayer):
    """Shared logic of every GPart wrapper: per-adapter slices, merge, unmerge, delta weights."""

    adapter_layer_names: tuple[str, ...] = ()
    other_param_names = ("gpart_slices", "gpart_dropout")
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

    def clear_gpart_cache(self, adapter_name: str | None = None) -> None:
        """Free what this wrapper keeps for eval mode (all adapters, or one)."""
        self._gpart_cache.drop_adapter(adapter_name)

    def get_base_layer(self) -> nn.Module:
        # PEFT's own probes with hasattr, which costs a raised AttributeError on every eval-mode step
        base = self.base_layer
        while isinstance(base, BaseTunerLayer):
            base = base.base_layer
        return base

    def _theta(self, adapter_name: str) -> torch.Tensor:
        return self.gpart_owner.gpart_theta[adapter_name]

    def _update(self, adapter_name: str, theta: torch.Tensor, with_dropout: bool = True) -> AdapterUpdate:
        """The adapter's update of this layer for one call (DropConnect drawn in training mode)."""
        weight, bias = self.gpart_slices[adapter_name]
        drop = Fn.draw_dropconnect(self.gpart_dropout.get(adapter_name, 0.0), self.training and with_dropout)
        return AdapterUpdate(weight, bias, self.gpart_owner.scales_for(adapter_name, theta.device), drop)

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

    def _delta(self, adapter_name: str, which: int) -> torch.Tensor | None:
        """Delta for weight (which=0) or bias (which=1) in fp32, in the tensor's own shape."""
        sl = self.gpart_slices[adapter_name][which]
        if sl is None:
            return None
        theta = self._theta(adapter_name).detach()
        return Fn.delta(self._update(adapter_name, theta, with_dropout=False).theta_s(theta), sl)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Delta_W of `adapter_name` in the base weight's shape and dtype."""
        w = self.adapted_tensors()[0][1]
        return self._delta(adapter_name, 0).to(w.dtype)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        self.clear_gpart_cache()  # the merged weights are edited through .data, which no version counter sees
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        for name in adapter_names:
            if name not in self.gpart_slices:
                continue
            merged = []  # every tensor is checked before any is written
            for tensor, upd in self._tensor_updates(name):
                new = (tensor.detach().float() + upd.to(tensor.device)).to(tensor.dtype)  # in fp32, cast once
                if safe_merge and not torch.isfinite(new).all():
                    raise ValueError(
                        f"NaNs or infs detected in the merged weights of adapter '{name}'; the base weights were left "
                        "untouched. Check theta for non-finite values."
                    )
                _warn_if_merge_loses(name, tensor, new, upd)
                merged.append((tensor, new))
            for tensor, new in merged:
                tensor.data.copy_(new)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        self.clear_gpart_cache()
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            for tensor, upd in self._tensor_updates(self.merged_adapters.pop()):
                tensor.data.copy_((tensor.detach().float() - upd.to(tensor.device)).to(tensor.dtype))

    def _tensor_updates(self, adapter_name: str):
        """(tensor, its update in fp32) for each adapted tensor the adapter updates, one at a time."""
        for k, (_, tensor) in enumerate(self.adapted_tensors()):
            upd = self._delta(adapter_name, k)
            if upd is not None:
                yield tensor, upd


def tensor_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    # under DeepSpeed ZeRO-3 the local tensor is a shard; ds_shape is the real shape
    return tuple(int(s) for s in getattr(tensor, "ds_shape", tensor.shape))


def merge_loss(realised: torch.Tensor, update: torch.Tensor) -> float | None:
    """||realised change - Delta_W|| / ||Delta_W|| where it exceeds MERGE_LOSS_WARN (worth a warning), else
    None (also when Delta_W is zero or not finite)."""
    norm = update.norm().item()
    if norm == 0.0 or not math.isfinite(norm):
        return None
    lost = (realised.float() - update.to(realised.device)).norm().item() / norm
    return lost if lost > MERGE_LOSS_WARN else None


def _warn_if_merge_loses(name: str, before: torch.Tensor, after: torch.Tensor, update: torch.Tensor) -> None:
    """Warn when casting W0 + Delta_W to the base dtype loses more than 1% of Delta_W's norm."""
    if before.dtype in Fn.EXACT_MERGE_DTYPES:
        return
    lost = merge_loss(after.float() - before.float(), update)
    if lost is not None:
        warnings.warn(
            f"Merging adapter '{name}' into {before.dtype} weights loses {lost:.1%} of the update's norm "
            f"(Delta_W is small next to W0 and {before.dtype} keeps few significant bits). Merge into a float32 "
            "copy of the model, or keep the adapter unmerged, to keep the update exact."
        )


class GPartModule(nn.Module, GPartLayer):
    """A wrapper module: the base layer, the first adapter, and the tuner that owns theta."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, owner, config) -> None:
        super().__init__()
        self.base_layer = base_layer
        # adapter name -> (weight TensorSlice | None, bias TensorSlice | None); filled once the layout is known
        self.gpart_slices: dict[str, tuple[TensorSlice | None, TensorSlice | None]] = {}
        self.gpart_dropout: dict[str, float] = {}
        self.merged_adapters: list[str] = []
        self._disable_adapters = False
        self._gpart_cache = EvalCache()
        object.__setattr__(self, "gpart_owner", owner)  # unregistered: see the module docstring
        self.partition_bias = bool(config.partition_bias) and getattr(base_layer, "bias", None) is not None
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def __repr__(self) -> str:
        return "gpart." + super().__repr__()
