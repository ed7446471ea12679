"""Bad input: a clear error naming the problem, and the model left exactly as it was."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import MLP, tiny_bert
from peft import PeftConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from gpart import GPartConfig, GPartLayer, LayoutMismatchError, PartitionError, __version__


def _snapshot(model):
    """Module types, parameter names, trainability and values: everything a failed call must not change."""
    return {n: (type(m), tuple(sorted((k, p.requires_grad, float(p.detach().double().sum()))
                                      for k, p in m.named_parameters(recurse=False))))
            for n, m in model.named_modules()}


@pytest.mark.parametrize("d,match", [(0, "positive"), (-5, "positive"), (2.5, "integer"), ("8", "integer"),
                                     (None, "needs d")])
def test_bad_d_in_config(d, match):
    with pytest.raises(ValueError, match=match):
        GPartConfig(d=d, target_modules=["lin0"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(dropout=1.0), "dropout"), (dict(seed=-1), "seed"), (dict(bias="all"), "partition_bias"),
    (dict(init_scale=-1.0), "init_scale"),
])
def test_bad_config_fields(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GPartConfig(d=4, target_modules=["lin0"], **kwargs)


def test_d_larger_than_D_states_D_and_leaves_the_model_untouched():
    base = MLP()
    before = _snapshot(base)
    with pytest.raises(PartitionError, match=r"D=200 weights.*between 1 and 200"):
        get_peft_model(base, GPartConfig(d=201, target_modules=["lin0"]))
    assert _snapshot(base) == before
    assert not any(isinstance(m, GPartLayer) for m in base.modules())


def test_a_failed_injection_takes_its_modules_to_save_copies_back():
    """PEFT copies modules_to_save before gpart can check d against D: the failure must undo those copies too,
    on a fresh model (the wrapper goes) and on a second adapter (the first adapter keeps its copy, unchanged)."""
    base = MLP()
    before = _snapshot(base)
    with pytest.raises(PartitionError, match="D=200 weights"):
        get_peft_model(base, GPartConfig(d=201, target_modules=["lin0"], modules_to_save=["head"]))
    assert _snapshot(base) == before

    model = get_peft_model(MLP(), GPartConfig(d=8, target_modules=["lin0"], modules_to_save=["head"]))
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["default"].weight.add_(1.0)  # as if it had trained
    x = torch.randn(3, 10)
    out, state = model(x), _snapshot(model)
    with pytest.raises(PartitionError, match="D=200 weights"):
        model.add_adapter("other", GPartConfig(d=201, target_modules=["lin0"], modules_to_save=["head"]))
    assert _snapshot(model) == state and list(model.peft_config) == ["default"]
    assert torch.equal(model(x), out)


def test_unknown_target_names_the_targets():
    with pytest.raises(ValueError, match=r"Target modules \{'nope'\} not found"):
        get_peft_model(MLP(), GPartConfig(d=4, target_modules=["nope"]))


def test_unsupported_layer_fails_at_get_peft_model_and_unwraps_what_was_done():
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(TypeError, match=r"cannot adapt '.*LayerNorm' of type LayerNorm.*target_parameters"):
        get_peft_model(base, GPartConfig(d=8, target_modules=["query", "LayerNorm"]))
    assert _snapshot(base) == before


def test_quantized_weight_is_refused_clearly():
    base = MLP()
    base.lin0.weight = nn.Parameter(torch.zeros(20, 10, dtype=torch.int8), requires_grad=False)
    with pytest.raises(TypeError, match=r"'lin0'.*torch.int8.*Supported: bitsandbytes 4-bit"):
        get_peft_model(base, GPartConfig(d=8, target_modules=["lin0", "lin1"]))
    assert not any(isinstance(m, GPartLayer) for m in base.modules())


def _saved_adapter(tmp_path, **kwargs):
    model = get_peft_model(tiny_bert(), GPartConfig(d=50, init_scale=1.0, target_modules=["query", "value"],
                                                    **kwargs))
    model.save_pretrained(tmp_path)
    return tmp_path


@pytest.mark.parametrize("key", ["gpart_theta", "base_model.model.gpart_theta"])
def test_theta_under_another_key_is_refused_not_left_unset(tmp_path, key):
    """PEFT loads theta from 'base_model.gpart_theta' only: under any other name the adapter would keep its
    initial theta and merely warn, so the file is refused."""
    path = _saved_adapter(tmp_path)
    theta = load_file(path / "adapter_model.safetensors")["base_model.gpart_theta"]
    save_file({key: theta}, path / "adapter_model.safetensors")
    with pytest.raises(ValueError, match="holds no theta .*expected the tensor 'base_model.gpart_theta'"):
        PeftModel.from_pretrained(tiny_bert(), path)


def test_loading_onto_a_different_model_names_the_first_mismatching_tensor(tmp_path):
    path = _saved_adapter(tmp_path)
    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=48, num_hidden_layers=2,
                                                     num_attention_heads=4, intermediate_size=64))
    before = _snapshot(other)
    with pytest.raises(LayoutMismatchError,
                       match=r"#0 is bert.encoder.layer.0.attention.self.query.weight \[48, 48\] in the model but "
                             r"bert.encoder.layer.0.attention.self.query.weight \[32, 32\] in the adapter"):
        PeftModel.from_pretrained(other, path)
    assert _snapshot(other) == before


def test_loading_onto_a_model_with_fewer_layers_fails(tmp_path):
    path = _saved_adapter(tmp_path)
    torch.manual_seed(0)
    other = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1,
                                                     num_attention_heads=4, intermediate_size=64))
    with pytest.raises(LayoutMismatchError, match=r"adapter has an extra adapted tensor #2"):
        PeftModel.from_pretrained(other, path)


@pytest.mark.parametrize("field,value,match", [
    ("partition_version", 3, "newer than this gpart"),
    ("partition_algorithm", "randint", "silently change"),
])
def test_unknown_partition_algorithm_or_version_is_refused(tmp_path, field, value, match):
    path = _saved_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, path)
    assert _snapshot(base) == before


def test_tampered_layout_fingerprint_is_detected(tmp_path):
    path = _saved_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    cfg["layout_fingerprint"] = "0" * 64
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(LayoutMismatchError, match="fingerprint"):
        PeftModel.from_pretrained(tiny_bert(), path)


@pytest.mark.parametrize("tensors,match", [
    ({"base_model.other": torch.zeros(50)}, "holds no theta"),
    ({"base_model.gpart_theta": torch.zeros(49)}, r"shape \[49\] but the config says d=50"),
    ({"base_model.gpart_theta": torch.zeros(50, dtype=torch.int32)}, "expected a float tensor"),
])
def test_bad_theta_in_the_file(tmp_path, tensors, match):
    path = _saved_adapter(tmp_path)
    save_file(tensors, path / "adapter_model.safetensors")
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, path)
    assert _snapshot(base) == before


def test_bad_theta_on_load_adapter_removes_only_the_new_adapter(tmp_path):
    good = _saved_adapter(tmp_path / "good")
    bad = _saved_adapter(tmp_path / "bad")
    save_file({"base_model.gpart_theta": torch.zeros(3)}, bad / "adapter_model.safetensors")
    model = PeftModel.from_pretrained(tiny_bert(), good)
    x = torch.randint(0, 100, (1, 5))
    ref = model(x).logits
    with pytest.raises(ValueError, match="shape"):
        model.load_adapter(bad, adapter_name="second")
    assert list(model.peft_config) == ["default"]
    assert list(model.base_model.gpart_theta) == ["default"]
    assert torch.equal(model(x).logits, ref)
    assert load_file(good / "adapter_model.safetensors")["base_model.gpart_theta"].shape == (50,)


# -- saved files ------------------------------------------------------------------------------------


def test_pickled_adapter_is_refused_unless_opted_in(tmp_path, monkeypatch):
    path = _saved_adapter(tmp_path)
    theta = load_file(path / "adapter_model.safetensors")
    torch.save(theta, path / "adapter_model.bin")
    (path / "adapter_model.safetensors").unlink()
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match="safetensors only.*GPART_ALLOW_PICKLE=1"):
        PeftModel.from_pretrained(base, path)
    assert _snapshot(base) == before
    monkeypatch.setenv("GPART_ALLOW_PICKLE", "1")
    loaded = PeftModel.from_pretrained(tiny_bert(), path)
    assert torch.equal(loaded.base_model.gpart_theta["default"], theta["base_model.gpart_theta"])


@pytest.mark.parametrize("edit,match", [
    (lambda c: c.update(newer_field=1), r"does not know: \['newer_field'\]"),
    (lambda c: c.pop("layout"), r"lacks \['layout'\]"),
    (lambda c: c.pop("seed"), r"lacks \['seed'\]"),
    (lambda c: c.update(d="50"), "d must be an integer"),
    (lambda c: c.update(layout=[["x", [2, -1]]]), "layout must be a list"),
    (lambda c: c.update(layout_fingerprint="abc"), "sha256"),
    (lambda c: c.update(gpart_version=3), "gpart_version must be a version string, got 3"),
])
def test_config_with_unknown_missing_or_mistyped_fields_is_refused(tmp_path, edit, match):
    path = _saved_adapter(tmp_path)
    cfg = json.loads((path / "adapter_config.json").read_text())
    edit(cfg)
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    base = tiny_bert()
    before = _snapshot(base)
    with pytest.raises(ValueError, match=match):
        PeftModel.from_pretrained(base, path)
    assert _snapshot(base) == before


@pytest.mark.parametrize("saved_by,hint", [
    ("9.1.0", "it was saved by gpart 9.1.0: upgrade with pip install -U 'gpart>=9.1.0'."),
    (None, "it was saved by a newer gpart: upgrade with pip install -U gpart."),  # no version recorded
])
@pytest.mark.parametrize("edit,reason", [
    (lambda c: c.update(newer_field=1), f"adapter_config.json has fields this gpart ({__version__}) does not know: "
                                        "['newer_field']; "),
    (lambda c: c.update(partition_version=3), f"partition version 3, which gpart {__version__} does not know "),
])
def test_an_adapter_from_a_newer_gpart_names_the_gpart_it_needs_on_every_loading_path(tmp_path, edit, reason,
                                                                                         saved_by, hint):
    good = _saved_adapter(tmp_path / "good")
    path = _saved_adapter(tmp_path / "newer")
    cfg = json.loads((path / "adapter_config.json").read_text())
    edit(cfg)
    cfg["gpart_version"] = saved_by
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    model = PeftModel.from_pretrained(tiny_bert(), good)
    before = _snapshot(model)
    for load in (lambda: PeftModel.from_pretrained(tiny_bert(), path), lambda: PeftConfig.from_pretrained(str(path)),
                 lambda: model.load_adapter(path, adapter_name="newer")):
        with pytest.raises(ValueError) as error:
            load()
        message = str(error.value)
        assert reason in message and message.endswith(hint) and "\n" not in message
    assert _snapshot(model) == before and list(model.peft_config) == ["default"]


def test_docs_api_shows_the_messages_gpart_gives(tmp_path):
    path = _saved_adapter(tmp_path)
    saved = json.loads((path / "adapter_config.json").read_text())
    docs = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    for edit in ({"newer_field": 1}, {"partition_version": 3}):
        (path / "adapter_config.json").write_text(json.dumps({**saved, **edit, "gpart_version": "0.3.0"}))
        with pytest.raises(ValueError) as error:
            PeftConfig.from_pretrained(str(path))
        assert f"\n{error.value}\n" in docs


def test_a_misspelt_config_argument_is_still_a_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'seeds'"):
        GPartConfig(d=4, seeds=3)


def _truncated_adapter(tmp_path):
    path = _saved_adapter(tmp_path)
    blob = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(blob[: len(blob) // 2])
    return path


def _weights(model):
    """Every weight's values by its name in the base model (a wrapped layer's base_layer is the same weight)."""
    return {n.replace(".base_layer", ""): p.detach().clone() for n, p in model.named_parameters()}


def _load_truncated(tmp_path, snapshot):
    """(snapshot of the base before, after) a load of the truncated adapter, which must fail clearly."""
    path = _truncated_adapter(tmp_path)
    base = tiny_bert()
    before = snapshot(base)
    with pytest.raises(Exception, match="(?i)safetensor|header|incomplete|invalid|deserializ"):
        PeftModel.from_pretrained(base, path)
    return before, snapshot(base)


def test_truncated_safetensors_file_fails_and_keeps_the_base_weights(tmp_path):
    before, after = _load_truncated(tmp_path, _weights)
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)


def test_truncated_safetensors_file_leaves_the_model_as_it_was(tmp_path):
    before, after = _load_truncated(tmp_path, _snapshot)
    assert after == before