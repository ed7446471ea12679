"""The eval-mode cache of what a wrapper's forward builds from theta: same bits as the uncached forward,
rebuilt whenever anything it depends on changes, never used or kept while training."""

from __future__ import annotations

import pytest
import torch
from peft import get_peft_model
from torch import nn

import gpart
from gpart import GPartConfig
from gpart.layers import EVAL_CACHE_ENV, GPartLayer

from conftest import MLP, ConvNet, tiny_gpt2, tiny_llama


def _layers(model):
    return [m for m in model.modules() if isinstance(m, GPartLayer)]


def _kept(model) -> int:
    """Number of cache entries over all wrappers."""
    return sum(len(m._gpart_cache) for m in _layers(model))


def _uncached(model, *args, **kwargs):
    tuner = model.base_model
    tuner.eval_cache = False
    try:
        return model(*args, **kwargs)
    finally:
        tuner.eval_cache = None


def _mlp(dtype=torch.float32, partition_bias=False, adapters=1, seed=0):
    torch.manual_seed(seed)
    model = MLP().to(dtype)
    cfg = dict(d=40, target_modules=["lin0", "lin1"], init_scale=0.5, partition_bias=partition_bias)
    model = get_peft_model(model, GPartConfig(seed=0, **cfg))
    for k in range(1, adapters):
        model.add_adapter(f"extra{k}", GPartConfig(seed=k, **cfg))
    if adapters > 1:
        model.base_model.set_adapter(["default"] + [f"extra{k}" for k in range(1, adapters)])
    with torch.no_grad():  # distinct non-zero thetas, so every adapter shows in the output
        for k, theta in enumerate(model.base_model.gpart_theta.values()):
            theta.copy_(torch.randn(theta.shape, generator=torch.Generator().manual_seed(k)) * 0.3)
    return model.eval()


# -- same bits as the uncached forward ------------------------------------------------------------------

@pytest.mark.parametrize("adapters", [1, 3])
@pytest.mark.parametrize("partition_bias", [False, True])
@pytest.mark.parametrize("mode", ["fp32", "bf16-weights", "bf16-autocast"])
def test_cached_forward_is_bit_identical_to_the_uncached_one(mode, partition_bias, adapters):
    dtype = torch.bfloat16 if mode == "bf16-weights" else torch.float32
    model = _mlp(dtype, partition_bias, adapters)
    x = torch.randn(5, 10).to(dtype)
    cast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=mode == "bf16-autocast")
    with torch.no_grad(), cast:
        want = _uncached(model, x)
        assert _kept(model) == 0
        first = model(x)  # builds the entries
        assert _kept(model) == 2 * adapters
        again = model(x)  # reuses them
    assert want.dtype == first.dtype
    assert torch.equal(first, want) and torch.equal(again, want)
    with torch.no_grad(), cast, model.disable_adapter():
        assert not torch.equal(model(x), want), "the adapters must change the output, or the test proves nothing"


@pytest.mark.parametrize("make, x", [
    (ConvNet, torch.randn(2, 3, 8)),
    (tiny_gpt2, torch.tensor([[1, 5, 7, 9]])),
    (tiny_llama, torch.tensor([[1, 5, 7, 9]])),
])
def test_cached_forward_is_bit_identical_for_conv_conv1d_and_llama(make, x):
    targets = {ConvNet: ["conv1d", "conv2d", "conv3d"], tiny_gpt2: ["c_attn", "c_proj"]}.get(make)
    model = get_peft_model(make(), GPartConfig(d=64, target_modules=targets, init_scale=0.5)).eval()
    with torch.no_grad():
        want, first, again = _uncached(model, x), model(x), model(x)
    get = (lambda o: o) if make is ConvNet else (lambda o: o.logits)
    assert _kept(model) == len(_layers(model))
    assert torch.equal(get(first), get(want)) and torch.equal(get(again), get(want))


def test_inference_mode_and_no_tensor_needing_grad_use_the_cache():
    model = _mlp()
    for theta in model.base_model.gpart_theta.values():
        theta.requires_grad_(False)
    x = torch.randn(3, 10)
    with torch.no_grad():
        want = _uncached(model, x)
    with torch.inference_mode():
        assert torch.equal(model(x), want)
    assert _kept(model) == 2
    assert torch.equal(model(x), want)  # grad on, but nothing needs grad: still cached, still exact


def test_generate_with_the_kv_cache_gives_the_uncached_tokens():
    model = get_peft_model(tiny_llama(), GPartConfig(d=64, init_scale=0.5)).eval()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        model.base_model.eval_cache = False
        want = model.generate(input_ids=ids, **kw)
        model.base_model.eval_cache = None
        got = model.generate(input_ids=ids, **kw)
    assert _kept(model) == len(_layers(model))
    assert torch.equal(got, want)


# -- invalidation --------------------------------------------------------------------------------------

def _check_fresh(model, x):
    """The cached forward equals the uncached one now (after whatever the caller changed)."""
    with torch.no_grad():
        got = model(x)
        want = _uncached(model, x)
    assert torch.equal(got, want)
    return got


def _warm(model, x):
    with torch.no_grad():
        before = model(x)
    assert _kept(model) > 0
    return before


def test_theta_edited_in_place_in_eval_mode_is_seen():
    model, x = _mlp(), torch.randn(4, 10)
    before = _warm(model, x)
    with torch.no_grad():
        model.base_model.gpart_theta["default"].mul_(-2.0)
    assert not torch.equal(_check_fresh(model, x), before)


def test_theta_replaced_is_seen():
    model, x = _mlp(), torch.randn(4, 10)
    before = _warm(model, x)
    theta = model.base_model.gpart_theta["default"]
    theta.data = torch.randn_like(theta)  # a new storage behind the same Parameter
    after = _check_fresh(model, x)
    assert not torch.equal(after, before)
    model.base_model.gpart_theta["default"] = nn.Parameter(torch.randn_like(theta))  # a new Parameter
    assert not torch.equal(_check_fresh(model, x), after)


def test_adapter_reloaded_with_set_peft_model_state_dict_is_seen():
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    model, x = _mlp(), torch.randn(4, 10)
    state = {k: v.clone() * 3 for k, v in get_peft_model_state_dict(model).items()}
    before = _warm(model, x)
    set_peft_model_state_dict(model, state)
    assert not torch.equal(_check_fresh(model, x), before)


def test_base_weight_edited_in_place_is_seen():
    model, x = _mlp(), torch.randn(4, 10)
    before = _warm(model, x)
    with torch.no_grad():
        model.base_model.model.lin0.base_layer.weight.mul_(0.5)
        model.base_model.model.lin1.base_layer.bias.add_(1.0)
    assert not torch.equal(_check_fresh(model, x), before)


def test_dtype_and_device_moves_free_and_rebuild():
    model, x = _mlp(), torch.randn(4, 10)
    _warm(model, x)
    model.to(torch.bfloat16)
    assert _kept(model) == 0  # .to() frees at once
    _check_fresh(model, x.bfloat16())
    # a move that bypasses the tuner (the inner model's .to) is caught by the keys instead
    model.base_model.model.to(torch.float64)
    assert _kept(model) > 0
    out = _check_fresh(model, x.double())
    assert out.dtype == torch.float64


def test_switching_adapters_and_disabling_them():
    model, x = _mlp(adapters=2), torch.randn(4, 10)
    for active in ("extra1", "default", ["default", "extra1"]):
        model.base_model.set_adapter(active)
        assert _kept(model) == 0  # a change of the active set frees
        _warm(model, x)
        _check_fresh(model, x)
    with model.disable_adapter():
        assert _kept(model) == 0
        with torch.no_grad():
            assert torch.equal(model(x), model.base_model.model.head(torch.relu(model.base_model.model.lin1.base_layer(
                torch.relu(model.base_model.model.lin0.base_layer(x))))))
    _check_fresh(model, x)


def test_merge_unmerge_and_delete_adapter_free_the_cache():
    model, x = _mlp(adapters=2), torch.randn(4, 10)
    _warm(model, x)
    with torch.no_grad():
        unmerged = _uncached(model, x)
    model.merge_adapter()
    assert _kept(model) == 0
    with torch.no_grad():  # both active adapters are in the merged weights
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    model.unmerge_adapter()
    _check_fresh(model, x)
    with torch.no_grad():
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
    model.base_model.delete_adapter("extra1")
    assert all(name == "default" for m in _layers(model) for name, _ in m._gpart_cache)
    _check_fresh(model, x)


def test_train_frees_the_cache_and_training_never_fills_it():
    model, x = _mlp(), torch.randn(4, 10)
    _warm(model, x)
    model.train()
    assert _kept(model) == 0
    with torch.no_grad():
        model(x)  # training mode, even without grad: nothing kept
    assert _kept(model) == 0
    model.eval()
    _warm(model, x)
    for layer in _layers(model):  # training set behind the tuner's back: the next forward frees
        layer.training = True
    with torch.no_grad():
        model(x)
    assert _kept(model) == 0


def test_one_training_step_is_unchanged_by_the_cache_code():
    x = torch.randn(6, 10)

    def grads(setting, mode):
        model = _mlp(partition_bias=True, adapters=2)
        model.base_model.eval_cache = setting
        model.train(mode == "train")
        model(x).square().sum().backward()  # grad enabled, theta needs grad: never the cached path
        assert _kept(model) == 0
        return [t.grad.clone() for t in model.base_model.gpart_theta.values()]

    for mode in ("train", "eval"):
        on, off = grads(True, mode), grads(False, mode)
        assert all(g.abs().sum() > 0 for g in on)
        assert all(torch.equal(a, b) for a, b in zip(on, off))


# -- switches ---------------------------------------------------------------------------------------

def test_switches_turn_it_off_and_clear_frees(monkeypatch):
    model, x = _mlp(), torch.randn(4, 10)
    monkeypatch.setenv(EVAL_CACHE_ENV, "0")
    with torch.no_grad():
        model(x)
    assert _kept(model) == 0
    model.base_model.eval_cache = True  # the model's own setting wins over the environment
    _warm(model, x)
    model.base_model.clear_gpart_cache()
    assert _kept(model) == 0
    _warm(model, x)
    gpart.clear_gpart_cache(model)
    assert _kept(model) == 0
    model.base_model.eval_cache = None
    monkeypatch.setenv(EVAL_CACHE_ENV, "maybe")
    with pytest.raises(ValueError, match="GPART_EVAL_CACHE='maybe' is not understood"), torch.no_grad():
        model(x)


def test_kept_memory_is_one_weight_per_adapted_layer_in_the_compute_dtype():
    for dtype in (torch.float32, torch.bfloat16):
        model, x = _mlp(dtype), torch.randn(4, 10).to(dtype)
        _warm(model, x)
        for layer in _layers(model):
            weight = layer.get_base_layer().weight
            (_key, (w, b, dw)), = layer._gpart_cache.values()
            new = dw if dtype == torch.bfloat16 else w  # bf16: W0 is the weight itself, Delta_W is kept
            assert new.shape == weight.shape and new.dtype == dtype
            assert new.untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()
            assert dtype == torch.float32 or w is weight


# -- the library's own generation and evaluation paths get the cache ---------------------------------

def test_causal_lm_generate_runs_in_eval_mode_without_grad_and_uses_the_cache():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from gpart.recipes.causal_lm import generate

    words = ["<pad>", "<unk>", "<s>", "</s>"] + "Question Answer : what is plus ?".split() + [str(i) for i in range(10)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64, eos_token_id=3)
    model = get_peft_model(LlamaForCausalLM(cfg), GPartConfig(d=64, init_scale=0.5)).train()
    prompts = [tokenizer(p)["input_ids"] for p in ("Question : what is 1 plus 2 ?\nAnswer :",
                                                    "Question : what is 3 plus 4 ?\nAnswer :")]
    kw = dict(max_new_tokens=5, batch_size=2, stop_ids=[3], stop_texts=["Question"])
    model.base_model.eval_cache = False
    want = generate(model, tokenizer, prompts, **kw)
    model.base_model.eval_cache = None
    model.train()
    got = generate(model, tokenizer, prompts, **kw)
    assert not model.training and _kept(model) == len(_layers(model))  # it ran in eval mode, without grad
    assert got == want


class _ExpertBank(nn.Module):
    """Like a MoE expert block: a 3-D parameter used by the module's own forward."""

    def __init__(self):
        super().__init__()
        self.gate_up = nn.Parameter(torch.randn(3, 6, 4))

    def forward(self, x):
        return torch.einsum("bi,eio->beo", x, self.gate_up)


class _Experts(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = _ExpertBank()
        self.norm = nn.LayerNorm(4)

    def forward(self, x):
        return self.norm(self.experts(x)).sum(1)


def test_target_parameters_wrapper_keeps_the_adapted_tensor_too():
    model = get_peft_model(_Experts(), GPartConfig(d=20, init_scale=0.7, target_modules=[],
                                                  target_parameters=["experts.gate_up", "norm.weight"])).eval()
    x = torch.randn(5, 6)
    with torch.no_grad():
        want, first, again = _uncached(model, x), model(x), model(x)
    assert _kept(model) == 2 and torch.equal(first, want) and torch.equal(again, want)
    with torch.no_grad():
        model.base_model.gpart_theta["default"].mul_(-1)
    _check_fresh(model, x)
    model.train()
    assert _kept(model) == 0


def test_a_copy_or_a_pickle_of_the_model_starts_with_an_empty_cache(tmp_path):
    import copy

    model, x = _mlp(), torch.randn(4, 10)
    before = _warm(model, x)
    clone = copy.deepcopy(model)
    assert _kept(clone) == 0 and _kept(model) > 0
    torch.save(model, tmp_path / "model.pt")  # weak references cannot be pickled: the cache is left out
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert _kept(loaded) == 0
    for m in (clone, loaded):
        with torch.no_grad():
            assert torch.equal(m(x), before)
        assert _kept(m) > 0
