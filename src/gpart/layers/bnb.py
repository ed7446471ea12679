"""The wrapper of bitsandbytes' 4-bit (Linear4bit) and 8-bit (Linear8bitLt) linear layers.

y = base_layer(x) + x Delta_W^T (+ Delta_b): the base output is bitsandbytes' own quantized matmul (and
its own input gradient); the update product keeps only x and theta for backward. The layout records the
logical (out_features, in_features) shape, not the packed storage.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from .. import quantization as Q
from .base import merge_loss
from .linear import Linear


class QuantizedLinear(Linear):
    def __init__(self, base_layer: nn.Module, adapter_name: str, owner, config) -> None:
        super().__init__(base_layer, adapter_name, owner, config)
        self.quant_kind = Q.bnb_kind(base_layer)
        # the quantized weight (and bias) from before the first merge: unmerge puts them back exactly
        self._premerge = None

    def adapted_shapes(self):
        shapes = [("weight", (self.out_features, self.in_features))]
        if self.partition_bias:
            shapes.append(("bias", (self.out_features,)))
        return shapes

    def _merges_into_base(self, base) -> bool:
        return False  # the base product is bitsandbytes'

    def _base_output(self, x, args, kwargs, adapted: bool):
        if torch.is_grad_enabled() and self.quant_kind == Q.BNB_4BIT:
            Q.unpack_cpu_4bit(self.get_base_layer())  # a repacked weight passes no gradient to x
        y = self.base_layer(x, *args, **kwargs)
        # as PEFT does for 4-bit outputs (backprop through bitsandbytes' result view)
        return y.clone() if adapted and self.quant_kind == Q.BNB_4BIT else y

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
            self._premerge = Q.snapshot(base)
        Q.requantize(base, new)
        _add_to_bias(base, db)
        lost = merge_loss(Q.dequantize(base) - w0, dw)
        if lost is not None:
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
        snap, self._premerge = self._premerge, None
        if snap[0].device == base.weight.device:
            Q.restore(base, snap)
        else:  # moved since the merge: subtract and re-quantize (a second rounding)
            dw, db = self._updates(self.merged_adapters)
            Q.requantize(base, Q.dequantize(base) - dw.to(base.weight.device))
            _add_to_bias(base, None if db is None else -db)
        self.merged_adapters.clear()


def _add_to_bias(base: nn.Module, db: torch.Tensor | None) -> None:
    """b += db, computed in fp32 and cast once (nothing when db is None)."""
    if db is not None:
        base.bias.data.copy_((base.bias.detach().float() + db.to(base.bias.device)).to(base.bias.dtype))
