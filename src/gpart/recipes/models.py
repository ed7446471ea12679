"""Finding models offline, and the module names the methods need (targets and the task head)."""
from __future__ import annotations

import os
from pathlib import Path

import torch.nn as nn

# Never reach a model hub: a name is either a local directory or a built-in asset.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# Attention projections to adapt by default, per naming family (first family present wins).
DEFAULT_TARGETS = {
    "attention-qv": (["query", "value"], ["q_proj", "v_proj"], ["q_lin", "v_lin"], ["c_attn"]),
    "attention-qkvo": (["q_proj", "k_proj", "v_proj", "o_proj"], ["c_attn"]),
}
# Fresh task heads created by AutoModelFor*; they are trained fully and saved with the adapter.
HEAD_NAMES = ("classifier", "pre_classifier", "score")


class ModelError(ValueError):
    """A model name or path cannot be resolved or used."""


def resolve_model_path(name_or_path: str) -> Path:
    """A local directory as is; otherwise a built-in name from gpart.assets (fetched once, cached)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is a directory but holds no config.json; not a transformers model")
        return path
    if path.exists():
        raise ModelError(f"{path} is a file; pass the model's directory")
    try:
        from gpart.assets import resolve_model
    except ImportError as e:  # the asset layer is optional at import time
        raise ModelError(f"model {name_or_path!r} is not a local directory and built-in models are unavailable ({e})") from None
    try:
        resolved = resolve_model(name_or_path)
    except (KeyError, ValueError, LookupError) as e:
        raise ModelError(f"model {name_or_path!r}: not a local directory and not a built-in model ({e})") from None
    return Path(resolved) if Path(resolved).is_dir() else hub_snapshot(resolved)


def hub_snapshot(repo_id: str) -> Path:
    """A Hugging Face hub id -> its local snapshot directory. gpart runs offline by default
    (HF_HUB_OFFLINE=1 above), so this reads the local Hugging Face cache; a user who sets
    HF_HUB_OFFLINE=0 lets it download where the network allows."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    offline = os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False", "")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=MODEL_FILES))
    except HFValidationError as e:
        raise ModelError(f"model {repo_id!r}: not a local directory, a built-in model or a hub id ({e})") from None
    except Exception as e:  # noqa: BLE001 - network, cache and repository errors all mean "not available"
        how = ("gpart runs offline: it is not in the local Hugging Face cache; set HF_HUB_OFFLINE=0 to download it"
               if offline else f"the hub did not provide it ({type(e).__name__}: {e})")
        raise ModelError(f"model {repo_id!r}: not a local directory or a built-in model, and as a hub id {how}; "
                         "or pass a local model directory") from None


# What a transformers model directory needs (weights, configs, tokenizer / image processor files).
MODEL_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken"]


def linear_leaf_names(model: nn.Module) -> set[str]:
    """Last name component of every Linear-like leaf module (what PEFT's target_modules match)."""
    names = set()
    for full, module in model.named_modules():
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.add(full.rsplit(".", 1)[-1])
    return names


def default_targets(model: nn.Module, family: str) -> list[str]:
    leaves = linear_leaf_names(model)
    for candidate in DEFAULT_TARGETS[family]:
        if all(name in leaves for name in candidate):
            return list(candidate)
    raise ModelError(
        f"cannot guess target modules for {type(model).__name__}; pass --targets (linear layers: {sorted(leaves)})"
    )


def check_targets(model: nn.Module, targets: list[str]) -> None:
    leaves = {full.rsplit(".", 1)[-1] for full, _ in model.named_modules()}
    missing = [t for t in targets if t not in leaves]
    if missing:
        raise ModelError(f"--targets {missing} match no module of {type(model).__name__}; linear layers: {sorted(linear_leaf_names(model))}")


def head_modules(model: nn.Module) -> list[str]:
    """Top-level task heads present on the model (the layers AutoModelFor*Classification adds)."""
    children = dict(model.named_children())
    return [name for name in HEAD_NAMES if name in children]
