"""Runnable recipes behind the `gpart` command: one module per task plus shared pieces.

    text_classification, image_classification, causal_lm   the tasks (a TaskRecipe each)
    methods     PEFT config / trainable set per --method, optimizer groups
    training    `gpart train` on transformers Trainer
    evaluation  `gpart eval`, `gpart info`, `gpart merge`: loading saved runs
    base        the TaskRecipe contract the three tasks fulfil
    metrics, predict, reporting, data, models, io          small helpers
"""
from __future__ import annotations

import importlib

TASKS = {
    "text-classification": "text_classification",
    "image-classification": "image_classification",
    "causal-lm": "causal_lm",
}


def get_recipe(task: str):
    """The TaskRecipe for a task name; modules are imported lazily so `gpart --help` stays fast."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    return importlib.import_module(f"{__name__}.{TASKS[task]}").RECIPE
