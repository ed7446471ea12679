"""The `gpart` command line: train, eval, info, merge.

Arguments are parsed by gpart_cli (outside this package, so that --help needs no torch); the
commands and their error reporting live here; the work is in gpart.recipes. Task-dependent defaults
(model, dataset, d, learning rates, ...) are filled in after parsing from the task's recipe, with
precedence: explicit flag > settings saved with an adapter > the recipe's default.
"""
from __future__ import annotations

import json
import os
import sys

from gpart_cli import main

__all__ = ["main", "run"]

# --------------------------------------------------------------------------------------- defaults
GENERIC_DEFAULTS = {"text_column": "text", "label_column": "label", "prompt_column": "question",
                    "response_column": "solution", "answer_column": "answer", "max_new_tokens": 256,
                    "eval_batch_size": 32, "seed": 0, "val_fraction": 0.1, "test_fraction": 0.1,
                    "data_format": "auto", "bf16": False, "load_in_4bit": False, "load_in_8bit": False}
# Settings saved with an adapter (gpart_task.json) that `eval`/`merge` reuse unless given again:
# the same inputs, and the same seeded validation split as in training.
SAVED_KEYS = ("dataset", "seed", "val_fraction", "test_fraction", "max_length", "image_size", "text_column", "label_column",
              "image_column", "prompt_column", "response_column", "answer_column", "data_format",
              "bf16", "load_in_4bit", "load_in_8bit")


def fill_defaults(args, recipe, saved: dict | None = None) -> None:
    """Fill every None option: saved adapter settings first, then the recipe's, then generic ones."""
    from gpart.recipes.methods import MethodError, default_lr

    saved = saved or {}
    if "val_fraction" in saved and "test_fraction" not in saved:
        saved = {**saved, "test_fraction": 0.0}  # written before test splits were held out: test was validation
    for key in SAVED_KEYS:
        if getattr(args, key, None) is None and saved.get(key) is not None:
            setattr(args, key, saved[key])
    d = recipe.defaults
    if getattr(args, "adapter", None) is None and getattr(args, "model", None) is None:
        args.model = d["model"]  # with --adapter, the base model recorded with the adapter is used
    for key in ("dataset", "d", "batch_size", "weight_decay", "warmup", "dropout", "scheduler",
                "max_length", "image_size", "max_new_tokens"):
        if getattr(args, key, None) is None and key in d:
            setattr(args, key, d[key])
    for key, value in GENERIC_DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if getattr(args, "command", None) == "train":
        if args.base_lr is not None and args.method != "gpart":
            raise MethodError(f"--base-lr is GPart's learning-rate rule (theta lr = base * (10000/d)^0.75) and applies "
                              f"to --method gpart only; for --method {args.method} set --lr")
        if getattr(args, "optimizer", "adamw") == "sgd" and args.lr is None:
            raise MethodError("--optimizer sgd needs --lr: every default learning rate, and GPart's rule "
                              "(--base-lr), is tuned for AdamW and does not carry over to SGD")
        if args.lr is None:
            args.lr = default_lr(args.method, d)
        if args.method == "gpart" and args.lr is None and args.base_lr is None:
            args.base_lr = d["lr"]  # the task's base learning rate; theta's lr follows once D is known
        if args.head_lr is None:
            args.head_lr = d["head_lr"]
        if args.epochs is None:
            args.epochs = d["epochs"]
    for key in ("labels", "max_train_samples", "max_eval_samples"):
        if not hasattr(args, key):
            setattr(args, key, None)


# --------------------------------------------------------------------------------------- commands
def cmd_train(args) -> int:
    from gpart.recipes import get_recipe
    from gpart.recipes.training import train

    recipe = get_recipe(args.task)
    fill_defaults(args, recipe)
    args.single_file_split = "train"
    metrics = train(args, recipe)
    if int(os.environ.get("RANK", "0")) != 0:  # under a launcher, one summary (all processes agree)
        return 0
    summary = {k: metrics[k] for k in ("validation", "test")}
    print(json.dumps({"output_dir": args.output_dir, "runtime_s": round(metrics["train"]["runtime_s"], 1),
                      "trainable": metrics["params"]["trainable"], **summary}, indent=2, default=str))
    return 0


def _recipe_of_saved_run(args, command: str):
    """(recipe, saved task info) for a command that starts from an adapter or model written by train."""
    from gpart.recipes import get_recipe
    from gpart.recipes.evaluation import read_task_file

    saved = read_task_file(args.adapter)
    task = args.task or saved.get("task")
    if task is None:
        raise SystemExit(f"gpart {command}: error: pass --task (no gpart_task.json next to the adapter says which)")
    recipe = get_recipe(task)
    fill_defaults(args, recipe, saved)
    return recipe, saved


def cmd_eval(args) -> int:
    from gpart.recipes.evaluation import evaluate
    from gpart.recipes.io import atomic_write_json

    given = args.dataset
    recipe, saved = _recipe_of_saved_run(args, "eval")
    # The data is split exactly as in training (same seed and fractions: a base model scores the
    # test items an adapter trained on that data was scored on), except with --split all, or for a
    # trained run given a data file other than its own: that file is the evaluated split, whole.
    other_file = args.adapter is not None and given is not None and not _same_dataset(given, saved.get("dataset"))
    args.single_file_split = args.split if args.split == "all" or other_file else "train"
    metrics = evaluate(args, recipe, saved)
    if args.output:
        atomic_write_json(args.output, metrics)
    print(json.dumps(metrics, indent=2, default=str))
    return 0


def _same_dataset(a: str, b: str | None) -> bool:
    from pathlib import Path

    if b is None:
        return False
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return a == b or (pa.exists() and pb.exists() and pa.resolve() == pb.resolve())


def cmd_info(args) -> int:
    from gpart.recipes import get_recipe
    from gpart.recipes.evaluation import info

    recipe = get_recipe(args.task)
    fill_defaults(args, recipe)
    result = info(args, recipe)
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        width = max(len(k) for k in result)
        for key, value in result.items():
            shown = f"{value:,}" if isinstance(value, int) else ",".join(value) if isinstance(value, list) else value
            print(f"{key:<{width}}  {shown}")
    return 0


def cmd_merge(args) -> int:
    from gpart.recipes.evaluation import merge

    recipe, saved = _recipe_of_saved_run(args, "merge")
    out = merge(args, recipe, saved)
    print(json.dumps({"merged": str(out)}))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "info": cmd_info, "merge": cmd_merge}


def user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input, reported as one line instead of a traceback."""
    from gpart.recipes.data import DataError
    from gpart.recipes.io import RunDirError
    from gpart.recipes.methods import MethodError
    from gpart.recipes.models import ModelError
    from gpart.recipes.training import LaunchError

    errors = [DataError, RunDirError, ModelError, MethodError, LaunchError]
    try:
        from gpart.assets.errors import AssetError, DatasetError

        errors += [AssetError, DatasetError]
    except ImportError:
        pass
    return tuple(errors)


def _quiet_library_noise() -> None:
    import warnings

    # PEFT calls a transformers method that transformers 5 deprecates; nothing a user can act on
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def run(args) -> int:
    """Run the parsed command; bad input is one line on stderr and exit status 2."""
    _quiet_library_noise()
    if getattr(args, "quiet", False):
        from transformers.utils import logging

        logging.disable_progress_bar()  # loading bars, and gpart's generation and prediction bars
    try:
        return COMMANDS[args.command](args)
    except user_errors() as e:
        if os.environ.get("GPART_DEBUG"):
            raise
        print(f"gpart {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"gpart {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from gpart.recipes.training import TrainingDiverged

        if not isinstance(e, TrainingDiverged) or os.environ.get("GPART_DEBUG"):
            raise
        print(f"gpart {args.command}: error: {e}", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
