"""GPart's learning-rate rule: one base value that transfers across d and across models (D).

    theta's lr = base_lr * (REFERENCE_LENGTH / d) ** EXPONENT        (10,000 and 3/4)

Why a power of 1/d: an Adam step moves every theta entry by about lr, so its first-order gain grows as
lr * d while its second-order cost grows as lr^2 * d^2 (curvature along the step) to lr^2 * d; the measured
optimum fell as d^-0.7 to d^-0.9, with no D in it, and 3/4 lost least over the tasks (docs/lr.md).
`base_lr` is theta's lr at d = 10,000, the one number to tune; weight decay is scaled by the inverse
factor (as muP's MuAdam does), so AdamW's per-step shrink lr * weight_decay does not change with d. The
rule lives on the optimizer side: saved adapters are unaffected.

The first step of every optimizer that trains a theta is checked against the rule (`watch_theta_lr`,
switched on when a GPart adapter is injected): a rate set for another method (TRL's 2e-5, LoRA's 2e-4)
leaves theta almost where it started, and is reported once, with the fix, as a `LearningRateWarning`.
"""
from __future__ import annotations

import warnings
import weakref

import torch.nn as nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from .config import GPartConfig
from .theta import ThetaParameter

REFERENCE_LENGTH = 10_000  # a reference theta length d: base_lr is theta's lr there
EXPONENT = 0.75
RULE = f"lr = base_lr * ({REFERENCE_LENGTH} / d) ** {EXPONENT:g}"  # recorded with every run


class LearningRateRuleError(ValueError):
    """The rule was asked of something it does not apply to (not a GPart adapter)."""


SUPPORTED = "a model with a GPart adapter (PeftModel or GPartModel, after get_peft_model) or a GPartConfig"


def _not_gpart(what: str) -> LearningRateRuleError:
    return LearningRateRuleError(f"GPart's learning-rate rule applies to GPart adapters only; {what}. It needs "
                                 f"{SUPPORTED}; for other methods set their learning rate directly")


def gpart_config(model_or_config, adapter_name: str | None = None) -> GPartConfig:
    """The GPartConfig the rule reads, from a config or a model holding a GPart adapter."""
    if isinstance(model_or_config, GPartConfig):
        return model_or_config
    kind, peft_type = type(model_or_config).__name__, getattr(model_or_config, "peft_type", None)
    if peft_type is not None and not hasattr(model_or_config, "peft_config"):  # another method's config
        raise _not_gpart(f"got a {kind} ({getattr(peft_type, 'value', peft_type)})")
    configs = getattr(model_or_config, "peft_config", None)
    if not isinstance(configs, dict) or not configs:
        raise LearningRateRuleError(f"GPart's learning-rate rule needs {SUPPORTED}; got a {kind} without a PEFT "
                                    "adapter")
    name = adapter_name or getattr(model_or_config, "active_adapter", None)
    if isinstance(name, (list, tuple)):
        name = name[0] if len(name) == 1 else None
    if name not in configs:
        raise LearningRateRuleError(f"adapter {name!r} not found; the model has {', '.join(map(str, configs))}")
    config = configs[name]
    if not isinstance(config, GPartConfig):
        method = getattr(getattr(config, "peft_type", None), "value", type(config).__name__)
        raise _not_gpart(f"adapter {name!r} is {method}")
    return config


def lr_factor(model_or_config, adapter_name: str | None = None) -> float:
    """(REFERENCE_LENGTH / d) ** EXPONENT: theta's learning rate per unit of base learning rate."""
    config = gpart_config(model_or_config, adapter_name)
    return (REFERENCE_LENGTH / config.d) ** EXPONENT


def gpart_lr(model_or_config, base_lr: float, adapter_name: str | None = None) -> float:
    """theta's learning rate under the rule: base_lr * (10,000 / d) ** 0.75."""
    if not base_lr >= 0:
        raise LearningRateRuleError(f"base_lr must be a number >= 0, got {base_lr!r}")
    return base_lr * lr_factor(model_or_config, adapter_name)


def gpart_param_groups(model: nn.Module, base_lr: float, *, weight_decay: float = 0.0,
                       head_lr: float | None = None, head_weight_decay: float | None = None,
                       adapter_name: str | None = None) -> list[dict]:
    """Optimizer parameter groups for a model with a GPart adapter, under the rule.

    theta: lr = base_lr * (10,000/d)^0.75, weight decay = weight_decay * (d/10,000)^0.75 (lr * wd unchanged:
    base_lr * weight_decay).
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


# -- the first-step check -------------------------------------------------------------------------------

# the command line's base values per task span 2.5e-2 (image classification) to 2e-1 (causal LM), 8x;
# a base more than FAR outside that span is far from every task's: theta barely moves (too low) or
# training may collapse (too high)
TASK_BASES = (2.5e-2, 2e-1)
FAR = 4.0
CHOSEN = "gpart_lr_chosen"  # a param group with this key set True chose theta's lr deliberately: not checked


class LearningRateWarning(UserWarning):
    """theta trains at a learning rate far from GPart's rule (filter it like any warning category)."""


def theta_lr_problem(lr: float, d: int) -> str | None:
    """Why `lr` is far from the rule's range for a theta of length d, or None when it is not."""
    factor = (REFERENCE_LENGTH / d) ** EXPONENT
    low, high = TASK_BASES[0] * factor, TASK_BASES[1] * factor
    if lr == 0 or low / FAR <= lr <= high * FAR:  # lr 0 freezes theta on purpose
        return None
    where = f"{low / lr:,.0f}x below" if lr < low else f"{lr / high:,.0f}x above"
    effect = "each Adam step moves theta that much less than the rule's" if lr < low else "training may diverge"
    return (f"GPart's theta (d={d:,}) is trained at lr {lr:.3g}, {where} GPart's learning-rate rule for this d: "
            f"{low:.2g} to {high:.2g} (base {TASK_BASES[0]:g} to {TASK_BASES[1]:g} x (10,000/d)^0.75; the "
            f"causal-LM base is {TASK_BASES[1]:g}), so {effect}. Fix: give theta the rule's lr with "
            "optimizer = torch.optim.AdamW(gpart.gpart_param_groups(model, base_lr)) (Trainer/SFTTrainer: "
            "optimizers=(optimizer, None)), or set learning_rate=gpart.gpart_lr(model, base_lr) when theta is "
            "the only trainable tensor. See docs/lr.md.")


_checked: weakref.WeakSet = weakref.WeakSet()  # optimizers whose first step was seen
_hook = None


def _check_first_step(optimizer, args, kwargs) -> None:
    if optimizer in _checked:
        return
    _checked.add(optimizer)
    for group in optimizer.param_groups:
        if group.get(CHOSEN):
            continue
        lr = float(group.get("initial_lr", group["lr"]))  # a warm-up scheduler lowers "lr" at first
        for param in group["params"]:
            if isinstance(param, ThetaParameter) and param.numel() > 0:
                problem = theta_lr_problem(lr, param.numel())
                if problem is not None:
                    warnings.warn(problem, LearningRateWarning, stacklevel=3)
                    return


def watch_theta_lr() -> None:
    """Check the first step of every optimizer in this process that trains a theta (idempotent)."""
    global _hook
    if _hook is None:
        _hook = register_optimizer_step_pre_hook(_check_first_step)
