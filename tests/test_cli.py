"""The `gpart` command line, end to end on tiny offline models, plus one slow run per built-in default.

Fast tests build 2-layer models from configs with word-level tokenizers and write tiny CSV / JSONL /
image-folder data, then drive `gpart.cli.main` in-process (no subprocess start-up cost).
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import run_cli, word_tokenizer, write_csv
from gpart.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")  # PEFT vs transformers 5


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def trained_text(text_setup, tmp_path_factory):
    """One GPart run shared by several tests; the in-memory model is kept to compare with the files."""
    import gpart.recipes.training as training

    captured = {}
    original = training.save_result

    def capture(model, *a, **kw):
        captured["model"] = model
        return original(model, *a, **kw)

    out = tmp_path_factory.mktemp("runs") / "gpart"
    training.save_result = capture
    try:
        rc = main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
                   "--dataset", str(text_setup / "data"), "--d", "64", "--max-steps", "6", "--batch-size", "8",
                   "--lr", "0.05", "--head-lr", "0.05", "--output-dir", str(out), "--quiet", "--seed", "3"])
    finally:
        training.save_result = original
    assert rc == 0
    return out, captured["model"]


def _text_batch(text_setup):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(text_setup / "bert")
    return tok(["the movie was good", "a film is terrible", "food very nice"], return_tensors="pt", padding=True)


def _load_adapter(text_setup, adapter_dir):
    import gpart  # noqa: F401
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(text_setup / "bert", num_labels=2)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


# ------------------------------------------------------------------------------------ train
def test_train_writes_metrics_adapter_curve_report(trained_text):
    out, _ = trained_text
    m = json.loads((out / "metrics.json").read_text())
    assert {"run", "params", "D", "adapter_bytes", "train", "validation", "test", "history"} <= set(m)
    assert m["run"]["method"] == "gpart" and m["run"]["d"] == 64 and m["run"]["targets"] == ["query", "value"]
    assert m["params"]["adapter"] == 64 and m["params"]["head"] == 2 * 32 + 2
    assert m["D"] == 2 * 2 * 32 * 32  # query + value weights of 2 layers
    assert m["train"]["steps"] == 6 and m["train"]["runtime_s"] > 0
    for split in ("validation", "test"):
        assert 0.0 <= m[split]["accuracy"] <= 1.0 and 0.0 <= m[split]["macro_f1"] <= 1.0
        assert -1.0 <= m[split]["mcc"] <= 1.0
    assert m["test"]["n"] == 20 and not m["test_is_validation"]  # the folder's own test.csv
    assert [p["step"] for p in m["history"]["train"]] == list(range(1, 7))
    assert len(m["history"]["eval"]) >= 2 and all("accuracy" in p for p in m["history"]["eval"])
    # the best checkpoint is named relative to the run folder (no machine path in a file studies commit)
    assert m["best_checkpoint"].startswith("checkpoints")
    assert not Path(m["best_checkpoint"]).is_absolute()
    adapter = out / "adapter"
    assert (adapter / "adapter_config.json").exists() and (adapter / "gpart_task.json").exists()
    assert m["adapter_bytes"] == (adapter / "adapter_model.safetensors").stat().st_size
    assert (out / "training_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "gpart" in report and "| test |" in report and "training_curve.png" in report
    assert not list(out.glob(".*tmp*"))  # atomic writes left no temporaries


def test_saved_adapter_reloads_to_identical_logits(trained_text, text_setup):
    from safetensors.torch import load_file

    out, model = trained_text
    theta = [v for k, v in load_file(out / "adapter" / "adapter_model.safetensors").items() if "gpart_theta" in k]
    assert len(theta) == 1 and theta[0].shape == (64,) and theta[0].abs().sum() > 0  # trained, not the zero init
    batch = _text_batch(text_setup)
    model.eval()
    with torch.no_grad():
        expected = model(**batch).logits
        reloaded = _load_adapter(text_setup, out / "adapter")(**batch).logits
    torch.testing.assert_close(reloaded, expected, rtol=0, atol=1e-6)


def test_eval_reproduces_training_test_metrics(trained_text, text_setup, capsys, tmp_path):
    out, _ = trained_text
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--dataset", str(text_setup / "data"),
                 "--output", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert result["split"] == "test" and result["n"] == test["n"]
    assert result["accuracy"] == pytest.approx(test["accuracy"]) and result["mcc"] == pytest.approx(test["mcc"])
    assert json.loads(capsys.readouterr().out)["accuracy"] == result["accuracy"]
    # without --dataset/--seed the adapter's own dataset and seed (3) give the run's validation split back
    assert main(["eval", "--adapter", str(out / "adapter"), "--split", "validation",
                 "--output", str(tmp_path / "val.json")]) == 0
    validation = json.loads((out / "metrics.json").read_text())["validation"]
    again = json.loads((tmp_path / "val.json").read_text())
    assert again["n"] == 6 and again["accuracy"] == pytest.approx(validation["accuracy"])  # 10% of 64


def test_eval_base_model_without_adapter(text_setup, tmp_path):
    base = ["eval", "--task", "text-classification", "--model", str(text_setup / "bert"),
            "--dataset", str(text_setup / "data" / "test.csv"), "--labels", "neg,pos"]
    # split as `gpart train` would split the file: the test items a run on it was scored on
    assert main([*base, "--output", str(tmp_path / "base.json")]) == 0
    result = json.loads((tmp_path / "base.json").read_text())
    assert result["split"] == "test" and result["n"] == 2 and 0 <= result["accuracy"] <= 1  # 10% of 20
    assert result["items"]["seed"] == 0 and len(result["items"]["sha256"]) == 16
    assert main([*base, "--split", "all", "--output", str(tmp_path / "all.json")]) == 0
    whole = json.loads((tmp_path / "all.json").read_text())
    assert whole["n"] == 20 and whole["items"]["sha256"] != result["items"]["sha256"]


def test_merge_gives_the_adapter_logits(trained_text, text_setup, tmp_path):
    from transformers import AutoModelForSequenceClassification

    out, _ = trained_text
    merged_dir = tmp_path / "merged"
    assert main(["merge", "--adapter", str(out / "adapter"), "--output-dir", str(merged_dir)]) == 0
    merged = AutoModelForSequenceClassification.from_pretrained(merged_dir).eval()
    batch = _text_batch(text_setup)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, _load_adapter(text_setup, out / "adapter")(**batch).logits,
                                   rtol=1e-5, atol=1e-5)
    assert json.loads((merged_dir / "gpart_task.json").read_text())["labels"] == ["neg", "pos"]


def test_separate_learning_rates_reach_the_optimizer(text_setup, tmp_path):
    """--lr 0 freezes theta while the head (--head-lr) still trains: the groups really are separate."""
    from safetensors.torch import load_file

    out = tmp_path / "lr0"
    assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
                 "--dataset", str(text_setup / "data"), "--d", "32", "--max-steps", "3", "--batch-size", "8",
                 "--lr", "0", "--head-lr", "0.1", "--output-dir", str(out), "--quiet"]) == 0
    state = load_file(out / "adapter" / "adapter_model.safetensors")
    theta = next(v for k, v in state.items() if "gpart_theta" in k)
    assert torch.count_nonzero(theta) == 0
    assert json.loads((out / "metrics.json").read_text())["run"]["head_lr"] == 0.1


@pytest.mark.parametrize("method,saved", [("lora", "adapter"), ("vera", "adapter"), ("unilora", "adapter"),
                                          ("full", "model"), ("head-only", "model")])
def test_other_methods_train_and_save(method, saved, text_setup, tmp_path):
    out = tmp_path / method
    # the same 8 reviews every step (one full batch), so the training loss must fall if the run learns
    assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
                 "--dataset", str(text_setup / "data"), "--method", method, "--d", "64", "--r", "4",
                 "--max-steps", "6", "--eval-steps", "6", "--batch-size", "8", "--max-train-samples", "8",
                 "--head-lr", "5e-2", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["saved"] == saved and (out / saved / "gpart_task.json").exists()
    losses = [h["loss"] for h in m["history"]["train"]]
    assert len(losses) == 6 and losses[0] == pytest.approx(0.693, abs=0.01)  # ln 2: a fresh 2-class head
    assert max(losses[-2:]) < losses[0] - 0.05, losses
    assert m["test"]["n"] == 20
    if method == "head-only":
        assert m["params"]["adapter"] == 0 and m["params"]["trainable"] == m["params"]["head"] == 66
    if method == "full":
        assert m["params"]["trainable"] == m["params"]["total"]


def test_resume_continues_and_checks_identity(text_setup, tmp_path, capsys):
    out = tmp_path / "resume"
    common = ["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
              "--dataset", str(text_setup / "data"), "--batch-size", "8", "--eval-steps", "2",
              "--output-dir", str(out), "--quiet"]
    assert main(common + ["--d", "32", "--max-steps", "4"]) == 0
    rc, err = run_cli(common + ["--d", "33", "--max-steps", "6", "--resume"], capsys)
    assert rc == 2 and "different run" in err and "d: run has 32, now 33" in err
    assert main(common + ["--d", "32", "--max-steps", "6", "--resume"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert (m["train"]["steps"], m["train"]["resumed_from_step"]) == (6, 4)  # runtime_s timed steps 5..6
    assert [p["step"] for p in m["history"]["train"]] == list(range(1, 7))  # history spans both sessions
    assert "6 steps" in (report := (out / "report.md").read_text()) and "since the resume at step 4" in report


def test_output_dir_guard_never_overwrites(trained_text, text_setup, tmp_path, capsys):
    out, _ = trained_text
    before = (out / "metrics.json").read_bytes()
    args = ["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
            "--dataset", str(text_setup / "data"), "--max-steps", "1", "--output-dir"]
    rc, err = run_cli(args + [str(out)], capsys)
    assert rc == 2 and "already holds a run" in err and "--resume" in err
    assert (out / "metrics.json").read_bytes() == before
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    rc, err = run_cli(args + [str(foreign), "--overwrite"], capsys)
    assert rc == 2 and "not a gpart run" in err and (foreign / "notes.txt").read_text() == "mine"
    rc, err = run_cli(args + [str(tmp_path / "empty"), "--resume"], capsys)
    assert rc == 2 and "nothing to resume" in err
    # --overwrite with a broken dataset fails before touching the old run
    rc, err = run_cli(args + [str(out), "--overwrite", "--dataset", str(tmp_path / "missing.csv")], capsys)
    assert rc == 2 and (out / "metrics.json").read_bytes() == before


# ------------------------------------------------------------------------------------ info
def test_info_counts_without_training(text_setup, capsys):
    sizes = {}
    for method in ("gpart", "lora", "vera", "unilora", "full", "head-only"):
        capsys.readouterr()
        assert main(["info", "--task", "text-classification", "--model", str(text_setup / "bert"),
                     "--method", method, "--d", "100", "--json"]) == 0
        sizes[method] = json.loads(capsys.readouterr().out)
    head = 2 * 32 + 2
    assert all(s["D"] == 4096 and s["head_params"] == head for s in sizes.values())
    assert sizes["gpart"]["adapter_params"] == 100 and sizes["gpart"]["saved_bytes"] == (100 + head) * 4
    assert sizes["unilora"]["adapter_params"] == 100
    assert sizes["lora"]["adapter_params"] == 4 * 8 * (32 + 32)  # 4 targeted linears, r=8, A and B
    assert sizes["head-only"]["trainable"] == head and sizes["full"]["trainable"] == sizes["full"]["base_params"]
    assert main(["info", "--task", "text-classification", "--model", str(text_setup / "bert"), "--d", "1000"]) == 0
    table = capsys.readouterr().out
    assert "D " in table and "4,096" in table and "1,000" in table and "query,value" in table
    rc, err = run_cli(["info", "--task", "text-classification", "--model", str(text_setup / "bert")], capsys)
    assert rc == 2 and "d=23040 is out of range" in err  # the task default is too big for a toy model


# ------------------------------------------------------------------------------------ errors
def test_argparse_rejects_unknown_task_and_method(capsys):
    rc, err = run_cli(["train", "--task", "translation", "--output-dir", "x"], capsys)
    assert rc == 2 and "invalid choice: 'translation'" in err
    rc, err = run_cli(["train", "--task", "text-classification", "--method", "adalora", "--output-dir", "x"], capsys)
    assert rc == 2 and "invalid choice: 'adalora'" in err
    rc, err = run_cli(["train", "--task", "text-classification", "--d", "0", "--output-dir", "x"], capsys)
    assert rc == 2 and "positive integer" in err
    rc, err = run_cli(["train", "--task", "text-classification", "--epochs", "1", "--max-steps", "2",
                    "--output-dir", "x"], capsys)
    assert rc == 2 and "not allowed with argument" in err


def test_data_errors_are_one_clear_line(text_setup, tmp_path, capsys):
    bad_column = tmp_path / "cols.csv"
    write_csv(bad_column, [{"sentence": "good film", "y": "pos"}])
    malformed = tmp_path / "bad.jsonl"
    malformed.write_text('{"text": "good", "label": "pos"}\n{"text": "bad", "label": \n')
    base = ["train", "--task", "text-classification", "--model", str(text_setup / "bert"), "--max-steps", "1"]
    cases = [
        (bad_column, "no column 'text'"),
        (malformed, "bad.jsonl:2: malformed JSON"),
        (tmp_path / "nope.csv", "neither a built-in dataset, an existing file"),
    ]
    for i, (dataset, message) in enumerate(cases):
        rc, err = run_cli(base + ["--dataset", str(dataset), "--output-dir", str(tmp_path / f"o{i}")], capsys)
        assert rc == 2 and message in err and "Traceback" not in err
        assert not (tmp_path / f"o{i}" / "run.json").exists()  # a failed start leaves the directory reusable
    rc, err = run_cli(base + ["--dataset", str(text_setup / "data"), "--targets", "nonexistent",
                           "--output-dir", str(tmp_path / "o9")], capsys)
    assert rc == 2 and "match no module" in err
    rc, err = run_cli(base + ["--dataset", str(text_setup / "data"), "--model", str(tmp_path / "no-model"),
                           "--output-dir", str(tmp_path / "o10")], capsys)
    assert rc == 2 and "no-model" in err


# ------------------------------------------------------------------------------------ other tasks
@pytest.fixture(scope="module")
def image_setup(tmp_path_factory):
    from PIL import Image
    from transformers import ViTConfig, ViTModel

    root = tmp_path_factory.mktemp("image")
    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=64)
    ViTModel(config, add_pooling_layer=False).save_pretrained(root / "vit")
    rng = np.random.default_rng(0)
    for cls, level in (("dark", 40), ("light", 200)):
        (root / "imgs" / cls).mkdir(parents=True)
        for i in range(12):
            pixels = np.clip(rng.normal(level, 30, (12, 12, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "imgs" / cls / f"{i}.png")
    return root


def test_image_classification_train_and_eval(image_setup, tmp_path):
    out = tmp_path / "img"
    assert main(["train", "--task", "image-classification", "--model", str(image_setup / "vit"),
                 "--dataset", str(image_setup / "imgs"), "--d", "128", "--max-steps", "4", "--batch-size", "8",
                 "--lr", "0.05", "--head-lr", "0.05", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["params"]["adapter"] == 128 and m["run"]["targets"] in (["query", "value"], ["q_proj", "v_proj"])
    # no test split in the folder: 10% of it is held out for testing, 10% for validation
    assert not m["test_is_validation"] and m["test"]["n"] == 2 and 0 <= m["test"]["accuracy"] <= 1
    assert json.loads((out / "adapter" / "gpart_task.json").read_text())["image_size"] == 16
    # eval carves the same seeded validation and test splits out of the folder as training did
    for split in ("validation", "test"):
        assert main(["eval", "--adapter", str(out / "adapter"), "--dataset", str(image_setup / "imgs"),
                     "--split", split, "--output", str(tmp_path / "e.json")]) == 0
        result = json.loads((tmp_path / "e.json").read_text())
        assert result["n"] == 2 and result["accuracy"] == m[split]["accuracy"]


@pytest.fixture(scope="module")
def lm_setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("lm")
    words = "Question Answer : what is plus ? ####".split() + [str(i) for i in range(20)]
    tokenizer, vocab = word_tokenizer(words, ["<pad>", "<unk>", "<s>", "</s>"], unk_token="<unk>",
                                       eos_token="</s>", bos_token="<s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
                         bos_token_id=2, eos_token_id=3, tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    rng = random.Random(0)
    with (root / "math.jsonl").open("w") as f:
        for _ in range(24):
            a, b = rng.randrange(10), rng.randrange(10)
            f.write(json.dumps({"question": f"what is {a} plus {b} ?", "answer": str(a + b),
                                "solution": f"{a} plus {b} is {a + b} #### {a + b}"}) + "\n")
    return root


def test_causal_lm_train_eval_merge(lm_setup, tmp_path, capsys):
    out = tmp_path / "lm"
    assert main(["train", "--task", "causal-lm", "--model", str(lm_setup / "llama"), "--dataset",
                 str(lm_setup / "math.jsonl"), "--d", "256", "--max-steps", "3", "--batch-size", "4",
                 "--max-new-tokens", "4", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["targets"] == ["q_proj", "k_proj", "v_proj", "o_proj"] and m["params"]["head"] == 0
    assert np.isfinite(m["validation"]["loss"]) and 0 <= m["test"]["exact_match"] <= 1
    assert m["test"]["n"] == 2 and len(m["test"]["examples"]) == 2 and not m["test_is_validation"]
    # the run's own file: the same held-out test split as in training, the same numbers
    assert main(["eval", "--adapter", str(out / "adapter"), "--dataset", str(lm_setup / "math.jsonl"),
                 "--max-new-tokens", "4", "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == 2 and result["exact_match"] == m["test"]["exact_match"]
    assert [e["output"] for e in result["examples"]] == [e["output"] for e in m["test"]["examples"]]
    # another file: all of it is the evaluated split
    other = tmp_path / "other.jsonl"
    other.write_text("".join(l for l in (lm_setup / "math.jsonl").read_text().splitlines(True)[:5]))
    assert main(["eval", "--adapter", str(out / "adapter"), "--dataset", str(other),
                 "--max-new-tokens", "2", "--max-eval-samples", "3", "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 3
    assert main(["merge", "--adapter", str(out / "adapter"), "--output-dir", str(tmp_path / "merged")]) == 0
    _check_merged_lm(lm_setup / "llama", out / "adapter", tmp_path / "merged")
    rc, err = run_cli(["train", "--task", "causal-lm", "--model", str(lm_setup / "llama"), "--dataset",
                    str(lm_setup / "math.jsonl"), "--method", "head-only", "--output-dir", str(tmp_path / "h")], capsys)
    assert rc == 2 and "head-only needs" in err


def _check_merged_lm(base_dir, adapter_dir, merged_dir):
    """The merged causal LM gives the adapter's logits, which differ from the base model's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.randint(4, 20, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(base_dir).eval()(ids).logits
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir).eval()(ids).logits
        merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(ids).logits
    assert (adapted - base).abs().max() > 1e-3  # training moved the model, so the comparison below can fail
    torch.testing.assert_close(merged, adapted, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------ helpers
def test_metrics_by_hand():
    from gpart.recipes.metrics import classification_metrics, exact_match, extract_final_number

    m = classification_metrics([1, 1, 0, 0, 1], [1, 0, 0, 0, 1])
    assert m["accuracy"] == pytest.approx(0.8)
    # class 0: tp=2 fp=0 fn=1 -> F1 0.8; class 1: tp=2 fp=1 fn=0 -> F1 0.8
    assert m["macro_f1"] == pytest.approx(0.8)
    assert m["mcc"] == pytest.approx((2 * 2 - 1 * 0) / np.sqrt(3 * 3 * 2 * 2))  # (tp*tn - fp*fn)/sqrt(...)
    assert classification_metrics([0, 0], [0, 0])["mcc"] == 0.0  # undefined -> 0, as sklearn
    assert extract_final_number("so 3 + 4 = 7 #### 7") == "7"
    assert extract_final_number("The answer is $1,234.50.") == "1234.5"
    assert extract_final_number("x = \\boxed{-12}") == "-12"
    assert extract_final_number("we get 3 then 5") == "5" and extract_final_number("no idea") is None
    assert exact_match(["... #### 42", "41", "nothing"], ["42", "The total is 41 #### 41", "3"])["exact_match"] == pytest.approx(2 / 3)


def test_finish_splits_holds_out_a_seeded_test_split():
    from gpart.recipes.data import finish_splits

    rows = list(range(20))
    s = finish_splits({"train": rows}, seed=4, val_fraction=0.1, test_fraction=0.1)
    assert [len(s[k]) for k in ("train", "validation", "test")] == [16, 2, 2]
    assert sorted(s["train"] + s["validation"] + s["test"]) == rows and s["test"] is not s["validation"]
    assert finish_splits({"train": rows}, seed=4, val_fraction=0.1, test_fraction=0.1) == s  # seeded
    order = list(range(20))
    random.Random(4).shuffle(order)
    assert s["test"] == sorted(order[:2]) and s["validation"] == sorted(order[2:4])
    # --test-fraction 0: the validation split of earlier versions, and test = validation
    old = finish_splits({"train": rows}, seed=4, val_fraction=0.1, test_fraction=0.0)
    assert old["validation"] == sorted(order[:2]) and old["test"] is old["validation"] and len(old["train"]) == 18
    # a dataset with its own validation split gives only the test slice
    s = finish_splits({"train": rows, "validation": [99]}, seed=4, val_fraction=0.1, test_fraction=0.25)
    assert s["validation"] == [99] and s["test"] == sorted(order[:5]) and len(s["train"]) == 15
    # its own test split is never touched
    s = finish_splits({"train": rows, "test": [7]}, seed=4, val_fraction=0.1, test_fraction=0.25)
    assert s["test"] == [7] and len(s["validation"]) == 2


def test_a_missing_matplotlib_skips_the_curve_not_therun_cli(text_setup, tmp_path, monkeypatch):
    """Without the train extra's matplotlib, a run still finishes and writes metrics.json and
    report.md; the missing curve is announced before training."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    out = tmp_path / "noplot"
    with pytest.warns(UserWarning, match=r"matplotlib is not installed.*pip install 'gpart\[train\]'"):
        assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
                     "--dataset", str(text_setup / "data" / "train.csv"), "--d", "64", "--max-steps", "2",
                     "--batch-size", "8", "--test-fraction", "0", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["test_is_validation"] and m["test"]["accuracy"] == m["validation"]["accuracy"]  # --test-fraction 0
    assert m["run"]["test_fraction"] == 0.0 and json.loads((out / "adapter" / "gpart_task.json").read_text())["test_fraction"] == 0.0
    assert not (out / "training_curve.png").exists()
    assert "no training curve: matplotlib is not installed" in (out / "report.md").read_text()


def test_atomic_dir_keeps_old_copy_on_failure(tmp_path):
    from gpart.recipes.io import atomic_dir

    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "a.txt").write_text("half")
            raise RuntimeError("crash mid-save")
    assert (target / "a.txt").read_text() == "v1" and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


# ------------------------------------------------------------------------------------ slow: built-ins
@pytest.mark.slow
def test_builtin_text_minilm_spam(tmp_path):
    out = tmp_path / "spam"
    assert main(["train", "--task", "text-classification", "--max-steps", "60", "--max-train-samples", "960",
                 "--max-eval-samples", "200", "--max-length", "64", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["model"] == "minilm" and m["run"]["dataset"] == "spam" and m["params"]["adapter"] == 23040
    # majority class (ham) is about 0.69; one full epoch reaches about 0.97 (docs/cli.md)
    assert m["test"]["n"] == 200 and m["test"]["accuracy"] > 0.8


@pytest.mark.slow
def test_builtin_image_dinov2_fashion_mnist(tmp_path):
    out = tmp_path / "fmnist"
    assert main(["train", "--task", "image-classification", "--max-steps", "30", "--max-train-samples", "960",
                 "--max-eval-samples", "200", "--image-size", "56", "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["model"] == "dinov2-small" and m["params"]["head"] == 10 * (2 * 384 + 1)
    assert m["test"]["n"] == 200 and m["test"]["accuracy"] > 0.4  # 10 classes: chance is 0.1


@pytest.mark.slow
def test_builtin_causal_lm_smollm2_gsm_symbolic(tmp_path):
    out = tmp_path / "gsm"
    assert main(["train", "--task", "causal-lm", "--max-steps", "2", "--eval-steps", "2", "--max-train-samples", "16",
                 "--max-eval-samples", "4", "--max-new-tokens", "48", "--max-length", "256",
                 "--output-dir", str(out), "--quiet"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    assert m["run"]["model"] == "smollm2" and m["params"]["adapter"] == 131072
    history = m["history"]["train"]
    assert all(np.isfinite(p["loss"]) for p in history) and np.isfinite(m["validation"]["loss"])
    assert m["test"]["n"] == 4 and 0 <= m["test"]["exact_match"] <= 1
    assert m["test"]["answered"] >= 0.5  # the instruct model states a number early


def test_model_as_hub_id_reads_the_local_hugging_face_cache(text_setup, tmp_path, monkeypatch, capsys):
    """`--model org/name` is a hub id: found in the Hugging Face cache with no network, and a clear error
    (not a trace) when it is not cached, saying how to allow the download."""
    import shutil

    import huggingface_hub.constants as hub_constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--someorg--tiny-bert" / "snapshots" / ("a" * 40)
    shutil.copytree(text_setup / "bert", snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["info", "--task", "text-classification", "--model", "someorg/tiny-bert", "--d", "64", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["D"] == 4096 and info["trainable"] > 64  # the cached tiny BERT: 4,096 query/value weights
    rc, err = run_cli(["info", "--task", "text-classification", "--model", "someorg/not-cached"], capsys)
    assert rc == 2 and "not in the local Hugging Face cache; set HF_HUB_OFFLINE=0" in err and "Traceback" not in err
