"""The wrapper of one named parameter (target_parameters: MoE expert tensors, norm weights, ...) whose use
is unknown: during the module's forward the parameter is replaced by W0 + Delta_W."""

from __future__ import annotations

from contextlib import contextmanager

import torch

from .. import functional as Fn
from .base import GPartModule, tensor_shape


def _in_out_features(shape: tuple[int, ...]):
    """LoRA's ParamWrapper convention: (experts, in, out) for 3-D, (out, in) for 2-D; a 1-D weight (a
    norm's) maps its size to itself; None where no convention applies."""
    if len(shape) == 3:
        return shape[1], shape[2]
    if len(shape) == 2:
        return shape[1], shape[0]
    if len(shape) == 1:
        return shape[0], shape[0]
    return None, None


class ParamWrapper(GPartModule):
    def __init__(self, base_layer, adapter_name: str, owner, config, parameter_name: str) -> None:
        self.parameter_name = parameter_name  # before the adapter is added: adapted_tensors needs it
        super().__init__(base_layer, adapter_name, owner, config)
        self.in_features, self.out_features = _in_out_features(tensor_shape(self._parameter()))

    def _parameter(self) -> torch.Tensor:
        return getattr(self.get_base_layer(), self.parameter_name)

    def adapted_tensors(self):
        return [(self.parameter_name, self._parameter())]

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
        w = self._parameter()
        thetas = [self._theta(a) for a in adapters]
        if self._gpart_cache.usable(self, self.get_base_layer(), w, *thetas):
            value = self._gpart_cache.get_or_build(self, adapters[0], tuple(adapters),
                                                   lambda: self._value(w, adapters, thetas), w, *thetas)
        else:
            value = self._value(w, adapters, thetas)
        with self._swapped(value):
            return self.base_layer(*args, **kwargs)

    def _value(self, w, adapters, thetas) -> torch.Tensor:
        """W0 + the active adapters' updates, in W0's dtype."""
        value = w
        for name, theta in zip(adapters, thetas):
            value = value + Fn.TensorDelta.apply(theta, self._update(name, theta), torch.float32).to(w.dtype)
        return value
