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


@pytest.mark.parametrize("version", [1, 2])
def test_adapter_saved_by_gpart_0_1_gives_the_same_outputs(version):
    base = MLP()
    base.load_state_dict(load_file(str(FIXTURES / "base.safetensors")))
    io = load_file(str(FIXTURES / "io.safetensors"))
    model = PeftModel.from_pretrained(base, str(FIXTURES / f"v{version}"))
    assert model.peft_config["default"].partition_version == version
    for name in ("lin0", "lin1"):  # the update itself is bit-identical
        layer = getattr(model.base_model.model, name)
        assert torch.equal(layer.get_delta_weight("default"), io[f"dw_v{version}_{name}"])
        assert torch.equal(layer._delta("default", 1), io[f"db_v{version}_{name}"])
    with torch.no_grad():
        y = model(io["x"])
    # outputs to the last bits of a GEMM, whose summation order depends on the thread count
    torch.testing.assert_close(y, io[f"y_v{version}"], rtol=1e-6, atol=1e-7)
    # the update is not trivial: without the adapter the outputs differ
    with torch.no_grad(), model.disable_adapter():
        assert not torch.allclose(model(io["x"]), y)
