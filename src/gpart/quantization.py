"""Quantized base layers: the bitsandbytes 4-bit and 8-bit weights GPart adapts, read as floats and written
back (only merges and exports dequantize, one layer at a time), and a clear refusal for other quantized layers.

CPU repacking (bitsandbytes 0.50 on CPUs with AVX512-BF16): an eval-mode forward whose input needs no
gradient rewrites a 4-bit weight in place into a CPU-only layout. Afterwards `dequantize_4bit` returns a
different matrix, a training forward fails or silently passes no gradient to its input, and every
pack/unpack round re-quantizes double-quantized statistics. GPart therefore turns that repacking off for
the 4-bit layers of a model it adapts (`disable_cpu_repacking`) and undoes it where it already happened
(`unpack_cpu_4bit`, which also runs before any dequantization).
"""

from __future__ import annotations

import sys

import torch
from torch import nn

BNB_4BIT = "bnb-4bit"
BNB_8BIT = "bnb-8bit"

SUPPORTED = (
    "bitsandbytes 4-bit (Linear4bit: nf4/fp4, with or without double quantization) and 8-bit (Linear8bitLt) "
    "linear layers, and float torch.nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d, nn.Embedding"
)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# class-name fragments of quantized layers from other libraries, and what they are called
_OTHER_QUANTIZERS = (
    ("gptq", "GPTQ"), ("awq", "AWQ"), ("hqq", "HQQ"), ("aqlm", "AQLM"), ("eetq", "EETQ"), ("exllama", "ExLlama"),
    ("marlin", "Marlin"), ("quantlinear", "a quantized linear layer"), ("fp8", "FP8"), ("qlinear", "a quantized linear layer"),
)


def _plain_types() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, Conv1D, nn.Conv1d, nn.Conv2d, nn.Conv3d,
            nn.Embedding)


def _bnb():
    # bitsandbytes layers can only exist once bitsandbytes is imported: never import it ourselves
    return sys.modules.get("bitsandbytes")


def bnb_kind(module: nn.Module) -> str | None:
    """BNB_4BIT, BNB_8BIT, or None, by isinstance (bitsandbytes' layers subclass nn.Linear)."""
    bnb = _bnb()
    if bnb is None:
        return None
    if isinstance(module, bnb.nn.Linear4bit):
        return BNB_4BIT
    if isinstance(module, bnb.nn.Linear8bitLt):
        return BNB_8BIT
    return None


def unsupported_reason(module: nn.Module) -> str | None:
    """Why `module` is a quantized layer GPart cannot adapt (naming what it is), or None: GPart needs a plain
    float weight to add Delta_W to, so an integer, float8 or tensor-subclass (torchao) weight is refused."""
    if bnb_kind(module) is not None:
        return None
    weight = getattr(module, "weight", None)
    if type(module) not in _plain_types():
        reason = _known_quantizer(module)
        if reason is not None:
            return reason
    if isinstance(weight, torch.Tensor) and not weight.is_meta:
        if _is_tensor_subclass(weight):
            return f"its weight is a {type(weight).__name__} tensor subclass (e.g. torchao), not a plain tensor"
        if weight.dtype not in FLOAT_DTYPES:
            return f"its weight is {weight.dtype}, not a float16/bfloat16/float32/float64 tensor"
    return None


def _known_quantizer(module: nn.Module) -> str | None:
    """PEFT's quantization backends (which import the quantization libraries installed), then class names."""
    name = type(module).__name__
    try:
        from peft.utils.quantization_utils import resolve_quantization_backend

        backend = resolve_quantization_backend(module, get_apply_tensor_subclass=lambda: None)
    except Exception:  # a backend that needs more than we give it is still a quantized layer
        backend = None
    if backend is not None:
        return f"it is quantized with {backend.backend_name or type(backend).__name__}"
    lowered = (type(module).__module__ + "." + name).lower()
    for fragment, label in _OTHER_QUANTIZERS:
        if fragment in lowered:
            return f"it looks like {label} ({type(module).__module__}.{name})"
    return None


def _is_tensor_subclass(weight: torch.Tensor) -> bool:
    if type(weight) in (torch.Tensor, nn.Parameter):
        return False
    try:  # FSDP2 shards parameters as DTensors: those are plain weights, sharded
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            return False
    except ImportError:
        pass
    # subclasses of nn.Parameter that only add attributes (e.g. DeepSpeed's) behave as plain tensors
    return type(weight).__torch_dispatch__ is not torch.Tensor.__torch_dispatch__


# -- the CPU repacking hazard --------------------------------------------------------------------------


def unpack_cpu_4bit(module: nn.Module) -> None:
    """Undo bitsandbytes' in-place CPU repacking of a Linear4bit weight, if it happened."""
    weight = module.weight
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
    if getattr(module, "quant_state", None) is not None:
        module.quant_state = weight.quant_state


def disable_cpu_repacking(model: nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of `model` in its standard layout (see the module docstring)."""
    for module in model.modules():
        if bnb_kind(module) == BNB_4BIT:
            unpack_cpu_4bit(module)
            if getattr(module, "support_avx512bf16_for_cpu", False):
                module.support_avx512bf16_for_cpu = False


# -- reading and writing weights -----------------------------------------------------------------------


def _standard_layout_kind(module: nn.Module) -> str:
    """The layer's kind, after undoing a CPU repacking (a repacked weight dequantizes to another matrix)."""
    kind = bnb_kind(module)
    if kind is None:
        raise TypeError(f"{type(module).__name__} is not a bitsandbytes layer")
    if kind == BNB_4BIT:
        unpack_cpu_4bit(module)
    return kind


def dequantize(module: nn.Module) -> torch.Tensor:
    """The weight the layer computes with, as a new float32 tensor of shape (out_features, in_features)."""
    kind = _standard_layout_kind(module)
    weight = module.weight
    if kind == BNB_4BIT:
        w = _bnb().functional.dequantize_4bit(weight.data, weight.quant_state)
    elif weight.dtype != torch.int8:  # has_fp16_weights: a float weight quantized on the fly
        return weight.detach().float().clone()
    else:
        scb = module.state.SCB if module.state.SCB is not None else weight.SCB
        w = _bnb().functional.int8_vectorwise_dequant(weight.data, scb)
    return w.float().reshape(module.out_features, module.in_features)


def requantize(module: nn.Module, w: torch.Tensor) -> None:
    """Quantize `w` (out, in) the way the layer's current weight was quantized, and install it; the old
    weight object is left untouched (a snapshot taken before stays valid)."""
    kind = _standard_layout_kind(module)
    bnb, weight = _bnb(), module.weight
    if kind == BNB_4BIT:
        state = weight.quant_state
        new = bnb.nn.Params4bit(
            w.detach().float().cpu().contiguous(), requires_grad=False, blocksize=state.blocksize,
            compress_statistics=state.nested, quant_type=state.quant_type, quant_storage=weight.quant_storage,
            module=module,
        ).to(weight.device)
        # quantized from fp32 (one rounding); dequantize keeps returning the dtype it did before
        new.quant_state.dtype = state.dtype
        module.weight = new
        module.quant_state = new.quant_state
    elif weight.dtype != torch.int8:  # 8-bit with has_fp16_weights: still float until moved to a GPU
        module.weight = bnb.nn.Int8Params(w.detach().to(weight.dtype).clone(), requires_grad=weight.requires_grad,
                                          has_fp16_weights=True)
    else:
        module.weight = bnb.nn.Int8Params(w.detach().float().cpu(), requires_grad=False,
                                          has_fp16_weights=weight.has_fp16_weights).to(weight.device)
        module.state.reset_grads()  # the next forward takes CB/SCB from the new weight


def snapshot(module: nn.Module):
    """What restore() needs to put the layer's quantized weight and its bias back exactly (no second rounding)."""
    state = getattr(module, "state", None)
    return (module.weight, getattr(module, "quant_state", None), None if state is None else (state.CB, state.SCB),
            None if module.bias is None else module.bias.detach().clone())


def restore(module: nn.Module, snap) -> None:
    weight, quant_state, lt, bias = snap
    module.weight = weight
    if quant_state is not None:
        module.quant_state = quant_state
    if lt is not None:
        module.state.reset_grads()
        module.state.CB, module.state.SCB = lt
    if bias is not None:
        module.bias.data.copy_(bias.to(module.bias.device))


def to_linear(weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> nn.Linear:
    """A plain, frozen nn.Linear holding `weight` (out, in) and `bias`, each cast once to `dtype`."""
    out_features, in_features = weight.shape
    lin = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().to(dtype), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().to(dtype), requires_grad=False)
    return lin
