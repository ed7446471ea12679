"""`gpart train`: one run from arguments to saved adapter, metrics and report, on transformers Trainer."""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from pathlib import Path

import torch

from . import methods, models, progress, reporting
from .base import TASK_FILE, TaskRecipe
from .data import DataError, scored_items, split_length
from .io import (RUN_MARKER, RunDirError, atomic_dir, atomic_write_json, fsync_tree, prepare_output_dir,
                 reset_run_dir)

CHECKPOINTS = "checkpoints"
# run.json fields that define a run: --resume refuses to continue a run whose identity differs.
IDENTITY = ("task", "model", "dataset", "method", "d", "targets", "seed", "r", "projection", "column_gain_ratio",
            "partition_scope", "grouping", "optimizer")
# --optimizer sgd: momentum 0.9 (without it SGD's steps in a few-hundred-step budget are too timid to compare)
SGD_ARGS = "momentum=0.9"


def make_trainer_class():
    from transformers import Trainer
    from transformers.trainer_utils import rotate_checkpoints

    class GPartTrainer(Trainer):
        """Trainer with separate learning rates for the adapter (theta) and the task head, atomic
        checkpoints and a stop on a non-finite loss or parameter."""

        def __init__(self, *a, param_groups_fn=None, **kw):
            self._param_groups_fn = param_groups_fn
            self._staging_dir = None
            super().__init__(*a, **kw)
            self.add_callback(FiniteCheck(self))

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                opt_model = self.model if model is None else model
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
                kwargs.pop("lr", None)  # every group carries its own
                self.optimizer = cls(self._param_groups_fn(opt_model), **kwargs)
            return self.optimizer

        def save_model(self, output_dir=None, _internal_call=False):
            # Under FSDP2 the Trainer gathers the whole model onto rank 0 for every save (or, with
            # SHARDED_STATE_DICT, writes no adapter file at all); an adapter needs only its trainable
            # tensors, gathered whole. (The shards for --resume are still written by the Trainer.)
            state = adapter_state_dict(self)
            if state is None:
                return super().save_model(output_dir, _internal_call)
            self._save(output_dir or self.args.output_dir, state_dict=state)

        def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
            loss, logits, labels = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys)
            # compute_metrics computes the eval loss exactly from the gathered predictions (see
            # TaskRecipe.compute_metrics); the Trainer's would overwrite it.
            return (None if self.compute_metrics is not None else loss), logits, labels

        def training_step(self, model, inputs, *a, **kw):
            loss = super().training_step(model, inputs, *a, **kw)
            # Before the optimizer step: theta is still the last good one. (Trainer's own
            # logging_nan_inf_filter would silently average the bad loss away.)
            if not torch.isfinite(loss.detach()).all():
                raise TrainingDiverged(self, f"loss is {loss.detach().float().sum().item()}",
                                       step=self.state.global_step + 1)  # the step being computed
            return loss

        # --- atomic checkpoints: checkpoint-N is written under a hidden temporary name and renamed
        # into place once complete, so an interrupted save leaves nothing --resume would load.
        def _get_output_dir(self, trial):
            return self._staging_dir if self._staging_dir is not None else super()._get_output_dir(trial)

        def _save_checkpoint(self, model, trial):
            run_dir = Path(super()._get_output_dir(trial))
            name = f"checkpoint-{self.state.global_step}"
            final = run_dir / name
            # One name for all processes: under DDP/FSDP every rank writes its part (RNG state,
            # shards) into the same folder. Leftovers of a killed save are cleared on --resume.
            staging = run_dir / f".{name}.tmp"
            staging.mkdir(parents=True, exist_ok=True)
            before = self.state.best_model_checkpoint
            self._staging_dir = str(staging)
            try:
                super()._save_checkpoint(model, trial)  # writes staging/checkpoint-N, rotates nothing
            except BaseException:
                if self.args.should_save:
                    shutil.rmtree(staging, ignore_errors=True)
                raise
            finally:
                self._staging_dir = None
            built = staging / name
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == staging:  # this checkpoint is the best so far
                self.state.best_model_checkpoint = str(final)
                if self.args.should_save:
                    self.state.save_to_json(str(built / "trainer_state.json"))  # record the final path
            elif best != before:
                self.state.best_model_checkpoint = before
            self.accelerator.wait_for_everyone()  # every rank has written its part
            if self.args.should_save:
                fsync_tree(built)
                old = None
                if final.exists():  # a re-save of the same step (e.g. after a resume): swap it
                    old = run_dir / f".{name}.old-{os.getpid()}"
                    os.replace(final, old)
                os.replace(built, final)  # the checkpoint appears complete, in one step
                fsync_tree(run_dir, files=False)
                if old is not None:
                    shutil.rmtree(old, ignore_errors=True)
                shutil.rmtree(staging, ignore_errors=True)
                # the step in each name orders them (mtimes of quick saves tie, and transformers warns)
                rotate_checkpoints(output_dir=str(run_dir), save_total_limit=self.args.save_total_limit,
                                   best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=False)
            self.accelerator.wait_for_everyone()  # nobody reads checkpoint-N before it is in place

    return GPartTrainer


def adapter_state_dict(trainer) -> dict | None:
    """Under FSDP2 with a PEFT model: the model's state dict with each trainable tensor (theta, the
    head) gathered whole and the frozen, sharded base weights left out; None otherwise (nothing to
    gather: save as usual). A collective: every rank calls it, in the same order."""
    from peft import PeftModel

    if not (trainer.is_fsdp_enabled and trainer.accelerator.is_fsdp2 and isinstance(trainer.model, PeftModel)):
        return None
    trainable = {name for name, p in trainer.model.named_parameters() if p.requires_grad}
    state = {}
    for key, value in trainer.model.state_dict().items():
        if hasattr(value, "full_tensor"):  # a DTensor: this rank holds a shard
            if key not in trainable:
                continue
            value = value.full_tensor()
        state[key] = value
    return state


def whole_state_dict(trainer) -> dict | None:
    """The state dict to save the final result from when parameters are sharded (FSDP, ZeRO-3),
    with whole tensors; None when they are not (save_pretrained then reads the model itself).
    A collective: every rank calls it."""
    from peft import PeftModel

    state = adapter_state_dict(trainer)
    if state is not None or not (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled):
        return state
    if trainer.is_deepspeed_enabled:
        if trainer.accelerator.deepspeed_config["zero_optimization"].get("stage") != 3:
            return None  # ZeRO-1/2 shard the optimizer state only
        # as the Trainer's own checkpoints do: an adapter needs only the trainable tensors
        return trainer.model_wrapped._zero3_consolidated_16bit_state_dict(
            exclude_frozen_parameters=isinstance(trainer.model, PeftModel))
    return trainer.accelerator.get_state_dict(trainer.model)


class LaunchError(RuntimeError):
    """The processes did not come up as the launcher asked (e.g. FSDP requested where Accelerate
    cannot enable it): training would silently do something else."""


def check_launch(trainer) -> None:
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if trainer.args.world_size != launched:
        raise LaunchError(
            f"launched as {launched} processes, but the Trainer set up {trainer.args.world_size} "
            f"(device {trainer.args.device}); each process would train alone. Pass --cpu to train "
            "on the CPU over gloo, or launch on a machine with one accelerator per process")
    for flag, engine, enabled in (("ACCELERATE_USE_FSDP", "FSDP", trainer.is_fsdp_enabled),
                                  ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed", trainer.is_deepspeed_enabled)):
        if os.environ.get(flag, "").lower() == "true" and not enabled:
            raise LaunchError(
                f"the launcher asked for {engine}, but Accelerate did not enable it on device "
                f"{trainer.args.device} (it enables {engine} only on GPUs and other accelerators); "
                "use a DDP launch (torchrun, or accelerate launch --multi_gpu) on the CPU")


def checkpoint_engine(path: Path) -> str:
    """Which engine wrote a Trainer checkpoint: each stores the optimizer state its own way."""
    names = [p.name for p in path.iterdir()]
    if any(n.startswith("pytorch_model_fsdp") for n in names):
        return "FSDP"
    if any(n.startswith("global_step") for n in names):
        return "DeepSpeed"
    return "DDP / one process"


def trainer_engine(trainer) -> str:
    return "FSDP" if trainer.is_fsdp_enabled else "DeepSpeed" if trainer.is_deepspeed_enabled else "DDP / one process"


def check_resume_launch(checkpoint: Path, trainer) -> None:
    """A checkpoint resumes under the engine that wrote it. DDP and FSDP (full or DCP-sharded
    state) checkpoints load under any number of processes; DeepSpeed ZeRO's optimizer shards only
    under the number that wrote them."""
    engine = checkpoint_engine(checkpoint)
    if engine != trainer_engine(trainer):
        raise LaunchError(
            f"--resume: {checkpoint} was written under {engine}, this launch uses {trainer_engine(trainer)}; "
            f"the optimizer state of one cannot be loaded by the other. Resume under {engine}"
            + (" (the number of processes may differ)" if engine != "DeepSpeed" else ""))
    shards = len(list(checkpoint.glob("global_step*/*optim_states.pt")))
    if engine == "DeepSpeed" and shards and shards != trainer.args.world_size:
        raise LaunchError(
            f"--resume: {checkpoint} holds DeepSpeed ZeRO optimizer state split over {shards} processes; "
            f"DeepSpeed loads it only with {shards} processes (this launch has {trainer.args.world_size}); "
            "relaunch with that number")


def device_settings(args) -> dict:
    """TrainingArguments' use_cpu / ddp_backend. Under a multi-process launch on a machine without
    an accelerator, Accelerate sets up gloo only when told to use the CPU, and would otherwise leave
    every process training alone; DeepSpeed brings its own CPU accelerator instead (Accelerate's CPU
    mode would drop DeepSpeed), and needs the backend named."""
    if args.cpu:
        return {"use_cpu": True}
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    available = accelerator.is_available() if accelerator is not None else torch.cuda.is_available()
    if args.bf16 and not available:
        return {"use_cpu": True}  # transformers accepts bf16 autocast on the CPU only when told it is the CPU
    if int(os.environ.get("WORLD_SIZE", "1")) == 1 or available:
        return {"use_cpu": False}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true":
        return {"use_cpu": False, "ddp_backend": "gloo"}
    return {"use_cpu": True}


class TrainingDiverged(RuntimeError):
    """The loss or a trainable parameter became NaN/inf; training stopped before saving it."""

    def __init__(self, trainer, what: str, step: int | None = None):
        step = trainer.state.global_step if step is None else step
        last = last_complete_checkpoint(Path(trainer.args.output_dir))
        keep = (f"last good checkpoint: {last} (--resume continues from it)" if last
                else "no checkpoint was saved yet")
        super().__init__(f"training diverged at step {step}: {what}; stopped, {keep}")
        self.step, self.checkpoint = step, last


def checkpoint_step(name: str) -> int | None:
    """N of a complete checkpoint's folder name checkpoint-N (also as a path ending in it); None otherwise."""
    tail = Path(name).name
    return int(tail[11:]) if tail.startswith("checkpoint-") and tail[11:].isdigit() else None


def last_complete_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint-N that --resume would load (incomplete saves never carry that name)."""
    if not ckpt_dir.is_dir():
        return None
    found = [p for p in ckpt_dir.glob("checkpoint-*") if p.is_dir() and checkpoint_step(p.name) is not None]
    return max(found, key=lambda p: checkpoint_step(p.name)) if found else None


def _non_finite_param(model) -> str | None:
    for name, p in model.named_parameters():
        if p.requires_grad and not torch.isfinite(p.detach()).all():
            return name
    return None


def _finite_check_class():
    from transformers import TrainerCallback

    class _FiniteCheck(TrainerCallback):
        """After each optimizer step: a NaN/inf loss in the logs or trainable parameter (theta, head)
        stops training before a checkpoint or the adapter can hold it. Parameters are scanned on
        steps that log, evaluate or save (and always when they are small, as GPart's theta is)."""

        SMALL = 10_000_000

        def __init__(self, trainer):
            self.trainer = trainer
            self.small = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad) <= self.SMALL

        def on_step_end(self, args, state, control, **kw):
            if self.small or control.should_save or control.should_evaluate or control.should_log \
                    or control.should_training_stop:
                bad = _non_finite_param(self.trainer.model)
                if bad is not None:
                    raise TrainingDiverged(self.trainer, f"parameter {bad} is not finite")

        def on_log(self, args, state, control, logs=None, **kw):
            value = (logs or {}).get("loss")
            if isinstance(value, (int, float)) and not math.isfinite(value):
                raise TrainingDiverged(self.trainer, f"logged loss is {value}", step=state.global_step)

    return _FiniteCheck


def FiniteCheck(trainer):  # noqa: N802 - builds the callback lazily (transformers is imported late)
    return _finite_check_class()(trainer)


def _projection_choice(args) -> dict:
    """GPart's projection flags, recorded only when given (earlier runs' run.json has no such keys)."""
    return {k: v for k, v in methods.projection_options(args).items() if v is not None}


def run_config(args, recipe: TaskRecipe) -> dict:
    return {
        "task": recipe.name, "model": args.model, "dataset": args.dataset, "method": args.method,
        "d": args.d if args.method in ("gpart", "unilora") else None, "targets": args.targets,
        "seed": args.seed, "r": args.r, **_projection_choice(args), "lr": args.lr,
        **({"base_lr": args.base_lr} if getattr(args, "base_lr", None) is not None else {}), "head_lr": args.head_lr, "epochs": args.epochs,
        "max_steps": args.max_steps, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
        "weight_decay": args.weight_decay, "warmup": args.warmup, "dropout": args.dropout,
        "scheduler": args.scheduler, "val_fraction": args.val_fraction, "test_fraction": args.test_fraction,
        "bf16": args.bf16, "quantization": models.quantization(args),
        **({"optimizer": "sgd"} if getattr(args, "optimizer", "adamw") == "sgd" else {}),  # recorded when not AdamW
    }


def check_resume(out: Path, config: dict) -> None:
    saved = json.loads((out / RUN_MARKER).read_text())
    diff = {k: (saved.get(k), config.get(k)) for k in IDENTITY if saved.get(k) != config.get(k)}
    if diff:
        detail = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in diff.items())
        raise RunDirError(f"--resume: {out} holds a different run ({detail})")
    if last_complete_checkpoint(out / CHECKPOINTS) is None:
        raise RunDirError(f"--resume: {out} has no checkpoint yet; start it again with --overwrite")


def clear_partial_checkpoints(ckpt_dir: Path) -> None:
    """Delete what interrupted checkpoint saves left: hidden .checkpoint-N.*.tmp / .old-* folders."""
    for p in ckpt_dir.glob(".checkpoint-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)


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
        **({"optim": "sgd", "optim_args": SGD_ARGS} if getattr(args, "optimizer", "adamw") == "sgd" else {}),
        logging_strategy="steps", logging_steps=args.logging_steps, logging_first_step=True,
        eval_strategy=strategy if has_eval else "no",
        save_strategy=strategy,
        save_total_limit=2,
        load_best_model_at_end=has_eval,  # the reference code selects the best epoch on validation
        metric_for_best_model=recipe.primary_metric if has_eval else None,
        greater_is_better=recipe.greater_is_better,
        seed=args.seed,
        bf16=args.bf16,
        **device_settings(args),
        # every trainable tensor takes part in every step (theta in each adapted layer, the head);
        # searching for unused ones costs a graph traversal per step. `full` may leave some unused.
        ddp_find_unused_parameters=None if args.method == "full" else False,
        report_to="none",
        remove_unused_columns=False,  # our datasets hold model inputs only; PeftModel hides the signature
        dataloader_num_workers=0,
        dataloader_pin_memory=torch.cuda.is_available() and not args.cpu,
        disable_tqdm=args.quiet,
        **every,
    )


def prepare_model(args, recipe: TaskRecipe, data) -> dict:
    """Load the base model and apply --method; also the sizes the report needs (D, parameter counts)."""
    models.check_precision(args, recipe.name, args.method)
    path = models.resolve_model_path(args.model)
    model, processor = recipe.load_model(path, args, data.labels)
    head = models.head_modules(model) if recipe.has_head else []
    targets = args.targets or models.default_targets(model, recipe.target_family)
    if args.method in methods.PEFT_METHODS:
        models.check_targets(model, targets)
    D = methods.adapted_size(model, targets)  # before wrapping, while the targets are plain modules
    try:
        model = methods.apply_method(model, args.method, head=head, d=args.d, targets=targets, seed=args.seed,
                                     dropout=args.dropout, task_type=recipe.task_type, r=args.r,
                                     **methods.projection_options(args))
    except TypeError as e:  # a layer the method cannot adapt (e.g. another quantizer's): bad input
        raise methods.MethodError(f"--method {args.method}: {e}") from None
    keep_trainable_fp32(model)
    return {"model": model, "processor": processor, "head": head, "targets": targets, "D": D, "path": path,
            "params": methods.count_params(model, head)}


def keep_trainable_fp32(model) -> None:
    """Trained tensors (theta, adapters, heads) stay float32 on a bf16 or quantized base: AdamW's small
    updates would vanish in bf16. The forward passes cast between the two (autocast, PEFT layers)."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()


def train(args, recipe: TaskRecipe) -> dict:
    from transformers import set_seed

    config = run_config(args, recipe)
    out = prepare_output_dir(args.output_dir, resume=args.resume, overwrite=args.overwrite)
    new_dir = not out.exists()
    if args.resume:
        check_resume(out, config)

    if not reporting.plotting_available():
        warnings.warn(reporting.NO_PLOT, stacklevel=2)  # said before training; the run goes on
    set_seed(args.seed)  # the fresh head's init depends on it
    data = recipe.load_data(args)
    if not _nonempty(data.splits.get("train")):
        raise DataError(f"dataset {args.dataset}: no training examples (a train split is needed)")
    setup = prepare_model(args, recipe, data)
    model, processor, head = setup["model"], setup["processor"], setup["head"]
    choice = None
    if args.method == "gpart":
        choice = methods.resolve_gpart_lr(model, lr=args.lr, base_lr=getattr(args, "base_lr", None),
                                           weight_decay=args.weight_decay)
        args.lr = choice["lr"]
        config |= {"lr": args.lr, "lr_rule": choice}

    train_ds = recipe.make_dataset(data.splits["train"], processor, args, data, train=True)
    eval_ds = None
    if _nonempty(data.splits.get("validation")):
        eval_ds = recipe.make_dataset(data.splits["validation"], processor, args, data, train=False)

    trainer = make_trainer_class()(
        model=model, args=training_arguments(args, out, eval_ds is not None, recipe),
        train_dataset=train_ds, eval_dataset=eval_ds, data_collator=recipe.collator(processor, args),
        compute_metrics=recipe.compute_metrics(data), preprocess_logits_for_metrics=recipe.preprocess_logits(),
        param_groups_fn=lambda m: methods.param_groups(
            m, lr=args.lr, head_lr=args.head_lr, weight_decay=args.weight_decay, head=head, gpart_lr=choice),
    )
    progress.use_run_progress(trainer, out, quiet=args.quiet)
    if recipe.loss_is_batch_mean:
        # The Trainer sees a forward that takes **kwargs and assumes the loss divides by its
        # num_items_in_batch: it would skip the 1/grad_accum scaling and multiply by the number of
        # processes, so gradients (and logged losses) would grow with --grad-accum and world size.
        trainer.model_accepts_loss_kwargs = False
    last = last_complete_checkpoint(out / CHECKPOINTS) if args.resume else None
    try:
        check_launch(trainer)
        if last is not None:
            check_resume_launch(last, trainer)
    except LaunchError:
        with contextlib.suppress(OSError):  # the Trainer made an empty checkpoints/; leave the dir as it was
            (out / CHECKPOINTS).rmdir()
            if new_dir:
                out.rmdir()
        raise
    # Only the main process touches the run directory; the barrier before makes sure every process
    # has checked it (prepare_output_dir, the checkpoint to resume) before it changes.
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        if args.resume:
            clear_partial_checkpoints(out / CHECKPOINTS)
        else:
            # Touch the directory only now: a bad dataset or model above leaves it as it was.
            if args.overwrite:
                reset_run_dir(out)
            atomic_write_json(out / RUN_MARKER, config)
    trainer.accelerator.wait_for_everyone()
    start = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=str(last) if last else None)
    runtime = time.perf_counter() - start
    model = trainer.model
    bad = _non_finite_param(model)  # e.g. a best checkpoint that a previous version saved
    if bad is not None:
        raise TrainingDiverged(trainer, f"parameter {bad} is not finite after training")
    history = list(trainer.state.log_history)  # before the final evaluate() below appends to it

    validation = _strip(trainer.evaluate()) if eval_ds is not None else {}
    test_split = data.splits.get("test")
    test = recipe.evaluate(model, processor, test_split, args, data) if _nonempty(test_split) else {}

    # Every process evaluated (forward passes are collectives under FSDP) and gathers the state to
    # save; the main process alone writes the result files.
    state = whole_state_dict(trainer)
    main = trainer.args.should_save
    saved_dir, adapter_bytes = out / result_name(args.method), None
    if main:
        saved_dir, adapter_bytes = save_result(model, processor, out, args.method, recipe.task_info(args, data) | {
            "task": recipe.name, "model": args.model, "model_path": str(setup["path"]), "method": args.method,
            "dataset": _absolute_if_local(args.dataset), "seed": args.seed, "val_fraction": args.val_fraction,
            "test_fraction": args.test_fraction, "bf16": args.bf16,
            "load_in_4bit": args.load_in_4bit, "load_in_8bit": args.load_in_8bit},
            state_dict=state)
    train_pts, eval_pts = reporting.split_history(history)
    metrics = {
        "run": config | {"targets": setup["targets"]},
        "params": setup["params"], "D": setup["D"], "adapter_bytes": adapter_bytes,
        "saved": saved_dir.name,
        "train": {"steps": trainer.state.global_step, "epochs": trainer.state.epoch,
                  "runtime_s": runtime, "final_loss": train_pts[-1]["loss"] if train_pts else None,
                  "mean_loss": result.training_loss,
                  # runtime_s timed this launch alone: after a resume, the steps from this one on
                  **({"resumed_from_step": checkpoint_step(last.name)} if last is not None else {})},
        "validation": validation, "test": test,
        "test_is_validation": data.splits.get("test") is data.splits.get("validation"),
        **({"test_items": scored_items(test_split, args.seed)} if test else {}),
        **({"skipped": dict(data.skipped)} if data.skipped else {}),
        "history": {"train": train_pts, "eval": eval_pts},
        # relative to the run folder: metrics.json travels (a study commits it) without this machine's paths
        "best_checkpoint": (None if trainer.state.best_model_checkpoint is None
                            else os.path.relpath(trainer.state.best_model_checkpoint, out)),
    }
    if main:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a missing matplotlib was reported before training
            reporting.write_curve(out, train_pts, eval_pts, recipe.primary_metric,
                                  f"{args.method} on {args.model} / {args.dataset}")
        reporting.write_report(out, metrics)
        reporting.write_metrics(out, metrics)  # last: its presence means the run finished
    trainer.accelerator.wait_for_everyone()  # no process reports success before the files exist
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


def result_name(method: str) -> str:
    return "adapter" if method in methods.PEFT_METHODS else "model"


def save_result(model, processor, out: Path, method: str, task_info: dict,
                state_dict: dict | None = None) -> tuple[Path, int]:
    """PEFT methods: the adapter in PEFT layout (out/adapter). full / head-only: a standalone model
    (out/model). Either gets gpart_task.json so `gpart eval`/`merge` can rebuild the task.
    `state_dict`: whole tensors gathered from sharded parameters (see whole_state_dict)."""
    name = result_name(method)
    with atomic_dir(out / name) as tmp:
        model.save_pretrained(tmp, state_dict=state_dict)
        if name == "model":
            processor.save_pretrained(tmp)
        atomic_write_json(tmp / TASK_FILE, task_info)
    weights = [p for p in (out / name).glob("*.safetensors")]
    return out / name, sum(p.stat().st_size for p in weights)

