"""The `gpart` command line: train, eval, info, merge.

Parsing and error reporting live here; the work is in gpart.recipes. Task-dependent defaults
(model, dataset, d, learning rates, ...) are filled in after parsing from the task's recipe, with
precedence: explicit flag > settings saved with an adapter > the recipe's default.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from gpart.recipes import TASKS
from gpart.recipes.methods import METHODS

SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


# --------------------------------------------------------------------------------------- parsing
def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {value}")
    return value


def _steps(text: str) -> float:
    """An integer step count, or a fraction in (0, 1) of the total steps (Trainer's convention)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a step count or a fraction, got {text!r}") from None
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"expected a step count or a fraction in (0, 1), got {text!r}")
    return int(value) if value >= 1 else value


def _csv_list(text: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of module names")
    return items


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"expected a number > 0, got {value}")
    return value


def _gain_ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value >= 1:
        raise argparse.ArgumentTypeError(f"expected a number >= 1 (1: isometric), got {value}")
    return value


def _nonneg_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value}")
    return value


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", help="built-in dataset name, a .csv/.tsv/.jsonl file, a folder of "
                                      "train/validation/test files, an image folder, or a Hugging Face hub dataset "
                                      "org/name[:config] (from the local cache; HF_HUB_OFFLINE=0 downloads) "
                                      "(default: the task's built-in)")
    g.add_argument("--text-column", default=None, help="text classification: text column (default: text)")
    g.add_argument("--label-column", default=None, help="classification: label column (default: label)")
    g.add_argument("--image-column", default=None,
                   help="image classification, hub datasets: image column (default: the one column of images)")
    g.add_argument("--labels", default=None, help="comma-separated class names in id order (default: inferred)")
    g.add_argument("--prompt-column", default=None, help="causal-lm: prompt column (default: question)")
    g.add_argument("--response-column", default=None, help="causal-lm: training target column (default: solution)")
    g.add_argument("--answer-column", default=None, help="causal-lm: final answer for exact match (default: answer)")
    g.add_argument("--data-format", choices=("auto", "messages", "prompt-completion", "question-answer"), default=None,
                   help="causal-lm: the data's format (default auto: detected from the columns: messages; "
                        "prompt + completion; the question/answer columns)")
    g.add_argument("--max-length", type=_positive_int, default=None, help="token limit per example")
    g.add_argument("--image-size", type=_positive_int, default=None, help="image side in pixels fed to the model")
    g.add_argument("--no-augment", action="store_true", help="image classification: no random flips in training")
    g.add_argument("--max-new-tokens", type=_positive_int, default=None, help="causal-lm: generation budget in eval")
    g.add_argument("--val-fraction", type=_fraction, default=None,
                   help="share of train held out for validation when the data has no validation split (0.1)")
    g.add_argument("--test-fraction", type=_fraction, default=None,
                   help="share of train held out for testing when the data has no test split (0.1; 0: test "
                        "on the validation split, which also chose the checkpoint)")
    g.add_argument("--max-train-samples", type=_positive_int, default=None, help="seeded random subset of train")
    g.add_argument("--max-eval-samples", type=_positive_int, default=None,
                   help="seeded random subset of validation and test")
    g.add_argument("--eval-batch-size", type=_positive_int, default=None)


def _add_method_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("method")
    g.add_argument("--method", choices=METHODS, default="gpart")
    g.add_argument("--d", type=_positive_int, default=None, help="GPart / Uni-LoRA: trainable vector length")
    g.add_argument("--targets", type=_csv_list, default=None,
                   help="comma-separated module names to adapt (default: the attention projections)")
    g.add_argument("--r", type=_positive_int, default=None, help="rank for lora (8), vera (256), unilora (4)")
    g.add_argument("--projection", default=None,
                   help="gpart: the map from theta to the weights: partition (default) or fastfood (the "
                        "intrinsic-dimension baseline, an ablation)")
    g.add_argument("--column-gain-ratio", type=_gain_ratio, default=None,
                   help="gpart, partition: max/min ratio of the column gains (1, the default: isometric; "
                        "> 1: the non-isometric ablation)")
    g.add_argument("--dropout", type=_fraction, default=None, help="adapter dropout")
    g.add_argument("--seed", type=int, default=0, help="seed of the run and of the GPart partition")


def _add_precision_args(g) -> None:
    # default None: "not given", so `eval` / `merge` can take the run's setting from gpart_task.json
    g.add_argument("--bf16", action="store_true", default=None,
                   help="bf16 mixed precision; causal-lm also loads the base weights in bf16 (adapters stay fp32)")
    quant = g.add_mutually_exclusive_group()
    quant.add_argument("--load-in-4bit", action="store_true", default=None,
                       help="causal-lm: quantize the base to NF4 4-bit with bitsandbytes (compute dtype bf16 "
                            "with --bf16, else fp32)")
    quant.add_argument("--load-in-8bit", action="store_true", default=None,
                       help="causal-lm: quantize the base to 8-bit (LLM.int8) with bitsandbytes")


def _add_model_args(p: argparse.ArgumentParser, *, task_required: bool) -> None:
    p.add_argument("--task", choices=TASKS, required=task_required, default=None)
    p.add_argument("--model", default=None, help="built-in model name or a local model directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gpart", description="GPart fine-tuning on top of Hugging Face PEFT.",
        epilog="Task-dependent defaults (model, dataset, d, learning rates, epochs) are listed in docs/cli.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="fine-tune a model; writes adapter, metrics.json, curve PNG, report.md")
    _add_model_args(t, task_required=True)
    _add_method_args(t)
    _add_data_args(t)
    g = t.add_argument_group("optimisation")
    rate = g.add_mutually_exclusive_group()
    rate.add_argument("--lr", type=_nonneg_float, default=None,
                      help="learning rate of theta / the adapter (gpart default: from --base-lr by the rule)")
    rate.add_argument("--base-lr", type=_nonneg_float, default=None,
                      help="gpart: base learning rate of the rule theta lr = base * (10000/d)^0.75, i.e. theta's "
                           "lr at d = 10,000 (docs/lr.md; default: per task)")
    g.add_argument("--head-lr", type=_nonneg_float, default=None, help="learning rate of the task head")
    g.add_argument("--optimizer", choices=("adamw", "sgd"), default="adamw",
                   help="adamw (default), or sgd with momentum 0.9 (needs --lr: the defaults and GPart's rule are for AdamW)")
    length = g.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_float, default=None, help="passes over train (default: per task)")
    length.add_argument("--max-steps", type=_positive_int, default=None, help="optimizer steps, instead of --epochs")
    g.add_argument("--batch-size", type=_positive_int, default=None)
    g.add_argument("--grad-accum", type=_positive_int, default=1)
    g.add_argument("--weight-decay", type=_nonneg_float, default=None)
    g.add_argument("--warmup", type=lambda t: 0 if t.strip() in ("0", "0.0") else _steps(t), default=None, help="warm-up steps, or a fraction of all steps")
    g.add_argument("--scheduler", choices=SCHEDULERS, default=None)
    g.add_argument("--max-grad-norm", type=_nonneg_float, default=1.0)
    g.add_argument("--eval-steps", type=_steps, default=None,
                   help="evaluate and checkpoint every N steps or fraction (default: every epoch, or 4 times with --max-steps)")
    g.add_argument("--logging-steps", type=_steps, default=0.02)
    _add_precision_args(g)
    g.add_argument("--cpu", action="store_true", help="train on the CPU even if an accelerator is present")
    o = t.add_argument_group("output")
    o.add_argument("--output-dir", required=True)
    state = o.add_mutually_exclusive_group()
    state.add_argument("--resume", action="store_true", help="continue the run in --output-dir from its last checkpoint")
    state.add_argument("--overwrite", action="store_true", help="delete the run already in --output-dir first")
    o.add_argument("--quiet", action="store_true", help="no progress bars")

    e = sub.add_parser("eval", help="evaluate a base model, an adapter, or a saved/merged model")
    _add_model_args(e, task_required=False)
    e.add_argument("--adapter", default=None, help="adapter (or model) directory written by train or merge")
    e.add_argument("--split", choices=("train", "validation", "test"), default="test")
    e.add_argument("--output", default=None, help="also write the metrics to this JSON file")
    e.add_argument("--seed", type=int, default=None,
                   help="seed for subsets and carved splits (default: the adapter's training seed, else 0)")
    e.add_argument("--cpu", action="store_true")
    _add_precision_args(e.add_argument_group("precision (default: the run's)"))
    _add_data_args(e)

    i = sub.add_parser("info", help="trainable parameters, D and adapter bytes, without training")
    _add_model_args(i, task_required=True)
    _add_method_args(i)
    i.add_argument("--num-labels", type=_positive_int, default=2, help="classes of the task head")
    i.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_precision_args(i.add_argument_group("precision (base_bytes: the base's weights as loaded)"))

    m = sub.add_parser("merge", help="fold an adapter into its base model and save a standalone model")
    m.add_argument("--adapter", required=True, help="adapter directory written by train")
    m.add_argument("--model", default=None, help="base model (default: the one the adapter was trained on)")
    m.add_argument("--task", choices=TASKS, default=None)
    m.add_argument("--output-dir", required=True)
    m.add_argument("--overwrite", action="store_true")
    return parser


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
    # A data file named here is the split to evaluate; the run's own dataset (read from the adapter,
    # or named again) is split exactly as in training.
    args.single_file_split = args.split if given is not None and not _same_dataset(given, saved.get("dataset")) \
        else "train"
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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m gpart.cli -- train ...` (see docs/distributed.md)
        argv = argv[1:]
    parser = build_parser()
    args = parser.parse_args(argv)
    _quiet_library_noise()
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
