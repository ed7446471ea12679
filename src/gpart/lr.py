"""GPart's learning-rate rule: one base value that transfers across d and D.

With an isometric map (||Delta W||_F = ||theta||) and Adam, every theta entry moves by about the
learning rate per step, and each of the D adapted weights receives one entry scaled by sqrt(d/D)
(its group's 1/sqrt(n_g)). So a theta learning rate `lr` moves each weight by about lr * sqrt(d/D)
per step: the same lr is a 4x larger weight step at 16x the d, and a smaller one on a larger model.
The rule holds that per-weight step fixed:

    theta's lr = base_lr * sqrt(D / d)

`base_lr` is the per-weight step (a full-fine-tuning-like learning rate), the one number to tune; it
was measured to transfer across d from D/600 to D/5 and across a 12x change of D (docs/lr.md).
Weight decay is scaled by the inverse factor (as muP's MuAdam does), so lr * weight_decay, the
per-step shrink of Delta W under AdamW, does not change either.

The rule lives on the optimizer side: the map itself is unchanged, so saved adapters are unaffected.
"""
from __future__ import annotations

import math

import torch.nn as nn

from .config import PEFT_TYPE, GPartConfig

RULE = "per-weight step: lr = base_lr * sqrt(D / d)"


class LearningRateRuleError(ValueError):
    """The rule was asked of something it does not apply to (not a GPart adapter, or D unknown)."""


def _supported() -> str:
    return ("a model with a GPart adapter (PeftModel or GPartModel, after get_peft_model) or the "
            "GPartConfig of an injected or saved adapter (its D is set)")


def gpart_config(model_or_config, adapter_name: str | None = None) -> GPartConfig:
    """The GPartConfig the rule reads, from a config or a model holding a GPart adapter."""
    if isinstance(model_or_config, GPartConfig):
        config = model_or_config
    else:
        configs = getattr(model_or_config, "peft_config", None)
        if not isinstance(configs, dict) or not configs:
            raise LearningRateRuleError(
                f"GPart's learning-rate rule needs {_supported()}; got a {type(model_or_config).__name__} "
                "without a PEFT adapter")
        name = adapter_name or getattr(model_or_config, "active_adapter", None)
        if isinstance(name, (list, tuple)):
            name = name[0] if len(name) == 1 else None
        if name not in configs:
            raise LearningRateRuleError(f"adapter {name!r} not found; the model has {', '.join(map(str, configs))}")
        config = configs[name]
        if not isinstance(config, GPartConfig):
            kind = getattr(getattr(config, "peft_type", None), "value", type(config).__name__)
            raise LearningRateRuleError(
                f"GPart's learning-rate rule applies to GPart adapters only; adapter {name!r} is {kind}. "
                f"It needs {_supported()}; for other methods set their learning rate directly")
    if str(getattr(config.peft_type, "value", config.peft_type)) != PEFT_TYPE:
        raise LearningRateRuleError(f"GPart's learning-rate rule needs {_supported()}")
    if not config.D:
        raise LearningRateRuleError(
            "this GPartConfig has no D yet (the number of adapted weights is known once the adapter is "
            "injected): pass the model returned by get_peft_model, or its peft_config")
    return config


def lr_factor(model_or_config, adapter_name: str | None = None) -> float:
    """sqrt(D / d): theta's learning rate per unit of base learning rate."""
    config = gpart_config(model_or_config, adapter_name)
    return math.sqrt(config.D / config.d)


def gpart_lr(model_or_config, base_lr: float, adapter_name: str | None = None) -> float:
    """theta's learning rate under the rule: base_lr * sqrt(D / d)."""
    if not base_lr >= 0:
        raise LearningRateRuleError(f"base_lr must be a number >= 0, got {base_lr!r}")
    return base_lr * lr_factor(model_or_config, adapter_name)


def gpart_param_groups(model: nn.Module, base_lr: float, *, weight_decay: float = 0.0,
                       head_lr: float | None = None, head_weight_decay: float | None = None,
                       adapter_name: str | None = None) -> list[dict]:
    """Optimizer parameter groups for a model with a GPart adapter, under the rule.

    theta: lr = base_lr * sqrt(D/d), weight decay = weight_decay / sqrt(D/d) (lr * wd unchanged).
    Every other trainable parameter (a task head or other modules_to_save) at `head_lr` (default:
    base_lr), decayed by `head_weight_decay` (default: weight_decay) when it is a matrix, not when it
    is a bias or a norm. Pass the result to any torch optimizer, e.g. torch.optim.AdamW(groups), and to
    transformers' Trainer as optimizers=(optimizer, None).
    """
    factor = lr_factor(model, adapter_name)
    head_lr = base_lr if head_lr is None else head_lr
    head_wd = weight_decay if head_weight_decay is None else head_weight_decay
    theta, head_decay, head_plain = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "gpart_theta" in name:
            theta.append(param)
        else:
            (head_decay if param.ndim >= 2 else head_plain).append(param)
    if not theta:
        raise LearningRateRuleError("the model has no trainable GPart theta (is the adapter active and not in "
                                    "inference mode?)")
    groups = [{"params": theta, "lr": base_lr * factor, "weight_decay": weight_decay / factor, "name": "gpart_theta"},
              {"params": head_decay, "lr": head_lr, "weight_decay": head_wd, "name": "head_decay"},
              {"params": head_plain, "lr": head_lr, "weight_decay": 0.0, "name": "head_plain"}]
    return [g for g in groups if g["params"]]  # torch rejects empty groups
