"""theta's container: a parameter that keeps its precision when a trainer narrows it behind our back.

TRL's trainers cast every trainable parameter of a quantized model to bfloat16 (following QLoRA), which
would round theta and its Adam state to 8 significant bits and lose updates below theta's bf16 spacing.
ThetaParameter's `data` setter (which `module.to(dtype)` goes through too) refuses a cast below
`keep_dtype` (float32 unless `get_peft_model(..., autocast_adapter_dtype=False)` chose the base weights'
dtype): a cast of theta itself keeps theta's exact values, any other narrower value is stored as
`keep_dtype`; widening and device moves pass through. GPart's functions read theta in float32 anyway.

ThetaDict (the tuner's `gpart_theta`) wraps the plain nn.Parameters put into it, by gpart or by
`load_state_dict(..., assign=True)` (PEFT's low_cpu_mem_usage load). FSDP2's own parameters are left as
they are: FSDP2 manages their dtype through its MixedPrecisionPolicy.
"""

from __future__ import annotations

import torch
from torch import nn

_DATA = torch._C.TensorBase.data  # the tensor's own `data` descriptor


def _bits(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits


class ThetaParameter(nn.Parameter):
    """An nn.Parameter whose `data` cannot be narrowed below `keep_dtype` (see the module docstring)."""

    def __new__(cls, data: torch.Tensor | None = None, requires_grad: bool = True,
                keep_dtype: torch.dtype = torch.float32):
        if data is None:
            data = torch.empty(0)
        if isinstance(data, ThetaParameter):
            data = _DATA.__get__(data)
        t = torch.Tensor._make_subclass(cls, data, requires_grad)
        t.keep_dtype = keep_dtype
        return t

    @property
    def data(self) -> torch.Tensor:
        return _DATA.__get__(self)

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        keep = self.__dict__.get("keep_dtype", torch.float32)
        if value.is_floating_point() and _bits(value.dtype) < _bits(keep):
            current = _DATA.__get__(self)
            if current.shape == value.shape and torch.equal(current.to(value.device, value.dtype), value):
                value = current.to(value.device)  # a cast of theta itself: keep every bit of it
            else:
                value = value.to(keep)
        _DATA.__set__(self, value)

    def __deepcopy__(self, memo):
        if id(self) in memo:
            return memo[id(self)]
        result = ThetaParameter(_DATA.__get__(self).clone(memory_format=torch.preserve_format), self.requires_grad,
                                self.keep_dtype)
        memo[id(self)] = result
        return result

    def __reduce_ex__(self, proto):
        return (_rebuild_theta, (_DATA.__get__(self), self.requires_grad, str(self.keep_dtype).split(".")[-1]))

    def __repr__(self) -> str:
        return "Parameter containing:\n" + repr(_DATA.__get__(self).requires_grad_(self.requires_grad))


def _rebuild_theta(data, requires_grad, keep):
    return ThetaParameter(data, requires_grad, getattr(torch, keep))


class ThetaDict(nn.ParameterDict):
    """nn.ParameterDict that stores the plain nn.Parameters put into it as ThetaParameters."""

    # here, not in __setattr__: FSDP2 swaps its own unsharded parameter objects in and out, and a wrapped copy
    # would take their gradients
    def __setitem__(self, key: str, value) -> None:
        super().__setitem__(key, _guarded(value))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        # load_state_dict(assign=True) (PEFT's low_cpu_mem_usage load) installs new plain parameters
        for name, value in list(self._parameters.items()):
            self._parameters[name] = _guarded(value)


def _guarded(value):
    return ThetaParameter(value, value.requires_grad) if type(value) is nn.Parameter else value
