"""Loading what `gpart train` saved, and the commands built on it: eval, info, merge."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import methods, models
from .base import TASK_FILE
from .data import DataError, scored_items, split_length
from .io import RunDirError, atomic_dir, atomic_write_json


def read_task_file(saved: Path | None) -> dict:
    if saved is None:
        return {}
    saved = Path(saved)
    if not saved.is_dir():
        raise models.ModelError(f"--adapter {saved}: no such directory")
    f = saved / TASK_FILE
    return json.loads(f.read_text()) if f.exists() else {}


def load_for_eval(recipe, args, saved_info: dict, labels):
    """(model, processor) for `gpart eval`/`merge`: a base model, base + adapter, or a saved full model."""
    adapter = Path(args.adapter) if getattr(args, "adapter", None) else None
    models.check_precision(args, recipe.name, None)
    if adapter is not None and not (adapter / "adapter_config.json").exists():
        if (adapter / "config.json").exists():  # a full model saved by train (full/head-only) or merge
            return recipe.load_saved_model(adapter, args, labels)
        raise models.ModelError(f"--adapter {adapter}: holds neither adapter_config.json nor config.json")
    base_path = _base_path(args, saved_info, adapter)
    if adapter is None:
        return recipe.load_model(base_path, args, labels)
    from transformers.utils import logging

    verbosity = logging.get_verbosity()
    logging.set_verbosity_error()  # the "head newly initialised" report is wrong here: the adapter brings it
    try:
        model, processor = recipe.load_model(base_path, args, labels)
    finally:
        logging.set_verbosity(verbosity)
    import gpart  # noqa: F401  (registers GPART with PEFT before the adapter config is read)
    from peft import PeftModel

    return PeftModel.from_pretrained(model, adapter), processor


def _base_path(args, saved_info, adapter):
    if args.model:
        return models.resolve_model_path(args.model)
    saved_path = saved_info.get("model_path")
    if saved_path and Path(saved_path).is_dir():
        return Path(saved_path)
    if saved_info.get("model"):
        return models.resolve_model_path(saved_info["model"])
    if adapter is not None:
        base = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if base:
            return models.resolve_model_path(base)
    raise models.ModelError("no base model: pass --model")


def evaluate(args, recipe, saved_info: dict) -> dict:
    data = recipe.load_data(args, saved=saved_info)
    split = args.split
    present = [s for s, rows in data.splits.items() if rows is not None and split_length(rows)]
    if split == "all" and split not in present:
        raise DataError(f"--split all scores a single data file whole; dataset {args.dataset} is not one "
                        f"(its splits: {', '.join(present)})")
    if split not in present:
        raise DataError(f"dataset {args.dataset} has no {split!r} split; available: {present}")
    model, processor = load_for_eval(recipe, args, saved_info, data.labels)
    metrics = recipe.evaluate(model, processor, data.splits[split], args, data)
    return {"task": recipe.name, "model": args.model or saved_info.get("model"), "adapter": args.adapter,
            "dataset": args.dataset, "split": split, **metrics,
            "items": scored_items(data.splits[split], args.seed)}


def info(args, recipe) -> dict:
    """Sizes for a model + method without training: built on the meta device, so no weights load."""
    from transformers import AutoConfig

    models.check_precision(args, recipe.name, args.method)
    path = models.resolve_model_path(args.model)
    labels = [str(i) for i in range(args.num_labels)] if recipe.has_head else None
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    if labels:
        config.num_labels = len(labels)
    with torch.device("meta"):
        model = recipe.auto_class().from_config(config)
    head = models.head_modules(model) if recipe.has_head else []
    targets = args.targets or models.default_targets(model, recipe.target_family)
    if args.method in methods.PEFT_METHODS:
        models.check_targets(model, targets)
    D = methods.adapted_size(model, targets)
    base_total = methods.count_params(model, head)["total"]
    quant = models.quantization(args)
    dtype = models.weights_dtype(args) if recipe.name == "causal-lm" else torch.float32  # see load_options
    base_bytes = models.base_weight_bytes(model, quant, dtype)
    model = methods.apply_method(model, args.method, head=head, d=args.d, targets=targets, seed=args.seed,
                                 dropout=0.0, task_type=recipe.task_type, r=args.r,
                                 **methods.projection_options(args))
    params = methods.count_params(model, head)
    return {
        "task": recipe.name, "model": args.model, "method": args.method, "targets": targets, "head": head,
        "D": D, "d": args.d if args.method in ("gpart", "unilora") else None,
        "base_params": base_total,
        "base_weights": {"4bit": "nf4 4-bit", "8bit": "int8"}.get(quant, str(dtype).removeprefix("torch.")),
        "base_bytes": base_bytes, "trainable": params["trainable"], "adapter_params": params["adapter"],
        "head_params": params["head"], "saved_bytes": saved_bytes(model, args.method),
    }


def saved_bytes(model, method) -> int:
    """Bytes of the tensors `gpart train` would save (the PEFT adapter file, or the whole model)."""
    if method in methods.PEFT_METHODS:
        from peft import get_peft_model_state_dict

        state = get_peft_model_state_dict(model)
    else:
        state = model.state_dict()
    seen, total = set(), 0
    for t in state.values():
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


def merge(args, recipe, saved_info: dict) -> Path:
    """Fold the adapter into the base weights and save a standalone transformers model."""
    adapter = Path(args.adapter)
    if not (adapter / "adapter_config.json").exists():
        raise models.ModelError(f"--adapter {adapter}: not a PEFT adapter directory (no adapter_config.json)")
    out = Path(args.output_dir)
    if out.exists() and any(out.iterdir()) and not args.overwrite:
        raise RunDirError(f"--output-dir {out} is not empty; pass --overwrite to replace it")
    if recipe.has_head and not saved_info.get("labels"):
        raise models.ModelError(f"--adapter {adapter}: no {TASK_FILE} with the class names; merge adapters "
                                "written by `gpart train`, or merge in Python with PEFT's merge_and_unload()")
    kind = models.quantization(args)
    if kind is not None and saved_info.get("method", "gpart") != "gpart":
        raise models.ModelError(
            f"merging a {saved_info.get('method')} adapter trained on a {kind[0]}-bit base: folding it into quantized "
            "weights would round most of the update away, and gpart writes a dequantized merged model for GPart "
            "adapters only. Use the adapter unmerged (gpart eval --adapter, or PeftModel.from_pretrained on the "
            "quantized base)")
    args.bf16 = False  # fold into float32 weights: a bf16 base would round small updates away
    model, processor = load_for_eval(recipe, args, saved_info, saved_info.get("labels"))
    if kind is not None:
        # W_deq + Delta_W in float32 for every quantized layer: a plain float32 model, nothing requantized
        from gpart import merge_and_dequantize

        merged = merge_and_dequantize(model, dtype=torch.float32)
    else:
        merged = model.merge_and_unload()
    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        if saved_info:
            atomic_write_json(tmp / TASK_FILE, saved_info | {"merged_from": str(adapter)})
    return out
