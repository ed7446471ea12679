"""The fine-tuning methods the CLI offers, each turned into a model with the right trainable set.

gpart | lora | vera | unilora wrap the model with PEFT (the adapter is what gets saved);
full trains every weight; head-only trains just the task head (a linear probe on the backbone).
"""
from __future__ import annotations

import torch.nn as nn

PEFT_METHODS = ("gpart", "lora", "vera", "unilora")
METHODS = PEFT_METHODS + ("full", "head-only")

# Named target sets by naming family, for the benchmarks and studies (the CLI's default is
# models.DEFAULT_TARGETS). "all" is every linear layer of a transformer block (attention and MLP): the task
# head and BERT's pooler are left out, as PEFT's all-linear leaves out the output layer. Names are
# suffixes, matched the way PEFT matches target_modules.
TARGET_SETS = {
    "encoder": {  # BERT / RoBERTa
        "qv": ("query", "value"),
        "all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"),
    },
    "decoder": {  # Llama
        "qv": ("q_proj", "v_proj"),
        "attn": ("q_proj", "k_proj", "v_proj", "o_proj"),
        "all": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    },
}

# Ranks when --r is not given: LoRA r=8 (alpha=r, as the GPart repo's baseline), VeRA r=256 (PEFT's
# default), Uni-LoRA r=4 (its paper's GLUE setting; theta length is --d, as GPart's).
DEFAULT_RANK = {"lora": 8, "vera": 256, "unilora": 4}

# Learning rate for the non-head parameters when --lr is not given. GPart's comes from the task's base
# learning rate through the rule (gpart.lr: theta's lr = base * (10,000 / d)^0.75: resolve_gpart_lr);
# the others are the usual values for each method.
DEFAULT_LR = {"lora": 5e-4, "vera": 1e-2, "unilora": 5e-3, "full": 2e-5, "head-only": 0.0}


class MethodError(ValueError):
    """A method cannot be applied as asked (e.g. d > D, head-only without a head)."""


def default_lr(method: str, task_defaults: dict) -> float | None:
    """The default of --lr; None for GPart, whose theta lr comes from the rule (resolve_gpart_lr)."""
    if method == "gpart":
        return None
    if method == "lora" and task_defaults.get("lora_lr"):
        return task_defaults["lora_lr"]
    return DEFAULT_LR[method]


GPART_FLAGS = {"projection": "--projection", "column_gain_ratio": "--column-gain-ratio",
               "partition_scope": "--partition-scope", "grouping": "--grouping"}


def check_gpart_options(method: str, **choices) -> None:
    """The projection choices (the isometry ablations, the partition scope) are GPart's: a clear error for any
    other method. `choices`: GPART_FLAGS' keys, None when not given."""
    given = [GPART_FLAGS[key] for key, value in choices.items() if value is not None]
    if given and method != "gpart":
        raise MethodError(f"{' and '.join(given)} choose GPart's projection and apply to --method gpart only; "
                          f"--method {method} takes none (drop {' and '.join(given)}, or use --method gpart)")


def resolve_gpart_lr(model: nn.Module, *, lr: float | None, base_lr: float | None,
                     weight_decay: float) -> dict:
    """theta's learning rate and weight decay, and how they were derived (recorded in metrics.json).

    An explicit lr is used as given, with weight_decay as given. Otherwise GPart's rule (gpart.lr): lr = base_lr * (10,000/d)^0.75, weight decay divided by the same factor.
    """
    if lr is not None:
        return {"lr": lr, "weight_decay": weight_decay, "source": "--lr"}
    from gpart.lr import RULE, gpart_config, lr_factor

    factor = lr_factor(model)
    config = gpart_config(model)
    return {"lr": base_lr * factor, "weight_decay": weight_decay / factor, "source": "rule", "rule": RULE,
            "base_lr": base_lr, "D": config.D, "d": config.d, "factor": factor}


def build_peft_config(method: str, *, d: int, targets: list[str], seed: int, dropout: float,
                      head: list[str], task_type: str | None, r: int | None = None,
                      **gpart_choices):
    """The PEFT config for one of PEFT_METHODS; heads in `head` are trained fully and saved too.

    gpart_choices (GPART_FLAGS' keys: projection, column_gain_ratio, partition_scope, grouping): GPart's map from
    theta to the weights (None: GPartConfig's defaults, the isometric global partition); other methods
    reject them.
    """
    check_gpart_options(method, **gpart_choices)
    common = dict(target_modules=list(targets), modules_to_save=list(head) or None, task_type=task_type)
    if method == "gpart":
        import gpart

        choice = {k: v for k, v in gpart_choices.items() if v is not None}
        return gpart.GPartConfig(d=d, seed=seed, dropout=dropout, **choice, **common)
    from peft import LoraConfig, UniLoraConfig, VeraConfig

    rank = r or DEFAULT_RANK[method]
    if method == "lora":
        return LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout, **common)
    if method == "vera":
        return VeraConfig(r=rank, projection_prng_key=seed, vera_dropout=dropout, **common)
    if method == "unilora":
        return UniLoraConfig(r=rank, theta_d_length=d, proj_seed=seed, unilora_dropout=dropout, **common)
    raise ValueError(f"unknown PEFT method {method!r}; choose from {', '.join(PEFT_METHODS)}")


def projection_options(args) -> dict:
    """GPart's projection flags of a parsed command line (absent or None: the default map)."""
    return {key: getattr(args, key, None) for key in GPART_FLAGS}


def apply_method(model: nn.Module, method: str, *, head: list[str], **peft_kwargs) -> nn.Module:
    """Return the model ready to train with `method`; raises ValueError for impossible combinations."""
    if method not in METHODS:
        raise MethodError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")
    check_gpart_options(method, **{key: peft_kwargs.get(key) for key in GPART_FLAGS})
    if method == "head-only" and not head:
        raise MethodError("head-only needs a fresh task head (a classifier); this task has none")
    if method in PEFT_METHODS:
        from peft import get_peft_model

        try:
            return get_peft_model(model, build_peft_config(method, head=head, **peft_kwargs))
        except ValueError as e:  # PEFT/GPart config validation, e.g. d larger than D: bad input, not a bug
            raise MethodError(f"{method}: {e}") from e
    for name, param in model.named_parameters():
        param.requires_grad = method == "full" or is_head_param(name, head)
    return model


def is_head_param(name: str, head: list[str]) -> bool:
    # PEFT names the trained head copy ...classifier.modules_to_save.default.weight; a bare model
    # names it classifier.weight: a head is any parameter with the head's name as a path component.
    return any(part in head for part in name.split("."))


def param_groups(model: nn.Module, *, lr: float, head_lr: float, weight_decay: float,
                 head: list[str], gpart_lr: dict | None = None) -> list[dict]:
    """Optimizer groups: non-head trainables at `lr`, the head at `head_lr`.

    gpart_lr: for a GPart model, resolve_gpart_lr's choice; the groups are then the library's own
    (gpart.gpart_param_groups). Otherwise weight decay follows the reference GPart code: adapter
    parameters (LoRA factors, ...) are always decayed; head and full-model parameters only when they are
    matrices (not biases or norms). Empty groups are dropped (torch rejects them).
    """
    from gpart.lr import CHOSEN

    # the command line sets theta's lr by the rule or by an explicit --lr, and reports it: no first-step check
    if gpart_lr is not None:
        return [{**group, CHOSEN: True}
                for group in _gpart_param_groups(model, gpart_lr, head_lr=head_lr, weight_decay=weight_decay)]
    groups = {key: [] for key in ("body_decay", "body_plain", "head_decay", "head_plain")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        is_head = is_head_param(name, head)
        decay = (not is_head and _is_adapter_param(name)) or param.ndim >= 2
        groups[("head" if is_head else "body") + ("_decay" if decay else "_plain")].append(param)
    spec = {
        "body_decay": (lr, weight_decay), "body_plain": (lr, 0.0),
        "head_decay": (head_lr, weight_decay), "head_plain": (head_lr, 0.0),
    }
    return [
        {"params": params, "lr": spec[key][0], "weight_decay": spec[key][1], "name": key, CHOSEN: True}
        for key, params in groups.items() if params
    ]


def _gpart_param_groups(model: nn.Module, choice: dict, *, head_lr: float, weight_decay: float) -> list[dict]:
    """gpart.gpart_param_groups giving theta the lr and weight decay of `choice` (resolve_gpart_lr)."""
    from gpart.lr import gpart_param_groups, lr_factor

    if choice["source"] == "rule":
        base_lr, base_wd = choice["base_lr"], weight_decay
    else:  # theta's own lr and decay were given: the base values the rule maps to them
        factor = lr_factor(model)
        base_lr, base_wd = choice["lr"] / factor, choice["weight_decay"] * factor
    return gpart_param_groups(model, base_lr, weight_decay=base_wd, head_lr=head_lr, head_weight_decay=weight_decay)


def _is_adapter_param(name: str) -> bool:
    return any(tag in name for tag in ("gpart_", "lora_", "vera_", "unilora_"))


def count_params(model: nn.Module, head: list[str]) -> dict[str, int]:
    total = trainable = head_n = 0
    seen = set()
    for name, param in model.named_parameters():
        if id(param) in seen:  # tied weights count once
            continue
        seen.add(id(param))
        n = weight_count(param)
        total += n
        if param.requires_grad:
            trainable += n
            if is_head_param(name, head):
                head_n += n
    return {"total": total, "trainable": trainable, "adapter": trainable - head_n, "head": head_n}


def adapted_size(model: nn.Module, targets: list[str]) -> int:
    """D: total number of weight entries in the targeted modules (what GPart partitions)."""
    total = 0
    for full, module in model.named_modules():
        if full.rsplit(".", 1)[-1] in targets and isinstance(getattr(module, "weight", None), nn.Parameter):
            if any(part in ("modules_to_save", "original_module") for part in full.split(".")):
                continue
            total += weight_count(module.weight)
    return total


def weight_count(param: nn.Parameter) -> int:
    """Entries of a parameter as the model defines it: a bitsandbytes 4-bit weight stores two per byte
    in a flat buffer, and its quant_state keeps the original shape."""
    quant_state = getattr(param, "quant_state", None)
    return quant_state.shape.numel() if quant_state is not None else param.numel()
