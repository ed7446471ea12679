"""Every ```python block of README.md and docs/ runs as written, and does what its text says.

How a page is run: its blocks in order, in one namespace (as a reader goes down the page), in a fresh
working directory, offline. The one substitution: a placeholder model path "path/to/NAME" becomes a
tiny model directory built here, of the kind NAME stands for (a RoBERTa classifier, a chat LLM with a
ChatML template), big enough for the d the snippet uses. Files a snippet reads as the user's own data
(`chat.jsonl`: conversations, one per line) are written here first. A block whose first line is
`# not run: <why>` is illustrative and skipped; keep those rare.

After each block a check asserts what the block claims (theta trained, outputs equal after loading,
...). A new block without a check fails `test_every_snippet_has_a_check`.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import pytest
import torch

import gpart

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md"))]
SKIP_MARK = "# not run:"
FENCE = re.compile(r"^```python\n(.*?)^```", re.S | re.M)

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
WORDS = ("what is one two three four five six plus minus times the answer a an great dull good bad film movie "
         "user assistant system").split()
QA = [("one plus one", "two"), ("two plus two", "four"), ("three plus three", "six"), ("six minus two", "four"),
      ("five minus four", "one"), ("two times three", "six"), ("one plus four", "five"), ("four minus one", "three")]


# Blocks run as written by another test, which gives them what this one cannot (a fresh interpreter, a
# task folder for lm-eval): page -> {text that identifies the block: the test that runs it}.
RUN_ELSEWHERE = {
    "docs/api.md": {'PeftConfig.from_pretrained("out")': "tests/test_autoload.py"},
    "docs/llm.md": {"simple_evaluate(": "tests/test_lm_eval.py"},
}


def snippets(page: str) -> list[str]:
    """The page's ```python blocks that this test runs (not marked `# not run:`, not run elsewhere)."""
    blocks = FENCE.findall((ROOT / page).read_text())
    elsewhere = RUN_ELSEWHERE.get(page, {})
    return [b for b in blocks if not b.lstrip().startswith(SKIP_MARK) and not any(k in b for k in elsewhere)]


def _word_tokenizer(specials, chat_template=None, **kw):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", **kw)
    if chat_template:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """placeholder path -> a tiny local model directory standing for it."""
    from transformers import LlamaConfig, LlamaForCausalLM, RobertaConfig, RobertaModel

    root = tmp_path_factory.mktemp("doc-models")
    torch.manual_seed(0)
    # RoBERTa: hidden 128 so that query+value hold D = 65,536 >= the README's d = 23,040
    tok = _word_tokenizer(["<pad>", "<unk>", "<s>", "</s>"], pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                          cls_token="<s>", sep_token="</s>")
    RobertaModel(RobertaConfig(vocab_size=64, hidden_size=128, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=256, max_position_embeddings=40, pad_token_id=0, bos_token_id=2,
                               eos_token_id=3)).save_pretrained(root / "roberta")
    tok.save_pretrained(root / "roberta")
    # a chat Llama: hidden 256, full attention heads, so q,k,v,o hold D = 524,288 (llm.md's d) and every
    # linear layer 1.3M (the README's d = 131,072); shapes bitsandbytes' 4-bit CPU kernels accept
    tok = _word_tokenizer(["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"], CHATML, pad_token="<pad>",
                          eos_token="<|im_end|>", bos_token="<|im_start|>")
    LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, intermediate_size=512, max_position_embeddings=128,
                                 tie_word_embeddings=False, pad_token_id=0, eos_token_id=3,
                                 bos_token_id=2)).save_pretrained(root / "llm")
    tok.save_pretrained(root / "llm")
    return {"path/to/roberta-base": root / "roberta", "path/to/llm": root / "llm", "path/to/model": root / "llm"}


def _write_user_files(where: Path) -> None:
    rows = [{"messages": [{"role": "user", "content": f"what is {q}"}, {"role": "assistant", "content": a}]}
            for q, a in QA]
    (where / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _substitute(code: str, models: dict) -> str:
    for placeholder, path in models.items():
        code = code.replace(f'"{placeholder}"', repr(str(path)))
    left = re.findall(r'"path/to/[^"]*"', code)
    assert not left, f"no tiny model stands for {left}: add it to the `models` fixture"
    return code


# -- what each snippet claims -----------------------------------------------------------------------------


def _theta(model):
    return next(p for n, p in model.named_parameters() if "gpart_theta" in n)


def _readme_quickstart(ns):
    model, loaded, merged = ns["model"].eval(), ns["loaded"], ns["merged"]
    assert _theta(model).detach().abs().max() > 0.1  # ten steps at the rule's lr moved theta
    with torch.no_grad():
        trained = model(**ns["batch"]).logits
        assert torch.equal(loaded.base_model.gpart_theta["default"], model.base_model.gpart_theta["default"])
        torch.testing.assert_close(merged(**ns["batch"]).logits, trained, rtol=1e-5, atol=1e-5)
    assert not any(isinstance(m, gpart.GPartLayer) for m in merged.modules())


def _readme_llm_quickstart(ns):
    from safetensors.torch import load_file

    theta = load_file("out/adapter_model.safetensors")["base_model.gpart_theta"]
    assert theta.shape == (131072,) and theta.norm() > 1.0  # TRL's default lr would leave it near 0
    assert ns["trainer"].args.learning_rate == pytest.approx(2.9e-2, rel=0.01)
    plain = ns["plain"]
    assert not any("bitsandbytes" in type(m).__module__ or isinstance(m, gpart.GPartLayer) for m in plain.modules())
    assert {p.dtype for p in plain.parameters()} == {torch.bfloat16}


def _llm_quantized(ns):
    plain = ns["plain"]
    assert not any("bitsandbytes" in type(m).__module__ for m in plain.modules())
    assert "quantization_config" not in json.loads(Path("merged/config.json").read_text())


def _llm_trl(ns):
    from safetensors.torch import load_file

    theta = load_file("adapter/adapter_model.safetensors")["base_model.gpart_theta"]
    assert theta.shape == (524288,) and theta.norm() > 1.0
    assert ns["trainer"].args.learning_rate == pytest.approx(1.0e-2, rel=0.03)


def _llm_generation(ns):
    model, out = ns["model"], ns["out"]
    assert model.base_model.gpart_cache_used  # generation reused what the first call built
    model.base_model.eval_cache = False
    with torch.no_grad():
        assert torch.equal(model.generate(**ns["batch"], max_new_tokens=64), out)


def _lr_trainer(ns):
    assert ns["groups"][0]["lr"] == pytest.approx(5.3e-2, rel=0.01)
    assert _theta(ns["model"]).detach().abs().max() > 0.1 and ns["trainer"].state.global_step == 10


def _assets(ns):
    assert (Path(ns["path"]) / "config.json").is_file() and ns["data"].label_names == ["ham", "spam"]


CHECKS = {
    "README.md": [_readme_quickstart, _readme_llm_quickstart],
    "docs/assets.md": [_assets],
    "docs/llm.md": [_llm_quantized, _llm_trl, _llm_generation],
    "docs/lr.md": [_lr_trainer],
}
SLOW = {"docs/assets.md"}  # fetches the built-in model and dataset (tens of MB) on first use


def test_every_snippet_has_a_check():
    counts = {page: len(snippets(page)) for page in PAGES if snippets(page)}
    assert counts == {page: len(checks) for page, checks in CHECKS.items()}


def test_blocks_run_elsewhere_are_on_their_pages():
    for page, blocks in RUN_ELSEWHERE.items():
        text = (ROOT / page).read_text()
        for key, test in blocks.items():
            assert any(key in b for b in FENCE.findall(text)), (page, key)
            assert page.split("/")[-1] in (ROOT / test).read_text(), (test, page)  # the test reads that page


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW else p for p in CHECKS])
def test_the_pages_snippets_run_as_written(page, models, tmp_path, monkeypatch):
    if page != "docs/assets.md":
        pytest.importorskip("trl")
        pytest.importorskip("bitsandbytes")
    monkeypatch.chdir(tmp_path)
    _write_user_files(tmp_path)
    if page != "docs/assets.md":  # load_dataset("json", ...) caches its conversion: here, not in the home folder
        import datasets

        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    namespace: dict = {"__name__": "__snippet__"}
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for i, (code, check) in enumerate(zip(snippets(page), CHECKS[page])):
            torch.manual_seed(0)
            exec(compile(_substitute(code, models), f"{page} snippet {i + 1}", "exec"), namespace)
            check(namespace)
    # the documented paths use GPart's rule: none of them is told its learning rate is far off
    assert [str(w.message) for w in record if issubclass(w.category, gpart.LearningRateWarning)] == []
