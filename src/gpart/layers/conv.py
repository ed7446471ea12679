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

    def _vjp(self, gy, x, w, mask):
        """(dL/dx, dL/dW, dL/db) of op at (x, w), each None where `mask` does not ask for it."""
        base = self.get_base_layer()
        padding = (0,) * (w.dim() - 2) if base.padding == "valid" else base.padding
        if base.padding_mode == "zeros" and not isinstance(padding, str):
            # aten's own backward: no forward conv is run again
            return torch.ops.aten.convolution_backward(gy, x, w, None, list(base.stride), list(padding),
                                                       list(base.dilation), False, [0] * (w.dim() - 2), base.groups,
                                                       mask)
        # a layer that pads itself ("same", a padding mode): autograd through its own conv
        with torch.enable_grad():
            inputs = [x.detach().requires_grad_(mask[0]), w.detach().requires_grad_(mask[1]),
                      torch.zeros(w.shape[0], dtype=w.dtype, device=w.device, requires_grad=mask[2])]
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(self.op(*inputs[:2], inputs[2] if mask[2] else None), wanted, gy))
        return tuple(next(grads) if m else None for m in mask)

    def weight_grads(self, gy, x, with_bias: bool):
        _, gw, gb = self._vjp(gy, x, self.get_base_layer().weight.to(gy.dtype), [False, True, with_bias])
        return gw, gb

    def input_grad(self, gy, x, w):
        return self._vjp(gy, x, w, [True, False, False])[0]
