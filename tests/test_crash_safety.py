"""Crash safety of `gpart train`: atomic checkpoints, SIGKILL + --resume, stop on a non-finite loss.

Uses conftest's tiny offline BERT and review CSVs (the `text_setup` fixture).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import gpart.recipes.training as training
from gpart.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _args(text_setup, out, steps):
    return ["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
            "--dataset", str(text_setup / "data"), "--d", "48", "--batch-size", "8", "--lr", "0.05",
            "--head-lr", "0.05", "--eval-steps", "4", "--max-steps", str(steps), "--seed", "5",
            "--output-dir", str(out), "--quiet"]


def _theta(path: Path) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path / "adapter_model.safetensors")
    (key,) = [k for k in tensors if "gpart_theta" in k]
    return tensors[key]


def _checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").iterdir()) if (out / "checkpoints").exists() else []


def _patch_trainer(monkeypatch, base, **overrides):
    """Make gpart train use a subclass of `base` (a GPartTrainer) with the given methods overridden."""
    monkeypatch.setattr(training, "make_trainer_class", lambda: type("Patched", (base,), overrides))


# Runs `gpart train` in a child process, slowed to ~0.3 s per step so the test can kill it mid-run.
SLOW_CHILD = textwrap.dedent("""
    import sys, time
    import gpart.recipes.training as t
    original = t.make_trainer_class
    def slow():
        base = original()
        class Slow(base):
            def training_step(self, *a, **kw):
                time.sleep(0.3)
                return super().training_step(*a, **kw)
        return Slow
    t.make_trainer_class = slow
    from gpart.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_sigkill_then_resume_matches_uninterrupted_run(text_setup, tmp_path):
    steps = 16
    killed = tmp_path / "killed"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_CHILD, *_args(text_setup, killed, steps)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (killed / "checkpoints" / "checkpoint-4").is_dir():
            assert proc.poll() is None, f"child exited early: {proc.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.05)
        time.sleep(0.5)  # land somewhere in steps 5..8 (possibly mid-save of checkpoint-8)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "metrics.json").exists()
    assert all(not n.startswith("checkpoint-") or int(n[11:]) < steps for n in _checkpoints(killed))

    assert main(_args(text_setup, killed, steps) + ["--resume"]) == 0
    reference = tmp_path / "reference"
    assert main(_args(text_setup, reference, steps)) == 0

    # The Trainer restores the optimizer, scheduler and RNG states, and on resume skips the batches
    # already seen in the current epoch of the same seeded sampler (--seed also seeds the data
    # order), so the resumed trajectory is the uninterrupted one.
    last = f"checkpoints/checkpoint-{steps}"
    torch.testing.assert_close(_theta(killed / last), _theta(reference / last), rtol=0, atol=1e-6)
    torch.testing.assert_close(_theta(killed / "adapter"), _theta(reference / "adapter"), rtol=0, atol=1e-6)
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (killed, reference))
    assert a["train"]["steps"] == b["train"]["steps"] == steps
    assert [p["step"] for p in a["history"]["train"]] == list(range(1, steps + 1))
    log = [json.loads(line) for line in (killed / "train_log.jsonl").read_text().splitlines()]
    resumed = [entry["step"] for entry in log if entry.get("resumed")]  # the log says where the second launch began
    assert len(resumed) == 1 and resumed[0] in (4, 8)  # the kill landed in steps 5..8


def test_interrupted_checkpoint_save_is_never_resumed(text_setup, tmp_path, monkeypatch, capsys):
    from transformers import Trainer

    out = tmp_path / "run"
    original = Trainer._save_rng_state

    def interrupted(self, output_dir):
        if self.state.global_step == 8:
            # part of checkpoint-8 is on disk when the "crash" comes
            assert any(Path(output_dir).iterdir())
            raise KeyboardInterrupt
        return original(self, output_dir)

    monkeypatch.setattr(Trainer, "_save_rng_state", interrupted)
    assert main(_args(text_setup, out, 12)) == 130
    assert _checkpoints(out) == ["checkpoint-4"]  # nothing named checkpoint-8, no temporary left
    monkeypatch.setattr(Trainer, "_save_rng_state", original)

    # what a SIGKILL during a save leaves: a hidden, half-written folder; --resume ignores and removes it
    leftover = out / "checkpoints" / ".checkpoint-8.x1y2.tmp" / "checkpoint-8"
    leftover.mkdir(parents=True)
    (leftover / "adapter_model.safetensors").write_bytes(b"\0" * 10)
    assert training.last_complete_checkpoint(out / "checkpoints").name == "checkpoint-4"
    assert main(_args(text_setup, out, 12) + ["--resume"]) == 0
    assert not any(n.startswith(".") for n in _checkpoints(out))
    assert "checkpoint-12" in _checkpoints(out)
    assert json.loads((out / "metrics.json").read_text())["train"]["steps"] == 12


def test_nan_loss_stops_with_message_and_keeps_last_good_checkpoint(text_setup, tmp_path, monkeypatch,
                                                                    capsys):
    out = tmp_path / "nan"
    base = training.make_trainer_class()

    def compute_loss(self, model, inputs, *a, **kw):
        loss = base.compute_loss(self, model, inputs, *a, **kw)
        if self.state.global_step >= 5:  # step 6 on
            loss = loss * float("nan") if not isinstance(loss, tuple) else (loss[0] * float("nan"), *loss[1:])
        return loss

    _patch_trainer(monkeypatch, base, compute_loss=compute_loss)
    assert main(_args(text_setup, out, 12)) == 3
    err = capsys.readouterr().err
    assert "training diverged at step 6: loss is nan" in err and "checkpoint-4" in err and "--resume" in err
    assert _checkpoints(out) == ["checkpoint-4"]
    assert not (out / "metrics.json").exists() and not (out / "adapter").exists()
    theta = _theta(out / "checkpoints" / "checkpoint-4")
    assert torch.isfinite(theta).all()

    monkeypatch.undo()  # the "fix": the last good checkpoint resumes to the end
    assert main(_args(text_setup, out, 12) + ["--resume"]) == 0
    assert torch.isfinite(_theta(out / "adapter")).all()


def test_non_finite_theta_stops_before_it_is_saved(text_setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "inf"
    base = training.make_trainer_class()

    def optimizer_step_hook(self, model, inputs, *a, **kw):
        loss = base.training_step(self, model, inputs, *a, **kw)
        if self.state.global_step == 3:  # computing step 4: its update makes theta inf, the loss stays finite
            theta = model.base_model.gpart_theta["default"]
            theta.grad = torch.full_like(theta, float("inf"))
        return loss

    _patch_trainer(monkeypatch, base, training_step=optimizer_step_hook)
    assert main(_args(text_setup, out, 12) + ["--max-grad-norm", "0"]) == 3
    err = capsys.readouterr().err
    assert "training diverged at step 4: parameter" in err and "is not finite" in err
    assert _checkpoints(out) == []  # checkpoint-4 would have held the bad theta
    assert "no checkpoint was saved yet" in err
