"""studies/llm_methods/llm_methods.py: every kind of run parses to the study's budget, method, lr, d, rank and
arm; each sweep is chosen on validation loss (never test) and extended at an end; seeds and arms go to the
chosen settings; the report pairs GPart with every method and the arms with the global partition by seed, and
says what is missing. All on fake metrics trees (no model)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

q = load_script("benchmarks/quality.py")
lm = load_script("studies/llm_methods/llm_methods.py")


pytestmark = pytest.mark.usefixtures("llm_study_domains")


def _write(runs: Path, run, loss: float | None, test: float, runtime: float = 600.0, steps: int = 300) -> None:
    out = q.run_dir(runs, run)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "validation": {} if loss is None else {"loss": loss}, "test": {"exact_match": test, "n": 200},
        "train": {"runtime_s": runtime, "steps": steps}}))


def _parse(run, tmp_path):
    from gpart_cli import build_parser

    return build_parser().parse_args(run.argv(tmp_path / "out"))


def _budget(args, dataset: str) -> None:
    assert (args.task, args.dataset, args.max_length, args.max_eval_samples, args.max_new_tokens) == (
        "causal-lm", dataset, 128, 200, 24)
    if args.command == "train":
        assert (args.max_steps, args.eval_steps, args.batch_size) == (300, 300, 8)


def test_every_kind_of_run_parses_to_the_studys_settings(tmp_path):
    g = _parse(lm.gpart_run("reversal", 0.4, 2), tmp_path)
    _budget(g, "word-reversal")
    assert (g.command, g.method, g.lr, g.base_lr, g.d, g.seed) == ("train", "gpart", None, 0.4, 131072, 2)
    assert (g.partition_scope, g.grouping) == (None, None)
    lora = _parse(lm.method_run("arithmetic", "lora", 2e-3, 1), tmp_path)
    _budget(lora, "arithmetic")
    assert (lora.method, lora.lr, lora.base_lr, lora.r, lora.d, lora.seed) == ("lora", 2e-3, None, 8, None, 1)
    uni = _parse(lm.method_run("reversal", "unilora", 1e-2), tmp_path)
    assert (uni.method, uni.lr, uni.d, uni.r, uni.seed) == ("unilora", 1e-2, 131072, 4, 0)
    full = _parse(lm.method_run("reversal", "full", 3e-5, 2), tmp_path)
    _budget(full, "word-reversal")
    assert (full.method, full.lr, full.d, full.r, full.seed) == ("full", 3e-5, None, None, 2)
    base = _parse(lm.method_run("arithmetic", "base", None, 1), tmp_path)
    _budget(base, "arithmetic")  # the same test subset as the trained runs, no training
    assert (base.command, base.seed, base.adapter) == ("eval", 1, None)
    block = _parse(lm.gpart_run("arithmetic", 0.1, 1, "block"), tmp_path)
    assert (block.partition_scope, block.grouping, block.base_lr, block.d, block.seed) == (
        "transformer_block", None, 0.1, 131072, 1)
    signed = _parse(lm.gpart_run("arithmetic", 0.1, 0, "signed"), tmp_path)
    assert (signed.partition_scope, signed.grouping) == (None, "signed_magnitude")
    tags = {lm.gpart_run("arithmetic", 0.1, 0, a).tag for a in (None, "block", "signed")}
    assert len(tags) == 3  # each arm has its own run folder


def test_the_study_uses_the_clis_defaults_where_it_says_so():
    from gpart.recipes.causal_lm import CausalLM
    from gpart.recipes.methods import DEFAULT_RANK

    assert lm.D == CausalLM.defaults["d"] == 131072
    assert lm.DEFAULT_BASE == CausalLM.defaults["lr"] == 0.2
    assert lm.first_points("gpart") == (0.1, 0.2, 0.4)  # the rule's default is the ladder's middle
    assert lm.RANK == {m: DEFAULT_RANK[m] for m in lm.RANK} and lm.RANK["lora"] == 8
    for m, middle in (("lora", 2e-3), ("unilora", 1e-2), ("full", 3e-5)):
        lo, mid, hi = lm.first_points(m)
        assert mid == pytest.approx(middle) and hi / mid == pytest.approx(3) and mid / lo == pytest.approx(3)
    assert lm.theta_lr(0.2) == pytest.approx(0.2 * (10_000 / 131072) ** 0.75)


def test_smoke_budget_is_small_and_later_flags_win(tmp_path, monkeypatch):
    from gpart_cli import build_parser

    for name, spec in lm.domain_specs(smoke=True).items():
        monkeypatch.setitem(q.DOMAINS, name, spec)
    args = build_parser().parse_args(lm.gpart_run("reversal", 0.2).argv(tmp_path))
    assert (args.max_steps, args.eval_steps, args.max_eval_samples, args.max_new_tokens) == (2, 2, 8, 4)


def _sweep(runs: Path, task: str, method: str, points: dict) -> None:
    """points: lr -> (validation loss, test exact match), seed 0."""
    for lr, (loss, test) in points.items():
        _write(runs, lm.method_run(task, method, lr), loss, test)


def test_the_lowest_validation_loss_wins_even_where_exact_match_disagrees(tmp_path):
    cell = lm.Cell("reversal", "lora")
    lo, mid, hi = cell.first
    _sweep(tmp_path, "reversal", "lora", {lo: (0.9, 0.6), mid: (0.5, 0.1), hi: (0.7, 0.9)})
    st = lm.sweep_state(tmp_path, cell)
    assert st["finished"] and st["chosen"] == mid and st["where"] == "bracketed"
    assert [p[0] for p in st["points"]] == [lo, mid, hi]


def test_a_best_at_an_end_extends_the_ladder_until_bracketed(tmp_path):
    cell = lm.Cell("arithmetic", "gpart")
    _sweep(tmp_path, "arithmetic", "gpart", {0.1: (0.9, 0.2), 0.2: (0.8, 0.3)})
    st = lm.sweep_state(tmp_path, cell)
    assert st["todo"] == [0.4] and st["next"] is None and not st["finished"] and st["chosen"] is None
    _sweep(tmp_path, "arithmetic", "gpart", {0.4: (0.7, 0.3)})
    assert lm.sweep_state(tmp_path, cell)["next"] == 0.8  # best at the top: one factor 2 further
    _sweep(tmp_path, "arithmetic", "gpart", {0.8: (0.75, 0.3)})
    st = lm.sweep_state(tmp_path, cell)
    assert st["finished"] and st["chosen"] == 0.4 and st["where"] == "bracketed"


def test_a_sweep_capped_at_an_end_says_so(tmp_path):
    cell = lm.Cell("reversal", "full")
    ladder = cell.ladder
    i = ladder.index(cell.first[0])
    pts = {lr: (1.0 + k, 0.1) for k, lr in enumerate(ladder[i - 4:i + 3])}  # falling loss towards low lrs
    assert len(pts) == q_max_points()
    _sweep(tmp_path, "reversal", "full", pts)
    st = lm.sweep_state(tmp_path, cell)
    assert st["finished"] and st["chosen"] == ladder[i - 4] and st["where"] == "lowest tried"
    missing = lm.task_summary(tmp_path, "reversal")["missing"]
    assert any("full FT: the chosen lr is the lowest tried" in m for m in missing)


def q_max_points() -> int:
    return lm.lr_rule.MAX_POINTS


def test_sweep_runs_middle_points_first_then_extends_and_does_not_retry_a_failure(tmp_path, monkeypatch):
    """A fake runner: every method's loss falls towards higher lrs up to a point; GPart's 0.8 fails."""
    batches = []

    def fake_execute(runs, todo, jobs, threads):
        batches.append([r.tag for r in todo])
        for r in todo:
            if "base0.8" in r.tag or q.load_metrics(runs, r):
                continue
            lr = r.lr if r.lr is not None else float(r.variant.removeprefix("base"))
            ladder = lm.LADDERS[r.method]
            k = min(range(len(ladder)), key=lambda j: abs(ladder[j] - lr) / lr)
            _write(runs, r, abs(k - ladder.index(lm.first_points(r.method)[2]) - 1) + 0.5, 0.3)

    monkeypatch.setattr(q, "execute", fake_execute)
    lm.sweep(tmp_path, lm.cells(("reversal",), ("gpart", "lora")), 1, 1)
    first = batches[0]
    assert first[:2] == ["gpart-base0.2-d131072-s0", "lora-lr0.002-s0"]  # both middles before any other point
    assert len(first) == 6
    assert batches[1] == ["gpart-base0.8-d131072-s0", "lora-lr0.018-s0"]
    assert batches[2:] == [["lora-lr0.054-s0"]]  # GPart's failed point is not run again; LoRA brackets 0.018
    assert lm.sweep_state(tmp_path, lm.Cell("reversal", "lora"))["chosen"] == pytest.approx(0.018)
    assert not lm.sweep_state(tmp_path, lm.Cell("reversal", "gpart"))["finished"]


@pytest.fixture
def tree(tmp_path):
    """reversal: GPart tuned at base 0.4 (the default 0.2 is the middle), LoRA and the base model done on 3 seeds,
    Uni-LoRA on seed 0 only; full not swept; the block arm on 3 seeds, signed on 2."""
    runs = tmp_path / "runs"
    _sweep(runs, "reversal", "gpart", {0.1: (0.9, 0.2), 0.2: (0.6, 0.40), 0.4: (0.5, 0.30), 0.8: (0.55, 0.2)})
    for s, t in ((1, 0.50), (2, 0.45)):
        _write(runs, lm.gpart_run("reversal", 0.4, s), 0.5, t)
    for s, t in ((1, 0.42), (2, 0.44)):
        _write(runs, lm.gpart_run("reversal", 0.2, s), 0.6, t)
    lora = lm.first_points("lora")
    _sweep(runs, "reversal", "lora", {lora[0]: (0.8, 0.1), lora[1]: (0.7, 0.35), lora[2]: (0.75, 0.4)})
    for s, t in ((1, 0.30), (2, 0.38)):
        _write(runs, lm.method_run("reversal", "lora", lora[1], s), 0.7, t)
    uni = lm.first_points("unilora")
    _sweep(runs, "reversal", "unilora", {uni[0]: (0.8, 0.1), uni[1]: (0.6, 0.5), uni[2]: (0.7, 0.4)})
    for s, t in ((0, 0.05), (1, 0.10), (2, 0.00)):
        _write(runs, lm.method_run("reversal", "base", None, s), None, t, runtime=0.0)
    for s, t in ((0, 0.32), (1, 0.49), (2, 0.40)):
        _write(runs, lm.gpart_run("reversal", 0.4, s, "block"), 0.5, t)
    for s, t in ((0, 0.20), (1, 0.30)):
        _write(runs, lm.gpart_run("reversal", 0.4, s, "signed"), 0.5, t)
    return runs


def test_seeds_and_arms_go_to_the_chosen_settings(tree):
    runs = lm.seed_runs(tree, ("reversal",))
    tags = [r.tag for r in runs]
    assert tags == ["gpart-base0.2-d131072-s0",
                    "base-s1", "gpart-base0.4-d131072-s1", "gpart-base0.2-d131072-s1",
                    f"lora-lr{lm.first_points('lora')[1]:g}-s1", "unilora-d131072-lr0.01-s1",
                    "base-s2", "gpart-base0.4-d131072-s2", "gpart-base0.2-d131072-s2",
                    f"lora-lr{lm.first_points('lora')[1]:g}-s2", "unilora-d131072-lr0.01-s2"]
    assert not any(r.method == "full" for r in runs)  # its sweep has not run
    arms = lm.arm_runs(tree, ("reversal", "arithmetic"))
    assert [r.tag for r in arms] == [f"gpart-{a}-base0.4-d131072-s{s}" for s in (0, 1, 2) for a in ("block", "signed")]
    assert lm.arm_runs(tree, ("arithmetic",)) == []  # no GPart sweep there yet


def test_where_the_default_is_the_best_gpart_gets_one_set_of_seeds(tmp_path):
    _sweep(tmp_path, "arithmetic", "gpart", {0.1: (0.9, 0.2), 0.2: (0.5, 0.4), 0.4: (0.6, 0.3)})
    tags = [r.tag for r in lm.seed_runs(tmp_path, ("arithmetic",), ("gpart",))]
    assert tags == ["gpart-base0.2-d131072-s1", "gpart-base0.2-d131072-s2"]
    md = lm.render(lm.collect(tmp_path))
    assert "GPart tuned is GPart at the rule's lr" in md and "| tuned |" not in md.split("### arithmetic")[1]


def test_paired_differences_arms_and_what_is_missing(tree):
    t = lm.task_summary(tree, "reversal")
    g = t["methods"]["gpart"]
    assert (g["chosen"], g["where"]) == (0.4, "bracketed")
    assert g["seeds"]["test"] == [0.30, 0.50, 0.45] and g["default"]["test"] == [0.40, 0.42, 0.44]
    assert g["seeds"]["validation_loss"] == [0.5, 0.5, 0.5]
    default_vs = t["paired"]["gpart-default"]
    assert default_vs["lora"]["diffs"] == pytest.approx([0.05, 0.12, 0.06])
    assert default_vs["lora"]["mean"] == pytest.approx(0.07666, abs=1e-4) and default_vs["lora"]["verdict"] == "ahead"
    assert default_vs["lora"]["loss"]["diffs"] == pytest.approx([-0.1, -0.1, -0.1])  # validation loss, paired too
    assert default_vs["lora"]["loss"]["verdict"] == "lower (better)"
    assert default_vs["base"]["diffs"] == pytest.approx([0.35, 0.32, 0.44])
    assert default_vs["base"]["loss"] is None  # the base model is not validated
    assert default_vs["gpart-tuned"]["loss"]["verdict"] == "higher (worse)"
    assert default_vs["gpart-tuned"]["diffs"] == pytest.approx([0.10, -0.08, -0.01])
    assert default_vs["gpart-tuned"]["verdict"] == "within the spread"
    uni = default_vs["unilora"]  # one seed: a difference, no sd and no verdict
    assert uni["diffs"] == pytest.approx([-0.10]) and uni["sd"] is None and uni["verdict"] is None
    assert default_vs["full"] is None
    tuned_vs = t["paired"]["gpart-tuned"]
    assert tuned_vs["lora"]["diffs"] == pytest.approx([-0.05, 0.20, 0.07]) and "gpart-tuned" not in tuned_vs
    block = t["arms"]["block"]
    assert block["base"] == 0.4 and block["minus_global"]["diffs"] == pytest.approx([0.02, -0.01, -0.05])
    assert block["minus_global"]["seeds"] == [0, 1, 2] and block["minus_global"]["verdict"] == "within the spread"
    assert block["minus_global"]["loss"]["diffs"] == pytest.approx([0.0, 0.0, 0.0])
    signed = t["arms"]["signed"]["minus_global"]
    assert signed["seeds"] == [0, 1] and signed["sd"] is None
    missing = "; ".join(t["missing"])
    assert "Uni-LoRA r=4: seeds 1, 2 at the chosen lr" in missing and "arm signed: seeds 2" in missing
    assert "full FT: lr sweep not finished (0 points done, 3 to run next)" in missing
    assert "GPart" not in missing.replace("GPart's", "")  # GPart itself is complete
    other = lm.task_summary(tree, "arithmetic")
    assert "arm block: waits for GPart's sweep" in other["missing"] and other["arms"] == {}


def test_report_writes_its_files_and_includes_the_analysis(tree, tmp_path, monkeypatch):
    out = tmp_path / "out"
    analysis = tmp_path / "llm_methods_analysis.md"
    analysis.write_text("### Verdict\n\nWritten by hand.\n")
    monkeypatch.setattr(lm, "ANALYSIS", analysis)
    assert lm.main(["report", "--runs-dir", str(tree), "--out-dir", str(out)]) == 0
    result = json.loads((out / "llm_methods.json").read_text())
    assert result["tasks"]["reversal"]["methods"]["gpart"]["chosen"] == 0.4
    md = (out / "llm_methods.md").read_text()
    assert ("| at the rule's lr | LoRA r=8 | +0.077 ± 0.038: s0 +0.050, s1 +0.120, s2 +0.060 | ahead | "
            "-0.100 ± 0.000: s0 -0.100, s1 -0.100, s2 -0.100 | lower (better) |") in md
    assert "| at the rule's lr | base model (no training) | +0.370 ± 0.062: s0 +0.350, s1 +0.320, s2 +0.440 | ahead | – | – (no verdict) |" in md
    assert "| at the rule's lr | Uni-LoRA r=4 | -0.100 (1 of 3 seeds: no sd, no verdict): s0 -0.100 | – (no verdict) |" in md
    assert "| GPart at the rule's default | (the sweep's middle point) | base 0.2 (theta 0.029) |" in md
    assert "**0.4 → 0.500 (0.300)**" in md and md.rstrip().endswith("Written by hand.")
    assert not list(out.glob("*.tmp"))


def test_status_counts_runs_and_estimates_time_from_finished_runs(tree):
    text = lm.status_text(tree)
    assert "train s per run, from this study's finished runs: gpart 600, lora 600, unilora 600, full 600" in text
    assert "sweep  done 11/14" in text  # reversal: base, 4 GPart, 3 LoRA, 3 Uni-LoRA points done; 3 full to do
    assert "full-lr3e-05-s0" in text and "chosen 0.4 (bracketed)" in text
    assert "CPU time left: ~" in text


def test_prune_removes_checkpoints_of_finished_runs_only(tmp_path):
    done, running = tmp_path / "llm-reversal" / "a-s0", tmp_path / "llm-reversal" / "b-s0"
    for run in (done, running):
        (run / "checkpoints" / "checkpoint-300").mkdir(parents=True)
    (done / "metrics.json").write_text(json.dumps({"best_checkpoint": "checkpoints/checkpoint-300"}))
    assert lm.prune_checkpoints(tmp_path) == 1
    assert not (done / "checkpoints").exists() and (running / "checkpoints" / "checkpoint-300").is_dir()
    assert (done / "metrics.json").exists()