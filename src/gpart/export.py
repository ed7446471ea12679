"""A plain float model for deployment from a GPart model on a quantized (bitsandbytes) base."""

from __future__ import annotations

import torch
from torch import nn

from . import quantization as Q
from .layers import QuantizedLinear
from .model import GPartModel


def merge_and_dequantize(model, dtype: torch.dtype | None = None, adapter_names: list[str] | None = None,
                         safe_merge: bool = False) -> nn.Module:
    """Merge the adapter(s) into dequantized copies of the quantized layers and return a plain float model.

    Adapted bitsandbytes layers become nn.Linear holding W + Delta_W (summed in float32, cast once); quantized
    layers no adapter touches are dequantized, float layers merged as by merge_and_unload, the quantization
    config removed and every float parameter cast to `dtype` (default: the dtype the model was loaded in, else
    float32), so `save_pretrained` writes an ordinary checkpoint. `model` (a PeftModel or its GPartModel) is
    consumed: keep the adapter file to go back. `adapter_names` defaults to the active adapters; `safe_merge`
    raises, before anything is replaced, if a merged weight is not finite.
    """
    tuner = getattr(model, "base_model", model)
    if not isinstance(tuner, GPartModel):
        raise TypeError("merge_and_dequantize needs a model with GPart adapters (a PeftModel from get_peft_model with "
                        f"a GPartConfig), got {type(model).__name__}.")
    dtype = _target_dtype(tuner.model, dtype)
    replacements = []
    for key, layer in list(tuner.model.named_modules()):
        if isinstance(layer, QuantizedLinear):
            new = layer.to_float_linear(dtype, adapter_names)
            if safe_merge and not torch.isfinite(new.weight).all():
                raise ValueError(f"NaNs or infs detected in the merged weight of '{key}'; nothing was replaced. Check "
                                 "theta for non-finite values.")
            replacements.append((key, layer, new))
    for key, layer, new in replacements:
        _swap(tuner.model, key, layer, new)
    plain = tuner.merge_and_unload(adapter_names=adapter_names, safe_merge=safe_merge)
    for key, module in list(plain.named_modules()):
        if Q.bnb_kind(module) is not None:
            bias = None if module.bias is None else module.bias.detach().float()
            _swap(plain, key, module, Q.to_linear(Q.dequantize(module), bias, dtype))
    _forget_quantization(plain)
    for param in plain.parameters():
        # parameters only: buffers such as rotary frequencies keep the dtype a fresh load gives them
        if param.is_floating_point() and param.dtype != dtype:
            param.data = param.data.to(dtype)
    if getattr(plain, "config", None) is not None and hasattr(plain.config, "dtype"):
        plain.config.dtype = dtype
    return plain


def _target_dtype(model: nn.Module, dtype) -> torch.dtype:
    if dtype is not None:
        return dtype
    loaded = getattr(getattr(model, "config", None), "dtype", None)
    if isinstance(loaded, str):
        loaded = getattr(torch, loaded, None)
    return loaded if isinstance(loaded, torch.dtype) and loaded.is_floating_point else torch.float32


def _swap(root: nn.Module, key: str, old: nn.Module, new: nn.Module) -> None:
    new.to(next(iter(old.parameters())).device)
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:  # accelerate's device-map hooks follow the module
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    root.set_submodule(key, new)


def _forget_quantization(model: nn.Module) -> None:
    """Remove what marks a transformers model as quantized (its quantizer, the config entry, the flags)."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "is_quantized"):
        if getattr(model, flag, False):
            setattr(model, flag, False)
