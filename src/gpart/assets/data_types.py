"""The three dataset shapes every loader returns, and the one deterministic way we split data.

Kept deliberately plain (lists of dicts, numpy arrays) so that a recipe can turn them into whatever
its trainer wants without this layer importing torch or `datasets`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import ClassVar, Union
from collections.abc import Sequence

import numpy as np

from .errors import DatasetError

TEXT_CLASSIFICATION = "text-classification"
IMAGE_CLASSIFICATION = "image-classification"
MATH = "math"
CHAT = "chat"
TASKS = (TEXT_CLASSIFICATION, IMAGE_CLASSIFICATION, MATH, CHAT)
# Data for causal-LM fine-tuning: question/answer tables (MathDataset) or chat / prompt-completion data
# (ChatDataset), told apart by their columns. Passing this as `task` accepts either.
CAUSAL_LM = "causal-lm"
TASK_GROUPS = {CAUSAL_LM: (MATH, CHAT)}
# The formats a causal-LM dataset can have (`data_format`): "auto" detects one from the columns.
MESSAGES, PROMPT_COMPLETION, QUESTION_ANSWER = "messages", "prompt-completion", "question-answer"
LM_FORMATS = (MESSAGES, PROMPT_COMPLETION, QUESTION_ANSWER)
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class TextDataset:
    """splits: name -> [{"text": str, "label": int}]; a label indexes label_names."""

    splits: dict[str, list[dict]]
    label_names: list[str]
    task: ClassVar[str] = TEXT_CLASSIFICATION

    def __getitem__(self, split: str) -> list[dict]:
        return self.splits[split]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class ImageDataset:
    """splits: name -> (images uint8 [N, H, W] or [N, H, W, 3], labels int64 [N]); a label indexes label_names."""

    splits: dict[str, tuple[np.ndarray, np.ndarray]]
    label_names: list[str]
    task: ClassVar[str] = IMAGE_CLASSIFICATION

    def __getitem__(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        return self.splits[split]

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass
class MathDataset:
    """splits: name -> [{"question": str, "answer": final answer as a string, "solution": worked steps ending
    with the answer}]."""

    splits: dict[str, list[dict]] = field(default_factory=dict)
    task: ClassVar[str] = MATH

    def __getitem__(self, split: str) -> list[dict]:
        return self.splits[split]


@dataclass
class ChatDataset:
    """Supervised data for a causal LM, in one of two formats (TRL's, see docs/cli.md):

    format "messages": splits: name -> [{"messages": [{"role", "content"}, ...], "train_from": int,
        "answer": str | None}]. The loss covers the assistant messages at index >= train_from (0: every
        assistant turn; a conversational prompt/completion row is stored as prompt + completion with
        train_from = len(prompt)). "answer" is the reference for exact match (None: the content of the
        last assistant message). Only "messages" is required; the other keys default as above.
    format "prompt-completion": splits: name -> [{"prompt": str, "completion": str, "answer": str | None}].
    Either may carry "where" (e.g. "file.jsonl:12"): errors found later (a chat template that cannot
    render the row) name it.
    """

    splits: dict[str, list[dict]] = field(default_factory=dict)
    format: str = MESSAGES
    task: ClassVar[str] = CHAT

    def __getitem__(self, split: str) -> list[dict]:
        return self.splits[split]


Dataset = Union[TextDataset, ImageDataset, MathDataset, ChatDataset]


def split_order(keys: Sequence[str], seed: int) -> list[int]:
    """Indices ordered by a keyed hash of each example's stable key: a shuffle that is the same on every
    machine and numpy version, and that keeps the relative order of examples when others are added."""
    def rank(i: int) -> bytes:
        return hashlib.blake2b(f"{seed}\x00{keys[i]}".encode(), digest_size=8).digest()
    return sorted(range(len(keys)), key=rank)


def split_indices(keys: Sequence[str], labels: Sequence[int] | None, test_fraction: float,
                  seed: int) -> tuple[list[int], list[int]]:
    """(train, test) indices; stratified when labels are given: each class gives round(n_c * test_fraction)
    examples to test. Both lists come in the seeded hash order, so any prefix is a fair sample."""
    if not 0.0 < test_fraction < 1.0:
        raise DatasetError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    order = split_order(keys, seed)
    groups = labels if labels is not None else [0] * len(keys)
    in_class: dict[int, int] = {}
    n_class = {c: sum(1 for g in groups if g == c) for c in set(groups)}
    train, test = [], []
    for i in order:
        c = groups[i]
        taken = in_class.get(c, 0)
        (test if taken < int(n_class[c] * test_fraction + 0.5) else train).append(i)
        in_class[c] = taken + 1
    return train, test


def train_test_split(dataset: Dataset, test_fraction: float = 0.2, seed: int = 0, source: str = "train") -> Dataset:
    """Split one split of `dataset` (e.g. a local file, which loads as "train" only) into train and test."""
    if source not in dataset.splits:
        raise DatasetError(f"no split {source!r} to divide; splits: {', '.join(dataset.splits)}")
    data = dataset.splits[source]
    if isinstance(dataset, ImageDataset):
        images, labels = data
        train, test = split_indices([str(i) for i in range(len(labels))], labels.tolist(), test_fraction, seed)
        return ImageDataset({"train": (images[train], labels[train]), "test": (images[test], labels[test])},
                            list(dataset.label_names))
    keys = [str(i) for i in range(len(data))]
    labels = [row["label"] for row in data] if isinstance(dataset, TextDataset) else None
    train, test = split_indices(keys, labels, test_fraction, seed)
    splits = {"train": [data[i] for i in train], "test": [data[i] for i in test]}
    if isinstance(dataset, TextDataset):
        return TextDataset(splits, list(dataset.label_names))
    if isinstance(dataset, ChatDataset):
        return ChatDataset(splits, dataset.format)
    return MathDataset(splits)
