"""Datasets from the Hugging Face hub, through the `datasets` library.

gpart runs offline: a hub id (`org/name`, or `org/name:config`) is read from the `datasets` cache, and
downloaded only when the user sets HF_HUB_OFFLINE=0. The splits become the same TextDataset,
ImageDataset or MathDataset that local files give, checked by the same code (gpart.assets.local_data).
"""
from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence

import numpy as np

from .data_types import CAUSAL_LM, CHAT, IMAGE_CLASSIFICATION, MATH, TEXT_CLASSIFICATION, ImageDataset, TextDataset
from .errors import DatasetError
from .lm_data import lm_dataset
from .local_data import _check_columns, _label_encoder, common_format, image_array, text_dataset

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+)?")
# hub split names -> ours; other splits (e.g. "validation_mismatched") are left out
SPLIT_NAMES = {"train": "train", "validation": "validation", "valid": "validation", "val": "validation",
               "dev": "validation", "test": "test"}


def is_hub_id(name: str) -> bool:
    return HUB_ID.fullmatch(name) is not None


def offline() -> bool:
    """gpart's default is offline; HF_HUB_OFFLINE=0 (or false) allows downloads."""
    return os.environ.get("HF_HUB_OFFLINE", "1").strip().lower() not in ("0", "false", "no", "off", "")


def load_hub(spec: str, task: str | None = None, *, text_column: str = "text", label_column: str = "label",
             label_names: Sequence[str] | None = None, image_size: int | tuple[int, int] | None = None,
             image_column: str | None = None, question_column: str = "question", answer_column: str = "answer",
             solution_column: str = "solution", data_format: str | None = None):
    """`org/name[:config]` -> a Dataset for `task` (inferred when None: images if a column holds images).
    Causal-LM tasks (math, chat, causal-lm) read the format `data_format` or the one the columns show."""
    repo, _, config = spec.partition(":")
    splits = _our_splits(spec, _download(repo, config or None))
    features = next(iter(splits.values())).features
    task = task or (IMAGE_CLASSIFICATION if _image_columns(features) else TEXT_CLASSIFICATION)
    if task in (MATH, CHAT, CAUSAL_LM):
        optional = (answer_column, solution_column)  # read along when present: references, worked answers
        sources = {split: (f"{spec} [{split}]", rows.column_names,
                           lambda required, split=split, rows=rows: _records(spec, split, rows, required, optional))
                   for split, rows in splits.items()}
        return lm_dataset(sources, task=task, data_format=data_format, question_column=question_column,
                          answer_column=answer_column, solution_column=solution_column)
    label_column = _label_column(spec, features, label_column)
    splits = _labelled(spec, splits, label_column)
    classes = _class_names(features, label_column)
    if task == IMAGE_CLASSIFICATION:
        return _image_dataset(spec, splits, _image_column(spec, features, image_column), label_column, image_size,
                              label_names or classes, classes)
    sources = {split: (f"{spec} [{split}]", _named_labels(_records(spec, split, rows, (text_column, label_column)),
                                                         label_column, classes))
               for split, rows in splits.items()}
    return text_dataset(sources, text_column, label_column, label_names or classes)


# ------------------------------------------------------------------------------------- reading the hub
def _download(repo: str, config: str | None):
    try:
        import datasets
    except ImportError:
        raise DatasetError(f"dataset {repo!r} looks like a Hugging Face hub id, and reading one needs the "
                           "`datasets` package: pip install 'gpart[hub]' (or pip install datasets)") from None
    from huggingface_hub import constants

    name = repo + (f":{config}" if config else "")
    quiet = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity_error()  # not "Using the latest cached version ..." on every offline run
    try:
        with _offline_flags(offline(), datasets.config, constants):
            return datasets.load_dataset(repo, config)
    except (ConnectionError, FileNotFoundError) as e:  # not reachable, not cached, no such dataset
        how = ("it is not in the local datasets cache (gpart runs offline; set HF_HUB_OFFLINE=0 to download it)"
               if offline() else f"the hub did not provide it ({_one_line(e)})")
        raise DatasetError(f"dataset {name!r}: not a built-in dataset or a local file or folder; as a "
                           f"Hugging Face hub id, {how}") from None
    except Exception as e:  # noqa: BLE001 - e.g. an unknown or missing configuration
        raise DatasetError(f"dataset {name!r}: the datasets library could not load it: {_one_line(e)}. "
                           f"A dataset with several configurations is named as {repo}:CONFIG") from None
    finally:
        datasets.logging.set_verbosity(quiet)


def _one_line(error: Exception) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip()) or type(error).__name__


@contextlib.contextmanager
def _offline_flags(value: bool, *modules):
    """Both libraries read HF_HUB_OFFLINE once, when first imported, maybe before gpart set its default."""
    saved = [m.HF_HUB_OFFLINE for m in modules]
    for m in modules:
        m.HF_HUB_OFFLINE = value
    try:
        yield
    finally:
        for m, v in zip(modules, saved):
            m.HF_HUB_OFFLINE = v


def _our_splits(spec: str, dataset_dict) -> dict:
    splits = {}
    for name, rows in dataset_dict.items():
        ours = SPLIT_NAMES.get(name)
        if ours is not None and ours not in splits:
            splits[ours] = rows
    if not splits:
        raise DatasetError(f"{spec}: no train, validation or test split; its splits are "
                           f"{', '.join(dataset_dict) or 'none'}")
    return splits


def _records(spec: str, split: str, rows, required: Sequence[str],
             optional: Sequence[str] = ()) -> Iterator[tuple[str, dict]]:
    _check_columns(f"{spec} [{split}]", rows.column_names, required)
    wanted = list(dict.fromkeys([*required, *(c for c in optional if c in rows.column_names)]))
    for i, row in enumerate(rows.select_columns(wanted)):
        yield f"{spec} [{split}] row {i}", row


# ------------------------------------------------------------------------------------- labels
def _class_names(features, column: str) -> list[str] | None:
    feature = features.get(column)
    return list(feature.names) if type(feature).__name__ == "ClassLabel" else None


def _label_column(spec: str, features, asked: str) -> str:
    """The asked column if present, else the one ClassLabel column (e.g. CIFAR-100's "fine_label" ...)."""
    if asked in features:
        return asked
    class_labels = [c for c, f in features.items() if type(f).__name__ == "ClassLabel"]
    if asked == "label" and len(class_labels) == 1:
        return class_labels[0]
    raise DatasetError(f"{spec}: no column {asked!r}; columns found: {', '.join(features)}. "
                       "Choose the label column with --label-column (label_column=...).")


def _labelled(spec: str, splits: dict, label_column: str) -> dict:
    """Drop splits whose labels are all hidden (-1, as in GLUE's test sets); a split left partly
    unlabelled is an error, not a silently smaller one."""
    out = {}
    for split, rows in splits.items():
        if type(rows.features[label_column]).__name__ != "ClassLabel":
            out[split] = rows
            continue
        labels = np.asarray(rows[label_column])
        hidden = int((labels < 0).sum())
        if hidden == len(labels) and len(labels):
            warnings.warn(f"{spec}: the {split} split has no labels (all -1); it is left out", stacklevel=3)
        elif hidden:
            raise DatasetError(f"{spec} [{split}]: {hidden} of {len(labels)} examples have no label (-1)")
        else:
            out[split] = rows
    if not out:
        raise DatasetError(f"{spec}: no split has labels in column {label_column!r}")
    return out


def _named_labels(records, label_column: str, names: list[str] | None):
    """ClassLabel ids -> their names, so that label_names given by the user are matched by name."""
    for where, row in records:
        if names is not None and isinstance(row[label_column], int):
            row = {**row, label_column: names[row[label_column]]}
        yield where, row


# ------------------------------------------------------------------------------------- images
def _image_columns(features) -> list[str]:
    return [c for c, f in features.items() if type(f).__name__ == "Image"]


def _image_column(spec: str, features, asked: str | None) -> str:
    found = _image_columns(features)
    if asked is not None:
        if asked not in found:
            raise DatasetError(f"{spec}: no image column {asked!r}; image columns: {', '.join(found) or 'none'}")
        return asked
    if len(found) != 1:
        raise DatasetError(f"{spec}: {'no column holds' if not found else 'several columns hold'} images "
                           f"({', '.join(found) or 'columns: ' + ', '.join(features)}); choose one with --image-column")
    return found[0]


def _image_dataset(spec: str, splits: dict, image_column: str, label_column: str, image_size, label_names, classes):
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    named = {split: list(_named_labels(_records(spec, split, rows, (image_column, label_column)), label_column, classes))
             for split, rows in splits.items()}
    everything = [(where, row[label_column]) for rows in named.values() for where, row in rows]
    names, encode = _label_encoder(everything, label_names)
    mode, size = common_format(((where, row[image_column]) for rows in named.values() for where, row in rows), size)
    out = {}
    for split, rows in named.items():
        images = np.stack([image_array(where, row[image_column], mode, size) for where, row in rows])
        out[split] = (images, np.array([encode(where, row[label_column]) for where, row in rows], dtype=np.int64))
    return ImageDataset(out, names)
