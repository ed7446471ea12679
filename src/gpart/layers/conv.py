"""The wrapper of nn.Conv1d, nn.Conv2d and nn.Conv3d (any padding mode and padding)."""

from __future__ import annotations

import torch

from .linear import ProductLayer


class Conv(ProductLayer):
    """y = conv(x, W0 + Delta_W, b0 + Delta_b) with the base layer's own stride, padding and groups."""

    def __init__(self, base_layer, adapter_name: str, owner, config) -> None:
        super().__init__(base_layer, adapter_name, owner, config)
        self.in_features, self.out_features = base_layer.in_channels, base_layer.out_channels

    def op(self, x, w, b):
        return self.get_base_layer()._conv_forward(x, w, b)

    def _vjp(self, gy, x, w, wrt_x: bool, with_bias: bool):
        """(dL/dx or None, dL/dW, dL/db or None) of op at (x, w), by autograd through the base layer's conv."""
        with torch.enable_grad():
            x = x.detach().requires_grad_(wrt_x)
            w = w.detach().requires_grad_(True)
            b = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device, requires_grad=True) if with_bias else None
            inputs = [t for t in (x, w, b) if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(self.op(x, w, b), inputs, gy))
        return (next(grads) if wrt_x else None), next(grads), (next(grads) if with_bias else None)

    def weight_grads(self, gy, x, with_bias: bool):
        _, gw, gb = self._vjp(gy, x, self.get_base_layer().weight.to(gy.dtype), False, with_bias)
        return gw, gb

    def input_grad(self, gy, x, w):
        return self._vjp(gy, x, w, True, False)[0]
