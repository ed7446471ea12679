"""Wrappers of layers that multiply x by their weight: nn.Linear and transformers' Conv1D (an (in, out)
weight), and the forward they share with the other product layers (gpart.layers.conv, .bnb).

A product layer gives functional.LayerProduct its op and the op's two gradients; the forward adds
every active adapter: the first one merged into the base product (y = op(x, W0 + Delta_W, b0 + Delta_b))
where the wrapper can run the base op itself, the others (and all of them beside a base output computed
elsewhere) as op(x, Delta_W, Delta_b). In eval mode without autograd the operands are kept
(gpart.layers.cache): an fp32 step is then one product with the kept merged weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import functional as Fn
from .base import GPartModule


class ProductLayer(GPartModule):
    """What Linear, Conv1D, Conv and QuantizedLinear share; subclasses define op and its gradients."""

    def op(self, x, w, b):
        raise NotImplementedError

    def weight_grads(self, gy, x, with_bias: bool):
        """(dL/dW, dL/db or None) of op at x for the output gradient gy."""
        raise NotImplementedError

    def input_grad(self, gy, x, w):
        """dL/dx of op(x, w) for the output gradient gy."""
        raise NotImplementedError

    def _merges_into_base(self, base) -> bool:
        """Whether the wrapper runs the base op itself, with W0 + Delta_W; not when another wrapper sits
        in between (its output would be lost)."""
        return self.base_layer is base

    def _base_output(self, x, args, kwargs, adapted: bool):
        """The base layer's own output (adapted: an adapter's update will be added to it)."""
        return self.base_layer(x, *args, **kwargs)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        kept = self._gpart_cache.shortcut(self, x)
        if kept is not None:  # an eval step like the last one: one product with the kept merged weight
            return self.op(x, *kept)
        adapters = self._adapters_to_apply()
        if not adapters:
            return self._base_output(x, args, kwargs, False)
        thetas = [self._theta(a) for a in adapters]
        base = self.get_base_layer()
        weight, bias = (base.weight, base.bias) if self._merges_into_base(base) else (None, None)
        if self._gpart_cache.usable(self, base, x, weight, bias, *thetas):
            return self._cached_forward(x, adapters, thetas, weight, bias, args, kwargs)
        y = None if weight is not None else self._base_output(x, args, kwargs, True)
        for name, theta in zip(adapters, thetas):
            out = Fn.LayerProduct.apply(x, theta, weight, bias, self._update(name, theta), self)
            y = out if y is None else y + out.to(y.dtype)
            weight = bias = None  # the base product is in y: the other adapters add their update alone
        return y

    def _cached_forward(self, x, adapters, thetas, weight, bias, args, kwargs) -> torch.Tensor:
        """The uncached forward's very operands, kept: the same bits, for the base model's cost in fp32."""
        cdt = Fn.compute_dtype(x, weight)
        y = None if weight is not None else self._base_output(x, args, kwargs, True)
        autocast = torch.is_autocast_enabled(x.device.type)
        for name, theta in zip(adapters, thetas):
            w0, b0 = weight, bias

            def build():
                w, b, dw = Fn.forward_operands(theta, w0, b0, self._update(name, theta, with_dropout=False), cdt)
                # W0 cast to a half dtype under autocast is the base layer's own per-call cast: not kept
                return (w if dw is None or w is w0 else None), b, dw

            w, b, dw = self._gpart_cache.get_or_build(self, name, (cdt, w0 is not None), build, theta, w0, b0)
            if len(adapters) == 1 and dw is None and w is not None and x.dtype == cdt and not autocast:
                self._gpart_cache.remember(self, name, x, (w, b))
            ops = (w0.to(cdt) if w is None and w0 is not None else w, b, dw)
            if autocast:
                with torch.autocast(x.device.type, enabled=False):
                    out = Fn.apply_operands(self, x, ops)
            else:
                out = Fn.apply_operands(self, x, ops)
            y = out if y is None else y + out.to(y.dtype)
            weight = bias = None
        return y


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


class Linear(ProductLayer):
    """torch.nn.Linear: y = x W^T + b."""

    def __init__(self, base_layer, adapter_name: str, owner, config) -> None:
        super().__init__(base_layer, adapter_name, owner, config)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features

    def op(self, x, w, b):
        return F.linear(x, w, b)

    def weight_grads(self, gy, x, with_bias: bool):
        g2 = _rows(gy)
        return g2.t() @ _rows(x), (g2.sum(0) if with_bias else None)

    def input_grad(self, gy, x, w):
        return gy @ w


class Conv1D(ProductLayer):
    """transformers' Conv1D (GPT-2): a linear layer storing its weight as (in, out), y = x W + b."""

    def __init__(self, base_layer, adapter_name: str, owner, config) -> None:
        super().__init__(base_layer, adapter_name, owner, config)
        self.in_features, self.out_features = base_layer.weight.shape

    def op(self, x, w, b):
        return F.linear(x, w.t(), b)

    def weight_grads(self, gy, x, with_bias: bool):
        g2 = _rows(gy)
        return _rows(x).t() @ g2, (g2.sum(0) if with_bias else None)

    def input_grad(self, gy, x, w):
        return gy @ w.t()
