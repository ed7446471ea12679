"""benchmarks/quality.py: the learning rate is chosen on validation (never test), every method of a domain gets
the same budget, the base-model evaluation sees the training runs' test subset, and the report shows each seed."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import load_script

q = load_script("benchmarks/quality.py")


def _write(runs: Path, run, val: float, test: float, trainable: int = 100) -> None:
    out = q.run_dir(runs, run)
    out.mkdir(parents=True)
    metric = q.DOMAINS[run.domain]["metric"]
    (out / "metrics.json").write_text(json.dumps({
        "validation": {metric: val, "loss": 1 - val}, "test": {metric: test, "n": 500},
        "params": {"trainable": trainable}, "adapter_bytes": 4 * trainable, "saved": "adapter",
        "train": {"runtime_s": 10.0}, "D": 1000}))


def test_lr_is_chosen_by_validation_not_test(tmp_path):
    lrs = q.DOMAINS["text"]["lr_sweep"]["gpart"]
    # the best validation score has the worst test score: the choice must follow validation
    for i, lr in enumerate(lrs):
        best = i == 1
        _write(tmp_path, q.Run("text", "gpart", 0, lr, q.DOMAINS["text"]["d"]), 0.95 if best else 0.8, 0.7 if best else 0.99)
    assert q.chosen_lr(tmp_path, "text", "gpart") == lrs[1]
    assert q.chosen_lr(tmp_path, "math", "vera") == q.FIXED_LR["vera"]  # not swept there: the default


def test_incomplete_sweep_refuses_to_choose(tmp_path):
    lr = q.DOMAINS["vision"]["lr_sweep"]["gpart"][0]
    _write(tmp_path, q.Run("vision", "gpart", 0, lr, q.DOMAINS["vision"]["d"]), 0.9, 0.9)
    with pytest.raises(RuntimeError, match="sweep is incomplete"):
        q.chosen_lr(tmp_path, "vision", "gpart")


def test_every_method_of_a_domain_gets_the_same_budget(tmp_path):
    for dom, spec in q.DOMAINS.items():
        argvs = [q.Run(dom, m, 1, 1e-3, spec["d"]).argv(tmp_path) for m in spec["methods"] if m != "base"]
        budgets = {tuple(a[1:1 + len(spec["args"])]) for a in argvs}
        assert budgets == {tuple(spec["args"])}, dom
        assert all(a[a.index("--seed") + 1] == "1" for a in argvs)


def test_base_evaluation_uses_the_training_runs_test_subset(tmp_path):
    argv = q.Run("math", "base", 2, None, q.DOMAINS["math"]["d"]).argv(tmp_path)
    assert argv[0] == "eval"
    opts = dict(zip(argv[1::2], argv[2::2]))
    train = dict(zip(q.DOMAINS["math"]["args"][::2], q.DOMAINS["math"]["args"][1::2]))
    for flag in ("--task", "--dataset", "--max-length", "--max-eval-samples", "--max-new-tokens"):
        assert opts[flag] == train[flag]
    assert opts["--seed"] == "2" and "--max-steps" not in opts


def test_report_shows_every_seed_and_the_mean(tmp_path):
    spec = q.DOMAINS["text"]
    for lr in spec["lr_sweep"]["gpart"]:
        _write(tmp_path, q.Run("text", "gpart", 0, lr, spec["d"]), 0.9 if lr == 5e-3 else 0.5, 0.9)
    for lr in spec["lr_sweep"]["lora"]:
        _write(tmp_path, q.Run("text", "lora", 0, lr, spec["d"]), 0.9 if lr == 5e-4 else 0.5, 0.8, trainable=5000)
    for s, acc in ((1, 0.92), (2, 0.94)):
        _write(tmp_path, q.Run("text", "gpart", s, 5e-3, spec["d"]), 0.9, acc)
    result = q.collect(tmp_path)
    g = result["domains"]["text"]["methods"]["gpart"]
    assert g["test"] == [0.9, 0.92, 0.94] and g["mean"] == pytest.approx(0.92)
    assert result["domains"]["text"]["methods"]["lora"]["test"] == [0.8]
    md = q.render(result)
    assert "| GPart | 0.005 | 100 | 0.4 kB | 0.920 ± 0.020 (3) | 0.900, 0.920, 0.940 | 0.100 | 10 |" in md


def test_partition_check_puts_the_new_runs_beside_the_studys(tmp_path):
    """partition-check reruns only GPart's grid runs (the study's chosen lr, d and seeds) into its own folder
    and writes both sets of test metrics; runs already there are not redone."""
    study, again = tmp_path / "study", tmp_path / "again"
    spec = q.DOMAINS["text"]
    for lr in spec["lr_sweep"]["gpart"]:
        _write(study, q.Run("text", "gpart", 0, lr, spec["d"]), 0.9 if lr == 4e-2 else 0.5, 0.9)
    for s, acc in ((1, 0.92), (2, 0.94)):
        _write(study, q.Run("text", "gpart", s, 4e-2, spec["d"]), 0.9, acc)
    for s, acc in ((0, 0.91), (1, 0.95), (2, 0.93)):
        _write(again, q.Run("text", "gpart", s, 4e-2, spec["d"]), 0.9, acc)
    out = tmp_path / "check.json"
    argv = ["partition-check", "--domains", "text", "--runs-dir", str(study), "--out-runs-dir", str(again),
            "--out", str(out)]
    assert q.main(argv) == 0
    result = json.loads(out.read_text())
    text = result["domains"]["text"]
    assert (text["lr"], text["d"], text["seeds"]) == (4e-2, spec["d"], [0, 1, 2])
    assert text["study"] == [0.9, 0.92, 0.94] and text["now"] == [0.91, 0.95, 0.93]
    assert text["now_mean_sd"][0] == pytest.approx(0.93)
    assert result["partition_version"] == 2 and result["command"].endswith(" ".join(argv))


def test_an_unfinished_run_resumes_from_its_last_complete_checkpoint_else_starts_afresh(tmp_path):
    out = tmp_path / "run"
    assert q.restart_flag(out) == []  # a new run
    out.mkdir()
    (out / "run.json").write_text("{}")
    assert q.restart_flag(out) == ["--overwrite"]  # started, nothing saved yet
    (out / "checkpoints" / ".checkpoint-256").mkdir(parents=True)  # a save that was cut off is not one
    assert q.restart_flag(out) == ["--overwrite"]
    (out / "checkpoints" / "checkpoint-256").mkdir()
    assert q.restart_flag(out) == ["--resume"]
    from gpart.recipes.training import checkpoint_step

    assert [checkpoint_step(n) for n in ("checkpoint-256", "checkpoints/checkpoint-1024", ".checkpoint-256",
                                          "checkpoint-256.tmp")] == [256, 1024, None, None]


def test_a_resumed_run_is_timed_by_the_steps_its_last_launch_ran():
    plain = {"train": {"steps": 300, "runtime_s": 600.0}}
    resumed = {"train": {"steps": 1024, "runtime_s": 512.0, "resumed_from_step": 768}}  # 256 steps timed
    at_end = {"train": {"steps": 60, "runtime_s": 0.01, "resumed_from_step": 60}}  # killed after the last save
    assert (q.step_seconds(plain), q.train_seconds(plain)) == (2.0, 600.0)
    assert (q.step_seconds(resumed), q.train_seconds(resumed)) == (2.0, 2048.0)
    assert (q.step_seconds(at_end), q.train_seconds(at_end)) == (None, None)
    assert q.step_seconds({"train": {"steps": 16, "runtime_s": 0.0}}) is None  # the base model: nothing trained
    assert q.median_step_seconds([plain, resumed, at_end, {"train": {"steps": 10, "runtime_s": 40.0}}]) == 2.0
    assert q.median_step_seconds([at_end]) is None


def test_results_md_is_what_the_report_assembles_from_its_hand_written_parts():
    """`quality.py report` rebuilds docs/results.md; text edited into results.md alone would be lost by it."""
    results = (q.ROOT / "docs" / "results.md").read_text()
    assert q.STUDIES_SUMMARY.read_text().split("-->\n", 1)[1] in results
    assert (q.ROOT / "docs" / "quality" / "analysis.md").read_text() in results
    assert results.endswith((q.ROOT / "studies" / "partition_arms" / "arms.md").read_text())
