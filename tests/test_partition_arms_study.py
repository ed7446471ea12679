"""studies/partition_arms/arms.py: each arm's runs carry its flags, the lr is chosen on validation, and the
report pairs the arm's test accuracy with the global partition's by seed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import load_script

q = load_script("benchmarks/quality.py")
arms = load_script("studies/partition_arms/arms.py")


def _write(runs: Path, run, val: float, test: float) -> None:
    out = q.run_dir(runs, run)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({"validation": {"accuracy": val}, "test": {"accuracy": test},
                                                  "train": {"runtime_s": 1.0}}))


def test_arm_runs_carry_their_flags(tmp_path):
    argv = arms.arm_run("block", 0.04, 1).argv(tmp_path)
    assert argv[argv.index("--partition-scope") + 1] == "transformer_block" and argv[argv.index("--lr") + 1] == "0.04"
    assert argv[argv.index("--seed") + 1] == "1" and argv[argv.index("--d") + 1] == "23040"
    signed = arms.arm_run("signed", 0.02).argv(tmp_path)
    assert signed[signed.index("--grouping") + 1] == "signed_magnitude" and "--partition-scope" not in signed


def test_lr_chosen_on_validation_and_paired_with_the_global_partition(tmp_path):
    for lr, val in zip(arms.LRS, (0.90, 0.95, 0.93)):
        _write(tmp_path, arms.arm_run("block", lr), val, 0.5)  # test accuracy must not steer the choice
    assert arms.chosen_lr(tmp_path, "block") == 0.04 and arms.chosen_lr(tmp_path, "signed") is None
    for seed, test in ((1, 0.95), (2, 0.93)):
        _write(tmp_path, arms.arm_run("block", 0.04, seed), 0.9, test)
    reference = {"methods": {"gpart": {"lr": 0.04, "seeds": [0, 1, 2], "test": [0.94, 0.96, 0.94], "mean": 0.9467}},
                 "lr_sweep": {"gpart": [{"lr": 0.04, "validation": 0.938}]}}
    result = arms.summary(tmp_path, reference)
    block = result["arms"]["block"]
    assert block["lr"] == 0.04 and block["test"] == [0.5, 0.95, 0.93]
    assert block["paired_diff"] == pytest.approx([-0.44, -0.01, -0.01])
    assert "signed" not in result["arms"]
    assert "| block (`--partition-scope transformer_block`) | 0.04 | 0.500, 0.950, 0.930 |" in arms.render(result)
    assert "are part of the LLM study: studies/llm_methods/llm_methods.md" in arms.render(result)
    assert "- block: -0.153 against the global partition, within the spread" in arms.render(result)
