"""Every wrapper exposes in_features / out_features the way PEFT's tuner layers do (LoRA's conventions:
Linear and Conv1D their features, convolutions their channels, embeddings (num_embeddings,
embedding_dim), parameter wrappers the parameter's (in, out)), and each kind of module gets its own
wrapper class."""

from __future__ import annotations

import pytest
import torch
from conftest import ConvNet, EmbNet, bnb_llama, load_quantized, tiny_gpt2
from peft import get_peft_model
from torch import nn

from gpart import GPartConfig
from gpart.layers import Conv, Conv1D, Embedding, Linear, ParamWrapper, QuantizedLinear


def _wrappers(model):
    return {name: m for name, m in model.base_model.model.named_modules() if hasattr(m, "gpart_slices")}


def test_linear_conv_and_embedding_wrappers_expose_peft_features():
    conv = get_peft_model(ConvNet(), GPartConfig(d=20, target_modules=["conv1d", "conv2d", "conv3d", "head"]))
    got = {name: (type(m), m.in_features, m.out_features) for name, m in _wrappers(conv).items()}
    assert got == {"conv1d": (Conv, 3, 4), "conv2d": (Conv, 4, 5), "conv3d": (Conv, 1, 2), "head": (Linear, 28, 2)}
    emb = get_peft_model(EmbNet(), GPartConfig(d=20, target_modules=["emb"]))
    layer = _wrappers(emb)["emb"]
    assert (type(layer), layer.in_features, layer.out_features) == (Embedding, 50, 8)


def test_transformers_conv1d_wrapper_reads_its_in_out_weight():
    model = get_peft_model(tiny_gpt2(), GPartConfig(d=20, target_modules=["c_attn"]))
    layer = next(iter(_wrappers(model).values()))
    n_in, n_out = layer.get_base_layer().weight.shape  # Conv1D stores (in, out)
    assert type(layer) is Conv1D and (layer.in_features, layer.out_features) == (n_in, n_out) and n_out == 3 * n_in


class _Bank(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(3, 6, 4))  # (experts, in, out)
        self.proj = nn.Parameter(torch.randn(5, 6))  # (out, in)
        self.norm = nn.Parameter(torch.ones(4))

    def forward(self, x):
        return torch.einsum("bi,eio->beo", x, self.gate_up).sum(1) * self.norm + (x @ self.proj.t()).sum(1, True)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.bank = _Bank()

    def forward(self, x):
        return self.bank(x)


def test_parameter_wrappers_follow_loras_param_wrapper():
    model = get_peft_model(_Experts(), GPartConfig(d=20, target_modules=[],
                                                  target_parameters=["bank.gate_up", "bank.proj", "bank.norm"]))
    layers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    got = {m.parameter_name: (m.in_features, m.out_features) for m in layers}
    assert got == {"gate_up": (6, 4), "proj": (6, 5), "norm": (4, 4)}


def test_bitsandbytes_wrapper_has_the_logical_features(tmp_path):
    pytest.importorskip("bitsandbytes")
    bnb_llama().save_pretrained(tmp_path)
    model = get_peft_model(load_quantized(tmp_path, "8bit"), GPartConfig(d=20, target_modules=["q_proj"]))
    layer = next(iter(_wrappers(model).values()))
    base = layer.get_base_layer()
    assert type(layer) is QuantizedLinear
    assert (layer.in_features, layer.out_features) == (base.in_features, base.out_features)
    assert layer.adapted_shapes()[0] == ("weight", (base.out_features, base.in_features))
