"""lm-evaluation-harness scores a GPart adapter (docs/llm.md, "Scoring with lm-evaluation-harness").

Offline: a 2-layer Llama with SmolLM2's tokenizer, a GPart adapter on it with a random theta (so it
changes the scores), and the docs' task YAML on rows of the built-in word-reversal test split. The
reference is lm-eval's score of the merged model: equal scores mean lm-eval applied the adapter.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")

DOC = Path(__file__).resolve().parents[1] / "docs" / "llm.md"
SECTION = "## Scoring with lm-evaluation-harness"
ADAPTER = "runs/reversal/adapter"  # the paths the docs' snippets use, relative to the folder they run in


def _doc_blocks(language: str) -> list[str]:
    text = DOC.read_text()
    section = text[text.index(SECTION):]
    section = section[:section.index("\n## ", len(SECTION))]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The folder the docs' commands run in: base/, runs/reversal/adapter/, merged/, tasks/, the data."""
    import gpart
    from peft import get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from gpart.assets import load_dataset
    from gpart.assets.models import smollm2_path

    root = tmp_path_factory.mktemp("lm_eval")
    tokenizer = AutoTokenizer.from_pretrained(smollm2_path())
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    LlamaForCausalLM(config).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(root / "base"),
                           gpart.GPartConfig(d=512, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        (theta,) = [p for p in model.parameters() if p.requires_grad]
        theta.normal_(0, 0.5)
    model.save_pretrained(root / ADAPTER)
    model.merge_and_unload().save_pretrained(root / "merged")
    tokenizer.save_pretrained(root / "merged")
    rows = load_dataset("word-reversal", task="causal-lm")["test"][:4]
    (root / "reversal-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (yaml,) = _doc_blocks("yaml")
    (root / "tasks").mkdir()
    (root / "tasks" / "reversal.yaml").write_text(yaml)
    return root


def _scores(workdir, model: str) -> dict:
    """lm-eval's scores of the task for a model directory under workdir, in process."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    with contextlib.chdir(workdir):  # the YAML names its data file relative to the working folder
        result = simple_evaluate(model="hf", model_args=f"pretrained={model}", tasks=["reversal"], device="cpu",
                                 task_manager=TaskManager(include_path="tasks"), bootstrap_iters=0)
    return result["results"]["reversal"]


@pytest.fixture(scope="module")
def merged_scores(workdir):
    return _scores(workdir, "merged")


def test_docs_snippet_scores_a_gpart_adapter_as_its_merged_model(workdir, merged_scores, monkeypatch, capsys):
    monkeypatch.chdir(workdir)  # the YAML names its data file relative to the working folder
    (snippet,) = _doc_blocks("python")
    scope = {}
    exec(compile(snippet, f"{DOC}:{SECTION}", "exec"), scope)
    adapter = scope["results"]["results"]["reversal"]
    assert float(capsys.readouterr().out.strip().splitlines()[-1]) == adapter["acc,none"]
    assert adapter["sample_len"] == merged_scores["sample_len"] == 4
    assert adapter["perplexity,none"] == pytest.approx(merged_scores["perplexity,none"], rel=1e-4)
    base = _scores(workdir, "base")
    assert adapter["perplexity,none"] != pytest.approx(base["perplexity,none"], rel=1e-2)  # theta changed it


def _cli(workdir, tmp_path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run docs/llm.md's `lm_eval` command as written (its results folder moved into tmp_path)."""
    (command,) = _doc_blocks("bash")
    program, *args = shlex.split(command.replace("\\\n", " "))
    assert program == "lm_eval" and f"pretrained=base,peft={ADAPTER}" in args
    out = tmp_path / "results"
    args[args.index("--output_path") + 1] = str(out)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    lm_eval = Path(sys.executable).with_name("lm_eval")  # the console script pip installed beside python
    proc = subprocess.run([str(lm_eval), *args], cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    found = sorted(out.rglob("results_*.json"))
    return proc, json.loads(found[-1].read_text())["results"]["reversal"] if found else None


def test_stock_lm_eval_command_loads_a_gpart_adapter(workdir, merged_scores, tmp_path):
    """docs/llm.md's `lm_eval` command, as written: the process never imports gpart itself."""
    proc, scores = _cli(workdir, tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert scores["perplexity,none"] == pytest.approx(merged_scores["perplexity,none"], rel=1e-4)


@pytest.mark.slow  # SmolLM2-135M: a short `gpart train` on the built-in word-reversal data, then lm-eval (minutes on a CPU)
def test_lm_eval_scores_a_cli_trained_smollm2_adapter_as_its_merged_model(tmp_path):
    from gpart.assets import load_dataset
    from gpart.cli import main

    run = tmp_path / "runs" / "reversal"
    assert main(["train", "--task", "causal-lm", "--model", "smollm2", "--dataset", "word-reversal",
                 "--max-steps", "2", "--batch-size", "2", "--max-train-samples", "8", "--max-eval-samples", "2",
                 "--max-new-tokens", "8", "--output-dir", str(run), "--quiet", "--cpu"]) == 0
    assert main(["merge", "--adapter", str(run / "adapter"), "--output-dir", str(tmp_path / "merged")]) == 0
    base = json.loads((run / "adapter" / "gpart_task.json").read_text())["model_path"]
    (tmp_path / "base").symlink_to(base)
    rows = load_dataset("word-reversal", task="causal-lm")["test"][:4]
    (tmp_path / "reversal-test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (yaml,) = _doc_blocks("yaml")
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "reversal.yaml").write_text(yaml)
    adapter = _scores(tmp_path, f"base,peft={ADAPTER}")
    merged = _scores(tmp_path, "merged")
    assert adapter["sample_len"] == 4 and adapter["acc,none"] == merged["acc,none"]
    assert adapter["perplexity,none"] == pytest.approx(merged["perplexity,none"], rel=1e-3)
