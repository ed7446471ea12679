"""What the `gpart` command prints and saves: a help without torch, one-line argument errors, no
third-party warnings on a float run, and a console and run log without Trainer dicts between bar redraws."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_tiny_chat_lm

SRC = Path(__file__).resolve().parents[1] / "src"
ENTRY = "import sys; from gpart_cli import main; sys.exit(main())"  # what the `gpart` script runs


def _gpart(*argv: str, cwd=None, stderr=subprocess.PIPE) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-c", ENTRY, *argv], env=env, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=stderr, text=True, timeout=600)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["eval", "--help"]])
def test_help_imports_no_torch_peft_or_recipes(argv):
    probe = ("import sys\nfrom gpart_cli import main\ntry:\n    main(sys.argv[1:])\nexcept SystemExit:\n    pass\n"
             "print('MODULES', sorted(m for m in sys.modules if m.split('.')[0] in "
             "('torch', 'peft', 'transformers', 'gpart', 'bitsandbytes')))")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-c", probe, *argv], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == ""
    assert proc.stdout.splitlines()[-1] == "MODULES []"
    assert "usage: gpart" in proc.stdout


def test_argument_errors_are_one_line():
    proc = _gpart("train", "--task", "causal-lm", "--d", "0", "--output-dir", "x")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == ("gpart train: error: argument --d: expected a positive integer, got 0 "
                           "(options: gpart train --help)\n")


def test_parser_choices_are_the_recipes_and_methods():
    import gpart_cli
    from gpart.recipes import TASKS
    from gpart.recipes.methods import METHODS

    assert gpart_cli.TASKS == tuple(TASKS) and gpart_cli.METHODS == METHODS


# a tqdm bar as drawn between carriage returns: "desc:  50%|#####     | 3/6 [00:01<00:01, 2.0it/s, loss=3.7]"
BAR = re.compile(r"^\s*(\w[\w ]*: *)?\d+%\|.*\|\s*\d+/\d+ \[.*\]\s*$")


def test_float_run_prints_bars_and_its_summary_only(tmp_path):
    data = write_tiny_chat_lm(tmp_path)
    out = tmp_path / "run"
    console = tmp_path / "console.txt"  # what `gpart train ... > console.txt 2>&1` keeps
    with console.open("w") as f:
        proc = _gpart("train", "--task", "causal-lm", "--model", str(data / "llama"), "--dataset",
                      str(data / "chat.jsonl"), "--d", "256", "--max-steps", "4", "--eval-steps", "2",
                      "--logging-steps", "1", "--batch-size", "4", "--max-new-tokens", "2", "--cpu",
                      "--output-dir", str(out), stderr=f)
    assert proc.returncode == 0
    summary = json.loads(proc.stdout)  # stdout holds the summary alone: no per-step dicts
    stderr = console.read_text()
    for chunk in re.split(r"[\r\n]", stderr):
        assert not chunk.strip() or BAR.match(chunk), f"not a progress bar: {chunk!r}"
    assert "bitsandbytes" not in stderr and "kernels" not in stderr
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    metrics = json.loads((out / "metrics.json").read_text())
    assert [(e["step"], e["loss"]) for e in log if "loss" in e] == \
        [(p["step"], p["loss"]) for p in metrics["history"]["train"]]
    assert [e["eval_loss"] for e in log if "eval_loss" in e][-1] == pytest.approx(summary["validation"]["loss"])


def test_quiet_run_prints_its_summary_only(tmp_path):
    data = write_tiny_chat_lm(tmp_path)
    proc = _gpart("train", "--task", "causal-lm", "--model", str(data / "llama"), "--dataset",
                  str(data / "chat.jsonl"), "--d", "256", "--max-steps", "2", "--logging-steps", "1",
                  "--batch-size", "4", "--max-new-tokens", "2", "--cpu", "--quiet", "--output-dir", str(tmp_path / "q"))
    assert proc.returncode == 0 and json.loads(proc.stdout)["trainable"] == 256
    assert proc.stderr == ""
