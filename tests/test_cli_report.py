"""The figures a run reports (report.md, metrics.json) and the baseline it is compared with:
unpacked counts on a 4-bit base, the base model scored on the run's test items, the report's
rendering, and bad input that leaves no output folder behind."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import write_tiny_chat_lm

from gpart.cli import main


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return write_tiny_chat_lm(tmp_path_factory.mktemp("report"))


def _train(tiny_lm, out, *flags):
    return main(["train", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--dataset",
                 str(tiny_lm / "chat.jsonl"), "--d", "256", "--max-steps", "2", "--batch-size", "4",
                 "--max-new-tokens", "2", "--output-dir", str(out), "--quiet", "--cpu", *flags])


@pytest.fixture(scope="module")
def float_run(tiny_lm, tmp_path_factory):
    out = tmp_path_factory.mktemp("float") / "run"
    assert _train(tiny_lm, out) == 0
    return out


def _info(tiny_lm, capsys, *flags) -> dict:
    capsys.readouterr()
    assert main(["info", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--d", "256", "--json", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_quantized_run_counts_the_unquantized_weights(tiny_lm, float_run, tmp_path, capsys):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "nf4"
    assert _train(tiny_lm, out, "--load-in-4bit") == 0
    m = json.loads((out / "metrics.json").read_text())
    info = _info(tiny_lm, capsys, "--load-in-4bit")
    float_m = json.loads((float_run / "metrics.json").read_text())
    assert m["D"] == info["D"] == float_m["D"] == 2 * (2 * 64 * 64 + 2 * 32 * 64)  # 2 layers: q, o 64x64; k, v 32x64
    assert m["params"]["total"] == info["base_params"] + info["trainable"] == float_m["params"]["total"]
    assert m["params"]["trainable"] == 256
    report = (out / "report.md").read_text()
    assert f"- trainable parameters: 256 of {m['params']['total']:,} (adapter 256)\n" in report
    assert f"D = {info['D']:,}, d = 256" in report


def test_base_model_eval_scores_the_runs_test_items(tiny_lm, float_run, tmp_path):
    m = json.loads((float_run / "metrics.json").read_text())
    assert m["test"]["n"] == 4 and m["test_items"]["seed"] == 0  # 10% of 40 held out
    base = ["eval", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--dataset", str(tiny_lm / "chat.jsonl"),
            "--max-new-tokens", "2"]
    assert main([*base, "--output", str(tmp_path / "base.json")]) == 0
    result = json.loads((tmp_path / "base.json").read_text())
    assert result["n"] == 4 and result["items"] == m["test_items"]
    assert [e["prompt"] for e in result["examples"]] == [e["prompt"] for e in m["test"]["examples"]]
    assert m["test_items"]["sha256"] in (float_run / "report.md").read_text()
    # another seed draws other items; --split all scores the whole file
    assert main([*base, "--seed", "1", "--output", str(tmp_path / "seed1.json")]) == 0
    assert json.loads((tmp_path / "seed1.json").read_text())["items"]["sha256"] != m["test_items"]["sha256"]
    assert main([*base, "--split", "all", "--output", str(tmp_path / "all.json")]) == 0
    assert json.loads((tmp_path / "all.json").read_text())["n"] == 40


def test_report_renders_examples_as_a_table_and_no_head_lr(float_run):
    report = (float_run / "report.md").read_text()
    m = json.loads((float_run / "metrics.json").read_text())
    assert "head lr" not in report and ", head " not in report
    assert "[{" not in report and "'prompt'" not in report
    rows = [line for line in report.splitlines() if line.startswith("| what is")]
    assert rows == [f"| {e['prompt']} | {e['output'] or ' '} | {e['answer']} |" for e in m["test"]["examples"]]
    assert "| test | " in report and "| exact_match | loss | n | reference |" in report


def test_report_cells_keep_pipes_and_newlines_inside(tmp_path):
    from gpart.recipes.reporting import _cell

    assert _cell("a|b\nc") == "a\\|b<br>c" and _cell("") == " "


@pytest.mark.parametrize("content,message", [("", "the file is empty"), ("\n\n", "the file is empty")])
def test_empty_data_file_is_named_and_leaves_no_output_dir(tiny_lm, tmp_path, capsys, content, message):
    empty = tmp_path / "empty.jsonl"
    empty.write_text(content)
    out = tmp_path / "never"
    capsys.readouterr()
    assert main(["train", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--dataset", str(empty),
                 "--output-dir", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err == f"gpart train: error: {empty}: {message} (no JSON object on any line)\n"
    assert not out.exists()


def test_refused_method_leaves_no_output_dir(tiny_lm, tmp_path, capsys):
    out = tmp_path / "never"
    assert _train(tiny_lm, out, "--d", "10000000") == 2  # d larger than D
    assert "error" in capsys.readouterr().err and not out.exists()
