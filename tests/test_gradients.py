"""GPart's update and gradient equal the dense reference Delta = P theta, grad = P^T vec(dL/dW)."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import MLP, ConvNet, EmbNet, tiny_bert, tiny_gpt2, tiny_llama
from peft import get_peft_model

import gpart
from gpart.partition import Partition
from gpart.projection import make_projection


def _dense_reference(base, peft_model, adapter="default"):
    """(theta leaf, function computing the base model's output with W0 + reshape(P theta) substituted)."""
    cfg = peft_model.peft_config[adapter]
    P = make_projection(cfg.projection, cfg.seed, cfg.D, cfg.d, cfg.partition_version,
                        cfg.column_gain_ratio).dense().float()
    theta = peft_model.base_model.gpart_theta[adapter].detach().clone().requires_grad_(True)
    params = dict(base.named_parameters())

    def run(*args):
        flat = P @ theta
        new, offset = {}, 0
        for name, shape in cfg.layout:
            n = torch.Size(shape).numel()
            new[name] = params[name] + flat[offset : offset + n].view(shape)
            offset += n
        return torch.func.functional_call(base, new, args)

    return theta, run


class PaddedConvNet(torch.nn.Module):
    """Convolutions that aten's backward serves (zero padding, groups, dilation) and ones that pad
    themselves (padding="same", a padding mode), whose backward runs through their own conv."""

    def __init__(self):
        super().__init__()
        self.grouped = torch.nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2)
        self.same = torch.nn.Conv2d(6, 4, 4, padding="same")
        self.reflect = torch.nn.Conv1d(4, 3, 3, padding=1, padding_mode="reflect")

    def forward(self, x):  # x: (B, 4, 5, 5)
        y = self.same(torch.tanh(self.grouped(x)))
        return self.reflect(y.flatten(2))


CASES = [
    ("mlp", lambda: MLP(), dict(target_modules=["lin0", "lin1"]), lambda: (torch.randn(4, 10),)),
    ("mlp-bias", lambda: MLP(), dict(target_modules=["lin0", "lin1"], partition_bias=True), lambda: (torch.randn(4, 10),)),
    ("conv", lambda: ConvNet(), dict(target_modules=["conv1d", "conv2d", "conv3d"], partition_bias=True),
     lambda: (torch.randn(3, 3, 8),)),
    ("conv-padding", lambda: PaddedConvNet(), dict(target_modules=["grouped", "same", "reflect"], partition_bias=True),
     lambda: (torch.randn(2, 4, 5, 5),)),
    ("embedding", lambda: EmbNet(), dict(target_modules=["emb", "lin"]), lambda: (torch.randint(0, 50, (4, 6)),)),
    ("gpt2-conv1d", lambda: tiny_gpt2(), dict(target_modules=["c_attn", "c_proj"], partition_bias=True),
     lambda: (torch.randint(0, 100, (2, 5)),)),
    ("bert", lambda: tiny_bert(), dict(target_modules=["query", "value"]), lambda: (torch.randint(0, 100, (2, 7)),)),
    ("llama-all-linear", lambda: tiny_llama(), dict(target_modules="all-linear"), lambda: (torch.randint(0, 120, (2, 6)),)),
]


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


@pytest.mark.parametrize("name,make,kwargs,inputs", CASES, ids=[c[0] for c in CASES])
def test_update_and_gradient_equal_dense_reference(name, make, kwargs, inputs):
    base = make()
    ref_base = copy.deepcopy(base)
    for p in ref_base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, gpart.GPartConfig(d=60, seed=5, init_scale=0.3, **kwargs))
    x = inputs()
    theta_ref, run_ref = _dense_reference(ref_base, model)

    out = _logits(model(*x))
    ref = _logits(run_ref(*x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)

    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    grad = model.base_model.gpart_theta["default"].grad
    assert grad is not None and grad.dtype == torch.float32
    torch.testing.assert_close(grad, theta_ref.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name,make,kwargs,inputs", CASES[:5], ids=[c[0] for c in CASES[:5]])
def test_update_is_an_isometry_of_theta(name, make, kwargs, inputs):
    model = get_peft_model(make(), gpart.GPartConfig(d=60, seed=1, init_scale=1.0, **kwargs))
    cfg = model.peft_config["default"]
    theta = model.base_model.gpart_theta["default"].detach()
    pieces = []
    for _, layer in model.base_model._gpart_layers():
        pieces.append(layer.get_delta_weight("default").reshape(-1))
        if layer.gpart_slices["default"][1] is not None:
            pieces.append(layer._delta("default", 1).reshape(-1))
    flat = torch.cat(pieces)
    assert flat.numel() == cfg.D
    torch.testing.assert_close(flat.norm(), theta.norm(), rtol=1e-5, atol=0)
    P = make_projection(cfg.projection, cfg.seed, cfg.D, cfg.d, cfg.partition_version,
                        cfg.column_gain_ratio).dense().float()
    torch.testing.assert_close(flat, P @ theta, rtol=1e-5, atol=1e-6)


def test_dropconnect_uses_the_same_mask_forward_and_backward():
    torch.manual_seed(0)
    base = MLP()
    model = get_peft_model(base, gpart.GPartConfig(d=100, seed=2, dropout=0.5, init_scale=1.0,
                                                   target_modules=["lin0"]))
    model.train()
    layer = model.base_model.model.lin0
    x = torch.randn(5, 10, requires_grad=False)
    torch.manual_seed(7)
    y = layer(x)
    torch.manual_seed(7)
    drop = layer._update("default", model.base_model.gpart_theta["default"]).drop
    # rebuild the masked update densely and check both the output and the gradient against it
    cfg = model.peft_config["default"]
    theta = model.base_model.gpart_theta["default"]
    P = make_projection(cfg.projection, cfg.seed, cfg.D, cfg.d, cfg.partition_version,
                        cfg.column_gain_ratio).dense().float()
    keep = drop.keep_scale(torch.arange(cfg.D))
    assert 0.3 < (keep > 0).float().mean() < 0.7
    t = theta.detach().clone().requires_grad_(True)
    dW = ((P @ t) * keep).view(20, 10)
    ref = torch.nn.functional.linear(x, base.lin0.base_layer.weight + dW, base.lin0.base_layer.bias)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(theta.grad, t.grad)
    model.eval()  # no dropout at eval
    y_eval = layer(x)
    ref_eval = torch.nn.functional.linear(x, base.lin0.base_layer.weight + (P @ t.detach()).view(20, 10),
                                          base.lin0.base_layer.bias)
    torch.testing.assert_close(y_eval, ref_eval)


def test_theta_gradient_is_fp32_for_bf16_weights_and_close_to_fp32_reference():
    torch.manual_seed(0)
    x = torch.randint(0, 120, (2, 6))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = get_peft_model(tiny_llama(dtype=dtype),
                               gpart.GPartConfig(d=300, seed=0, init_scale=0.5, target_modules=["q_proj", "v_proj"]))
        theta = model.base_model.gpart_theta["default"]
        assert theta.dtype == torch.float32  # autocast_adapter_dtype keeps theta in fp32
        model(x, labels=x).loss.backward()
        grads[dtype] = theta.grad
    assert grads[torch.bfloat16].dtype == torch.float32
    rel = (grads[torch.bfloat16] - grads[torch.float32]).norm() / grads[torch.float32].norm()
    assert rel < 0.05


def test_no_per_weight_tensor_is_saved_for_backward():
    # what autograd keeps between forward and backward: inputs, theta and the (frozen) base weight, not Delta_W
    model = get_peft_model(MLP(), gpart.GPartConfig(d=50, target_modules=["lin0"]))
    layer = model.base_model.model.lin0
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = layer(torch.randn(3, 10))
    weight = layer.base_layer.weight
    extra = [t for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()]
    assert extra == [], [tuple(t.shape) for t in extra]
    y.sum().backward()


@pytest.mark.parametrize("make,kwargs,inputs", [
    (lambda: MLP(), dict(target_modules=["lin0", "lin1"], partition_bias=True), lambda: (torch.randn(4, 10),)),
    (lambda: tiny_gpt2(), dict(target_modules=["c_attn", "c_proj"], partition_bias=True),
     lambda: (torch.randint(0, 100, (2, 5)),)),
], ids=["linear", "gpt2-conv1d"])
def test_two_active_adapters_add_exact_updates_and_keep_nothing_per_weight(make, kwargs, inputs):
    """The second active adapter's update goes through the separate update product (gpart.functional.
    LayerProduct without the base weight): exact against W0 + P_a theta_a + P_b theta_b, and nothing per weight saved for backward."""
    base = make()
    ref_base = copy.deepcopy(base)
    for p in ref_base.parameters():
        p.requires_grad_(False)
    model = get_peft_model(base, gpart.GPartConfig(d=60, seed=5, init_scale=0.3, **kwargs))
    model.add_adapter("b", gpart.GPartConfig(d=40, seed=9, init_scale=0.3, **kwargs))
    model.base_model.set_adapter(["default", "b"])
    thetas = model.base_model.gpart_theta
    cfgs = {n: model.peft_config[n] for n in ("default", "b")}
    Ps = {n: Partition(c.seed, c.D, c.d).dense().float() for n, c in cfgs.items()}
    ts = {n: thetas[n].detach().clone().requires_grad_(True) for n in cfgs}
    params = dict(ref_base.named_parameters())

    def run_ref(*args):
        flat = sum(Ps[n] @ ts[n] for n in cfgs)
        new, offset = {}, 0
        for name, shape in cfgs["default"].layout:
            n = torch.Size(shape).numel()
            new[name] = params[name] + flat[offset : offset + n].view(shape)
            offset += n
        return torch.func.functional_call(ref_base, new, args)

    # one adapted layer alone: autograd keeps its input, theta and the frozen weight, no Delta_W
    layer = next(m for m in model.modules() if isinstance(m, gpart.GPartLayer))
    weight = layer.base_layer.weight
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer(torch.randn(3, weight.shape[0] if kwargs["target_modules"][0] == "c_attn" else weight.shape[1]))
    assert [tuple(t.shape) for t in saved if t.numel() >= weight.numel() and t.data_ptr() != weight.data_ptr()] == []

    x = inputs()
    out = _logits(model(*x))
    ref = _logits(run_ref(*x))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    for n in cfgs:
        torch.testing.assert_close(thetas[n].grad, ts[n].grad, rtol=1e-4, atol=1e-5)
