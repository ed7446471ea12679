"""Wrappers of layers that multiply x by their weight (nn.Linear, transformers' Conv1D) and the forward
they share with the other product layers (conv.py, bnb.py): the first active adapter is merged into the
base product where the wrapper runs the base op itself, the others add op(x, Delta_W, Delta_b)."""

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
        hot = self._gpart_cache.shortcut(self, x)
        if hot is not None:  # an eval step like the last one: one product with the kept merged weight
            return self.op(x, *hot)
        adapters = self._adapters_to_apply()
        if not adapters:
            return self._base_output(x, args, kwargs, False)
        thetas = [self._theta(a) for a in adapters]
        base = self.get_base_layer()
        weight, bias = (base.weight, base.bias) if self._merges_into_base(base) else (None, None)
        kept = self._gpart_cache.usable(self, base, x, weight, bias, *thetas)
        cdt = Fn.compute_dtype(x, weight)  # the first product's; the kept operands of every adapter use it
        y = None if weight is not None else self._base_output(x, args, kwargs, True)
        for name, theta in zip(adapters, thetas):
            if not kept:
                out = Fn.LayerProduct.apply(x, theta, weight, bias, self._update(name, theta), self)
            else:
                out = self._kept_product(x, name, theta, weight, bias, cdt, len(adapters) == 1)
            y = out if y is None else y + out.to(y.dtype)
            weight = bias = None  # the base product is in y: the other adapters add their update alone
        return y

    def _kept_product(self, x, name, theta, w0, b0, cdt, alone: bool) -> torch.Tensor:
        """LayerProduct's forward with its operands kept (eval mode): the same bits, for the base model's cost
        in fp32."""
        autocast = torch.is_autocast_enabled(x.device.type)

        def build():
            w, b, dw = Fn.forward_operands(theta, w0, b0, self._update(name, theta, with_dropout=False), cdt)
            # W0 cast to a half dtype under autocast is the base layer's own per-call cast: not kept
            return (w if dw is None or w is w0 else None), b, dw

        w, b, dw = self._gpart_cache.get_or_build(self, name, (cdt, w0 is not None), build, theta, w0, b0)
        if alone and dw is None and w is not None and x.dtype == cdt and not autocast:
            self._gpart_cache.remember(self, name, x, (w, b))
        with torch.autocast(x.device.type, enabled=False):  # as LayerProduct.forward
            return Fn.apply_operands(self, x, (w0.to(cdt) if w is None and w0 is not None else w, b, dw))


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
