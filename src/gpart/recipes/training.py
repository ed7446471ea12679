"""`gpart train`: one run from arguments to saved adapter, metrics and report, on transformers Trainer."""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import methods, models, reporting
from .base import TASK_FILE, TaskRecipe
from .data import DataError, split_length
from .io import RUN_MARKER, RunDirError, atomic_dir, atomic_write_json, prepare_output_dir, reset_run_dir

CHECKPOINTS = "checkpoints"
# run.json fields that define a run: --resume refuses to continue a run whose identity differs.
IDENTITY = ("task", "model", "dataset", "method", "d", "targets", "seed", "r")


def make_trainer_class():
    from transformers import Trainer

    class GPartTrainer(Trainer):
        """Trainer with separate learning rates for the adapter (theta) and the task head."""

        def __init__(self, *a, param_groups_fn=None, **kw):
            self._param_groups_fn = param_groups_fn
            super().__init__(*a, **kw)

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                kwargs.pop("lr", None)  # every group carries its own
                self.optimizer = cls(self._param_groups_fn(opt_model), **kwargs)
            return self.optimizer

    return GPartTrainer


def run_config(args, recipe: TaskRecipe) -> dict:
    return {
        "task": recipe.name, "model": args.model, "dataset": args.dataset, "method": args.method,
        "d": args.d if args.method in ("gpart", "unilora") else None, "targets": args.targets,
        "seed": args.seed, "r": args.r, "lr": args.lr, "head_lr": args.head_lr, "epochs": args.epochs,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "weight_decay": args.weight_decay, "warmup": args.warmup, "dropout": args.dropout,
        "scheduler": args.scheduler,
    }


def check_resume(out: Path, config: dict) -> None:
    saved = json.loads((out / RUN_MARKER).read_text())
    diff = {k: (saved.get(k), config.get(k)) for k in IDENTITY if saved.get(k) != config.get(k)}
    if diff:
        detail = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise RunDirError(f"--resume: {out} holds a different run ({detail})")
    if not list((out / CHECKPOINTS).glob("checkpoint-*")):
        raise RunDirError(f"--resume: {out} has no checkpoint yet; start it again with --overwrite")


def training_arguments(args, out: Path, has_eval: bool, recipe: TaskRecipe):
    from transformers import TrainingArguments

    # Every epoch for long runs (the reference's choice); short runs would get a curve of one or two
    # points, so they evaluate and checkpoint four times instead.
    by_epoch = args.max_steps is None and args.eval_steps is None and args.epochs >= 4
    every = {} if by_epoch else {"eval_steps": args.eval_steps or 0.25, "save_steps": args.eval_steps or 0.25}
    strategy = "epoch" if by_epoch else "steps"
    return TrainingArguments(
        output_dir=str(out / CHECKPOINTS),
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        gradient_accumulation_steps=args.grad_accum,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps is not None else -1,
        learning_rate=args.lr,  # only the scheduler's reference; groups carry their own lrs
        weight_decay=args.weight_decay,
        warmup_steps=args.warmup,
        lr_scheduler_type=args.scheduler,
        max_grad_norm=args.max_grad_norm,
        logging_strategy="steps", logging_steps=args.logging_steps, logging_first_step=True,
        eval_strategy=strategy if has_eval else "no",
        save_strategy=strategy,
        save_total_limit=2,
        load_best_model_at_end=has_eval,  # the reference code selects the best epoch on validation
        metric_for_best_model=recipe.primary_metric if has_eval else None,
        greater_is_better=recipe.greater_is_better,
        seed=args.seed,
        bf16=args.bf16,
        use_cpu=args.cpu,
        report_to="none",
        remove_unused_columns=False,  # our datasets hold model inputs only; PeftModel hides the signature
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not args.cpu,
        disable_tqdm=args.quiet,
        **every,
    )


def prepare_model(args, recipe: TaskRecipe, data) -> dict:
    """Load the base model and apply --method; also the sizes the report needs (D, parameter counts)."""
    path = models.resolve_model_path(args.model)
    model, processor = recipe.load_model(path, args, data.labels)
    head = models.head_modules(model) if recipe.has_head else []
    targets = args.targets or models.default_targets(model, recipe.target_family)
    if args.method in methods.PEFT_METHODS:
        models.check_targets(model, targets)
    D = methods.adapted_size(model, targets)  # before wrapping, while the targets are plain modules
    model = methods.apply_method(model, args.method, head=head, d=args.d, targets=targets, seed=args.seed,
                                 dropout=args.dropout, task_type=recipe.task_type, r=args.r)
    return {"model": model, "processor": processor, "head": head, "targets": targets, "D": D, "path": path,
            "params": methods.count_params(model, head)}


def train(args, recipe: TaskRecipe) -> dict:
    from transformers import set_seed

    config = run_config(args, recipe)
    out = prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite)
    if args.resume:
        check_resume(out, config)

    set_seed(args.seed)  # the fresh head's init depends on it
    data = recipe.load_data(args)
    if not _nonempty(data.splits.get("train")):
        raise DataError(f"dataset {args.dataset}: no training examples (a train split is needed)")
    setup = prepare_model(args, recipe, data)
    model, processor, head = setup["model"], setup["processor"], setup["head"]

    train_ds = recipe.make_dataset(data.splits["train"], processor, args, data, train=True)
    eval_ds = None
    if _nonempty(data.splits.get("validation")):
        eval_ds = recipe.make_dataset(data.splits["validation"], processor, args, data, train=False)

    trainer = make_trainer_class()(
        model=model, args=training_arguments(args, out, eval_ds is not None, recipe),
        train_dataset=train_ds, eval_dataset=eval_ds, data_collator=recipe.collator(processor, args),
        compute_metrics=recipe.compute_metrics(data),
        param_groups_fn=lambda m: methods.param_groups(
            m, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay, head=head),
    )
    if not args.resume:
        # Touch the directory only now: a bad dataset or model above leaves it as it was.
        if args.overwrite:
            reset_run_dir(out)
        atomic_write_json(out / RUN_MARKER, config)
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=True if args.resume else None)
    runtime = time.perf_counter() - start
    model = trainer.model
    history = list(trainer.state.log_history)  # before the final evaluate() below appends to it

    validation = _strip(trainer.evaluate()) if eval_ds is not None else {}
    test_split = data.splits.get("test")
    test = recipe.evaluate(model, processor, test_split, args, data) if _nonempty(test_split) else {}

    saved_dir, adapter_bytes = save_result(model, processor, out, args.method, recipe.task_info(args, data) | {
        "task": recipe.name, "model": args.model, "model_path": str(setup["path"]), "method": args.method,
        "dataset": _absolute_if_local(args.dataset), "seed": args.seed, "val_fraction": args.val_fraction})
    train_pts, eval_pts = reporting.split_history(history)
    metrics = {
        "run": config | {"targets": setup["targets"]},
        "params": setup["params"], "D": setup["D"], "adapter_bytes": adapter_bytes,
        "saved": saved_dir.name,
        "train": {"steps": trainer.state.global_step, "epochs": trainer.state.epoch,
                  "runtime_s": runtime, "final_loss": train_pts[-1]["loss"] if train_pts else None,
                  "mean_loss": result.training_loss},
        "validation": validation, "test": test,
        "test_is_validation": data.splits.get("test") is data.splits.get("validation"),
        "history": {"train": train_pts, "eval": eval_pts},
        "best_checkpoint": trainer.state.best_model_checkpoint,
    }
    reporting.write_curve(out, train_pts, eval_pts, recipe.primary_metric,
                          f"{args.method} on {args.model} / {args.dataset}")
    reporting.write_report(out, metrics)
    reporting.write_metrics(out, metrics)  # last: its presence means the run finished
    return metrics


def _absolute_if_local(name_or_path: str) -> str:
    # a relative data path would break `gpart eval` run from another directory
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def _nonempty(split) -> bool:
    return split is not None and split_length(split) > 0


def _strip(metrics: dict) -> dict:
    drop = ("runtime", "samples_per_second", "steps_per_second", "epoch")
    return {k[5:] if k.startswith("eval_") else k: v for k, v in metrics.items()
            if not any(k.endswith(d) for d in drop)}


def save_result(model, processor, out: Path, method: str, task_info: dict) -> tuple[Path, int]:
    """PEFT methods: the adapter in PEFT layout (out/adapter). full / head-only: a standalone model
    (out/model). Either gets gpart_task.json so `gpart eval`/`merge` can rebuild the task."""
    name = "adapter" if method in methods.PEFT_METHODS else "model"
    with atomic_dir(out / name) as tmp:
        model.save_pretrained(tmp)
        if name == "model":
            processor.save_pretrained(tmp)
        atomic_write_json(tmp / TASK_FILE, task_info)
    weights = [p for p in (out / name).glob("*.safetensors")]
    return out / name, sum(p.stat().st_size for p in weights)

