"""GPart on bitsandbytes 4-bit and 8-bit bases: exact gradient against the dequantized weight, the PEFT
lifecycle, merges (in place and to a float model), and refusals for other quantizers."""

from __future__ import annotations

import pytest
import torch
from conftest import QUANT_MODES, bnb_llama, load_quantized
from peft import PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn

import gpart
from gpart import GPartConfig, GPartLayer
from gpart.partition import Partition

bnb = pytest.importorskip("bitsandbytes")
import bitsandbytes.functional as BF  # noqa: E402

from gpart import quantization as Q  # noqa: E402
from gpart.layers import QuantizedLinear  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore:.*(MatMul8bitLt|kernels-community).*")
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]


def quantize_linear(lin: nn.Linear, mode: str, device="cpu") -> nn.Module:
    """A bitsandbytes layer holding `lin`'s weights, built by hand (no model-level flags)."""
    if mode == "8bit":
        q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
    else:
        q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                              compute_dtype=torch.float32, quant_type=mode[:3],
                              compress_statistics=mode.endswith("-dq"))
        q.weight = bnb.nn.Params4bit(lin.weight.data.clone(), requires_grad=False, quant_type=mode[:3],
                                     compress_statistics=mode.endswith("-dq"))
    if lin.bias is not None:
        q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    return q.to(device)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(64, 96)
        self.b = nn.Linear(96, 64, bias=False)
        self.head = nn.Linear(64, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.b(torch.relu(self.a(x)))))


def quantized_net(mode, device="cpu"):
    torch.manual_seed(0)
    net = Net()
    net.a, net.b = quantize_linear(net.a, mode, device), quantize_linear(net.b, mode, device)
    return net.to(device)


def dequantized_by_bnb(layer) -> torch.Tensor:
    """The weight a bitsandbytes layer computes with, read through bitsandbytes alone (not gpart)."""
    if isinstance(layer, bnb.nn.Linear4bit):
        return BF.dequantize_4bit(layer.weight.data, layer.weight.quant_state).float()
    scb = layer.state.SCB if layer.state.SCB is not None else layer.weight.SCB
    return BF.int8_vectorwise_dequant(layer.weight.data, scb).float()


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


# -- exact gradient ---------------------------------------------------------------------------------


def _check_exact_gradient(mode, device):
    model = get_peft_model(quantized_net(mode, device),
                           GPartConfig(d=300, seed=3, init_scale=0.2, target_modules=["a", "b"], partition_bias=True))
    model.train()
    net = model.base_model.model
    cfg = model.peft_config["default"]
    assert [n for n, _ in cfg.layout] == ["a.weight", "a.bias", "b.weight"]
    assert [s for _, s in cfg.layout] == [[96, 64], [96], [64, 96]]  # logical shapes, not the packed storage
    assert isinstance(net.a, QuantizedLinear) and isinstance(net.b, QuantizedLinear)

    # dense reference: W = dequantized W + reshape(P theta), through plain float ops
    wa, wb = dequantized_by_bnb(net.a.base_layer), dequantized_by_bnb(net.b.base_layer)
    P = Partition(cfg.seed, cfg.D, cfg.d).dense().float().to(device)
    theta = model.base_model.gpart_theta["default"]
    t = theta.detach().clone().requires_grad_(True)

    def reference(x):
        flat = P @ t
        da, dba, db = flat[:6144].view(96, 64), flat[6144:6240], flat[6240:].view(64, 96)
        h = torch.relu(nn.functional.linear(x, wa + da, net.a.base_layer.bias + dba))
        return net.head(torch.tanh(nn.functional.linear(h, wb + db)))

    x = torch.randn(6, 64, device=device)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y, y_ref = model(x1), reference(x2)
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(y)
    (y * w).sum().backward()
    (y_ref * w).sum().backward()
    assert theta.grad.dtype == torch.float32
    torch.testing.assert_close(theta.grad, t.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_gradient_is_exact_for_the_dequantized_weight(mode):
    _check_exact_gradient(mode, "cpu")


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_nothing_dequantized_is_saved_for_backward_or_kept_between_steps(mode):
    model = get_peft_model(quantized_net(mode), GPartConfig(d=100, init_scale=0.1, target_modules=["a", "b"]))
    model.train()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    per_weight = 64 * 96
    big = [tuple(t.shape) for t in saved if t.is_floating_point() and t.numel() >= per_weight]
    assert big == []
    y.sum().backward()
    for layer in (model.base_model.model.a, model.base_model.model.b):
        # the wrapper holds no tensor of its own, and the base layer only its quantized weight and bias
        assert list(layer.parameters(recurse=False)) == [] and list(layer.buffers()) == []
        assert layer._premerge is None
        weight = layer.base_layer.weight
        assert not weight.is_floating_point() or mode == "8bit" and weight.dtype == torch.int8


# -- the PEFT lifecycle on a model loaded quantized -----------------------------------------------------


@pytest.mark.parametrize("mode", QUANT_MODES)
def test_lifecycle_on_a_quantized_llama(mode, bnb_llama_dir, tmp_path):
    base = load_quantized(bnb_llama_dir, mode)
    assert getattr(base, "is_loaded_in_8bit" if mode == "8bit" else "is_loaded_in_4bit")
    x = torch.randint(0, 120, (2, 8))
    model = get_peft_model(base, GPartConfig(d=512, seed=1, target_modules=ATTN))
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 8
    assert model.peft_config["default"].layout[0] == ["model.layers.0.self_attn.q_proj.weight", [64, 64]]
    with torch.no_grad():
        with model.disable_adapter():
            base_out = model(x).logits
        assert torch.equal(model(x).logits, base_out)  # theta = 0: the base model

    theta = model.base_model.gpart_theta["default"]
    opt = torch.optim.AdamW([theta], lr=2e-2)
    model.train()
    losses = []
    for _ in range(4):
        opt.zero_grad()
        loss = model(x, labels=x).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses))) and losses[-1] < losses[0]
    assert theta.abs().sum() > 0 and theta.dtype == torch.float32
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    assert not torch.allclose(trained, base_out)

    model.save_pretrained(tmp_path / "a")
    loaded = PeftModel.from_pretrained(load_quantized(bnb_llama_dir, mode), tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, trained)

    # several adapters, disable_adapter, delete_adapter
    model.add_adapter("b", GPartConfig(d=256, seed=2, init_scale=0.05, target_modules=["gate_proj", "v_proj"]))
    model.set_adapter("b")
    with torch.no_grad():
        out_b = model(x).logits
        assert not torch.allclose(out_b, trained)
        with model.disable_adapter():
            torch.testing.assert_close(model(x).logits, base_out, rtol=0, atol=0)
        model.set_adapter("default")
        assert torch.equal(model(x).logits, trained)
    model.delete_adapter("b")
    gate = model.base_model.model.model.layers[0].mlp.gate_proj
    assert isinstance(gate, bnb.nn.Linear8bitLt if mode == "8bit" else bnb.nn.Linear4bit)
    with torch.no_grad():
        assert torch.equal(model(x).logits, trained)


def test_prepare_model_for_kbit_training_then_get_peft_model(bnb_llama_dir):
    base = prepare_model_for_kbit_training(load_quantized(bnb_llama_dir, "nf4-dq"))
    assert base.model.norm.weight.dtype == torch.float32 and base.is_gradient_checkpointing
    model = get_peft_model(base, GPartConfig(d=256, target_modules=ATTN))
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["base_model.gpart_theta.default"]
    theta = model.base_model.gpart_theta["default"]
    opt = torch.optim.SGD([theta], lr=0.1)
    x = torch.randint(0, 120, (2, 8))
    model.train()
    for _ in range(2):
        opt.zero_grad()
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        assert torch.isfinite(loss) and theta.grad.abs().sum() > 0
        opt.step()
    assert theta.abs().sum() > 0


def test_training_after_an_eval_forward_keeps_gradients_flowing(bnb_llama_dir):
    """Trainer evaluates in eval mode without gradients; bitsandbytes would then repack 4-bit weights for
    its CPU kernel, after which no gradient reaches the layers below. GPart keeps the standard layout."""
    x = torch.randint(0, 120, (2, 8))
    grads = []
    for evaluate_first in (False, True):
        model = get_peft_model(load_quantized(bnb_llama_dir, "nf4"), GPartConfig(d=128, target_modules=["q_proj"]))
        if evaluate_first:
            model.eval()
            with torch.no_grad():
                model(x)
        model.train()
        model(x, labels=x).loss.backward()
        grads.append(model.base_model.gpart_theta["default"].grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)


# -- merging -------------------------------------------------------------------------------------------


def _requantized_reference(layer: QuantizedLinear, w: torch.Tensor) -> torch.Tensor:
    """bitsandbytes' own quantize -> dequantize round trip of w, with the layer's settings."""
    base = layer.base_layer
    if isinstance(base, bnb.nn.Linear4bit):
        qs = base.weight.quant_state
        p = bnb.nn.Params4bit(w.clone(), requires_grad=False, blocksize=qs.blocksize, compress_statistics=qs.nested,
                              quant_type=qs.quant_type).to(w.device)
        return BF.dequantize_4bit(p.data, p.quant_state).float()
    CB, SCB, _ = BF.int8_vectorwise_quant(w.half())
    return BF.int8_vectorwise_dequant(CB, SCB).float()


def _rounding_bound(w: torch.Tensor, layer) -> torch.Tensor:
    """The most bitsandbytes' round trip can move each entry of w, for the format of `layer`.

    4-bit: each block of `blocksize` entries is scaled by its absmax and rounded to the nearest of 16 code
    values, so an entry moves by at most half the widest gap between adjacent codes times its block's absmax
    (NF4: 0.152, FP4: 0.167); 2% more covers a double-quantized absmax (stored in 8 bits) and bitsandbytes'
    rounding thresholds. 8-bit: each row is scaled by its absmax to integers in [-127, 127] (half a step:
    absmax / 254), after w is rounded to fp16 (relative 2^-11).
    """
    if isinstance(layer, bnb.nn.Linear4bit):
        state = layer.weight.quant_state
        code = BF.get_4bit_type(state.quant_type, device="cpu").float().sort().values
        half_gap = (code[1:] - code[:-1]).max() / 2
        absmax = w.reshape(-1, state.blocksize).abs().amax(1, keepdim=True)
        return (1.02 * half_gap * absmax).expand(-1, state.blocksize).reshape(w.shape)
    return w.abs().amax(1, keepdim=True) / 254 + w.abs() * 2.0 ** -11


def _float_twin(model) -> nn.Module:
    """The float tiny Llama with every quantized layer's weight replaced by what that layer computes with."""
    twin = bnb_llama()
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)):
                key = name.removeprefix("base_model.model.").replace(".base_layer", "")
                twin.get_submodule(key).weight.copy_(dequantized_by_bnb(module))
    return twin.eval()


@pytest.mark.parametrize("mode", ["nf4", "fp4-dq", "8bit"])
def test_merge_requantizes_warns_with_the_measured_loss_and_unmerge_is_exact(mode, bnb_llama_dir):
    base = load_quantized(bnb_llama_dir, mode)
    x = torch.randint(0, 120, (2, 8))
    with torch.no_grad():
        base(x)  # an eval forward before adapting: on AVX512-BF16 CPUs bitsandbytes repacks 4-bit weights here
    model = get_peft_model(base, GPartConfig(d=2000, seed=4, init_scale=0.005, target_modules=["q_proj", "v_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    w0 = dequantized_by_bnb(layer.base_layer)  # gpart undid any repacking: this is the real weight again
    ref_w = bnb_llama().model.layers[0].self_attn.q_proj.weight.detach()
    assert ((w0 - ref_w).abs() <= _rounding_bound(ref_w, layer.base_layer)).all()
    with torch.no_grad():
        model(x)  # an eval forward after adapting: no repacking any more
    before = {n: (p.detach().clone(), type(p)) for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        unmerged = model(x).logits
    dw = layer.get_delta_weight("default")
    assert dw.shape == (64, 64) and dw.dtype == torch.float32

    with pytest.warns(UserWarning, match=r"into bnb-\dbit weights loses \d+\.\d% of the update's norm"):
        model.merge_adapter()
    assert layer.merged
    merged_w = dequantized_by_bnb(layer.base_layer)
    torch.testing.assert_close(merged_w, _requantized_reference(layer, w0 + dw), rtol=0, atol=0)
    with torch.no_grad():
        merged_out = model(x).logits
    # the merged model computes with the weights it holds: a float Llama holding them gives its logits (8-bit in
    # training mode: the 8-bit eval kernel also rounds the input to int8)
    model.train(mode == "8bit")
    with torch.no_grad():
        got, expected = model(x).logits, _float_twin(model)(x).logits
    model.eval()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())

    model.unmerge_adapter()  # exact: the quantized weights from before the merge come back
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p.detach(), before[n][0]) and type(p) is before[n][1], n
    with torch.no_grad():
        assert torch.equal(model(x).logits, unmerged)
        model.merge_adapter()
        with model.disable_adapter():  # unmerges first, then runs the base alone
            model(x)
    assert not layer.merged

    plain = model.merge_and_unload()
    assert not any(isinstance(m, GPartLayer) for m in plain.modules())
    assert isinstance(plain.model.layers[0].self_attn.q_proj, type(layer.base_layer))
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, merged_out, rtol=0, atol=0)


def test_safe_merge_raises_on_nan_without_touching_the_quantized_weight(bnb_llama_dir):
    model = get_peft_model(load_quantized(bnb_llama_dir, "nf4"), GPartConfig(d=300, target_modules=["q_proj"]))
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    data = layer.base_layer.weight.data.clone()
    with torch.no_grad():
        model.base_model.gpart_theta["default"][:] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    assert torch.equal(layer.base_layer.weight.data, data) and not layer.merged


@pytest.mark.parametrize("mode,dtype,tol", [("nf4-dq", torch.float32, 1e-5), ("8bit", torch.float32, 1e-5),
                                            ("fp4", torch.bfloat16, 3e-2)])
def test_merge_and_dequantize_gives_a_plain_model_with_the_adapter_outputs(mode, dtype, tol, bnb_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = load_quantized(bnb_llama_dir, mode)
    model = get_peft_model(base, GPartConfig(d=1000, seed=2, init_scale=0.05, target_modules=["q_proj", "v_proj"],
                                             partition_bias=True))
    x = torch.randint(0, 120, (2, 8))
    model.train()  # bitsandbytes' 8-bit eval kernel also rounds the input to int8; its training path does not
    with torch.no_grad():
        expected = model(x).logits
    model.merge_adapter()  # merging first must not matter: the float model is built from the exact weights
    plain = gpart.merge_and_dequantize(model, dtype=dtype)
    assert not any(isinstance(m, GPartLayer) or Q.bnb_kind(m) for m in plain.modules())
    assert type(plain.model.layers[0].mlp.up_proj) is nn.Linear  # unadapted quantized layers too
    assert {p.dtype for p in plain.parameters()} == {dtype}
    assert not getattr(plain, "is_loaded_in_4bit", False) and not getattr(plain, "is_loaded_in_8bit", False)
    assert getattr(plain.config, "quantization_config", None) is None
    with torch.no_grad():
        out = plain(x).logits.float()
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item())

    plain.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=dtype)
    assert not any(Q.bnb_kind(m) for m in reloaded.modules())
    with torch.no_grad():
        torch.testing.assert_close(reloaded(x).logits, plain(x).logits, rtol=0, atol=0)


# -- layers GPart cannot adapt ----------------------------------------------------------------------


class QuantLinear(nn.Module):
    """Shaped like a GPTQ layer: packed int32 weights, no float `weight`."""

    def __init__(self):
        super().__init__()
        self.in_features, self.out_features = 10, 20
        self.register_buffer("qweight", torch.zeros(2, 20, dtype=torch.int32))

    def forward(self, x):
        return x.new_zeros(*x.shape[:-1], 20)


QuantLinear.__module__ = "gptqmodel.nn_modules.qlinear.torch"


class HQQLinear(QuantLinear):
    pass


HQQLinear.__module__ = "hqq.core.quantize"


class AffineQuantized(torch.Tensor):
    """A stand-in for a torchao weight: a tensor subclass that intercepts every op."""

    @staticmethod
    def __new__(cls, data):
        return torch.Tensor._make_wrapper_subclass(cls, data.shape, dtype=data.dtype, device=data.device)

    def __init__(self, data):
        self.inner = data

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        unwrap = lambda t: t.inner if isinstance(t, AffineQuantized) else t  # noqa: E731
        out = func(*torch.utils._pytree.tree_map(unwrap, args), **torch.utils._pytree.tree_map(unwrap, kwargs or {}))
        return AffineQuantized(out) if func is torch.ops.aten.detach.default else out


def _with(module):
    net = nn.Sequential()
    net.add_module("proj", module)
    net.add_module("out", nn.Linear(20, 2))
    return net


def _float8_linear():
    lin = nn.Linear(10, 20)
    lin.weight = nn.Parameter(lin.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
    return lin


def _torchao_like_linear():
    lin = nn.Linear(10, 20)
    lin.weight = nn.Parameter(AffineQuantized(lin.weight.data), requires_grad=False)
    return lin


@pytest.mark.parametrize("make,what", [
    (QuantLinear, r"gptqmodel\.nn_modules\.qlinear\.torch\.QuantLinear.*GPTQ"),
    (HQQLinear, r"hqq\.core\.quantize\.HQQLinear.*HQQ"),
    (_float8_linear, r"torch\.nn\.modules\.linear\.Linear.*torch\.float8_e4m3fn"),
    (_torchao_like_linear, r"torch\.nn\.modules\.linear\.Linear.*AffineQuantized tensor subclass"),
], ids=["gptq", "hqq", "float8", "torchao"])
def test_other_quantized_layers_are_refused_naming_type_and_what_is_supported(make, what):
    net = _with(make())
    with pytest.raises(TypeError, match=rf"'proj'.*{what}.*Supported: bitsandbytes 4-bit.*8-bit.*float torch\.nn\.Linear"):
        get_peft_model(net, GPartConfig(d=8, target_modules=["proj", "out"]))
    assert not any(isinstance(m, GPartLayer) for m in net.modules())


# -- CUDA --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", QUANT_MODES)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_gradient_is_exact_for_the_dequantized_weight(mode):
    _check_exact_gradient(mode, "cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("mode", ["nf4-dq", "8bit"])
def test_cuda_train_merge_and_dequantize(mode, bnb_llama_dir):
    model = get_peft_model(load_quantized(bnb_llama_dir, mode, device="cuda"),
                           GPartConfig(d=512, init_scale=0.05, target_modules=ATTN))
    x = torch.randint(0, 120, (2, 8), device="cuda")
    model.train()
    model(x, labels=x).loss.backward()
    assert torch.isfinite(model.base_model.gpart_theta["default"].grad).all()
    model.eval()
    with torch.no_grad():
        expected = model(x).logits
    plain = gpart.merge_and_dequantize(model, dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(plain(x).logits, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("mode", ["nf4-dq", "8bit"])
def test_eval_cache_on_a_quantized_layer_gives_the_uncached_outputs(mode):
    """In eval mode without autograd the wrapper keeps Delta_W (compute dtype) and reuses it: bit-identical
    to rebuilding it, rebuilt after theta changes, freed by train() and by a merge."""
    net = quantized_net(mode)
    model = get_peft_model(net, GPartConfig(d=40, seed=2, init_scale=0.3, target_modules=["a", "b"],
                                            partition_bias=True))
    model.add_adapter("other", GPartConfig(d=25, seed=5, init_scale=0.3, target_modules=["b"]))
    model.base_model.set_adapter(["default", "other"])
    x = torch.randn(3, 64)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    model.eval()

    def run(cache: bool):
        model.base_model.eval_cache = cache
        with torch.no_grad():
            return model(x)

    want = run(False)
    assert all(not layer._gpart_cache for layer in layers)
    assert torch.equal(run(True), want) and torch.equal(run(True), want)
    assert all(layer._gpart_cache for layer in layers)
    with torch.no_grad():
        model.base_model.gpart_theta["default"].mul_(2.0)  # an in-place edit bumps theta's version
    assert torch.equal(run(True), run(False)) and not torch.equal(run(True), want)
    model.train()
    assert all(not layer._gpart_cache for layer in layers)


def test_unmerge_is_exact_on_an_8bit_layer_still_holding_fp16_weights():
    """An 8-bit layer built with has_fp16_weights=True keeps its float weight until it is moved to a GPU:
    merge must install a new weight object, so that unmerge restores the one from before, bit for bit."""
    torch.manual_seed(0)
    net = Net()
    lin = net.a
    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=True, has_fp16_weights=True)
    q.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=True)
    q.bias = nn.Parameter(lin.bias.data.clone(), requires_grad=False)
    net.a = q
    assert net.a.weight.dtype == torch.float32  # still the float weight: the in-place branch of requantize
    model = get_peft_model(net, GPartConfig(d=500, seed=1, init_scale=0.05, target_modules=["a"]))
    layer, x = model.base_model.model.a, torch.randn(4, 64)
    w_before = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        unmerged = model(x)
    model.merge_adapter()
    assert not torch.equal(layer.base_layer.weight.detach(), w_before)  # the merge did change the weight
    model.unmerge_adapter()
    assert torch.equal(layer.base_layer.weight.detach(), w_before)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, rtol=0, atol=0)
