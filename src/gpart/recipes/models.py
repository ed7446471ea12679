"""Finding models offline, and the module names the methods need (targets and the task head)."""
from __future__ import annotations

import os
from pathlib import Path

import torch
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


# ------------------------------------------------------------------------------------ precision
def quantization(args) -> str | None:
    """"4bit", "8bit" or None, from --load-in-4bit / --load-in-8bit."""
    return "4bit" if getattr(args, "load_in_4bit", False) else "8bit" if getattr(args, "load_in_8bit", False) else None


def weights_dtype(args) -> torch.dtype:
    """Dtype of the base weights that are not quantized (and bitsandbytes' compute dtype): bf16 with --bf16."""
    return torch.bfloat16 if getattr(args, "bf16", False) else torch.float32


def load_options(args) -> dict:
    """from_pretrained keyword arguments for --bf16, --load-in-4bit, --load-in-8bit (causal LMs).

    4-bit is NF4 with double quantization (QLoRA's choice); its compute dtype is the weights' dtype:
    bf16 with --bf16, else float32 (exact on every CPU). Quantized models are placed by bitsandbytes
    on the process's device (the CPU with --cpu or without an accelerator), not moved by the Trainer.
    """
    options = {"dtype": weights_dtype(args)}
    kind = quantization(args)
    if kind is None:
        return options
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ModelError(f"--load-in-{kind} needs bitsandbytes: pip install 'gpart[llm]' "
                         "(or pip install bitsandbytes)") from None
    if kind == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=options["dtype"])
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return options | {"quantization_config": config, "device_map": {"": quantized_device(args)}}


def quantized_device(args) -> str:
    if getattr(args, "cpu", False) or not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"


def check_precision(args, task: str, method: str | None) -> None:
    """Quantized bases are for causal LMs trained through an adapter."""
    kind = quantization(args)
    if kind is None:
        return
    if getattr(args, "load_in_4bit", False) and getattr(args, "load_in_8bit", False):
        raise ModelError("--load-in-4bit and --load-in-8bit exclude each other; choose one")
    if task != "causal-lm":
        raise ModelError(f"--load-in-{kind} is for --task causal-lm (a fresh classification head must not be "
                         "quantized); use --bf16 to save memory here")
    if method in ("full", "head-only"):
        raise ModelError(f"--load-in-{kind} with --method {method}: quantized weights cannot be trained; use an "
                         "adapter method (gpart, lora, vera, unilora)")


def base_weight_bytes(model: nn.Module, quant: str | None, dtype: torch.dtype) -> int:
    """Bytes of the base model's parameters and buffers as from_pretrained loads them with these
    options (what transformers' get_memory_footprint() reports), computed from the shapes alone, so it
    works on the meta device. bitsandbytes quantizes every Linear except the output layer (and weights
    tied to it): 4-bit packs two weights a byte, 8-bit stores one. Its quantization constants (one
    byte per 64 weights in 4-bit with double quantization, 4 bytes per row in 8-bit) are not counted,
    as transformers does not count them either."""
    skip: set[str] = set()
    if quant is not None:
        from transformers.quantizers.base import get_keys_to_not_convert
        from transformers.quantizers.quantizers_utils import should_convert_module

        keep = get_keys_to_not_convert(model)
        skip = {f"{name}.weight" for name, m in model.named_modules()
                if (type(m) is nn.Linear or type(m).__name__ == "Conv1D") and should_convert_module(name, keep)}
    size = torch.tensor([], dtype=dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        if name in skip:
            total += (p.numel() + 1) // 2 if quant == "4bit" else p.numel()
        else:
            total += p.numel() * (size if p.is_floating_point() else p.element_size())
    for _, b in model.named_buffers():
        total += b.numel() * b.element_size()
    return total
