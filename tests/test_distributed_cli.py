"""`gpart train` under real launchers: 2 CPU processes over gloo (torchrun / accelerate launch).

Every multi-process run is compared with one single-process run of the same global batch (per
process 4 examples x 2 processes = 8): same data order, same theta, head and metrics. Dropout is 0
(the adapter's and the model's), so nothing random differs between the runs. The data order is the
same because Accelerate shards each global batch of the seeded sampler's order across processes
(process r takes per-process batches r, r + N, ...), and 48 training examples split into whole
global batches of 8 (a short last batch would be filled up differently: see docs/distributed.md).

Uses conftest's tiny offline BERT and review CSVs (the `text_setup` fixture).
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpart.recipes.training as training
from gpart.cli import main

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
DOCS = Path(__file__).resolve().parents[1] / "docs" / "accelerate"
STEPS = 9  # checkpoints at 3, 6, 9; steps 7-9 are in the second epoch (6 global batches per epoch)

# Accelerate 1.15 enables FSDP (and DeepSpeed through its plugin) only for accelerator devices; on
# CPU it quietly trains with DDP instead, which gpart train refuses (LaunchError). This launcher
# script, for tests only, promotes the gloo process group to FSDP before running gpart train, so
# Accelerate's real FSDP2 path runs: fully_shard on CPU, theta a DTensor, full-state saves.
FSDP_ON_CPU = """
import sys
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType

init = AcceleratorState.__init__

def fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # AcceleratorState() copies it
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

AcceleratorState.__init__ = fsdp_on_cpu
from gpart.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def setup(text_setup, tmp_path_factory):
    """text_setup's BERT with dropout 0 (hidden and attention), and its data."""
    from transformers import AutoModel

    root = tmp_path_factory.mktemp("dist")
    model = AutoModel.from_pretrained(text_setup / "bert")
    model.config.hidden_dropout_prob = model.config.attention_probs_dropout_prob = 0.0
    model.save_pretrained(root / "bert")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(text_setup / "bert" / name, root / "bert" / name)
    return {"model": root / "bert", "data": text_setup / "data", "root": root}


def _args(setup, out, batch_size, *extra):
    return ["train", "--task", "text-classification", "--model", str(setup["model"]), "--dataset",
            str(setup["data"]), "--max-train-samples", "48", "--d", "48", "--lr", "0.05", "--head-lr", "0.05",
            "--dropout", "0", "--max-steps", str(STEPS), "--eval-steps", "3", "--seed", "5",
            "--batch-size", str(batch_size), "--output-dir", str(out), "--quiet", *extra]


def _launch(command: list[str], cwd: Path, timeout: int = 300) -> str:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", PYTHONWARNINGS="ignore",
               OMP_NUM_THREADS="1")
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"launch failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-4000:]}"
    return proc.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(setup, out, *extra) -> str:
    # `--` ends torchrun's own options: it abbreviates option names and would take gpart's --d and
    # --r for its --duplicate-*/--rdzv-* ("ambiguous option"); gpart drops the `--`.
    return _launch([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    "-m", "gpart.cli", "--", *_args(setup, out, 4, *extra)], setup["root"])


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path / "adapter_model.safetensors")


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _same_run(out: Path, ref: Path) -> None:
    """Same adapter, last checkpoint and history as the single-process reference run."""
    for sub in ("adapter", f"checkpoints/checkpoint-{STEPS}"):
        got, want = _adapter(out / sub), _adapter(ref / sub)
        assert set(got) == set(want) and got["base_model.gpart_theta"].shape == (48,)
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{sub}: {key}")
    a, b = _metrics(out), _metrics(ref)
    assert a["train"]["steps"] == b["train"]["steps"] == STEPS and a["train"]["epochs"] == b["train"]["epochs"] == 1.5
    assert [p["step"] for p in a["history"]["train"]] == list(range(1, STEPS + 1))
    assert [p["loss"] for p in a["history"]["train"]] == pytest.approx([p["loss"] for p in b["history"]["train"]],
                                                                         rel=1e-5)
    for x, y in zip(a["history"]["eval"], b["history"]["eval"], strict=True):
        assert (x["step"], x["accuracy"]) == (y["step"], y["accuracy"])
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)  # exact per-example mean, not batch means
    assert a["validation"] == pytest.approx(b["validation"], rel=1e-5) and a["test"] == pytest.approx(b["test"])
    assert a["best_checkpoint"].endswith("checkpoint-6") and b["best_checkpoint"].endswith("checkpoint-6")


def _killed_after_checkpoint_6(run: Path, copy: Path) -> Path:
    """A copy of a finished run as a crash after checkpoint-6 would have left it."""
    shutil.copytree(run, copy)
    for name in (f"checkpoints/checkpoint-{STEPS}", "adapter"):
        shutil.rmtree(copy / name)
    (copy / "metrics.json").unlink()
    return copy


@pytest.fixture(scope="module")
def reference(setup):
    """One process, batch 8: the run every multi-process run must reproduce."""
    out = setup["root"] / "reference"
    assert main(_args(setup, out, 8)) == 0
    return out


@pytest.fixture(scope="module")
def ddp_run(setup):
    out = setup["root"] / "ddp"
    stdout = _torchrun(setup, out)
    return out, stdout


# ------------------------------------------------------------------------------------ DDP
def test_torchrun_ddp_matches_one_process(ddp_run, reference):
    out, stdout = ddp_run
    _same_run(out, reference)
    # two processes really trained together: one RNG state per process in every checkpoint
    for n in (6, STEPS):
        names = {p.name for p in (out / "checkpoints" / f"checkpoint-{n}").iterdir()}
        assert {"rng_state_0.pth", "rng_state_1.pth", "optimizer.pt", "adapter_model.safetensors"} <= names
    # the main process alone wrote the results (once, atomically) and printed the summary
    assert stdout.count('"output_dir"') == 1
    assert json.loads(stdout[stdout.index('{\n  "output_dir"'):])["trainable"] == 48 + 2 * 32 + 2  # theta + head
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints", "metrics.json", "report.md", "run.json",
                                                    "train_log.jsonl", "training_curve.png"]
    lines = (out / "train_log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines]
    assert steps == sorted(steps) and len(lines) == len(set(lines))  # the main process alone wrote each log line
    assert not [p for p in out.rglob(".*")]  # no temporaries left by the atomic writes
    assert json.loads((out / "run.json").read_text())["batch_size"] == 4


def test_resume_two_processes_checkpoint_with_one_process(setup, ddp_run, reference, tmp_path, monkeypatch):
    """A DDP checkpoint holds whole tensors and the plain optimizer state, so one process resumes it
    (with the same global batch: --batch-size 8) and continues the very same trajectory."""
    out = _killed_after_checkpoint_6(ddp_run[0], tmp_path / "resumed")
    steps_run = []
    base = training.make_trainer_class()

    class Recording(base):
        def training_step(self, *a, **kw):
            steps_run.append(self.state.global_step)
            return super().training_step(*a, **kw)

    monkeypatch.setattr(training, "make_trainer_class", lambda: Recording)
    assert main(_args(setup, out, 8, "--resume")) == 0
    assert steps_run == [6, 7, 8]  # continued from checkpoint-6: three more steps, not nine
    # same theta as the uninterrupted single-process run: optimizer, scheduler and data position loaded
    _same_run(out, reference)


@pytest.mark.slow
def test_resume_one_process_checkpoint_with_two_processes(setup, reference, tmp_path):
    out = _killed_after_checkpoint_6(reference, tmp_path / "resumed")
    _torchrun(setup, out, "--resume")
    _same_run(out, reference)


# ------------------------------------------------------------------------------------ FSDP2
def _accelerate_config(tmp_path: Path, name: str, **plugin) -> Path:
    """One of the documented configs (docs/accelerate), for 2 processes; `plugin` edits its
    fsdp_config / deepspeed_config section."""
    import yaml

    config = yaml.safe_load((DOCS / name).read_text())
    config.update(num_processes=2, mixed_precision="no")
    section = "fsdp_config" if "fsdp_config" in config else "deepspeed_config"
    config[section].update(plugin)
    path = tmp_path / name
    path.write_text(yaml.safe_dump(config))
    return path


def test_accelerate_fsdp2_matches_one_process_and_saves_whole_theta(setup, reference, tmp_path, capsys):
    config = _accelerate_config(tmp_path, "fsdp2.yaml", fsdp_transformer_layer_cls_to_wrap="BertLayer")
    script = tmp_path / "fsdp_on_cpu.py"
    script.write_text(FSDP_ON_CPU)
    out = tmp_path / "fsdp2"
    stdout = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                      "--main_process_port", str(_free_port()), str(script), *_args(setup, out, 4)], tmp_path)
    assert stdout.count('"output_dir"') == 1
    _same_run(out, reference)
    # The Trainer's FSDP checkpoint (what --resume loads) holds the trainable tensors, whole: theta
    # registered once on the tuner, not a shard of it.
    for n in (6, STEPS):
        state = torch.load(out / "checkpoints" / f"checkpoint-{n}" / "pytorch_model_fsdp.bin", weights_only=True)
        assert sorted(state) == ["base_model.gpart_theta.default",
                                 "base_model.model.classifier.modules_to_save.default.bias",
                                 "base_model.model.classifier.modules_to_save.default.weight"]
        torch.testing.assert_close(state["base_model.gpart_theta.default"],
                                   _adapter(out / "checkpoints" / f"checkpoint-{n}")["base_model.gpart_theta"])

    # An FSDP checkpoint stores the optimizer state in FSDP's format: a launch without FSDP refuses
    # it with a clear message instead of failing inside the Trainer.
    resumed = _killed_after_checkpoint_6(out, tmp_path / "resumed")
    capsys.readouterr()
    assert main(_args(setup, resumed, 8, "--resume")) == 2
    assert "checkpoint-6 was written under FSDP, this launch uses DDP / one process" in capsys.readouterr().err


def test_fsdp_requested_where_accelerate_cannot_enable_it(setup, tmp_path, monkeypatch, capsys):
    """What `accelerate launch` with an FSDP config sets; on CPU Accelerate would train with plain
    DDP (or, in one process, alone) instead."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    out = tmp_path / "fsdp-cpu"
    assert main(_args(setup, out, 8)) == 2
    err = capsys.readouterr().err
    assert "the launcher asked for FSDP, but Accelerate did not enable it" in err
    assert not out.exists() or not any(out.iterdir())  # nothing left: the directory can be used again


# ------------------------------------------------------------------------------------ DeepSpeed
# ZeRO-3 keeps tensors below stage3_param_persistence_threshold (1e5 elements) whole, as it would
# this toy model's theta and weights; the test config sets it to 0 so that they are really
# partitioned, and this launcher script reports how much of theta a process holds between steps.
ZERO3_PROBE = """
import sys
import gpart.recipes.training as training

make = training.make_trainer_class

def probing():
    class Probe(make()):
        def training_step(self, model, *args, **kwargs):
            if self.state.global_step == 0:
                theta = self.model.base_model.gpart_theta["default"]
                print(f"theta holds {theta.numel()} of {tuple(theta.ds_shape)}", flush=True)
            return super().training_step(model, *args, **kwargs)
    return Probe

training.make_trainer_class = probing
from gpart.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs `pip install deepspeed`")
@pytest.mark.parametrize("stage", [2, 3])
def test_accelerate_deepspeed_zero_matches_one_process(stage, setup, reference, tmp_path):
    """Opt-in: needs `pip install deepspeed` (not a gpart dependency). DeepSpeed runs on the CPU
    with its own CPU accelerator over gloo; its first run compiles a shared-memory op (minutes)."""
    import yaml

    out = tmp_path / f"zero{stage}"
    if stage == 2:
        config, program = _accelerate_config(tmp_path, "deepspeed_zero2.yaml"), ["-m", "gpart.cli"]
    else:
        (tmp_path / "zero3.json").write_text(json.dumps({
            "train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto", "zero_optimization": {
                "stage": 3, "stage3_param_persistence_threshold": 0,
                "stage3_gather_16bit_weights_on_model_save": True}}))
        config = tmp_path / "zero3.yaml"
        config.write_text(yaml.safe_dump({
            "distributed_type": "DEEPSPEED", "num_machines": 1, "num_processes": 2, "machine_rank": 0,
            "deepspeed_config": {"deepspeed_config_file": str(tmp_path / "zero3.json"), "zero3_init_flag": False}}))
        (tmp_path / "probe.py").write_text(ZERO3_PROBE)
        program = [str(tmp_path / "probe.py")]
    stdout = _launch([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
                      "--main_process_port", str(_free_port()), *program, *_args(setup, out, 4)], tmp_path,
                     timeout=900)
    if stage == 3:
        assert stdout.count("theta holds 0 of (48,)") == 2  # partitioned: gathered for each use only
    _same_run(out, reference)
    assert (out / "checkpoints" / f"checkpoint-{STEPS}" / f"global_step{STEPS}").is_dir()
