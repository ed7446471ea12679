"""Reading user data files and shaping them into train / validation / test splits.

Accepted: one file (.csv, .tsv, .jsonl, .json) or a directory holding train.* and optionally
validation.* (or val.*, dev.*) and test.* in those formats. A missing validation split is carved
out of train with a seeded shuffle, so runs stay reproducible.
"""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

SUFFIXES = (".csv", ".tsv", ".jsonl", ".json")
SPLIT_ALIASES = {"train": ("train",), "validation": ("validation", "val", "valid", "dev"), "test": ("test",)}


class DataError(ValueError):
    """A dataset is missing, malformed or lacks a required column."""


def read_records(path: str | Path) -> list[dict]:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")
    try:
        if suffix in (".csv", ".tsv"):
            with path.open(newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
                rows = list(reader)
                if reader.fieldnames is None:
                    raise DataError(f"{path}: empty file, expected a header row")
                if any(None in row for row in rows):  # DictReader puts surplus cells under key None
                    raise DataError(f"{path}: a row has more cells than the header")
                return rows
        if suffix == ".jsonl":
            rows = []
            with path.open(encoding="utf-8") as f:
                for lineno, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise DataError(f"{path}:{lineno}: malformed JSON line: {e.msg}") from None
            return _check_objects(path, rows)
        with path.open(encoding="utf-8") as f:
            try:
                obj = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: malformed JSON: {e.msg}") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
        return _check_objects(path, obj)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    except csv.Error as e:
        raise DataError(f"{path}: malformed CSV: {e}") from None


def _check_objects(path, rows):
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path}: record {i} is {type(row).__name__}, expected an object")
    return rows


def find_split_files(directory: Path) -> dict[str, Path]:
    found = {}
    for split, names in SPLIT_ALIASES.items():
        for name in names:
            for suffix in SUFFIXES:
                candidate = directory / f"{name}{suffix}"
                if candidate.exists() and split not in found:
                    found[split] = candidate
    if "train" not in found and "test" not in found:
        raise DataError(f"{directory}: expected train.<ext> (and optionally validation/test) with ext in {SUFFIXES}")
    return found


def read_splits(path: str | Path, single: str = "train") -> dict[str, list[dict]]:
    """A file -> {single: rows} (train when training, the evaluated split in `gpart eval`);
    a directory -> every split file it holds."""
    path = Path(path)
    if path.is_dir():
        return {split: read_records(p) for split, p in find_split_files(path).items()}
    return {single: read_records(path)}


def require_columns(rows: list[dict], columns: list[str], where: str) -> None:
    if not rows:
        raise DataError(f"{where}: no records")
    present = set(rows[0])
    missing = [c for c in columns if c not in present]
    if missing:
        raise DataError(f"{where}: missing column(s) {missing}; found {sorted(present)}")
    for i, row in enumerate(rows):
        for c in columns:
            if row.get(c) in (None, ""):
                raise DataError(f"{where}: record {i} has an empty {c!r}")


def finish_splits(splits: dict[str, list], *, seed: int, val_fraction: float) -> dict[str, list]:
    """Return train / validation / test, carving what is missing out of train.

    Only train given: validation = a `val_fraction` slice of it, and test = validation (reported as
    such). Official test but no validation: validation comes out of train, test stays untouched.
    """
    splits = dict(splits)
    if "train" not in splits:
        if "validation" in splits or "test" in splits:
            return {"train": [], **splits, "test": splits.get("test", splits.get("validation"))}
        raise DataError("dataset has no train split")
    if "validation" not in splits:
        train = list(splits["train"])
        random.Random(seed).shuffle(train)
        n_val = max(1, int(round(len(train) * val_fraction))) if len(train) > 1 else 0
        splits["validation"], splits["train"] = train[:n_val], train[n_val:]
    if "test" not in splits:
        splits["test"] = splits["validation"]
    return splits


def subsample(rows: list, limit: int | None, seed: int) -> list:
    """A seeded random subset (keeps class mix; the head of a file is often sorted by class)."""
    if limit is None or limit >= len(rows):
        return rows
    idx = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in idx]


def builtin(name: str, task: str):
    """A built-in dataset from gpart.assets -> ({split: records}, label names or None)."""
    try:
        from gpart.assets import load_dataset
    except ImportError as e:
        raise DataError(f"dataset {name!r} is not a file or directory, and built-in datasets are unavailable ({e})") from None
    try:
        result = load_dataset(name)
    except (KeyError, LookupError, ValueError) as e:
        raise DataError(f"dataset {name!r}: not an existing file or directory, and not a built-in dataset ({e})") from None
    return result


def limit_splits(splits: dict[str, list], args) -> dict[str, list]:
    """Apply --max-train-samples / --max-eval-samples; a test split that *is* validation stays so."""
    out = dict(splits)
    out["train"] = subsample(splits.get("train") or [], getattr(args, "max_train_samples", None), args.seed)
    limit = getattr(args, "max_eval_samples", None)
    for split in ("validation", "test"):
        if split in splits:
            same = split == "test" and splits.get("test") is splits.get("validation")
            out[split] = out["validation"] if same else subsample(splits[split], limit, args.seed + 1)
    return out
