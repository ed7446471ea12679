"""studies/lr_budget/lr_budget.py: every run carries its budget and the rule's base value, a cell's sweep grows
until its best base is bracketed, seeds go to the default and the tuned best, and the report's numbers (the
default against the tuned best by seed, how the best lr moves with the budget, the authors' arm) come out
right on a small fake metrics tree."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import load_script

q = load_script("benchmarks/quality.py")
lb = load_script("studies/lr_budget/lr_budget.py")


def _write(runs: Path, run, val: float, test: float | None = None, steps: int = 32) -> None:
    out = q.run_dir(runs, run)
    out.mkdir(parents=True)
    (out / "metrics.json").write_text(json.dumps({
        "validation": {"accuracy": val, "loss": 1 - val}, "test": {"accuracy": val if test is None else test, "n": 500},
        "params": {"trainable": 1}, "adapter_bytes": 4, "saved": "adapter",
        "train": {"runtime_s": 0.5 * steps, "steps": steps},
        "run": {"scheduler": "linear", "warmup": 0.06, "weight_decay": 0.1, "head_lr": 0.005, "batch_size": 16}}))


def _peaked(best: float):
    """A validation curve that falls by 0.02 per factor 2 away from `best`."""
    return lambda b: 0.95 - 0.02 * abs(math.log2(b / best))


def _flag(argv: list[str], name: str) -> str:
    return argv[len(argv) - 1 - argv[::-1].index(name) + 1]  # the last one: argparse keeps the last value


def test_runs_carry_their_budget_and_the_rules_base(tmp_path):
    assert list(lb.cells()) == [(1024, 23040), (1024, 1440), (256, 23040), (256, 1440), (32, 23040), (32, 1440)]
    make, first = lb.cells((256,))[(256, 1440)]
    assert first == (0.05, 0.1, 0.2) and lb.DEFAULT_BASE == 0.1
    argv = make(0.1).argv(tmp_path)
    assert "--lr" not in argv and _flag(argv, "--base-lr") == "0.1" and _flag(argv, "--d") == "1440"
    assert _flag(argv, "--max-steps") == _flag(argv, "--eval-steps") == "256"
    # the rest is the quality study's text budget
    assert argv[1:1 + len(q.DOMAINS["text"]["args"])] == q.DOMAINS["text"]["args"]
    assert make(0.1).tag == "gpart-T256-base0.1-d1440-s0" != lb.rule_run(1024, 1440, 0.1).tag
    authors = lb.authors_run(1024, 2).argv(tmp_path)
    assert (_flag(authors, "--lr"), _flag(authors, "--d"), _flag(authors, "--max-steps"), _flag(authors, "--seed")) == (
        "0.005", "23040", "1024", "2") and "--base-lr" not in authors


def test_the_parsed_budget_is_the_last_flag(tmp_path):
    from gpart_cli import build_parser

    args = build_parser().parse_args(lb.rule_run(1024, 23040, 0.2).argv(tmp_path))
    assert (args.max_steps, args.eval_steps, args.base_lr, args.lr) == (1024, 1024, 0.2, None)


def test_sweep_extends_until_bracketed_and_seeds_go_to_default_and_best(tmp_path):
    make, first = lb.cells((1024,))[(1024, 23040)]
    val = _peaked(0.025)
    for b in first:
        _write(tmp_path, make(b), val(b))
    assert lb.lr_rule.extension(tmp_path, "text", make, first, lb.BASES) == 0.025
    _write(tmp_path, make(0.025), val(0.025))
    assert lb.lr_rule.extension(tmp_path, "text", make, first, lb.BASES) == 0.0125
    _write(tmp_path, make(0.0125), val(0.0125))
    assert lb.lr_rule.extension(tmp_path, "text", make, first, lb.BASES) is None
    assert lb.best_base(tmp_path, make, first) == 0.025
    tags = [r.tag for r in lb.seed_runs(tmp_path, (1024,))]
    assert tags == [f"gpart-T1024-base{b}-d23040-s{s}" for b in ("0.1", "0.025") for s in (1, 2)]


def test_seeds_once_where_the_default_is_the_best(tmp_path):
    make, first = lb.cells((32,))[(32, 1440)]
    for b in first:
        _write(tmp_path, make(b), _peaked(0.1)(b))
    assert [r.tag for r in lb.seed_runs(tmp_path, (32,))] == ["gpart-T32-base0.1-d1440-s1", "gpart-T32-base0.1-d1440-s2"]


def test_bracket_names_the_end_the_best_sits_at():
    assert lb.bracket([0.05, 0.1, 0.2], 0.1) == "bracketed"
    assert lb.bracket([0.05, 0.1, 0.2], 0.05) == "lowest tried"
    assert lb.bracket([0.05, 0.1, 0.2], 0.2) == "highest tried"
    assert lb.bracket([0.1, 0.2], 0.1) == "fewer than 3 points"


@pytest.fixture
def tree(tmp_path):
    """d = 23,040: best base 0.2 at 32 steps and 0.05 at 1,024 steps (the default 0.1 loses there by seed);
    the authors' arm at 1,024 steps."""
    make32, _ = lb.cells((32,))[(32, 23040)]
    for b, v in ((0.05, 0.90), (0.1, 0.92), (0.2, 0.94), (0.4, 0.93)):
        _write(tmp_path, make32(b), v, steps=32)
    make, _ = lb.cells((1024,))[(1024, 23040)]
    for b, v in ((0.025, 0.96), (0.05, 0.98), (0.1, 0.97), (0.2, 0.95)):
        _write(tmp_path, make(b), v, steps=1024)
    for s, (default, tuned) in zip((1, 2), ((0.95, 0.98), (0.96, 0.97))):
        _write(tmp_path, lb.rule_run(1024, 23040, 0.1, s), 0.5, default, steps=1024)
        _write(tmp_path, lb.rule_run(1024, 23040, 0.05, s), 0.5, tuned, steps=1024)
    for s, t in zip((0, 1, 2), (0.90, 0.91, 0.93)):
        _write(tmp_path, lb.authors_run(1024, s), 0.5, t, steps=1024)
    return tmp_path


def test_report_numbers_from_a_fake_tree(tree):
    result = lb.collect(tree)
    c1024, c32 = result["cells"]  # cells without runs are left out; the longest budget first
    assert (c1024["steps"], c1024["best_base"], c1024["bracket"]) == (1024, 0.05, "bracketed")
    assert (c32["best_base"], c32["bracket"]) == (0.2, "bracketed") and c32["near_best_bases"] == [0.2, 0.4]
    factor = (10_000 / 23040) ** 0.75
    assert math.isclose(c1024["default_lr"], 0.1 * factor) and math.isclose(c1024["best_lr"], 0.05 * factor)
    assert c1024["step_s"] == 0.5
    gap = c1024["default_minus_tuned"]
    assert c1024["default"]["test"] == [0.97, 0.95, 0.96] and c1024["tuned"]["test"] == [0.98, 0.98, 0.97]
    assert [round(x, 6) for x in gap["paired"]["diffs"]] == [-0.01, -0.03, -0.01]
    assert math.isclose(gap["mean"], -0.01666666, rel_tol=1e-5) and gap["within_one_sd"] is False  # tuned sd 0.0058
    assert c32["default_minus_tuned"]["within_one_sd"] is None  # seed 0 only: no spread to judge by
    mv = result["movement"]["23040"]
    assert mv["best_lr"] == {"32": c32["best_lr"], "1024": c1024["best_lr"]} and math.isclose(mv["longest_over_shortest"], 0.25)
    assert math.isclose(mv["slope"], math.log(0.25) / math.log(32))
    assert result["d_exponent"] == {}  # d = 1,440 has no runs in this tree
    assert math.isclose(lb.rule_exponent(), 0.75)
    a = result["authors"]
    assert a["test"] == [0.90, 0.91, 0.93] and [round(x, 6) for x in a["minus_default"]["diffs"]] == [-0.07, -0.04, -0.03]
    assert result["schedule"]["scheduler"] == "linear" and result["llm_step"]["median_s"] > 1
    text = lb.render(result)
    assert "| 1,024 | 23,040 | 0.960 ± 0.010 (3): 0.970, 0.950, 0.960 | 0.05 | 0.977 ± 0.006 (3): 0.980, 0.980, 0.970 | -0.017 ± 0.012 (-0.010, -0.030, -0.010) | no |" in text


def test_report_writes_its_files(tree, tmp_path_factory, monkeypatch):
    out = tmp_path_factory.mktemp("out")
    monkeypatch.setattr(lb, "OUT", out)
    assert lb.main(["report", "--runs-dir", str(tree)]) == 0
    assert json.loads((out / "lr_budget.json").read_text())["cells"][0]["best_base"] == 0.05
    assert (out / "lr_budget.png").stat().st_size > 0 and "## GPart's learning-rate rule across" in (out / "lr_budget.md").read_text()


def test_d_exponent_from_two_bracketed_cells_of_one_budget():
    rows = [{"steps": 32, "d": 23040, "bracket": "bracketed", "best_lr": 0.1},
            {"steps": 32, "d": 1440, "bracket": "bracketed", "best_lr": 0.4},
            {"steps": 1024, "d": 23040, "bracket": "bracketed", "best_lr": 0.05},
            {"steps": 1024, "d": 1440, "bracket": "lowest tried", "best_lr": 0.05}]
    assert lb.d_exponent(rows) == {"32": pytest.approx(0.5)}  # 4x the lr for 16x fewer coordinates


def test_docs_table_is_the_committed_study():
    """docs/lr.md's budget table: every validation figure is the committed lr_budget.json's (seed 0)."""
    result = json.loads((lb.OUT / "lr_budget.json").read_text())
    curves = {(c["steps"], c["d"]): {p["base"]: p["validation"] for p in c["curve"]} for c in result["cells"]}
    text = (Path(lb.quality.ROOT) / "docs" / "lr.md").read_text()
    section = text.split("## Across training length")[1].split("\n## ")[0]
    header = next(line for line in section.splitlines() if line.startswith("| steps | d | base "))
    bases = [float(c.split()[1]) for c in header.split("|")[3:-2]]  # "base 0.1 (default)", ..., then "best base"
    rows = [line.split("|")[1:-1] for line in section.splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == len(curves)
    assert {b for c in curves.values() for b in c} <= set(bases), "a swept base has no column in docs/lr.md"
    for row in rows:
        steps, d = int(row[0].replace(",", "")), int(row[1].replace(",", ""))
        for base, cell in zip(bases, row[2:2 + len(bases)]):
            got = curves[(steps, d)].get(base)
            assert cell.strip().strip("*") == ("–" if got is None else f"{got:.3f}"), (steps, d, base)
