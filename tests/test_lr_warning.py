"""The first-step learning-rate check: a theta trained far from GPart's rule is reported once, with the fix.

Plain loops, transformers' Trainer, TRL's SFTTrainer and the command line, on tiny offline models.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import MLP, tiny_bert
from peft import LoraConfig, get_peft_model

import gpart
from gpart.lr import FAR, TASK_BASES, LearningRateWarning, theta_lr_problem


def _lr_warnings(record):
    return [str(w.message) for w in record if issubclass(w.category, LearningRateWarning)]


def _steps(model, optimizer, n=3, scheduler=None):
    """n optimizer steps on random data; returns the LearningRateWarning messages they raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for _ in range(n):
            model(torch.randn(4, 10)).sum().backward()
            optimizer.step()
            optimizer.zero_grad()
            if scheduler is not None:
                scheduler.step()
    return _lr_warnings(record)


def _mlp(d=100):
    return get_peft_model(MLP(), gpart.GPartConfig(d=d, target_modules=["lin0", "lin1"], modules_to_save=["head"]))


def test_the_far_band_is_the_task_bases_widened_by_FAR():
    d = 131_072
    factor = (10_000 / d) ** 0.75
    low, high = TASK_BASES[0] * factor / FAR, TASK_BASES[1] * factor * FAR
    assert theta_lr_problem(low, d) is None and theta_lr_problem(high, d) is None
    assert theta_lr_problem(low * 0.99, d) is not None and theta_lr_problem(high * 1.01, d) is not None
    assert theta_lr_problem(gpart.gpart_lr(gpart.GPartConfig(d=d), 2e-1), d) is None  # the causal-LM default
    assert "diverge" in theta_lr_problem(high * 2, d)
    assert theta_lr_problem(0.0, d) is None  # a frozen theta is deliberate


def test_the_command_lines_defaults_lie_inside_the_band():
    from gpart.recipes import causal_lm, image_classification, text_classification

    bases = {r.defaults["lr"] for r in (causal_lm.RECIPE, image_classification.RECIPE, text_classification.RECIPE)}
    assert min(bases) == TASK_BASES[0] and max(bases) == TASK_BASES[1]


@pytest.mark.parametrize("lr,times", [(2e-5, "39,528x below"), (2e-4, "3,953x below")])
def test_a_plain_loop_at_trls_or_loras_lr_is_told_once_with_the_fix(lr, times):
    model = _mlp()  # d = 100: the rule gives 0.79 (base 2.5e-2) to 6.3 (base 2e-1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    messages = _steps(model, optimizer)
    assert len(messages) == 1
    assert messages[0].startswith(f"GPart's theta (d=100) is trained at lr {lr:g}, {times} GPart's learning-rate "
                                  "rule for this d: 0.79 to 6.3")
    assert "each Adam step moves theta that much less than the rule's" in messages[0]
    assert "gpart.gpart_param_groups(model, base_lr)" in messages[0] and "gpart.gpart_lr(model, base_lr)" in messages[0]


def test_the_rules_lr_and_param_groups_train_silently():
    model = _mlp()
    theta = model.base_model.gpart_theta["default"]
    before = theta.detach().clone()
    optimizer = torch.optim.AdamW(gpart.gpart_param_groups(model, 1e-1, head_lr=1e-3))
    assert _steps(model, optimizer) == []
    single = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=gpart.gpart_lr(model, 2.5e-2))
    assert _steps(model, single) == []
    assert (theta.detach() - before).abs().max() > 0.1  # Adam moves theta by about lr (2.5) per step


def test_a_warm_up_schedule_is_judged_by_its_target_lr():
    model = _mlp()
    optimizer = torch.optim.AdamW(gpart.gpart_param_groups(model, 1e-1))
    warm_up = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: step / 10)  # lr 0 at the first step
    assert _steps(model, optimizer, scheduler=warm_up) == []


def test_optimizers_without_theta_and_opted_out_groups_are_not_checked():
    lora = get_peft_model(MLP(), LoraConfig(r=2, target_modules=["lin0"]))
    assert _steps(lora, torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-6)) == []
    model = _mlp()
    chosen = [{"params": [p for p in model.parameters() if p.requires_grad], "lr": 1e-6, gpart.lr.CHOSEN: True}]
    assert _steps(model, torch.optim.AdamW(chosen)) == []


def test_the_warning_is_a_category_users_can_filter():
    model = _mlp()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=gpart.LearningRateWarning)
        model(torch.randn(4, 10)).sum().backward()
        optimizer.step()
    assert _lr_warnings(record) == [] and issubclass(gpart.LearningRateWarning, UserWarning)


# -- transformers' Trainer and TRL's SFTTrainer ---------------------------------------------------------


def _classification_rows(n=16):
    datasets = pytest.importorskip("datasets")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 100, (n, 8), generator=g)
    return datasets.Dataset.from_dict({"input_ids": ids.tolist(), "labels": (ids[:, 0] % 2).tolist()})


def _trainer_run(tmp_path, **args):
    from transformers import Trainer, TrainingArguments

    model = get_peft_model(tiny_bert(), gpart.GPartConfig(d=1024, target_modules=["query", "value"],
                                                          modules_to_save=["classifier"]))
    theta = model.base_model.gpart_theta["default"]
    before = theta.detach().clone()
    optimizers = (torch.optim.AdamW(gpart.gpart_param_groups(model, 1e-1)), None) if args.pop("groups", False) \
        else (None, None)
    training_args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=8,
                                      report_to="none", save_strategy="no", use_cpu=True, seed=0, **args)
    trainer = Trainer(model=model, args=training_args, train_dataset=_classification_rows(), optimizers=optimizers)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.train()
    return _lr_warnings(record), (theta.detach() - before).abs().max().item()


def test_trainer_at_its_default_lr_is_told_at_the_first_step(tmp_path):
    messages, moved = _trainer_run(tmp_path)  # Trainer's default learning_rate: 5e-5
    assert len(messages) == 1 and "trained at lr 5e-05" in messages[0]
    assert moved < 1e-3  # why: three steps at 5e-5 leave theta where it was


@pytest.mark.parametrize("how", ["param groups", "learning_rate=gpart_lr", "warm-up"])
def test_trainer_with_the_rules_lr_trains_silently(tmp_path, how):
    args = {"param groups": dict(groups=True), "learning_rate=gpart_lr": dict(learning_rate=0.2),
            "warm-up": dict(learning_rate=0.2, warmup_steps=2)}[how]
    assert gpart.gpart_lr(gpart.GPartConfig(d=1024), 1e-1) == pytest.approx(0.55, abs=0.01)  # 0.2 is in the band
    messages, moved = _trainer_run(tmp_path, **args)
    assert messages == [] and moved > 0.1


def test_trls_sfttrainer_at_its_default_lr_is_told_and_at_the_rules_trains(tmp_path):
    trl = pytest.importorskip("trl")
    from conftest import bnb_llama, chatml_word_tokenizer, qa_conversations

    found = {}
    for name, lr in (("default", None), ("rule", gpart.gpart_lr(gpart.GPartConfig(d=512), 2e-1))):
        config = trl.SFTConfig(output_dir=str(tmp_path / name), max_steps=2, per_device_train_batch_size=4,
                               report_to="none", save_strategy="no", max_length=32, use_cpu=True, seed=0,
                               **({} if lr is None else {"learning_rate": lr}))
        trainer = trl.SFTTrainer(model=bnb_llama(), args=config, train_dataset=qa_conversations(),
                                 processing_class=chatml_word_tokenizer(),
                                 peft_config=gpart.GPartConfig(d=512, target_modules=["q_proj", "v_proj"]))
        theta = trainer.model.base_model.gpart_theta["default"]
        before = theta.detach().clone()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            trainer.train()
        found[name] = (_lr_warnings(record), (theta.detach() - before).abs().max().item())
    (told, moved_default), (silent, moved_rule) = found["default"], found["rule"]
    assert len(told) == 1 and "trained at lr 2e-05" in told[0] and silent == []
    assert moved_rule > 100 * moved_default


def test_the_command_line_is_not_told_even_with_an_explicit_lr(text_setup, tmp_path):
    from gpart.cli import main

    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        # --lr 1e-4 at d = 64 is far below the rule (0.55 to 4.4): the user asked for it, and report.md says so
        assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
                     "--dataset", str(text_setup / "data"), "--d", "64", "--max-steps", "2", "--batch-size", "8",
                     "--lr", "1e-4", "--output-dir", str(tmp_path / "run"), "--quiet"]) == 0
    assert _lr_warnings(record) == []
