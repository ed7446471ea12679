"""Adapters saved by an earlier gpart (committed fixtures, tests/fixtures/make_saved_adapters.py) load
with exactly the outputs they gave when they were saved: new config fields must default to the old
behaviour, and the partition of a saved adapter must never change."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gpart  # noqa: F401
from conftest import MLP
from peft import PeftModel

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "saved-adapters"


# fixture -> (what its config records, the file of its outputs)
FIXTURE_CASES = {
    "v1": (dict(partition_version=1, projection="partition", column_gain_ratio=1.0), "io.safetensors"),
    "v2": (dict(partition_version=2, projection="partition", column_gain_ratio=1.0), "io.safetensors"),
    "fastfood": (dict(projection="fastfood"), "io-projections.safetensors"),
    "gains-16": (dict(projection="partition", column_gain_ratio=16.0), "io-projections.safetensors"),
}


def bias_delta(layer) -> torch.Tensor:
    return layer._delta("default", 1)


@pytest.mark.parametrize("fixture", FIXTURE_CASES)
def test_adapter_saved_by_gpart_0_1_gives_the_same_outputs(fixture):
    recorded, io_name = FIXTURE_CASES[fixture]
    base = MLP()
    base.load_state_dict(load_file(str(FIXTURES / "base.safetensors")))
    io = load_file(str(FIXTURES / io_name))
    model = PeftModel.from_pretrained(base, str(FIXTURES / fixture))
    for field, value in recorded.items():
        assert getattr(model.peft_config["default"], field) == value
    for name in ("lin0", "lin1"):  # the update itself is bit-identical (element-wise work, no reduction order)
        layer = getattr(model.base_model.model, name)
        assert torch.equal(layer.get_delta_weight("default"), io[f"dw_{fixture}_{name}"])
        assert torch.equal(bias_delta(layer), io[f"db_{fixture}_{name}"])
    with torch.no_grad():
        y = model(io["x"])
    # outputs to the last bits of a GEMM, whose summation order depends on the thread count
    torch.testing.assert_close(y, io[f"y_{fixture}"], rtol=1e-6, atol=1e-7)
    # the update is not trivial: without the adapter the outputs differ
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(io["x"]), y)
