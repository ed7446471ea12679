"""grouping="signed_magnitude" (experimental): groups by the sign and magnitude of W0, exact against its dense
matrix, P^T P = I, and an adapter refused on other base weights."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import MLP, tiny_bert
from peft import PeftModel, get_peft_model

import gpart
from gpart.grouping import SignedMagnitudeGroups


def test_groups_split_by_sign_then_equal_count_magnitude_bins():
    w = torch.tensor([0.5, -0.1, 0.2, -0.4, 0.1, -0.3, 0.4, 0.0, -0.2, 0.3])  # 6 non-negative, 4 negative
    groups = SignedMagnitudeGroups([w[:4], w[4:].view(2, 3)], d=5)
    # 5 * 6/10 = 3 bins of 2 for the non-negative pool by |W0| (0.0 0.1 | 0.2 0.3 | 0.4 0.5), 2 bins of 2 for the negative
    assert groups.ids.tolist() == [2, 3, 1, 4, 0, 4, 2, 0, 3, 1]
    assert groups.scales().tolist() == pytest.approx([2 ** -0.5] * 5)
    P = groups.dense()
    torch.testing.assert_close(P.T @ P, torch.eye(5, dtype=torch.float64))


def test_unequal_pools_get_bins_in_proportion_and_every_group_is_used():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0)) + 0.5  # mostly positive
    groups = SignedMagnitudeGroups([w], d=40)
    n_pos = int((w >= 0).sum())
    d_pos = round(40 * n_pos / 1000)
    assert set(groups.ids[w >= 0].tolist()) == set(range(d_pos))
    assert set(groups.ids[w < 0].tolist()) == set(range(d_pos, 40))
    # within a pool, a larger |W0| never gets a lower bin
    pos = (w >= 0).nonzero().squeeze(1)
    order = w[pos].argsort()
    assert torch.all(groups.ids[pos[order]].diff() >= 0)


def test_signed_magnitude_update_and_gradient_equal_the_dense_reference():
    base = tiny_bert()
    ref_base = copy.deepcopy(base).requires_grad_(False)
    model = get_peft_model(base, gpart.GPartConfig(d=60, init_scale=0.3, grouping="signed_magnitude",
                                                   target_modules=["query", "value"]))
    cfg = model.peft_config["default"]
    params = dict(ref_base.named_parameters())
    P = SignedMagnitudeGroups([params[n] for n, _ in cfg.layout], cfg.d).dense().float()
    theta = model.base_model.gpart_theta["default"]
    theta_ref = theta.detach().clone().requires_grad_(True)

    def run(x):
        flat, new, offset = P @ theta_ref, {}, 0
        for name, shape in cfg.layout:
            n = torch.Size(shape).numel()
            new[name] = params[name] + flat[offset : offset + n].view(shape)
            offset += n
        return torch.func.functional_call(ref_base, new, (x,)).logits

    x = torch.randint(0, 100, (2, 7))
    out, ref = model(x).logits, run(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (ref * w).sum().backward()
    torch.testing.assert_close(theta.grad, theta_ref.grad, rtol=1e-4, atol=1e-5)


def test_signed_magnitude_round_trip_and_other_base_weights_are_refused(tmp_path):
    model = get_peft_model(tiny_bert(seed=0), gpart.GPartConfig(d=60, init_scale=0.3, grouping="signed_magnitude",
                                                                target_modules=["query", "value"])).eval()
    x = torch.randint(0, 100, (2, 7))
    want = model(x).logits
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["grouping"] == "signed_magnitude" and len(saved["grouping_fingerprint"]) == 64
    torch.testing.assert_close(PeftModel.from_pretrained(tiny_bert(seed=0), tmp_path).eval()(x).logits, want)
    with pytest.raises(gpart.LayoutMismatchError, match="groups were computed from other base weights"):
        PeftModel.from_pretrained(tiny_bert(seed=1), tmp_path)


def test_default_options_are_not_written_so_earlier_gpart_can_load_the_adapter(tmp_path):
    get_peft_model(tiny_bert(), gpart.GPartConfig(d=40, target_modules=["query"])).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert not {"partition_scope", "grouping", "grouping_fingerprint"} & set(saved)


def test_unknown_grouping_and_unsupported_combinations_are_refused():
    with pytest.raises(ValueError, match=r"grouping='magnitude' is not supported; choose one of random, signed_magnitude"):
        gpart.GPartConfig(d=10, grouping="magnitude")
    with pytest.raises(ValueError, match=r"grouping='signed_magnitude' applies to the global isometric partition only"):
        gpart.GPartConfig(d=10, grouping="signed_magnitude", partition_scope="transformer_block")
    with pytest.raises(ValueError, match=r"applies to the global isometric partition only"):
        gpart.GPartConfig(d=10, grouping="signed_magnitude", projection="fastfood")


def test_signed_magnitude_needs_the_base_weights_values():
    with torch.device("meta"):
        base = MLP()
    with pytest.raises(ValueError, match="computes its groups from the base weights' values.*meta"):
        get_peft_model(base, gpart.GPartConfig(d=10, grouping="signed_magnitude", target_modules=["lin0"]))


def test_cli_grouping_reaches_the_adapter_and_run_json(text_setup, tmp_path):
    from gpart.cli import main

    out = tmp_path / "signed"
    assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"), "--dataset",
                 str(text_setup / "data"), "--d", "32", "--max-steps", "2", "--batch-size", "8", "--quiet",
                 "--grouping", "signed_magnitude", "--output-dir", str(out)]) == 0
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert saved["grouping"] == "signed_magnitude" and len(saved["grouping_fingerprint"]) == 64
    assert json.loads((out / "run.json").read_text())["grouping"] == "signed_magnitude"
