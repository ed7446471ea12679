"""Getting a dataset into train / validation / test, whatever its source.

Reading is gpart.assets.load_dataset's job (built-in names, CSV/TSV/JSONL tables, image folders);
this module only decides the splits: a missing validation split is carved out of train with a
seeded shuffle, and --max-*-samples take seeded subsets, so runs stay reproducible.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from gpart.assets import DatasetError, load_dataset

DataError = DatasetError  # one error type for every data problem; the CLI prints it without a traceback


def load(args, task: str, **columns):
    """The dataset named by --dataset, read for `task` ("text-classification" | "image-classification" | "math").

    In `gpart eval` a single local file is the split being evaluated, not a training set.
    """
    dataset = load_dataset(args.dataset, task, seed=args.seed, **columns)
    single = getattr(args, "single_file_split", "train")
    if single != "train" and Path(args.dataset).expanduser().is_file():
        dataset.splits = {single: dataset.splits["train"]}
    return dataset


def finish_splits(splits: dict, *, seed: int, val_fraction: float, test_fraction: float = 0.0, take=None) -> dict:
    """train / validation / test, carving what is missing out of train with one seeded shuffle.

    No test split: a `test_fraction` slice of train is held out as test (first in the shuffled
    order), so the test numbers never come from the split that chose the checkpoint; with
    test_fraction 0, test = validation (the run reports this). No validation split: a
    `val_fraction` slice (of the original train size) of what is left. `take(split, indices)`
    selects examples (lists by default; image recipes pass one for arrays).
    """
    take = take or (lambda rows, idx: [rows[i] for i in idx])
    splits = dict(splits)
    if "train" not in splits:
        if not splits:
            raise DataError("dataset has no splits")
        return {"train": None, **splits}
    carve_test = "test" not in splits and test_fraction > 0
    if carve_test or "validation" not in splits:
        train = splits["train"]
        n = split_length(train)
        order = list(range(n))
        random.Random(seed).shuffle(order)
        n_test = min(n - 1, max(1, round(n * test_fraction))) if carve_test and n > 1 else 0
        rest = n - n_test
        n_val = (min(rest - 1, max(1, round(n * val_fraction))) if "validation" not in splits and rest > 1
                 and val_fraction > 0 else 0)
        if carve_test:
            splits["test"] = take(train, sorted(order[:n_test]))
        if "validation" not in splits:
            splits["validation"] = take(train, sorted(order[n_test:n_test + n_val]))
        splits["train"] = take(train, sorted(order[n_test + n_val:]))
    if "test" not in splits:
        splits["test"] = splits["validation"]
    return splits


def limit_splits(splits: dict, args, take=None) -> dict:
    """Apply --max-train-samples / --max-eval-samples as seeded subsets; a test split that *is* the
    validation split stays the same object (the run reports "test = validation")."""
    take = take or (lambda rows, idx: [rows[i] for i in idx])
    out = dict(splits)
    limits = {"train": getattr(args, "max_train_samples", None)}
    limits["validation"] = limits["test"] = limits["all"] = getattr(args, "max_eval_samples", None)
    for split, limit in limits.items():
        rows = splits.get(split)
        if rows is None or limit is None or limit >= split_length(rows):
            continue
        if split == "test" and splits.get("test") is splits.get("validation"):
            out["test"] = out["validation"]
            continue
        idx = sorted(random.Random(f"{args.seed}-{split}").sample(range(split_length(rows)), limit))
        out[split] = take(rows, idx)
    return out


def split_length(rows) -> int:
    """Number of examples in a split: a list of records, or an (images, labels) pair."""
    return len(rows[1]) if isinstance(rows, tuple) else len(rows)


def scored_items(rows, seed: int) -> dict:
    """Which examples a score is on: the seed that drew the split and subsets, and 16 hex digits of a
    SHA-256 over the examples in order (equal digests: the same items), for numbers put side by side."""
    h = hashlib.sha256()
    if isinstance(rows, tuple):  # (images, labels) arrays
        import numpy as np

        for part in rows:
            h.update(np.ascontiguousarray(part).tobytes())
    else:
        h.update(json.dumps(rows, sort_keys=True, ensure_ascii=False, default=str).encode("utf-8"))
    return {"seed": seed, "sha256": h.hexdigest()[:16]}
