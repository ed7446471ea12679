"""The `gpart` command's entry point: argument parsing, then the work in gpart.cli.

It lives outside the gpart package because importing anything under gpart runs gpart/__init__,
which imports PEFT, transformers and torch (seconds): `gpart --help`, `gpart train --help` and
argument errors are answered from here without them.
"""
from __future__ import annotations

import argparse
import contextlib
import sys

# the names of gpart.recipes.TASKS and gpart.recipes.methods.METHODS (tests/test_cli_console.py ties them)
TASKS = ("text-classification", "image-classification", "causal-lm")
METHODS = ("gpart", "lora", "vera", "unilora", "full", "head-only")
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")


# --------------------------------------------------------------------------------------- parsing
def _number(convert, ok, expected: str, what: str = "a number"):
    """An argparse type: `convert` the text (else "expected <what>"), then check it (else "expected <expected>")."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {value}")
        return value
    return parse


_positive_int = _number(lambda t: int(t.replace("_", "")), lambda v: v > 0, "a positive integer", "a positive integer")
_fraction = _number(float, lambda v: 0 <= v < 1, "a fraction in [0, 1)")
_positive_float = _number(float, lambda v: v > 0, "a number > 0")
_gain_ratio = _number(float, lambda v: v >= 1, "a number >= 1 (1: isometric)")
_nonneg_float = _number(float, lambda v: v >= 0, "a number >= 0")


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
    g.add_argument("--partition-scope", choices=("global", "transformer_block"), default=None,
                   help="gpart: one partition of all adapted weights (global, the default), or one per numbered "
                        "transformer block on its own slice of theta (transformer_block, the authors' option)")
    g.add_argument("--grouping", choices=("random", "signed_magnitude"), default=None,
                   help="gpart: which weights share a coordinate: random (GPart's partition, the default) or "
                        "signed_magnitude (experimental ablation: bins by the sign and magnitude of the base weights)")
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


class _Parser(argparse.ArgumentParser):
    """Bad arguments get one line naming the problem, not the whole usage (which --help gives)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
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
    e.add_argument("--split", choices=("train", "validation", "test", "all"), default="test",
                   help="the split to score (default test); all: every row of a single data file")
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


@contextlib.contextmanager
def _silenced(*loggers: str):
    """Only these loggers' errors get through while the block runs (their warnings are dropped)."""
    import logging

    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `torchrun ... -m gpart.cli -- train ...` (see docs/distributed.md)
        argv = argv[1:]
    args = build_parser().parse_args(argv)
    # Importing PEFT imports bitsandbytes, whose CPU backend then tries to fetch an optional kernel
    # through the `kernels` package and logs how that went: news only for a 4-bit or 8-bit base.
    quantized = getattr(args, "load_in_4bit", None) or getattr(args, "load_in_8bit", None)
    with contextlib.nullcontext() if quantized else _silenced("bitsandbytes", "kernels"):
        from gpart.cli import run
    return run(args)
