"""GPart's learning-rate rule (gpart.lr: theta lr = base * (10,000/d)^0.75, weight decay / the same factor), its
use as the CLI's default, and the CLI's projection choices (--projection, --column-gain-ratio)."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import run_cli

import gpart
from gpart.cli import main
from gpart.lr import LearningRateRuleError, gpart_lr, gpart_param_groups, lr_factor

pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")


def _bert(**peft):
    from peft import get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=64))
    if not peft:
        return base
    return get_peft_model(base, peft.pop("config"))


def _gpart(d=64, targets=("query", "value")):
    return _bert(config=gpart.GPartConfig(d=d, target_modules=list(targets), modules_to_save=["classifier"]))


# ------------------------------------------------------------------------------------ the rule
@pytest.mark.parametrize("d,targets,D", [(64, ("query", "value"), 4096), (16, ("query",), 2048),
                                         (1024, ("query", "key", "value", "dense"), 2 * (4 * 1024 + 2 * 2048) + 1024)])
def test_rule_values_for_known_D_and_d(d, targets, D):
    model = _gpart(d, targets)
    assert model.peft_config["default"].D == D
    assert lr_factor(model) == pytest.approx((10_000 / d) ** 0.75)  # D does not enter
    assert gpart_lr(model, 1e-3) == pytest.approx(1e-3 * (10_000 / d) ** 0.75)
    # the tuner model, the injected config and a fresh config give the same
    assert gpart_lr(model.base_model, 2e-3) == gpart_lr(model.peft_config["default"], 2e-3) == gpart_lr(
        gpart.GPartConfig(d=d), 2e-3) == pytest.approx(2e-3 * (10_000 / d) ** 0.75)
    assert lr_factor(gpart.GPartConfig(d=625)) == pytest.approx(8.0)  # (10,000 / 625)^(3/4) = 16^(3/4)
    assert gpart_lr(gpart.GPartConfig(d=10_000), 0.05) == pytest.approx(0.05)  # base = theta's lr at d = 10,000


def test_param_groups_scale_theta_lr_and_weight_decay_and_keep_the_head():
    model = _gpart(625)  # factor (10,000 / 625)^0.75 = 8
    groups = {g["name"]: g for g in gpart_param_groups(model, 1e-3, weight_decay=0.1, head_lr=5e-3)}
    assert set(groups) == {"gpart_theta", "head_decay", "head_plain"}
    theta = groups["gpart_theta"]
    assert theta["lr"] == pytest.approx(8e-3) and theta["weight_decay"] == pytest.approx(0.1 / 8)
    assert theta["lr"] * theta["weight_decay"] == pytest.approx(1e-3 * 0.1)  # lr * wd unchanged
    assert [p.shape for p in theta["params"]] == [torch.Size([625])]
    assert groups["head_decay"]["lr"] == 5e-3 and groups["head_decay"]["weight_decay"] == 0.1
    assert [p.ndim for p in groups["head_decay"]["params"]] == [2]
    assert groups["head_plain"]["weight_decay"] == 0.0 and [p.ndim for p in groups["head_plain"]["params"]] == [1]
    n_trainable = sum(1 for p in model.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in groups.values()) == n_trainable
    # a real optimizer takes them, and Adam's first step moves theta entries by up to theta's lr
    opt = torch.optim.AdamW(list(groups.values()))
    x = torch.randint(0, 40, (4, 6))
    model(input_ids=x, labels=torch.tensor([0, 1, 0, 1])).loss.backward()
    opt.step()
    step = theta["params"][0].detach().abs()
    assert step.max().item() == pytest.approx(8e-3, rel=1e-3)
    assert step.median().item() == pytest.approx(8e-3, rel=0.05)
    # defaults: the head at the base lr and the same weight decay
    plain = {g["name"]: g for g in gpart_param_groups(model, 1e-3)}
    assert plain["head_decay"]["lr"] == 1e-3 and plain["gpart_theta"]["weight_decay"] == 0.0


def test_rule_asked_of_other_methods_or_models_is_a_clear_error():
    from peft import LoraConfig

    lora = _bert(config=LoraConfig(r=2, target_modules=["query"]))
    with pytest.raises(LearningRateRuleError, match="GPart adapters only; adapter 'default' is LORA"):
        gpart_lr(lora, 1e-3)
    with pytest.raises(LearningRateRuleError, match="without a PEFT adapter"):
        gpart_param_groups(_bert(), 1e-3)
    with pytest.raises(LearningRateRuleError, match="GPart adapters only"):
        lr_factor(lora.peft_config["default"])
    with pytest.raises(LearningRateRuleError, match="base_lr must be a number >= 0"):
        gpart_lr(_gpart(), -1.0)


# ------------------------------------------------------------------------------------ the CLI
def _train(setup, out, *extra):
    return main(["train", "--task", "text-classification", "--model", str(setup / "bert"),
                 "--dataset", str(setup / "data"), "--d", "64", "--max-steps", "1", "--eval-steps", "1",
                 "--batch-size", "8", "--output-dir", str(out), "--quiet", *extra])


def _optimizer_groups(out) -> dict:
    """{group name: (its initial lr, weight decay, number of tensors)} of the optimizer a run trained with."""
    state = torch.load(next((out / "checkpoints").glob("checkpoint-*/optimizer.pt")), weights_only=False)
    return {g["name"]: (g["initial_lr"], g["weight_decay"], len(g["params"])) for g in state["param_groups"]}


def test_cli_default_lr_is_the_rule_and_lr_overrides(text_setup, tmp_path):
    from gpart.recipes.text_classification import TextClassification

    base, wd, head_lr = (TextClassification.defaults[k] for k in ("lr", "weight_decay", "head_lr"))
    factor = (10_000 / 64) ** 0.75  # d = 64
    assert _train(text_setup, tmp_path / "rule") == 0
    # theta (one tensor) under the rule; the classifier's matrix and bias at the head's lr
    assert _optimizer_groups(tmp_path / "rule") == {
        "gpart_theta": (base * factor, wd / factor, 1), "head_decay": (head_lr, wd, 1), "head_plain": (head_lr, 0.0, 1)}
    run = json.loads((tmp_path / "rule" / "metrics.json").read_text())["run"]
    rule = run["lr_rule"]
    assert run["lr"] == base * factor and rule["source"] == "rule" and rule["base_lr"] == base
    assert (rule["D"], rule["d"]) == (4096, 64) and rule["weight_decay"] == wd / factor
    assert "GPart's rule: base" in (tmp_path / "rule" / "report.md").read_text()

    assert _train(text_setup, tmp_path / "base", "--base-lr", "0.0008", "--head-lr", "0.002") == 0
    assert _optimizer_groups(tmp_path / "base") == {
        "gpart_theta": (0.0008 * factor, wd / factor, 1), "head_decay": (0.002, wd, 1), "head_plain": (0.002, 0.0, 1)}
    assert json.loads((tmp_path / "base" / "metrics.json").read_text())["run"]["lr_rule"]["base_lr"] == 0.0008

    # an explicit --lr is theta's own, with --weight-decay undivided
    assert _train(text_setup, tmp_path / "lr", "--lr", "0.03", "--weight-decay", "0.2") == 0
    groups = _optimizer_groups(tmp_path / "lr")
    assert groups["gpart_theta"] == (pytest.approx(0.03, rel=1e-15), pytest.approx(0.2, rel=1e-15), 1)
    assert groups["head_decay"] == (head_lr, 0.2, 1)
    run = json.loads((tmp_path / "lr" / "metrics.json").read_text())["run"]
    assert run["lr"] == 0.03 and run["lr_rule"] == {"lr": 0.03, "weight_decay": 0.2, "source": "--lr"}


def test_cli_rule_options_errors(text_setup, tmp_path, capsys):
    rc, err = run_cli(["train", "--task", "text-classification", "--method", "lora", "--base-lr", "1e-3",
                    "--output-dir", str(tmp_path / "x")], capsys)
    assert rc == 2 and "--base-lr is GPart's learning-rate rule" in err and "--method lora" in err
    rc, err = run_cli(["train", "--task", "text-classification", "--lr", "1e-3", "--base-lr", "1e-3",
                    "--output-dir", str(tmp_path / "x")], capsys)
    assert rc == 2 and "not allowed with argument" in err


def test_cli_projection_choices_reach_the_adapter(text_setup, tmp_path):
    assert _train(text_setup, tmp_path / "ff", "--projection", "fastfood") == 0
    saved = json.loads((tmp_path / "ff" / "adapter" / "adapter_config.json").read_text())
    assert saved["projection"] == "fastfood" and saved["column_gain_ratio"] == 1.0
    assert json.loads((tmp_path / "ff" / "metrics.json").read_text())["run"]["projection"] == "fastfood"
    assert _train(text_setup, tmp_path / "gain", "--column-gain-ratio", "4", "--lr", "0.01") == 0
    saved = json.loads((tmp_path / "gain" / "adapter" / "adapter_config.json").read_text())
    assert saved["projection"] == "partition" and saved["column_gain_ratio"] == 4.0
    assert "projection" not in json.loads((tmp_path / "gain" / "metrics.json").read_text())["run"]


def test_cli_projection_choice_errors(text_setup, capsys):
    info = ["info", "--task", "text-classification", "--model", str(text_setup / "bert"), "--d", "64"]
    rc, err = run_cli(info + ["--method", "lora", "--projection", "fastfood"], capsys)
    assert rc == 2 and "--projection choose GPart's projection" in err and "--method lora takes none" in err
    rc, err = run_cli(info + ["--method", "unilora", "--column-gain-ratio", "4"], capsys)
    assert rc == 2 and "--column-gain-ratio" in err and "--method gpart only" in err
    rc, err = run_cli(info + ["--projection", "dense"], capsys)
    assert rc == 2 and "projection='dense' is not supported; choose one of partition, fastfood" in err
    rc, err = run_cli(info + ["--column-gain-ratio", "0.5"], capsys)
    assert rc == 2 and "expected a number >= 1" in err
    rc, err = run_cli(info + ["--projection", "fastfood", "--column-gain-ratio", "4"], capsys)
    assert rc == 2 and "applies to projection='partition' only" in err
    assert main(info + ["--projection", "fastfood", "--json"]) == 0


def test_cli_sgd_optimizer_for_the_ablations(text_setup, tmp_path, capsys):
    # the isometry ablation's SGD arm: theta and the head under torch SGD with momentum 0.9, at the given lr
    assert _train(text_setup, tmp_path / "sgd", "--optimizer", "sgd", "--lr", "0.5", "--head-lr", "0.1") == 0
    run = json.loads((tmp_path / "sgd" / "metrics.json").read_text())["run"]
    assert run["optimizer"] == "sgd" and run["lr"] == 0.5
    state = torch.load(next((tmp_path / "sgd" / "checkpoints").glob("checkpoint-*/optimizer.pt")), weights_only=False)
    groups = {g["name"]: g for g in state["param_groups"]}
    assert groups["gpart_theta"]["momentum"] == 0.9 and groups["gpart_theta"]["initial_lr"] == pytest.approx(0.5, rel=1e-15)
    assert groups["head_decay"]["initial_lr"] == 0.1
    assert all("momentum_buffer" in s and "exp_avg" not in s for s in state["state"].values())
    # AdamW runs record no optimizer key (run.json stays as before)
    assert _train(text_setup, tmp_path / "adam", "--lr", "0.01") == 0
    assert "optimizer" not in json.loads((tmp_path / "adam" / "metrics.json").read_text())["run"]
    # a run does not resume under the other optimizer (its state would not load)
    rc, err = run_cli(["train", "--task", "text-classification", "--model", str(text_setup / "bert"), "--dataset",
                    str(text_setup / "data"), "--d", "64", "--max-steps", "2", "--optimizer", "sgd", "--lr", "0.5",
                    "--output-dir", str(tmp_path / "adam"), "--resume", "--quiet"], capsys)
    assert rc == 2 and "holds a different run" in err and "optimizer: run has None, now 'sgd'" in err
    rc, err = run_cli(["train", "--task", "text-classification", "--optimizer", "sgd", "--output-dir", str(tmp_path / "x")], capsys)
    assert rc == 2 and "--optimizer sgd needs --lr" in err and "tuned for AdamW" in err
