"""GPart's wrappers, one module per kind of thing they wrap (as PEFT's tuners are laid out): linear.py
(nn.Linear, transformers' Conv1D), conv.py (nn.Conv1d/2d/3d), embedding.py, param.py (target_parameters)
and bnb.py (bitsandbytes 4-bit / 8-bit); base.py holds what they share and cache.py the eval-mode cache."""

from __future__ import annotations

from torch import nn

from .. import quantization as Q
from .base import GPartLayer, GPartModule
from .bnb import QuantizedLinear
from .cache import EVAL_CACHE_ENV, clear_gpart_cache, eval_cache_enabled
from .conv import Conv
from .embedding import Embedding
from .linear import Conv1D, Linear
from .param import ParamWrapper

__all__ = ["EVAL_CACHE_ENV", "Conv", "Conv1D", "Embedding", "GPartLayer", "GPartModule", "Linear", "ParamWrapper",
           "QuantizedLinear", "clear_gpart_cache", "eval_cache_enabled", "wrapper_for"]


# wrapped by exact type: a subclass may change what the forward computes
_WRAPPERS = {nn.Linear: Linear, nn.modules.linear.NonDynamicallyQuantizableLinear: Linear, nn.Conv1d: Conv,
             nn.Conv2d: Conv, nn.Conv3d: Conv, nn.Embedding: Embedding}


def wrapper_for(module: nn.Module) -> type[GPartModule] | None:
    """The GPart wrapper class that fits `module`, or None when none does."""
    from transformers.pytorch_utils import Conv1D as TransformersConv1D

    if Q.bnb_kind(module) is not None:  # before nn.Linear: bitsandbytes' layers subclass it
        return QuantizedLinear
    if isinstance(module, TransformersConv1D):
        return Conv1D
    return _WRAPPERS.get(type(module))
