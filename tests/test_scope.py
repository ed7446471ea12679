"""partition_scope="transformer_block": one balanced partition per numbered block, each on its own slice of
theta; exact against a dense block-diagonal reference, saved and fingerprinted, and bad input refused."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MLP, tiny_bert, tiny_gpt2, tiny_llama
from peft import PeftModel, get_peft_model

import gpart
import gpart.kernels
from gpart.partition import Partition, PartitionError
from gpart.scope import block_name, plan


def _dense_block_P(cfg) -> torch.Tensor:
    """P (D x d) built independently of the model: block i is Partition(seed + i, D_i, d_i) on the rows of
    its tensors and the columns [sum of earlier d_j, + d_i), blocks in order of first appearance."""
    names = [block_name(name) for name, _ in cfg.layout]
    order = list(dict.fromkeys(names))
    sizes = [torch.Size(shape).numel() for _, shape in cfg.layout]
    q, r = divmod(cfg.d, len(order))
    d_of = [q + (i < r) for i in range(len(order))]
    block_rows = {b: [] for b in order}
    offset = 0
    for name, n in zip(names, sizes):
        block_rows[name].extend(range(offset, offset + n))
        offset += n
    P = torch.zeros(cfg.D, cfg.d, dtype=torch.float64)
    col = 0
    for i, b in enumerate(order):
        rows = torch.tensor(block_rows[b])
        P[rows, col : col + d_of[i]] = Partition(cfg.seed + i, len(rows), d_of[i]).dense()
        col += d_of[i]
    return P


def _reference(base, cfg, theta):
    P = _dense_block_P(cfg).float()
    params = dict(base.named_parameters())

    def run(*args):
        flat, new, offset = P @ theta, {}, 0
        for name, shape in cfg.layout:
            n = torch.Size(shape).numel()
            new[name] = params[name] + flat[offset : offset + n].view(shape)
            offset += n
        return torch.func.functional_call(base, new, args)

    return run


CASES = [
    ("bert", tiny_bert, dict(target_modules=["query", "value"]), lambda: (torch.randint(0, 100, (2, 7)),)),
    ("gpt2-bias", tiny_gpt2, dict(target_modules=["c_attn", "c_proj"], partition_bias=True),
     lambda: (torch.randint(0, 100, (2, 5)),)),
    ("llama-all-linear", tiny_llama, dict(target_modules="all-linear"), lambda: (torch.randint(0, 120, (2, 6)),)),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("name,make,kwargs,inputs", CASES, ids=[c[0] for c in CASES])
def test_block_scope_update_and_gradient_equal_the_dense_block_reference(name, make, kwargs, inputs, backend):
    with gpart.kernels.use_backend(backend):
        _check_against_dense(make, kwargs, inputs)


def _check_against_dense(make, kwargs, inputs):
    base = make()
    ref_base = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, gpart.GPartConfig(d=61, seed=5, init_scale=0.3, partition_scope="transformer_block",
                                                   **kwargs))
    cfg = model.peft_config["default"]
    theta = model.base_model.gpart_theta["default"]
    theta_ref = theta.detach().clone().requires_grad_(True)
    x = inputs()
    out, ref = model(*x).logits, _reference(ref_base, cfg, theta_ref)(*x).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(theta.grad, theta_ref.grad, rtol=1e-4, atol=1e-5)


def test_block_scope_is_an_isometry_per_block_and_differs_from_global():
    cfg_kwargs = dict(d=40, seed=3, target_modules=["query", "value"])
    model = get_peft_model(tiny_bert(), gpart.GPartConfig(partition_scope="transformer_block", **cfg_kwargs))
    cfg = model.peft_config["default"]
    P = _dense_block_P(cfg)
    torch.testing.assert_close(P.T @ P, torch.eye(cfg.d, dtype=torch.float64))
    # tiny_bert has 2 blocks: each block's rows use only its own 20 columns
    split = sum(torch.Size(s).numel() for n, s in cfg.layout if ".layer.0." in n)
    assert P[:split, 20:].abs().sum() == 0 and P[split:, :20].abs().sum() == 0
    glob = get_peft_model(tiny_bert(), gpart.GPartConfig(**cfg_kwargs)).peft_config["default"]
    assert glob.layout == cfg.layout and glob.layout_fingerprint != cfg.layout_fingerprint


def test_global_scope_keeps_the_layout_only_fingerprint():
    model = get_peft_model(tiny_bert(), gpart.GPartConfig(d=40, target_modules=["query", "value"]))
    cfg = model.peft_config["default"]
    assert cfg.partition_scope == "global"
    assert cfg.layout_fingerprint == gpart.layout_fingerprint([(n, s) for n, s in cfg.layout])


def test_block_scope_save_load_round_trip_and_the_other_scope_is_refused(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(tiny_bert(), gpart.GPartConfig(d=40, seed=2, init_scale=0.5, partition_scope="transformer_block",
                                                          target_modules=["query", "value"]))
    x = torch.randint(0, 100, (2, 7))
    model.eval()
    want = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["partition_scope"] == "transformer_block"
    loaded = PeftModel.from_pretrained(tiny_bert(), tmp_path).eval()
    torch.testing.assert_close(loaded(x).logits, want)

    saved["partition_scope"] = "global"
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(gpart.LayoutMismatchError, match="partition_scope='global'.*another partition scope"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_global_adapter_loaded_with_a_block_scope_config_is_refused(tmp_path):
    model = get_peft_model(tiny_bert(), gpart.GPartConfig(d=40, target_modules=["query", "value"]))
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert "partition_scope" not in saved  # written only when not global, like adapters saved before the option
    assert PeftModel.from_pretrained(tiny_bert(), tmp_path).peft_config["default"].partition_scope == "global"
    saved["partition_scope"] = "transformer_block"
    (tmp_path / "adapter_config.json").write_text(json.dumps(saved))
    with pytest.raises(gpart.LayoutMismatchError, match="partition_scope='transformer_block'"):
        PeftModel.from_pretrained(tiny_bert(), tmp_path)


def test_plan_splits_d_evenly_in_block_order_and_seeds_each_block():
    layout = [["m.layers.0.q", [4, 5]], ["m.layers.0.v", [4, 5]], ["m.layers.1.q", [4, 5]], ["m.layers.10.q", [3, 2]]]
    p = plan("transformer_block", layout, d=8, seed=7)
    assert [(b.name, b.seed, b.D, b.d, b.theta_offset) for b in p.blocks] == [
        ("m.layers.0", 7, 40, 3, 0), ("m.layers.1", 8, 20, 3, 3), ("m.layers.10", 9, 6, 2, 6)]
    assert p.placements == ((0, 0), (0, 20), (1, 0), (2, 0))
    assert block_name("h.0.attn.block.3.w") == "h.0"
    assert block_name("encoder.layers.2") == "encoder.layers.2"
    assert block_name("model.layers_norm.0.w") is None


def test_layers_pattern_names_the_block_container():
    layout = [["net.stage.0.lin", [4, 4]], ["net.stage.1.lin", [4, 4]]]
    assert [b.name for b in plan("transformer_block", layout, 4, 0, layers_pattern="stage").blocks] == [
        "net.stage.0", "net.stage.1"]
    with pytest.raises(PartitionError, match="no adapted tensor lies in one"):
        plan("transformer_block", layout, 4, 0)


# -- bad input ------------------------------------------------------------------------------------------


def test_unknown_scope_is_refused_naming_the_choices():
    with pytest.raises(ValueError, match=r"partition_scope='block' is not supported; choose one of global, "
                                         r"transformer_block"):
        gpart.GPartConfig(d=10, partition_scope="block")


def test_block_scope_without_numbered_blocks_is_refused():
    with pytest.raises(gpart.PartitionError, match="needs numbered transformer blocks, but no adapted tensor lies in one"):
        get_peft_model(MLP(), gpart.GPartConfig(d=10, partition_scope="transformer_block", target_modules=["lin0"]))


def test_block_scope_with_a_tensor_outside_every_block_is_refused():
    with pytest.raises(gpart.PartitionError, match=r"'classifier.weight' lies in no numbered transformer block"):
        get_peft_model(tiny_bert(), gpart.GPartConfig(d=10, partition_scope="transformer_block",
                                                      target_modules=["query", "classifier"]))


def test_d_smaller_than_the_number_of_blocks_is_refused():
    with pytest.raises(gpart.PartitionError, match=r"d=1 is smaller than the 2 transformer blocks.*choose d >= 2"):
        get_peft_model(tiny_bert(), gpart.GPartConfig(d=1, partition_scope="transformer_block",
                                                      target_modules=["query"]))


def test_a_block_with_more_coordinates_than_weights_is_refused():
    layout = [["m.layers.0.q", [4, 5]], ["m.layers.1.q", [2, 2]]]
    with pytest.raises(PartitionError, match=r"block 'm.layers.1' would get d_i=10 .* holds only 4 adapted "
                                             r"weights; choose d <= 8"):
        plan("transformer_block", layout, d=20, seed=0)


def test_a_failed_block_scope_injection_leaves_the_model_unwrapped():
    base = tiny_bert()
    with pytest.raises(ValueError, match="smaller than the 2 transformer blocks"):
        get_peft_model(base, gpart.GPartConfig(d=1, partition_scope="transformer_block", target_modules=["query"]))
    assert not any(isinstance(m, gpart.GPartLayer) for m in base.modules())


# -- the command line -----------------------------------------------------------------------------------


def test_cli_partition_scope_reaches_the_adapter_and_run_json(text_setup, tmp_path):
    from gpart.cli import main

    out = tmp_path / "block"
    assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"), "--dataset",
                 str(text_setup / "data"), "--d", "32", "--max-steps", "2", "--batch-size", "8", "--quiet",
                 "--partition-scope", "transformer_block", "--output-dir", str(out)]) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["partition_scope"] == "transformer_block"
    assert json.loads((out / "run.json").read_text())["partition_scope"] == "transformer_block"
    assert json.loads((out / "metrics.json").read_text())["run"]["partition_scope"] == "transformer_block"


def test_cli_partition_scope_errors(text_setup, capsys):
    from conftest import run_cli

    info = ["info", "--task", "text-classification", "--model", str(text_setup / "bert")]
    rc, err = run_cli(info + ["--method", "lora", "--partition-scope", "transformer_block"], capsys)
    assert rc == 2 and "--partition-scope choose GPart's projection" in err and "--method lora takes none" in err
    rc, err = run_cli(info + ["--d", "1", "--partition-scope", "transformer_block"], capsys)
    assert rc == 2 and "d=1 is smaller than the 2 transformer blocks" in err
    rc, err = run_cli(info + ["--partition-scope", "layer"], capsys)
    assert rc == 2 and "invalid choice: 'layer'" in err
