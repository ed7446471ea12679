"""The contract every task recipe fulfils, so cli.py and training.py stay task-agnostic."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

TASK_FILE = "gpart_task.json"  # saved next to the adapter: what `gpart eval`/`merge` need to rebuild the model


@dataclass
class TaskData:
    """train / validation / test in the recipe's own record format, plus what describes them."""

    splits: dict[str, Any]
    labels: list[str] | None = None  # class names, for classification
    source: str = ""  # dataset name or path, for reports
    format: str | None = None  # causal LM: "messages" | "prompt-completion" | "question-answer"
    skipped: dict[str, int] = field(default_factory=dict)  # split -> rows left out (e.g. too long), reported


class TaskRecipe:
    name: str = ""
    task_type: str | None = None  # PEFT task_type
    target_family: str = "attention-qv"  # see models.DEFAULT_TARGETS
    primary_metric: str = "accuracy"  # chooses the best checkpoint; eval_<metric> in Trainer logs
    greater_is_better: bool = True
    has_head: bool = True
    # The model's loss is the mean over the batch's examples and ignores the Trainer's
    # num_items_in_batch (classification heads). The Trainer must then not rescale it for gradient
    # accumulation or the number of processes (see training.train). Token-level losses that divide
    # by num_items_in_batch (causal LM) set this False.
    loss_is_batch_mean: bool = True
    # defaults["lr"] is GPart's *base* learning rate: theta's lr is lr * (10,000 / d) ** 0.75 (gpart.lr, docs/lr.md)
    defaults: dict = {}

    # ---- data
    def load_data(self, args, *, saved: dict | None = None) -> TaskData:
        """Read --dataset (a built-in name or a path). `saved` is the task file of a trained run."""
        raise NotImplementedError

    # ---- model
    def auto_class(self):
        """The transformers Auto* class for this task (used to build models from a config)."""
        raise NotImplementedError

    def load_model(self, path: Path, args, labels: list[str] | None):
        """(model, processor) for the base model at `path`, with a fresh head sized for `labels`."""
        raise NotImplementedError

    def load_saved_model(self, path: Path, args, labels: list[str] | None):
        """(model, processor) for a full model saved by `gpart train --method full|head-only` or merge."""
        raise NotImplementedError

    # ---- training inputs
    def make_dataset(self, records, processor, args, data: TaskData, *, train: bool):
        raise NotImplementedError

    def collator(self, processor, args) -> Callable:
        raise NotImplementedError

    def compute_metrics(self, data: TaskData) -> Callable | None:
        """The Trainer's compute_metrics. It must also return "loss", computed from the gathered,
        per-example predictions: the Trainer's own eval loss is a mean of batch means, and under
        several processes it counts the examples repeated to pad each process's last batch."""
        return None

    def preprocess_logits(self) -> Callable | None:
        """The Trainer's preprocess_logits_for_metrics: shrinks each batch's logits to what
        compute_metrics needs, before they are gathered from every process."""
        return None

    # ---- evaluation outside the Trainer (final test numbers, `gpart eval`)
    def evaluate(self, model, processor, records, args, data: TaskData) -> dict:
        raise NotImplementedError

    def task_info(self, args, data: TaskData) -> dict:
        """Settings to save with the adapter so evaluation can rebuild the same inputs."""
        return {"labels": data.labels}
