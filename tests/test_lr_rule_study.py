"""studies/lr_rule/lr_rule.py: a cell's lr sweep grows until its best lr is bracketed, each rule's base value and
loss per cell come out right on synthetic curves, the rule's default is held against the per-d tuned best
and LoRA by seed, and the ablation / validation runs carry their flags."""
from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from conftest import load_script

q = load_script("benchmarks/quality.py")
lr = load_script("studies/lr_rule/lr_rule.py")
TEXT, VISION = lr.STUDIES["text"], lr.STUDIES["vision"]


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
    make, first = lr.rule_cells(TEXT)[("q", 1440)]  # first: 0.04, 0.08, 0.16
    acc = _peaked(0.32)
    for x in first:
        _write(tmp_path, make(x), acc(x))
    assert lr.extension(tmp_path, "text", make, first) == 0.32  # best at the top end: one factor 2 further
    _write(tmp_path, make(0.32), acc(0.32))
    assert lr.extension(tmp_path, "text", make, first) == 0.64
    _write(tmp_path, make(0.64), acc(0.64))
    assert lr.extension(tmp_path, "text", make, first) is None and lr.best_lr(tmp_path, "text", make, first) == 0.32


def test_rules_recover_the_rule_that_made_the_optima(tmp_path):
    # optima that follow the per-weight rule exactly, with base 4e-3, on a factor-2 ladder per cell
    first = {key: tuple(4e-3 * math.sqrt(TEXT.targets[key[0]]["D"] / key[1]) * 2.0 ** k for k in range(-2, 3))
             for key in TEXT.rule_cells}
    study = replace(TEXT, rule_cells=first)
    for (tset, d), (make, _) in lr.rule_cells(study).items():
        best = 4e-3 * math.sqrt(TEXT.targets[tset]["D"] / d)
        for x in first[(tset, d)]:
            _write(tmp_path, make(x), _peaked(best)(x))
    out = lr.rule_summary(tmp_path, study)
    rules = out["rules"]
    assert math.isclose(rules["R-weight"]["base"], 4e-3, rel_tol=0.06)
    assert rules["R-weight"]["max_loss"] < 0.005 and math.isclose(rules["R-weight"]["implied_spread"], 1.0)
    assert rules["constant"]["max_loss"] > 0.05 and rules["R-norm"]["max_loss"] > 0.02
    assert math.isclose(out["power_law"]["b_d"], -0.5, abs_tol=1e-6) and math.isclose(out["power_law"]["c_D"], 0.5, abs_tol=1e-6)
    assert rules["R-linear"]["max_loss"] > 0.02 and rules["R-linear"]["implied_spread"] > 4
    # the shipped rule at the task's base value, and the ones shipped before at theirs, are scored too
    assert [(x["rule"], x["base"]) for x in out["defaults"]] == [("R-3/4", TEXT.base_lr), ("R-linear", 9e-2), ("R-norm", 6e-2)]


def test_validation_holds_the_rule_against_the_tuned_best_and_lora_by_seed(tmp_path):
    # the rule's default at d = 5,760 (test 0.60, 0.62, 0.64) against a tuned sweep whose best (0.02) gets
    # 0.61, 0.65, 0.66, and the quality study's LoRA (docs/quality/results.json) paired by seed
    d = 5760
    for s, acc in zip((0, 1, 2), (0.60, 0.62, 0.64)):
        _write(tmp_path, lr.rule_default_run(VISION, d, s), acc)
    make, _ = lr.tuned_cells(VISION)[d]
    for x, acc in ((0.01, 0.55), (0.02, 0.61), (0.04, 0.58)):
        _write(tmp_path, make(x), acc)
    for s, acc in ((1, 0.65), (2, 0.66)):
        _write(tmp_path, lr.with_seed(make(0.02), s), acc)
    # the runs of the rules shipped before (folders gpart-rule-d*: R-norm) are read beside the current one's
    _write(tmp_path, lr.rule_default_run(VISION, d, 0, "R-norm"), 0.57)
    for p in tmp_path.rglob("metrics.json"):  # the validate runs record the rule's lr
        m = json.loads(p.read_text())
        m["run"] = {"lr": 0.0264, "lr_rule": {"weight_decay": 0.001}}
        p.write_text(json.dumps(m))
    out = lr.validate_summary(tmp_path, VISION)
    row = out["d"][str(d)]
    rules = {r["rule"]: r for r in row["rules"]}
    r, t = rules["R-3/4"], row["tuned"]
    assert set(rules) == {"R-3/4", "R-norm"} and r["mean"] == 0.62 and t["lr"] == 0.02 and t["test"] == [0.61, 0.65, 0.66]
    assert math.isclose(r["minus_tuned"]["mean"], -0.02) and r["minus_tuned"]["within_one_sd"]
    assert [round(x, 6) for x in r["minus_tuned"]["paired"]["diffs"]] == [-0.01, -0.03, -0.02]
    assert rules["R-norm"]["test"] == [0.57] and rules["R-norm"]["base_lr"] == 0.02
    lora = json.loads((lr.QUALITY / "results.json").read_text())["domains"]["vision"]["methods"]["lora"]
    vs = {v["rule"]: v for v in out["lora"]["vs"] if v["d"] == d}  # trainable 1 <= 1/10 of LoRA's
    assert [round(x, 6) for x in vs["R-3/4"]["diffs"]] == [round(a - b, 6) for a, b in zip((0.60, 0.62, 0.64), lora["test"])]
    assert [round(x, 6) for x in vs["R-norm"]["diffs"]] == [round(0.57 - lora["test"][0], 6)]
    assert lr.rule_default_run(VISION, d, 0).tag == "gpart-rule-34-d5760-s0"


def test_ablation_and_validation_runs_carry_their_flags(tmp_path):
    argv = lr.arm_run(TEXT, "fastfood", 0.04, 1).argv(tmp_path)
    assert argv[argv.index("--projection") + 1] == "fastfood" and argv[argv.index("--lr") + 1] == "0.04"
    assert argv[argv.index("--d") + 1] == str(TEXT.d) == "23040" and argv[argv.index("--seed") + 1] == "1"
    gain = lr.arm_run(VISION, "gain16", 0.02).argv(tmp_path)
    assert gain[gain.index("--column-gain-ratio") + 1] == "16" and gain[gain.index("--d") + 1] == "18000"
    sgd = lr.arm_run(TEXT, "sgd-gain16", 1.28).argv(tmp_path)
    assert sgd[sgd.index("--optimizer") + 1] == "sgd" and sgd[sgd.index("--head-lr") + 1] == "1.28"
    assert sgd[sgd.index("--column-gain-ratio") + 1] == "16" and "--projection" not in lr.arm_run(TEXT, "sgd-partition", 1).argv(tmp_path)
    rule = lr.rule_default_run(TEXT, 368640, 2).argv(tmp_path)
    assert "--lr" not in rule and rule[rule.index("--base-lr") + 1] == f"{TEXT.base_lr:g}"
    # every run of the study has its domain's quality-study budget
    for study, runs in ((TEXT, (lr.arm_run(TEXT, "gain16", 0.02), lr.rule_default_run(TEXT, 2880, 0),
                                lr.rule_run(TEXT, "all", 23040, 0.04), lr.tuned_run(TEXT, 2880, 0.08))),
                        (VISION, (lr.rule_run(VISION, "all", 34560, 0.02), lr.rule_default_run(VISION, 5760, 1)))):
        budget = q.DOMAINS[study.domain]["args"]
        for run in runs:
            assert run.argv(tmp_path)[1:1 + len(budget)] == budget
    assert lr.rule_run(TEXT, "all", 23040, 0.04).tag == "gpart-all-d23040-lr0.04-s0"
    assert lr.rule_run(VISION, "all", 34560, 0.02).argv(tmp_path)[-1] == "q_proj,k_proj,v_proj,o_proj,fc1,fc2"


def test_the_studys_shipped_rule_is_the_librarys():
    import gpart
    from gpart.lr import RULE, lr_factor

    assert RULE == "lr = base_lr * (10000 / d) ** 0.75"  # the text every run records
    for d in (625, 23040, 2211840):
        assert math.isclose(lr.RULES[lr.RULE_NAME](1e6, d, 384.0), lr_factor(gpart.GPartConfig(d=d)), rel_tol=1e-12)


def test_base_values_are_the_tasks_defaults():
    from gpart.recipes.causal_lm import CausalLM
    from gpart.recipes.image_classification import ImageClassification
    from gpart.recipes.text_classification import TextClassification

    assert (lr.STUDIES["text"].base_lr, lr.STUDIES["vision"].base_lr, lr.STUDIES["llm"].base_lr) == (
        TextClassification.defaults["lr"], ImageClassification.defaults["lr"], CausalLM.defaults["lr"])
