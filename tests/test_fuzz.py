"""Property / fuzz tests on config parsing and adapter loading (hostile files).

Every mutated adapter either loads and behaves exactly like the original (when the mutation does not
change meaning), or is refused with a ValueError / TypeError / SafetensorError that names the problem.
Nothing may crash deeper down, and nothing may load with a different partition.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import tiny_bert
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from peft import PeftModel, get_peft_model
from safetensors import SafetensorError
from safetensors.torch import save_file

from gpart import GPartConfig

CLEAN_ERRORS = (ValueError, TypeError, SafetensorError)
X = torch.randint(0, 100, (2, 6), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("adapter")
    model = get_peft_model(tiny_bert(), GPartConfig(d=40, seed=5, init_scale=1.0, target_modules=["query", "value"]))
    model.save_pretrained(path)
    return path, model(X).logits.detach()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)
FIELDS = ["d", "seed", "D", "layout", "layout_fingerprint", "partition_algorithm", "partition_version",
          "target_modules", "dropout", "init_scale", "peft_type", "task_type", "bias", "partition_bias"]


def _load(path):
    return PeftModel.from_pretrained(tiny_bert(), path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS + ["brand_new_field"]), value=json_values, drop=st.booleans())
def test_mutated_config_loads_identically_or_fails_cleanly(saved, tmp_path_factory, field, value, drop):
    src, expected = saved
    path = tmp_path_factory.mktemp("mut")
    shutil.copytree(src, path, dirs_exist_ok=True)
    cfg = json.loads((path / "adapter_config.json").read_text())
    original = dict(cfg)
    if drop:
        cfg.pop(field, None)
    else:
        cfg[field] = value
    (path / "adapter_config.json").write_text(json.dumps(cfg))
    # without a usable peft_type PEFT itself cannot tell which method to load and raises KeyError naming it
    errors = CLEAN_ERRORS + (KeyError,) if field == "peft_type" else CLEAN_ERRORS
    try:
        model = _load(path)
    except errors:
        return
    # it loaded: then every partition-defining field must be what it was, and the outputs identical
    loaded = model.peft_config["default"]
    for key in ("d", "seed", "D", "layout", "layout_fingerprint", "partition_algorithm", "partition_version"):
        assert getattr(loaded, key) == original[key], key
    torch.testing.assert_close(model(X).logits, expected, rtol=0, atol=0)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    length=st.integers(0, 80),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.uint8]),
    key=st.sampled_from(["base_model.gpart_theta", "base_model.theta", "gpart_theta", "x"]),
    ndim=st.integers(1, 2),
)
def test_mutated_theta_file_loads_only_when_it_is_a_theta(saved, tmp_path_factory, length, dtype, key, ndim):
    src, _ = saved
    path = tmp_path_factory.mktemp("theta")
    shutil.copytree(src, path, dirs_exist_ok=True)
    shape = (length,) if ndim == 1 else (length, 1)
    save_file({key: torch.zeros(shape).to(dtype)}, path / "adapter_model.safetensors")
    ok = key == "base_model.gpart_theta" and length == 40 and ndim == 1 and dtype.is_floating_point
    if ok:
        model = _load(path)
        assert model.base_model.gpart_theta["default"].abs().sum() == 0
    else:
        with pytest.raises(CLEAN_ERRORS):
            _load(path)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(0, 400), flip=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_corrupted_safetensors_bytes_fail_cleanly_or_load_the_same_shape(saved, tmp_path_factory, cut, flip, byte):
    src, _ = saved
    path = tmp_path_factory.mktemp("bytes")
    shutil.copytree(src, path, dirs_exist_ok=True)
    blob = bytearray((path / "adapter_model.safetensors").read_bytes())
    blob[flip % len(blob)] = byte
    blob = blob[: max(0, len(blob) - cut)]
    (path / "adapter_model.safetensors").write_bytes(bytes(blob))
    try:
        model = _load(path)
    except CLEAN_ERRORS:
        return
    # a flipped byte inside theta's data is still a valid file: it must load as a 40-float theta
    assert model.base_model.gpart_theta["default"].shape == (40,)
