"""studies/lr_budget/llm_budget.py: every run carries its budget, d and the rule's base value, the 300-step
cell at the default d is the LLM study's own GPart sweep, a cell's sweep is chosen on validation loss and
extended at an end, seeds go to the default and the chosen base, and the report pairs them by seed and says
what is missing. All on fake metrics trees (no model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

q = load_script("benchmarks/quality.py")
lm = load_script("studies/llm_methods/llm_methods.py")
lbl = load_script("studies/lr_budget/llm_budget.py")


pytestmark = pytest.mark.usefixtures("llm_study_domains")


def _write(runs: Path, run, loss: float, test: float, steps: int) -> None:
    out = q.run_dir(runs, run)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "validation": {"loss": loss}, "test": {"exact_match": test, "n": 200},
        "train": {"runtime_s": 4.0 * steps, "steps": steps}}))


def _parse(run, tmp_path):
    from gpart_cli import build_parser

    return build_parser().parse_args(run.argv(tmp_path / "out"))


def test_runs_carry_budget_d_and_base_and_the_study_cell_is_shared(tmp_path):
    assert [(lbl.steps_of(c), c.d) for c in lbl.cells()] == [
        (1024, 131072), (1024, 8192), (300, 131072), (300, 8192), (32, 131072), (32, 8192)]
    run = lbl.cell(1024, 8192).make(0.1)
    args = _parse(run, tmp_path)
    # a run longer than the study's validates and checkpoints every 256 steps, so a stopped one resumes
    assert (args.max_steps, args.eval_steps, args.d, args.base_lr, args.lr) == (1024, 256, 8192, 0.1, None)
    assert _parse(lbl.cell(32, 8192).make(0.1), tmp_path).eval_steps == 32  # short: one validation, at the end
    assert (args.dataset, args.batch_size, args.max_length, args.max_eval_samples) == ("arithmetic", 8, 128, 200)
    assert run.tag == "gpart-T1024-base0.1-d8192-s0"
    # the LLM study's cell: the same runs (same folder), so its sweep and seeds count here
    assert lbl.cell(300, 131072) == lm.Cell("arithmetic", "gpart")
    assert lbl.cell(300, 131072).make(0.2).tag == "gpart-base0.2-d131072-s0"
    assert _parse(lbl.cell(300, 8192).make(0.2), tmp_path).max_steps == 300
    assert lm.theta_lr(0.2, 8192) == pytest.approx(0.2 * (10_000 / 8192) ** 0.75)


def test_unknown_budgets_are_refused():
    with pytest.raises(SystemExit, match="unknown 500; choose from 1024, 300, 32"):
        lbl.main(["run", "--phase", "sweep", "--steps", "500"])


def test_sweep_on_validation_loss_extends_then_seeds_go_to_default_and_best(tmp_path):
    c = lbl.cell(32, 8192)
    for b, loss, test in ((0.1, 1.0, 0.10), (0.2, 0.9, 0.12), (0.4, 0.8, 0.05)):  # best at the top end
        _write(tmp_path, c.make(b), loss, test, 32)
    assert lm.sweep_state(tmp_path, c)["next"] == 0.8
    _write(tmp_path, c.make(0.8), 0.85, 0.20, 32)  # best test, but not the lowest loss: 0.4 is chosen
    st = lm.sweep_state(tmp_path, c)
    assert (st["chosen"], st["where"]) == (0.4, "bracketed")
    assert [r.tag for r in lbl.seed_runs(tmp_path, [c])] == [
        "gpart-T32-base0.2-d8192-s1", "gpart-T32-base0.4-d8192-s1", "gpart-T32-base0.2-d8192-s2",
        "gpart-T32-base0.4-d8192-s2"]
    assert lbl.seed_runs(tmp_path, [lbl.cell(1024, 8192)]) == []  # not swept yet


def test_report_pairs_default_with_tuned_and_says_what_is_missing(tmp_path, monkeypatch):
    t32, study = lbl.cell(32, 8192), lbl.cell(300, 131072)
    for b, loss in ((0.1, 1.0), (0.2, 0.9), (0.4, 0.8), (0.8, 0.85)):
        _write(tmp_path, t32.make(b), loss, 0.1, 32)
    for s, (default, tuned) in enumerate(((0.10, 0.15), (0.12, 0.14), (0.20, 0.19))):
        if s:
            _write(tmp_path, lm.gpart_run("arithmetic", 0.2, s, steps=32, d=8192), 0.9, default, 32)
            _write(tmp_path, lm.gpart_run("arithmetic", 0.4, s, steps=32, d=8192), 0.8, tuned, 32)
    # seed 0 of both are the sweep's runs (test 0.1); the study's own cell: the default is the best, 3 seeds
    for b, loss in ((0.1, 0.95), (0.2, 0.94), (0.4, 0.98)):
        _write(tmp_path, study.make(b), loss, 0.18, 300)
    for s in (1, 2):
        _write(tmp_path, lm.gpart_run("arithmetic", 0.2, s), 0.9, 0.17, 300)
    assert lbl.kept_text(lbl.kept_steps(tmp_path)) == "No run over 300 steps has finished yet."
    assert "1,024 steps, d = 8,192: sweep not finished (0 points)" in "; ".join(lbl.collect(tmp_path)["missing"])
    _write(tmp_path, lbl.cell(1024, 8192).make(0.1), 0.75, 0.2, 1024)
    assert "1,024 steps, d = 8,192: sweep not finished (1 point);" in "; ".join(lbl.collect(tmp_path)["missing"])
    for b, kept in ((0.2, 1024), (0.4, 768)):  # 1,024 steps validate every 256 and keep the best checkpoint
        _write(tmp_path, lbl.cell(1024, 8192).make(b), 0.7, 0.2, 1024)
        f = q.run_dir(tmp_path, lbl.cell(1024, 8192).make(b)) / "metrics.json"
        f.write_text(json.dumps(json.loads(f.read_text()) | {"best_checkpoint": f"checkpoints/checkpoint-{kept}"}))
    result = lbl.collect(tmp_path)
    assert lbl.kept_text(result["kept_checkpoints"]) == (
        "Checkpoint kept at the end: the last one in 1 of the 2 finished runs over 300 steps; an earlier one in "
        "gpart-T1024-base0.4-d8192-s0 (step 768 of 1,024).")
    rows = {(c["steps"], c["d"]): c for c in result["cells"]}
    r = rows[(32, 8192)]
    assert (r["best_base"], r["bracket"], r["best_lr"]) == (0.4, "bracketed", pytest.approx(lm.theta_lr(0.4, 8192)))
    assert r["default_minus_tuned"]["diffs"] == pytest.approx([0.0, -0.02, 0.01])
    assert r["default_minus_tuned"]["verdict"] == "within the spread"
    assert rows[(300, 131072)]["default_minus_tuned"] is None  # the default is the chosen base
    assert result["movement"]["8192"]["best_lr"]["32"] == pytest.approx(lm.theta_lr(0.4, 8192))
    missing = "; ".join(result["missing"])
    assert "1,024 steps, d = 131,072: sweep not finished (0 points)" in missing
    assert "1,024 steps, d = 8,192: seeds 1, 2 at the default base" in missing  # swept: 0.1, 0.2, 0.4
    assert "32 steps, d = 131,072: sweep not finished (0 points)" in missing
    assert "32 steps, d = 8,192" not in missing and "300 steps, d = 131,072" not in missing
    analysis = tmp_path / "analysis.md"
    analysis.write_text("### What it shows\n\nBy hand.\n")
    monkeypatch.setattr(lbl, "ANALYSIS", analysis)
    assert lbl.main(["report", "--runs-dir", str(tmp_path), "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "llm_budget.md").read_text()
    assert "| 32 | 8,192 | " in md and "**0.4 → 0.800 (0.100)**" in md
    assert "| 300 | 131,072 | 0.173 ± 0.006: s0 0.180, s1 0.170, s2 0.170 |" in md and "is the tuned best" in md
    assert "+0.000, s1 -0.020, s2 +0.010 | within the spread |" in md and md.rstrip().endswith("By hand.")
    assert "| 0.4 | 0.143 ± 0.045: s0 0.100, s1 0.140, s2 0.190 | 0.800, 0.800, 0.800 (mean 0.800) |" in md
    assert [c["steps"] for c in json.loads((tmp_path / "llm_budget.json").read_text())["cells"]] == [1024, 300, 32]
    assert "an earlier one in gpart-T1024-base0.4-d8192-s0 (step 768 of 1,024)." in md
    # one seed of two done: the line names the one still to run
    _write(tmp_path, lm.gpart_run("arithmetic", 0.2, 1, steps=1024, d=8192), 0.7, 0.2, 1024)
    assert "1,024 steps, d = 8,192: seed 2 at the default base" in "; ".join(lbl.collect(tmp_path)["missing"])


def test_the_authors_run_is_their_lr_at_the_default_d_and_the_report_pairs_it_with_the_default(tmp_path):
    run = lbl.authors_run()
    args = _parse(run, tmp_path)
    # an explicit --lr: the rule is bypassed, so weight decay stays the recipe's 0.01 (the authors' value)
    assert (args.lr, args.base_lr, args.d, args.max_steps, args.eval_steps) == (2e-4, None, 131072, 1024, 256)
    assert run.tag == "gpart-T1024-authors-d131072-lr0.0002-s0"
    assert "the authors' lr (1,024 steps, d = 131,072, seed 0)" in lbl.collect(tmp_path)["missing"]
    assert lbl.collect(tmp_path)["authors"] is None
    cell = lbl.cell(1024, 131072)
    for b, loss, test in ((0.1, 0.80, 0.28), (0.2, 0.79, 0.30), (0.4, 0.85, 0.25)):
        _write(tmp_path, cell.make(b), loss, test, 1024)
    _write(tmp_path, run, 1.10, 0.05, 1024)
    a = lbl.collect(tmp_path)["authors"]
    assert (a["lr"], a["test"], a["default_lr"]) == (2e-4, [0.05], pytest.approx(lm.theta_lr(0.2)))
    assert a["minus_default"]["diffs"] == pytest.approx([-0.25]) and a["minus_default"]["verdict"] is None
    assert lbl.main(["report", "--runs-dir", str(tmp_path), "--out-dir", str(tmp_path)]) == 0
    md = (tmp_path / "llm_budget.md").read_text()
    assert ("Theta lr 0.0002 (their MetaMathQA value for d = 131,072; 145x below the CLI default 0.029) at 1,024 "
            "steps") in md
    # one seed: no verdict; the default is this cell's tuned best, so it is the only comparison
    assert "minus the CLI default -0.250 (1 of 3 seeds: no sd, no verdict): s0 -0.250 (paired by seed)." in md
    assert "the authors' lr" not in "; ".join(lbl.collect(tmp_path)["missing"])
