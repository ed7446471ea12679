"""`--bf16`, `--load-in-4bit`, `--load-in-8bit` for causal LMs: train, eval, info, merge, on a tiny Llama.

bitsandbytes runs on the CPU (its CPU backend), so these run everywhere the suite does.
"""
from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import write_tiny_chat_lm

from gpart.cli import main

pytest.importorskip("bitsandbytes")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning",
                                        "ignore:.*kernels.*", "ignore::UserWarning")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return write_tiny_chat_lm(tmp_path_factory.mktemp("prec"), conversations=20)


def _train(tiny_lm, out, *flags, method="lora"):
    return main(["train", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--dataset",
                 str(tiny_lm / "chat.jsonl"), "--method", method, "--d", "256", "--max-steps", "2",
                 "--batch-size", "4", "--max-new-tokens", "2", "--output-dir", str(out), "--quiet", "--cpu", *flags])


@pytest.mark.parametrize("flag,kind", [("--load-in-4bit", "Linear4bit"), ("--load-in-8bit", "Linear8bitLt")])
def test_lora_on_a_quantized_base_trains_evaluates_and_refuses_to_merge(tiny_lm, tmp_path, capsys, flag, kind):
    import gpart.recipes.training as training

    seen = {}
    original = training.save_result

    def capture(model, *a, **kw):
        seen["layer"] = type(model.base_model.model.model.layers[0].self_attn.q_proj.base_layer).__name__
        seen["lora_dtype"] = model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype
        return original(model, *a, **kw)

    training.save_result = capture
    try:
        assert _train(tiny_lm, tmp_path / "run", flag) == 0
    finally:
        training.save_result = original
    assert seen == {"layer": kind, "lora_dtype": torch.float32}
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["run"]["quantization"] == flag[-4:] and m["validation"]["loss"] > 0
    task = json.loads((tmp_path / "run" / "adapter" / "gpart_task.json").read_text())
    assert task[flag[2:].replace("-", "_")] is True
    # eval reuses the run's quantization (saved) and reproduces its test numbers
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--max-new-tokens", "2",
                 "--output", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["n"] == m["test"]["n"] and result["examples"] == m["test"]["examples"]
    capsys.readouterr()
    assert main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output-dir", str(tmp_path / "m")]) == 2
    assert f"merging a lora adapter trained on a {flag[10]}-bit base" in capsys.readouterr().err


@pytest.mark.parametrize("flag", ["--load-in-4bit", "--load-in-8bit"])
def test_gpart_on_a_quantized_base_trains_and_merges_into_a_float_model(tiny_lm, tmp_path, capsys, flag):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    import gpart  # noqa: F401

    rc = _train(tiny_lm, tmp_path / "run", flag, "--dropout", "0", method="gpart")
    assert rc == 0, capsys.readouterr().err
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert m["params"]["adapter"] == 256 and m["run"]["quantization"] == flag[10:] and m["validation"]["loss"] > 0
    # gpart merge writes a plain float32 model: dequantized W + Delta_W, no bitsandbytes layer left
    assert main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output-dir", str(tmp_path / "m")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "m", local_files_only=True)
    assert all(type(mod).__module__.split(".")[0] != "bitsandbytes" for mod in merged.modules())
    assert merged.dtype == torch.float32 and getattr(merged.config, "quantization_config", None) is None
    # ... with the outputs of the unmerged adapter on the quantized base
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32) if flag == "--load-in-4bit" else \
        BitsAndBytesConfig(load_in_8bit=True)
    base = AutoModelForCausalLM.from_pretrained(tiny_lm / "llama", quantization_config=quant, device_map="cpu",
                                                local_files_only=True)
    # training mode: bitsandbytes' exact dequantize-then-matmul path (its 8-bit eval path quantizes the
    # inputs too); the adapter was trained without DropConnect, so nothing random either
    unmerged = PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").train()
    ids = torch.tensor([[1, 5, 7, 9, 2, 4]])
    with torch.no_grad():
        expect = unmerged(ids).logits
        got = merged(ids).logits
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_bf16_loads_the_base_in_bf16_and_keeps_the_adapter_fp32(tiny_lm, tmp_path):
    import gpart.recipes.training as training

    seen = {}
    original = training.save_result

    def capture(model, *a, **kw):
        seen["base"] = model.base_model.model.model.layers[0].mlp.up_proj.weight.dtype
        seen["theta"] = {p.dtype for p in model.parameters() if p.requires_grad}
        return original(model, *a, **kw)

    training.save_result = capture
    try:
        assert _train(tiny_lm, tmp_path / "run", "--bf16", method="gpart") == 0
    finally:
        training.save_result = original
    assert seen == {"base": torch.bfloat16, "theta": {torch.float32}}
    assert json.loads((tmp_path / "run" / "adapter" / "gpart_task.json").read_text())["bf16"] is True
    assert main(["eval", "--adapter", str(tmp_path / "run" / "adapter"), "--max-new-tokens", "2",
                 "--output", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["n"] == 2
    # merge folds into float32 weights whatever the run's --bf16
    assert main(["merge", "--adapter", str(tmp_path / "run" / "adapter"), "--output-dir", str(tmp_path / "m")]) == 0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(tmp_path / "m").model.layers[0].mlp.up_proj.weight.dtype == torch.float32


@pytest.mark.parametrize("flags", [[], ["--bf16"], ["--load-in-8bit"], ["--load-in-4bit"], ["--load-in-4bit", "--bf16"]])
def test_info_base_bytes_match_a_real_load(tiny_lm, capsys, flags):
    from argparse import Namespace

    from transformers import AutoModelForCausalLM

    from gpart.recipes import models

    assert main(["info", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--method", "lora", "--json",
                 *flags]) == 0
    info = json.loads(capsys.readouterr().out)
    args = Namespace(bf16="--bf16" in flags, load_in_4bit="--load-in-4bit" in flags,
                     load_in_8bit="--load-in-8bit" in flags, cpu=True)
    real = AutoModelForCausalLM.from_pretrained(tiny_lm / "llama", **models.load_options(args))
    assert info["base_bytes"] == real.get_memory_footprint()
    full = sum(p.numel() for p in real.parameters())  # packed 4-bit weights count half
    assert info["base_weights"] == {"--load-in-4bit": "nf4 4-bit", "--load-in-8bit": "int8"}.get(
        (flags or [""])[0], "bfloat16" if flags == ["--bf16"] else "float32")
    if not flags:
        assert info["base_bytes"] == 4 * full + sum(b.numel() * b.element_size() for b in real.buffers())


def test_precision_errors(tiny_lm, tmp_path, capsys):
    def run(*argv):
        try:
            rc = main(list(argv))
        except SystemExit as e:
            rc = e.code
        return rc, capsys.readouterr().err

    rc, err = run("train", "--task", "text-classification", "--load-in-4bit", "--output-dir", str(tmp_path / "x"))
    assert rc == 2 and "--load-in-4bit is for --task causal-lm" in err
    rc, err = run("train", "--task", "causal-lm", "--model", str(tiny_lm / "llama"), "--method", "full",
                  "--load-in-8bit", "--output-dir", str(tmp_path / "x"))
    assert rc == 2 and "quantized weights cannot be trained" in err
    rc, err = run("info", "--task", "causal-lm", "--load-in-4bit", "--load-in-8bit")
    assert rc == 2 and "not allowed with argument" in err
