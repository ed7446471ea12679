"""What PEFT's generic tuner tests expect of every method, checked on GPart (our own tests of those conventions).

PEFT runs the same lifecycle tests for each method it ships (merge/unmerge/disable/delete, modules_to_save,
requires_grad, several adapters, save/load). Where a convention is about which tensors train, the same
sequence of calls is run on LoRA, the reference, and GPart must give the same answer. Deliberate
differences are in docs/api.md, "Differences from PEFT's conventions".
"""

from __future__ import annotations

import pytest
import torch
from conftest import MLP, ConvNet, EmbNet, tiny_gpt2
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer

from gpart import GPartConfig, GPartLayer

TOL = dict(rtol=1e-5, atol=1e-5)

# name -> (base model, GPart targets, an input); every kind of wrapper GPart has, on a small real module
CASES = {
    "linear": (MLP, dict(target_modules=["lin0", "lin1"]), lambda: torch.randn(4, 10)),
    "linear+bias": (MLP, dict(target_modules=["lin0", "lin1"], partition_bias=True), lambda: torch.randn(4, 10)),
    "conv1d/2d/3d": (ConvNet, dict(target_modules=["conv1d", "conv2d", "conv3d"]), lambda: torch.randn(2, 3, 8)),
    "embedding": (EmbNet, dict(target_modules=["emb", "lin"]), lambda: torch.randint(0, 50, (2, 7))),
    "transformers-Conv1D": (tiny_gpt2, dict(target_modules=["c_attn", "c_proj"]),
                            lambda: torch.randint(0, 100, (2, 7))),
    "target_parameters": (MLP, dict(target_modules=[], target_parameters=["lin1.weight"]), lambda: torch.randn(4, 10)),
}


def _out(model, x):
    out = model(x)
    return out.logits if hasattr(out, "logits") else out


def _fresh(make):
    """The same base model on every call (the tiny modules draw their weights from torch's global RNG)."""
    torch.manual_seed(0)
    return make()


def _adapted(case, seed=3, **extra):
    """(base outputs, GPart model with a non-zero theta, input) for a case of CASES."""
    make, targets, make_x = CASES[case]
    x = make_x()
    base = _fresh(make)
    with torch.no_grad():
        base_out = _out(base, x)
    model = get_peft_model(base, GPartConfig(d=24, seed=seed, init_scale=0.5, **targets, **extra))
    return base_out, model, x


def _wrappers(model):
    return [m for m in model.modules() if isinstance(m, GPartLayer)]


# -- merge, unmerge, disable, unload -----------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_merge_unmerge_disable_and_unload_give_the_adapted_or_the_base_outputs(case):
    base_out, model, x = _adapted(case)
    with torch.no_grad():
        adapted = _out(model, x)
        assert not torch.allclose(adapted, base_out)  # the adapter changes the outputs
        for safe_merge in (False, True):
            model.merge_adapter(safe_merge=safe_merge)
            assert all(w.merged for w in _wrappers(model))
            torch.testing.assert_close(_out(model, x), adapted, **TOL)
            with model.disable_adapter():  # a merged adapter is taken out while disabled, as in LoRA
                torch.testing.assert_close(_out(model, x), base_out, **TOL)
            torch.testing.assert_close(_out(model, x), adapted, **TOL)
            model.unmerge_adapter()
            assert not any(w.merged for w in _wrappers(model))
            torch.testing.assert_close(_out(model, x), adapted, **TOL)
        with model.disable_adapter():
            torch.testing.assert_close(_out(model, x), base_out, **TOL)
        torch.testing.assert_close(_out(model, x), adapted, **TOL)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("how", ["merge_and_unload", "safe_merge_and_unload", "unload"])
def test_merge_and_unload_keeps_the_update_and_unload_drops_it(case, how):
    base_out, model, x = _adapted(case)
    with torch.no_grad():
        adapted = _out(model, x)
        plain = model.unload() if how == "unload" else model.merge_and_unload(safe_merge=how.startswith("safe"))
        assert not any(isinstance(m, BaseTunerLayer) for m in plain.modules())
        assert not any("gpart" in name for name, _ in plain.named_parameters())
        if how == "unload":
            assert torch.equal(_out(plain, x), base_out)
        else:
            torch.testing.assert_close(_out(plain, x), adapted, **TOL)


@pytest.mark.parametrize("case", ["linear", "conv1d/2d/3d", "embedding", "transformers-Conv1D"])
def test_get_delta_weight_is_what_merging_adds(case):
    _, model, _ = _adapted(case)
    for wrapper in _wrappers(model):
        before = wrapper.get_base_layer().weight.detach().clone()
        delta = wrapper.get_delta_weight("default")
        assert delta.shape == before.shape and delta.dtype == before.dtype and delta.abs().sum() > 0
        wrapper.merge()
        torch.testing.assert_close(wrapper.get_base_layer().weight.detach(), before + delta, **TOL)
        wrapper.unmerge()
        torch.testing.assert_close(wrapper.get_base_layer().weight.detach(), before, **TOL)


# -- several adapters -------------------------------------------------------------------------------


def test_two_active_adapters_add_their_updates():
    base_out, model, x = _adapted("linear")
    model.add_adapter("other", GPartConfig(d=16, seed=9, init_scale=0.5, target_modules=["lin1"]))
    with torch.no_grad():
        only_default = _out(model, x)
        model.set_adapter("other")
        only_other = _out(model, x)
        model.base_model.set_adapter(["default", "other"])
        both = _out(model, x)
        assert model.base_model.active_adapters == ["default", "other"]
        # the layers are linear in their weights and lin1 sees lin0's output: compare merged weights instead
        for wrapper in _wrappers(model):
            weight = wrapper.get_base_layer().weight.detach().clone()
            expected = weight + sum(wrapper.get_delta_weight(a) for a in ("default", "other")
                                    if a in wrapper.gpart_slices)
            wrapper.merge(adapter_names=["default", "other"])
            torch.testing.assert_close(wrapper.get_base_layer().weight.detach(), expected, **TOL)
        torch.testing.assert_close(_out(model, x), both, **TOL)
    assert not torch.allclose(both, only_default) and not torch.allclose(both, only_other)
    assert not torch.allclose(both, base_out)


def test_deleting_an_adapter_keeps_the_others_outputs():
    base_out, model, x = _adapted("linear")
    model.add_adapter("other", GPartConfig(d=16, seed=9, init_scale=0.5, target_modules=["lin0"]))
    with torch.no_grad():
        adapted = _out(model, x)
        model.delete_adapter("other")  # inactive
        assert torch.equal(_out(model, x), adapted)
        model.add_adapter("other", GPartConfig(d=16, seed=9, init_scale=0.5, target_modules=["lin0"]))
        model.set_adapter("other")
        other = _out(model, x)
        model.delete_adapter("default")  # active: PEFT activates what is left
        assert model.active_adapters == ["other"] and torch.equal(_out(model, x), other)
        model.delete_adapter("other")  # the last one (PeftModel's forward needs an adapter: call the model)
        assert model.active_adapters == [] and torch.equal(model.base_model.model(x), base_out)


def test_a_deleted_adapter_can_be_added_again_under_its_name():
    _, model, x = _adapted("linear")
    with torch.no_grad():
        adapted = _out(model, x)
    model.delete_adapter("default")
    model.add_adapter("default", GPartConfig(d=24, seed=3, init_scale=0.5, target_modules=["lin0", "lin1"]))
    model.set_adapter("default")
    with torch.no_grad():
        assert torch.equal(_out(model, x), adapted)  # the same seed gives the same partition and theta


# -- which tensors train: the same calls on LoRA (the reference) and on GPart ------------------------


def _trainable(model) -> set[tuple[str, str]]:
    """(what, adapter) for every trainable tensor: what is "adapter" (LoRA's factors, GPart's theta),
    "head" (a modules_to_save copy) or "base" (anything else)."""
    found = set()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        parts = name.split(".")
        if "modules_to_save" in parts:
            found.add(("head", parts[parts.index("modules_to_save") + 1]))
        elif "gpart_theta" in parts:
            found.add(("adapter", parts[parts.index("gpart_theta") + 1]))
        elif any(p.startswith("lora_") for p in parts):
            found.add(("adapter", parts[[p.startswith("lora_") for p in parts].index(True) + 1]))
        else:
            found.add(("base", name))
    return found


def _config(method, seed):
    if method == "lora":
        return LoraConfig(r=2, target_modules=["lin0", "lin1"], modules_to_save=["head"], init_lora_weights=False)
    return GPartConfig(d=24, seed=seed, init_scale=0.5, target_modules=["lin0", "lin1"], modules_to_save=["head"])


def _requires_grad_story(method):
    """What trains after each step of a PEFT user's session; one entry per step."""
    model = get_peft_model(_fresh(MLP), _config(method, 1))
    seen = [_trainable(model)]
    model.add_adapter("other", _config(method, 2))
    seen.append(_trainable(model))  # a new adapter is added inactive and frozen
    model.set_adapter("other")
    seen.append(_trainable(model))
    model.set_requires_grad("default", True)
    seen.append(_trainable(model))
    model.set_requires_grad(["default", "other"], False)
    seen.append(_trainable(model))
    model.set_requires_grad("other", True)
    seen.append(_trainable(model))
    with model.disable_adapter():
        seen.append(_trainable(model))
    seen.append(_trainable(model))
    model.delete_adapter("other")
    seen.append(_trainable(model))
    return seen


def test_requires_grad_follows_loras_conventions_step_by_step():
    lora, ours = _requires_grad_story("lora"), _requires_grad_story("gpart")
    assert ours == lora
    # the convention itself, spelled out
    assert ours[0] == {("adapter", "default"), ("head", "default")}
    assert ours[1] == ours[0]
    assert ours[2] == {("adapter", "other"), ("head", "other")}
    assert ours[3] == ours[2] | ours[0]  # set_requires_grad switches theta and the adapter's head copy
    assert ours[4] == set() and ours[5] == ours[2]
    assert ours[6] == set()  # nothing trains inside disable_adapter(), theta included


def test_disable_adapter_restores_each_thetas_own_flag():
    model = get_peft_model(_fresh(MLP), _config("gpart", 1))
    theta = model.base_model.gpart_theta["default"]
    with model.disable_adapter():
        assert not theta.requires_grad
    assert theta.requires_grad
    model.set_requires_grad("default", False)
    with model.disable_adapter():
        pass
    assert not theta.requires_grad  # frozen before, frozen after


def test_a_loaded_inference_adapter_stays_frozen_through_disable_adapter(tmp_path):
    # (LoRA's adapter and head copy come out of disable_adapter() trainable here: docs/api.md)
    get_peft_model(_fresh(MLP), _config("gpart", 1)).save_pretrained(tmp_path)
    model = PeftModel.from_pretrained(_fresh(MLP), tmp_path)
    assert _trainable(model) == set()
    with model.disable_adapter():
        pass
    assert _trainable(model) == set()
    trainable = PeftModel.from_pretrained(_fresh(MLP), tmp_path, is_trainable=True)
    assert _trainable(trainable) == {("adapter", "default"), ("head", "default")}


def test_set_requires_grad_names_an_unknown_adapter():
    model = get_peft_model(_fresh(MLP), _config("gpart", 1))
    with pytest.raises(ValueError, match=r"\['nope'\] not found; available: \['default'\]"):
        model.set_requires_grad("nope", True)


# -- modules_to_save and save/load round trips -------------------------------------------------------


def test_modules_to_save_copies_are_per_adapter_switched_and_saved(tmp_path):
    model = get_peft_model(_fresh(MLP), _config("gpart", 1))
    model.add_adapter("other", _config("gpart", 2))
    x = torch.randn(4, 10)
    with torch.no_grad():
        model.base_model.model.head.modules_to_save["other"].weight.add_(1.0)  # a trained head of its own
        out_default = _out(model, x)
        model.set_adapter("other")
        out_other = _out(model, x)
    head = model.base_model.model.head
    assert head.active_adapters == ["other"] and not torch.allclose(out_default, out_other)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(_fresh(MLP), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(_out(loaded, x), out_default)
        loaded.set_adapter("other")
        assert torch.equal(_out(loaded, x), out_other)
        with loaded.disable_adapter():  # the original head, not a copy
            assert torch.equal(_out(loaded, x), _fresh(MLP)(x))


@pytest.mark.parametrize("case", CASES)
def test_save_and_load_give_identical_outputs_and_state(case, tmp_path):
    make, _, _ = CASES[case]
    _, model, x = _adapted(case)
    model.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "adapter_config.json",
                                                           "adapter_model.safetensors"]
    loaded = PeftModel.from_pretrained(_fresh(make), tmp_path)
    with torch.no_grad():
        assert torch.equal(_out(loaded, x), _out(model, x))
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_save_pretrained_of_selected_adapters(tmp_path):
    _, model, x = _adapted("linear")
    model.add_adapter("other", GPartConfig(d=16, seed=9, init_scale=0.5, target_modules=["lin1"]))
    model.set_adapter("other")
    with torch.no_grad():
        other = _out(model, x)
    model.save_pretrained(tmp_path, selected_adapters=["other"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "other"]  # the model card, and "other" alone
    loaded = PeftModel.from_pretrained(_fresh(MLP), tmp_path / "other", adapter_name="other")
    with torch.no_grad():
        assert torch.equal(_out(loaded, x), other)


# -- deliberate differences (docs/api.md, "Differences from PEFT's conventions") -----------------------


def test_theta_comes_from_the_configs_seed_not_torchs_global_rng():
    thetas = []
    for global_seed in (0, 123):
        base = _fresh(MLP)
        torch.manual_seed(global_seed)
        state = torch.get_rng_state()
        model = get_peft_model(base, _config("gpart", 5))
        assert torch.equal(torch.get_rng_state(), state)  # get_peft_model draws nothing from the global RNG
        thetas.append(model.base_model.gpart_theta["default"].detach())
    assert torch.equal(*thetas) and thetas[0].abs().sum() > 0


def test_injecting_without_a_peft_model_is_refused_as_for_vera():
    from peft import inject_adapter_in_model

    with pytest.raises(ValueError, match="GPART because it uses shared state stored on the tuner.*get_peft_model"):
        inject_adapter_in_model(_config("gpart", 1), _fresh(MLP))


# -- PEFT's attributes on every tuner layer ---------------------------------------------------------


def _features(base_layer):
    """(in_features, out_features) as PEFT's LoRA layers define them for this kind of base layer."""
    if isinstance(base_layer, torch.nn.Embedding):
        return base_layer.num_embeddings, base_layer.embedding_dim
    if isinstance(base_layer, torch.nn.modules.conv._ConvNd):
        return base_layer.in_channels, base_layer.out_channels
    if type(base_layer).__name__ == "Conv1D":
        return tuple(base_layer.weight.shape)
    return base_layer.in_features, base_layer.out_features


@pytest.mark.parametrize("case", ["linear", "conv1d/2d/3d", "embedding", "transformers-Conv1D", "target_parameters"])
def test_every_wrapper_exposes_in_and_out_features(case):
    _, model, _ = _adapted(case)
    for wrapper in _wrappers(model):
        assert (wrapper.in_features, wrapper.out_features) == _features(wrapper.get_base_layer())


def test_peft_type_has_a_value_as_peft_reads_it():
    _, model, _ = _adapted("linear")
    assert model.active_peft_config.peft_type.value == "GPART"
