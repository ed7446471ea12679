"""benchmarks/lr_rule.py: a cell's lr sweep grows until its best lr is bracketed, each rule's base value and
loss per cell come out right on synthetic curves, and the ablation / validation runs carry their flags."""
from __future__ import annotations

import json
import math
from pathlib import Path

from benchmark_scripts import load

q = load("quality")
lr = load("lr_rule")


def _write(runs: Path, run, val: float) -> None:
    out = q.run_dir(runs, run)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "validation": {"accuracy": val, "loss": 1 - val}, "test": {"accuracy": val, "n": 500},
        "params": {"trainable": 1}, "adapter_bytes": 4, "saved": "adapter", "train": {"runtime_s": 1.0}}))


def _peaked(best: float):
    """A validation curve that falls by 0.05 per factor 2 away from `best`."""
    return lambda x: 0.95 - 0.05 * abs(math.log2(x / best))


def test_sweep_extends_past_an_edge_until_bracketed(tmp_path):
    make, first = lr.rule_cells()[("q", 1440)]  # first: 0.04, 0.08, 0.16
    acc = _peaked(0.32)
    for x in first:
        _write(tmp_path, make(x), acc(x))
    assert lr.extension(tmp_path, make, first) == 0.32  # best at the top end: one factor 2 further
    _write(tmp_path, make(0.32), acc(0.32))
    assert lr.extension(tmp_path, make, first) == 0.64
    _write(tmp_path, make(0.64), acc(0.64))
    assert lr.extension(tmp_path, make, first) is None and lr.best_lr(tmp_path, make, first) == 0.32


def test_rules_recover_the_rule_that_made_the_optima(tmp_path):
    # optima that follow the per-weight rule exactly, with base 4e-3, on a factor-2 ladder per cell
    for (tset, d), (make, _) in lr.rule_cells().items():
        best = 4e-3 * math.sqrt(lr.TARGETS[tset]["D"] / d)
        for k in range(-2, 3):
            _write(tmp_path, make(best * 2.0 ** k), _peaked(best)(best * 2.0 ** k))
    first = {key: tuple(4e-3 * math.sqrt(lr.TARGETS[key[0]]["D"] / key[1]) * 2.0 ** k for k in range(-2, 3))
             for key in lr.RULE_CELLS}
    original = lr.RULE_CELLS
    lr.RULE_CELLS = first
    try:
        out = lr.rule_summary(tmp_path)
    finally:
        lr.RULE_CELLS = original
    rules = out["rules"]
    assert math.isclose(rules["R-weight"]["base"], 4e-3, rel_tol=0.06)
    assert rules["R-weight"]["max_loss"] < 0.005 and math.isclose(rules["R-weight"]["implied_spread"], 1.0)
    assert rules["constant"]["max_loss"] > 0.05 and rules["R-norm"]["max_loss"] > 0.02
    assert math.isclose(out["power_law"]["b_d"], -0.5, abs_tol=1e-6) and math.isclose(out["power_law"]["c_D"], 0.5, abs_tol=1e-6)


def test_ablation_and_validation_runs_carry_their_flags(tmp_path):
    argv = lr.arm_run("fastfood", 0.04, 1).argv(tmp_path)
    assert argv[argv.index("--projection") + 1] == "fastfood" and argv[argv.index("--lr") + 1] == "0.04"
    assert argv[argv.index("--d") + 1] == str(lr.ABLATION_D) and argv[argv.index("--seed") + 1] == "1"
    gain = lr.arm_run("gain16", 0.02).argv(tmp_path)
    assert gain[gain.index("--column-gain-ratio") + 1] == "16"
    rule = lr.rule_default_run(368640, 2).argv(tmp_path)
    assert "--lr" not in rule and rule[rule.index("--base-lr") + 1] == f"{lr.TEXT_BASE_LR:g}"
    # every run of the study has the quality study's text budget
    budget = q.DOMAINS["text"]["args"]
    for run in (lr.arm_run("gain16", 0.02), lr.rule_default_run(2880, 0), lr.rule_run("all", 23040, 0.04)):
        assert run.argv(tmp_path)[1:1 + len(budget)] == budget
    assert lr.rule_run("all", 23040, 0.04).tag == "gpart-all-d23040-lr0.04-s0"
