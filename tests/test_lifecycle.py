"""The PEFT lifecycle with GPart, as PEFT users know it from LoRA (peft-integration.md, section 2)."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from conftest import MLP, EmbNet, tiny_bert, tiny_gpt2, tiny_llama, tiny_roberta, tiny_vit
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn

import gpart
from gpart import GPartConfig, GPartLayer


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _gpart_layer_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, GPartLayer)]


# -- construction -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make,expected",
    [
        (tiny_bert, ["query", "value"]),
        (tiny_roberta, ["query", "value"]),
        (tiny_llama, ["q_proj", "v_proj"]),
        (tiny_gpt2, ["c_attn"]),
        (tiny_vit, ["q_proj", "v_proj"]),
    ],
    ids=["bert", "roberta", "llama", "gpt2", "vit"],
)
def test_default_target_modules_per_model_type(make, expected):
    model = get_peft_model(make(), GPartConfig(d=64))
    leaves = sorted({n.rsplit(".", 1)[-1] for n in _gpart_layer_names(model)})
    assert leaves == sorted(expected)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable["base_model.gpart_theta.default"] == 64


def test_plain_module_without_default_targets_needs_target_modules():
    with pytest.raises(ValueError, match="target_modules"):
        get_peft_model(MLP(), GPartConfig(d=10))


def test_target_modules_as_regex_all_linear_exclude_and_layer_indexing():
    base = tiny_llama()
    m = get_peft_model(copy.deepcopy(base), GPartConfig(d=64, target_modules=r".*layers\.1\.self_attn\.(q|k)_proj"))
    assert _gpart_layer_names(m) == ["base_model.model.model.layers.1.self_attn.q_proj",
                                    "base_model.model.model.layers.1.self_attn.k_proj"]
    m = get_peft_model(copy.deepcopy(base), GPartConfig(d=64, target_modules="all-linear"))
    names = _gpart_layer_names(m)
    assert len(names) == 2 * 7 and not any("lm_head" in n for n in names)
    m = get_peft_model(copy.deepcopy(base), GPartConfig(d=64, target_modules="all-linear", exclude_modules=["o_proj"]))
    assert len(_gpart_layer_names(m)) == 2 * 6
    m = get_peft_model(copy.deepcopy(base), GPartConfig(d=64, target_modules=["q_proj"], layers_to_transform=[1]))
    assert _gpart_layer_names(m) == ["base_model.model.model.layers.1.self_attn.q_proj"]


def test_trainable_parameters_are_theta_and_modules_to_save():
    model = get_peft_model(tiny_bert(), GPartConfig(d=100, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == [
        "base_model.gpart_theta.default",
        "base_model.model.classifier.modules_to_save.default.bias",
        "base_model.model.classifier.modules_to_save.default.weight",
    ]
    assert model.base_model.gpart_theta["default"].abs().sum() == 0  # zero init: starts as the base model


def test_zero_init_gives_the_base_model_exactly():
    base = tiny_bert()
    x = torch.randint(0, 100, (2, 9))
    ref = _out(base, x)
    model = get_peft_model(base, GPartConfig(d=100, target_modules="all-linear"))
    assert torch.equal(_out(model, x), ref)


def test_config_records_partition_and_layout():
    model = get_peft_model(MLP(), GPartConfig(d=30, seed=9, target_modules=["lin1", "lin0"], partition_bias=True))
    cfg = model.peft_config["default"]
    assert cfg.layout == [["lin0.weight", [20, 10]], ["lin0.bias", [20]], ["lin1.weight", [16, 20]],
                          ["lin1.bias", [16]]]
    assert cfg.D == 200 + 20 + 320 + 16
    assert cfg.layout_fingerprint == gpart.layout_fingerprint([(n, s) for n, s in cfg.layout])
    assert (cfg.partition_algorithm, cfg.partition_version) == (gpart.ALGORITHM, gpart.VERSION)


@pytest.mark.parametrize("version", gpart.VERSIONS)
def test_each_partition_version_gives_its_own_P_theta_and_keeps_it_through_save_and_load(tmp_path, version):
    """Adapters record their partition version; one saved by an earlier gpart (version 1) keeps meaning
    Delta_W = P_1 theta after loading, while new adapters use the current version."""
    torch.manual_seed(0)
    base = MLP()
    config = GPartConfig(d=30, seed=9, init_scale=0.5, target_modules=["lin0", "lin1"], partition_version=version)
    model = get_peft_model(copy.deepcopy(base), config)
    theta = model.base_model.gpart_theta["default"].detach().clone()
    P = gpart.Partition(9, 200 + 320, 30, version).dense().float()
    delta = P @ theta
    merged = copy.deepcopy(model).merge_and_unload()
    torch.testing.assert_close(merged.lin0.weight - base.lin0.weight, delta[:200].view(20, 10), rtol=0, atol=1e-6)
    torch.testing.assert_close(merged.lin1.weight - base.lin1.weight, delta[200:].view(16, 20), rtol=0, atol=1e-6)
    x = torch.randn(4, 10)
    expected = _out(model, x)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["partition_version"] == version
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    assert loaded.peft_config["default"].partition_version == version
    assert torch.equal(_out(loaded, x), expected)
    other = gpart.Partition(9, 520, 30, 3 - version).dense().float()
    assert not torch.allclose(other @ theta, delta, atol=1e-3)  # the versions are different partitions


# -- save / load ------------------------------------------------------------------------------------


def test_save_load_roundtrip_saves_only_theta_and_warns_nothing(tmp_path):
    base = tiny_bert()
    model = get_peft_model(base, GPartConfig(d=200, seed=3, init_scale=0.5, target_modules=["query", "value"],
                                             modules_to_save=["classifier"]))
    x = torch.randint(0, 100, (2, 7))
    with torch.no_grad():
        model.base_model.model.classifier.modules_to_save["default"].weight.add_(1.0)
    expected = _out(model, x)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    assert sorted(tensors) == ["base_model.gpart_theta", "base_model.model.classifier.bias",
                               "base_model.model.classifier.weight"]
    assert tensors["base_model.gpart_theta"].shape == (200,)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "GPART" and saved["seed"] == 3 and saved["D"] == model.peft_config["default"].D
    assert isinstance(PeftConfig.from_pretrained(tmp_path), GPartConfig)
    for low_cpu in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path, low_cpu_mem_usage=low_cpu)
        assert not [w for w in caught if "missing adapter keys" in str(w.message).lower()]
        assert torch.equal(_out(loaded, x), expected)
        theta = loaded.base_model.gpart_theta["default"]
        assert not theta.requires_grad  # inference mode by default
        assert theta.device.type == "cpu"
    trainable = PeftModel.from_pretrained(tiny_bert(), tmp_path, is_trainable=True)
    assert trainable.base_model.gpart_theta["default"].requires_grad


def test_partition_bias_updates_are_restored_on_load(tmp_path):
    base = MLP()
    model = get_peft_model(copy.deepcopy(base), GPartConfig(d=40, target_modules=["lin0"], partition_bias=True))
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    x = torch.randn(8, 10)
    for _ in range(3):
        opt.zero_grad()
        model(x).pow(2).sum().backward()
        opt.step()
    # base biases stay frozen (the reference implementation trained and then lost them)
    assert not model.base_model.model.lin0.base_layer.bias.requires_grad
    assert torch.equal(model.base_model.model.lin0.base_layer.bias, base.lin0.bias)
    assert model.base_model.model.lin0._delta("default", 1).abs().sum() > 0
    expected = model(x)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(loaded(x), expected, rtol=0, atol=0)


def test_multiple_adapters_load_set_and_delete(tmp_path):
    base = tiny_bert()
    x = torch.randint(0, 100, (2, 7))
    base_out = _out(base, x)
    model = get_peft_model(base, GPartConfig(d=80, seed=1, init_scale=0.5, target_modules=["query", "value"]))
    out_a = _out(model, x)
    model.save_pretrained(tmp_path / "a")
    model.add_adapter("b", GPartConfig(d=120, seed=2, init_scale=0.5, target_modules=["key"]))
    model.set_adapter("b")
    out_b = _out(model, x)
    assert not torch.allclose(out_a, out_b)
    theta = model.base_model.gpart_theta
    assert theta["b"].requires_grad and not theta["default"].requires_grad
    model.save_pretrained(tmp_path / "both")
    assert sorted(p.name for p in (tmp_path / "both").iterdir()) == ["README.md", "adapter_config.json",
                                                                      "adapter_model.safetensors", "b"]
    assert list(load_file(tmp_path / "both" / "b" / "adapter_model.safetensors")) == ["base_model.gpart_theta"]
    model.set_adapter("default")
    assert torch.equal(_out(model, x), out_a)
    with model.disable_adapter():
        assert torch.equal(_out(model, x), base_out)
    assert torch.equal(_out(model, x), out_a)

    model.delete_adapter("b")
    assert "b" not in model.base_model.gpart_theta and "b" not in model.peft_config
    for _, layer in model.base_model._gpart_layers():
        assert "b" not in layer.gpart_slices and "b" not in layer.gpart_dropout
    # "key" modules were only adapted by "b": they are plain nn.Linear again
    assert not any(n.endswith(".key") for n in _gpart_layer_names(model))
    assert torch.equal(_out(model, x), out_a)

    other = PeftModel.from_pretrained(tiny_bert(), tmp_path / "a")
    other.load_adapter(tmp_path / "both" / "b", adapter_name="b")
    other.set_adapter("b")
    assert torch.equal(_out(other, x), out_b)


def test_delete_adapter_leaves_nothing_behind():
    base = MLP()
    x = torch.randn(3, 10)
    ref = base(x)
    model = get_peft_model(base, GPartConfig(d=30, target_modules=["lin0"], init_scale=1.0))
    model.add_adapter("other", GPartConfig(d=20, target_modules=["lin1"]))
    model.delete_adapter("default")
    model.delete_adapter("other")
    assert _gpart_layer_names(model) == []
    assert len(model.base_model.gpart_theta) == 0
    assert dict(model.named_parameters()).keys() == {f"base_model.model.{n}" for n, _ in MLP().named_parameters()}
    assert torch.equal(model.base_model.model(x), ref)
    with pytest.raises(ValueError, match="does not exist"):
        model.delete_adapter("default")


def test_adding_a_duplicate_adapter_name_is_refused_without_change():
    model = get_peft_model(MLP(), GPartConfig(d=30, target_modules=["lin0"], init_scale=1.0))
    theta = model.base_model.gpart_theta["default"].detach().clone()
    with pytest.raises(ValueError, match="already"):
        model.add_adapter("default", GPartConfig(d=10, target_modules=["lin1"]))
    assert torch.equal(model.base_model.gpart_theta["default"], theta)
    assert _gpart_layer_names(model) == ["base_model.model.lin0"]


# -- merging ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,kwargs,x", [
    (tiny_bert, dict(target_modules="all-linear"), lambda: torch.randint(0, 100, (2, 7))),
    (tiny_gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc"], partition_bias=True),
     lambda: torch.randint(0, 100, (2, 7))),
    (EmbNet, dict(target_modules=["emb", "lin"]), lambda: torch.randint(0, 50, (2, 7))),
], ids=["bert", "gpt2-conv1d", "embedding"])
def test_merge_unmerge_and_merge_and_unload_are_exact(make, kwargs, x):
    x = x()
    base = make()
    base_out = _out(base, x)
    model = get_peft_model(base, GPartConfig(d=64, seed=4, init_scale=1.0, **kwargs))
    _check_merge_cycle(model, x, _out(model, x), base_out, atol=1e-5)


def _check_merge_cycle(model, x, expected, base_out, atol):
    """merge (twice: idempotent), unmerge, disable and merge_and_unload all give the unmerged output."""
    for step in (model.merge_adapter, model.merge_adapter, model.unmerge_adapter):
        step()
        torch.testing.assert_close(_out(model, x), expected, rtol=1e-5, atol=atol)
    with model.disable_adapter():
        torch.testing.assert_close(_out(model, x), base_out, rtol=1e-5, atol=atol)
    merged = model.merge_and_unload()
    assert _gpart_layer_names(merged) == []
    torch.testing.assert_close(_out(merged, x), expected, rtol=1e-5, atol=atol)


def test_two_active_adapters_merge_and_unmerge_to_their_unmerged_output():
    base = tiny_bert()
    x = torch.randint(0, 100, (2, 7))
    base_out = _out(base, x)
    model = get_peft_model(base, GPartConfig(d=80, seed=1, init_scale=2.0, target_modules=["query", "value"]))
    model.add_adapter("b", GPartConfig(d=120, seed=2, init_scale=2.0, target_modules=["query", "key"]))
    only_a = _out(model, x)
    model.base_model.set_adapter(["default", "b"])  # "query" carries both updates
    both = _out(model, x)
    # each adapter moves the logits (about 0.01 here) by far more than the tolerances below
    assert (both - only_a).abs().max() > 1e-3 and (both - base_out).abs().max() > 1e-3
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query
    model.merge_adapter()
    assert query.merged_adapters == ["default", "b"]
    model.unmerge_adapter()
    _check_merge_cycle(model, x, both, base_out, atol=1e-6)


def test_unload_restores_base_model():
    base = tiny_bert()
    x = torch.randint(0, 100, (2, 7))
    ref = _out(base, x)
    model = get_peft_model(base, GPartConfig(d=64, init_scale=1.0, target_modules="all-linear"))
    plain = model.unload()
    assert _gpart_layer_names(plain) == []
    assert torch.equal(_out(plain, x), ref)


def test_safe_merge_raises_on_nan_without_touching_the_base():
    model = get_peft_model(MLP(), GPartConfig(d=30, target_modules=["lin0", "lin1"], init_scale=1.0))
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    with torch.no_grad():
        model.base_model.gpart_theta["default"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    for n, p in model.named_parameters():
        if n in before:
            assert torch.equal(p, before[n]), n
    assert not model.base_model.model.lin0.merged


def test_get_delta_weight_has_the_base_shape_and_dtype():
    model = get_peft_model(tiny_gpt2(), GPartConfig(d=64, init_scale=1.0, target_modules=["c_attn"]))
    layer = model.base_model.model.transformer.h[0].attn.c_attn
    dw = layer.get_delta_weight("default")
    assert dw.shape == layer.base_layer.weight.shape and dw.dtype == layer.base_layer.weight.dtype


def test_merge_into_bf16_warns_with_measured_loss():
    base = tiny_llama(dtype=torch.bfloat16)
    model = get_peft_model(base, GPartConfig(d=1000, init_scale=1e-3, target_modules=["q_proj"]))
    with pytest.warns(UserWarning, match=r"loses \d+\.\d% of the update's norm"):
        model.merge_adapter()


def test_add_weighted_adapter_is_a_combination_in_theta_space():
    x = torch.randn(4, 10)
    model = get_peft_model(MLP(), GPartConfig(d=30, seed=1, target_modules=["lin0"], init_scale=1.0))
    model.add_adapter("b", GPartConfig(d=30, seed=1, target_modules=["lin0"], init_scale=0.0))
    with torch.no_grad():
        model.base_model.gpart_theta["b"].normal_()
    ta, tb = (model.base_model.gpart_theta[n].detach().clone() for n in ("default", "b"))
    model.add_weighted_adapter(["default", "b"], [0.5, -2.0], "mix")
    torch.testing.assert_close(model.base_model.gpart_theta["mix"], 0.5 * ta - 2.0 * tb)
    model.set_adapter("mix")
    layer = model.base_model.model.lin0
    dw = {n: layer.get_delta_weight(n) for n in ("default", "b", "mix")}
    torch.testing.assert_close(dw["mix"], 0.5 * dw["default"] - 2.0 * dw["b"], rtol=1e-5, atol=1e-6)
    model.add_adapter("c", GPartConfig(d=30, seed=2, target_modules=["lin0"]))
    with pytest.raises(ValueError, match="seed differs"):
        model.add_weighted_adapter(["default", "c"], [1.0, 1.0], "bad")
    assert "bad" not in model.peft_config


def test_autocast_adapter_dtype():
    m = get_peft_model(tiny_llama(dtype=torch.bfloat16), GPartConfig(d=64))
    assert m.base_model.gpart_theta["default"].dtype == torch.float32
    m = get_peft_model(tiny_llama(dtype=torch.bfloat16), GPartConfig(d=64), autocast_adapter_dtype=False)
    theta = m.base_model.gpart_theta["default"]
    assert theta.dtype == torch.bfloat16 and theta.keep_dtype == torch.bfloat16  # chosen explicitly: kept
    x = torch.randint(0, 120, (1, 5))
    assert m(x).logits.dtype == torch.bfloat16


def test_theta_keeps_float32_when_trainables_are_cast_to_bf16(tmp_path):
    """TRL casts every trainable parameter of a quantized model to bf16 (`param.data = param.data.to(bf16)`);
    theta keeps its float32 values through that, through model.to(bf16), copies, pickling and loading."""
    import io

    model = get_peft_model(MLP(), GPartConfig(d=30, target_modules=["lin0"], init_scale=1.0))
    theta = model.base_model.gpart_theta["default"]
    exact = theta.detach().clone()
    assert not torch.equal(exact, exact.to(torch.bfloat16).float())
    for _, param in model.named_parameters():
        if param.requires_grad:
            param.data = param.data.to(torch.bfloat16)  # what TRL does
    assert theta.dtype == torch.float32 and torch.equal(theta, exact)
    model.to(torch.bfloat16)
    assert theta.dtype == torch.float32 and torch.equal(theta, exact)
    assert model.base_model.model.lin0.base_layer.weight.dtype == torch.bfloat16
    assert model(torch.randn(2, 10, dtype=torch.bfloat16)).dtype == torch.bfloat16
    model.to(torch.float32)
    theta.data = torch.full((30,), 0.1, dtype=torch.bfloat16)  # a new narrower value: stored as float32
    assert theta.dtype == torch.float32 and torch.equal(theta, torch.full((30,), 0.1, dtype=torch.bfloat16).float())
    with torch.no_grad():
        theta.copy_(exact)

    opt = torch.optim.AdamW([theta], lr=1e-3)
    model(torch.randn(2, 10)).sum().backward()
    opt.step()
    assert {k: v.dtype for k, v in opt.state[theta].items()} == {"step": torch.float32, "exp_avg": torch.float32,
                                                                 "exp_avg_sq": torch.float32}
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    for other in (copy.deepcopy(model), torch.load(buf, weights_only=False)):
        t = other.base_model.gpart_theta["default"]
        assert type(t) is type(theta) and torch.equal(t, theta) and t.data_ptr() != theta.data_ptr()
        t.data = t.data.to(torch.bfloat16)
        assert t.dtype == torch.float32
    model.save_pretrained(tmp_path)
    for low_cpu in (False, True):
        loaded = PeftModel.from_pretrained(MLP(), tmp_path, low_cpu_mem_usage=low_cpu, is_trainable=True)
        t = loaded.base_model.gpart_theta["default"]
        assert type(t) is type(theta) and torch.equal(t, theta) and t.requires_grad
        t.data = t.data.to(torch.bfloat16)
        assert t.dtype == torch.float32 and torch.equal(t, theta)


def test_device_and_dtype_moves_carry_theta():
    model = get_peft_model(MLP(), GPartConfig(d=30, target_modules=["lin0"], init_scale=1.0))
    x = torch.randn(2, 10)
    y = model(x)
    model.to(torch.float64)
    assert model.base_model.gpart_theta["default"].dtype == torch.float64
    torch.testing.assert_close(model(x.double()).float(), y, rtol=1e-5, atol=1e-6)


# -- training ---------------------------------------------------------------------------------------


def test_training_only_changes_theta_and_head_and_lowers_the_loss():
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), GPartConfig(d=256, target_modules=["query", "value"],
                                                    modules_to_save=["classifier"]))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    x = torch.randint(0, 100, (8, 10))
    y = torch.randint(0, 2, (8,))
    model.train()
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = model(input_ids=x, labels=y).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"base_model.gpart_theta.default",
                       "base_model.model.classifier.modules_to_save.default.weight",
                       "base_model.model.classifier.modules_to_save.default.bias"}


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_the_same_gradient(reentrant):
    x = torch.randint(0, 120, (2, 8))
    grads = []
    for checkpointing in (False, True):
        model = get_peft_model(tiny_llama(), GPartConfig(d=128, seed=0, dropout=0.3, init_scale=0.2,
                                                         target_modules="all-linear"))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            model.enable_input_require_grads()
        model.train()
        torch.manual_seed(42)
        model(x, labels=x).loss.backward()
        grads.append(model.base_model.gpart_theta["default"].grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)


def test_generate_works():
    model = get_peft_model(tiny_llama(), GPartConfig(d=64, init_scale=0.5))
    out = model.generate(input_ids=torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    model = get_peft_model(MLP(), GPartConfig(d=40, target_modules=["lin0", "lin1"], init_scale=0.5))
    x = torch.randn(4, 10)
    y_eager = model(x)
    y_eager.sum().backward()
    g_eager = model.base_model.gpart_theta["default"].grad.clone()
    model.zero_grad()
    compiled = torch.compile(model)
    y = compiled(x)
    y.sum().backward()
    torch.testing.assert_close(y, y_eager)
    torch.testing.assert_close(model.base_model.gpart_theta["default"].grad, g_eager)


# -- target_parameters ------------------------------------------------------------------------------


class ExpertBank(nn.Module):
    """Like a MoE expert block: a 3-D parameter used by the module's own forward."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(3, 6, 4))

    def forward(self, x):  # (B, 6) -> (B, 3, 4)
        return torch.einsum("bi,eio->beo", x, self.gate_up)


class Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = ExpertBank()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.experts(x)).sum(1)


def test_target_parameters_adapt_arbitrary_tensors_with_exact_gradient(tmp_path):
    base = Experts()
    ref = copy.deepcopy(base)
    model = get_peft_model(base, GPartConfig(d=20, seed=3, init_scale=0.7, target_modules=[],
                                             target_parameters=["experts.gate_up", "norm.weight"]))
    cfg = model.peft_config["default"]
    assert [n for n, _ in cfg.layout] == ["experts.gate_up", "norm.weight"]
    x = torch.randn(5, 6)
    y = model(x)
    P = gpart.Partition(cfg.seed, cfg.D, cfg.d).dense().float()
    t = model.base_model.gpart_theta["default"].detach().clone().requires_grad_(True)
    flat = P @ t
    params = {"experts.gate_up": ref.experts.gate_up.detach() + flat[:72].view(3, 6, 4),
              "norm.weight": ref.norm.weight.detach() + flat[72:]}
    y_ref = torch.func.functional_call(ref, params, (x,))
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(model.base_model.gpart_theta["default"].grad, t.grad)
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(x), y_ref, rtol=1e-5, atol=1e-5)


class GatedExpertBank(ExpertBank):
    """Two adapted parameters on one module: two ParamWrappers, one inside the other."""

    def __init__(self):
        super().__init__()
        self.gate = nn.Parameter(torch.randn(3, 4))

    def forward(self, x):
        return super().forward(x) * self.gate


def test_deleting_an_adapter_unwraps_nested_parameter_wrappers():
    base = nn.Sequential(GatedExpertBank())
    x = torch.randn(5, 6)
    ref = base(x)
    model = get_peft_model(base, GPartConfig(d=8, init_scale=1.0, target_modules=[],
                                             target_parameters=["0.gate_up", "0.gate"]))
    assert _gpart_layer_names(model) == ["base_model.model.0", "base_model.model.0.base_layer"]
    assert not torch.allclose(model(x), ref)
    model.delete_adapter("default")
    assert _gpart_layer_names(model) == []
    assert type(model.base_model.model[0]) is GatedExpertBank
    assert torch.equal(model.base_model.model(x), ref)


def test_same_seed_data_and_config_give_a_bit_identical_theta():
    def run():
        torch.manual_seed(0)
        model = get_peft_model(tiny_llama(), GPartConfig(d=200, seed=3, dropout=0.1, target_modules="all-linear"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        x = torch.randint(0, 120, (2, 8), generator=torch.Generator().manual_seed(1))
        model.train()
        for _ in range(3):
            opt.zero_grad()
            model(x, labels=x).loss.backward()
            opt.step()
        return model.base_model.gpart_theta["default"].detach().clone()

    a, b = run(), run()
    assert a.abs().sum() > 0
    assert torch.equal(a, b)
