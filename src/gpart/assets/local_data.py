"""Datasets from the user's own files: CSV/TSV/JSONL tables and class-per-sub-folder image trees.

Layouts understood:
  data.csv | data.tsv | data.jsonl          -> one split, "train"
  folder/{train,validation,test}.<ext>      -> one split per file present
  images/<class>/<image>                    -> one split, "train"
  images/{train,validation,test}/<class>/<image> -> one split per sub-folder
Every problem is a DatasetError that names the file, and the line for a bad row.
"""
from __future__ import annotations

import csv
import json
import re
from pathlib import Path
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

from .data_types import (CAUSAL_LM, CHAT, IMAGE_CLASSIFICATION, MATH, TEXT_CLASSIFICATION, ImageDataset,
                         MathDataset, TextDataset)
from .errors import DatasetError

TABLE_SUFFIXES = (".csv", ".tsv", ".jsonl", ".ndjson")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_NAMES = ("train", "validation", "test")
_INT = re.compile(r"[+-]?\d+")


def load_local(path: Path, task: str | None = None, *, text_column: str = "text", label_column: str = "label",
               label_names: Sequence[str] | None = None, image_size: int | tuple[int, int] | None = None,
               question_column: str = "question", answer_column: str = "answer",
               solution_column: str = "solution", data_format: str | None = None):
    """Load a local file or folder; `task` is inferred when None (tables: text classification).
    Causal-LM tasks (math, chat, causal-lm) read the format `data_format` or the one the columns show."""
    tables = _table_splits(path)
    task = task or (TEXT_CLASSIFICATION if tables else IMAGE_CLASSIFICATION)
    if task == IMAGE_CLASSIFICATION:
        if not path.is_dir():
            raise DatasetError(f"{path}: image classification needs a folder with one sub-folder per class")
        return load_image_folder(path, image_size=image_size)
    if not tables:
        raise DatasetError(f"{path}: no data file found; expected a {'/'.join(TABLE_SUFFIXES)} file "
                           f"or a folder holding {{{','.join(SPLIT_NAMES)}}}.<ext>")
    if task in (MATH, CHAT, CAUSAL_LM):
        from .lm_data import lm_dataset

        sources = {split: (f, table_columns(f), lambda required, f=f: _records(f, required))
                   for split, f in tables.items()}
        return lm_dataset(sources, task=task, data_format=data_format, question_column=question_column,
                          answer_column=answer_column, solution_column=solution_column)
    return load_text_classification(tables, text_column, label_column, label_names)


# ------------------------------------------------------------------------------------- text classification
def load_text_classification(tables: dict[str, Path], text_column: str = "text", label_column: str = "label",
                             label_names: Sequence[str] | None = None) -> TextDataset:
    return text_dataset({split: (f, _records(f, (text_column, label_column))) for split, f in tables.items()},
                        text_column, label_column, label_names)


def text_dataset(sources: dict[str, tuple[object, Iterable[tuple[str, dict]]]], text_column: str, label_column: str,
                 label_names: Sequence[str] | None = None) -> TextDataset:
    """split -> (where it comes from, its ("where", row) records) -> a TextDataset; labels as _label_encoder reads them."""
    raw = {split: _read_pairs(source, records, text_column, label_column) for split, (source, records) in sources.items()}
    everything = [(where, label) for rows in raw.values() for where, _, label in rows]
    names, encode = _label_encoder(everything, label_names)
    splits = {split: [{"text": text, "label": encode(where, label)} for where, text, label in rows]
              for split, rows in raw.items()}
    return TextDataset(splits, names)


def _read_pairs(source: object, records: Iterable[tuple[str, dict]], text_column: str,
                label_column: str) -> list[tuple[str, str, object]]:
    rows = []
    for where, row in records:
        text, label = row[text_column], row[label_column]
        if not isinstance(text, str):
            raise DatasetError(f"{where}: column {text_column!r} must hold text, got {text!r}")
        rows.append((where, text, label))
    if not rows:
        raise DatasetError(f"{source}: no examples (the file has no data rows)")
    return rows


def _label_encoder(labels: list[tuple[str, object]], given: Sequence[str] | None):
    """Label names and a function mapping a raw label to its id.

    Integer labels (or integer strings, as CSV gives them) are used as ids; any other string is a class
    name, and names are numbered in sorted order unless `given` fixes the order.
    """
    for where, value in labels:
        if value is None or value == "" or isinstance(value, (float, list, dict)):
            raise DatasetError(f"{where}: label {value!r} is neither an integer class id nor a class name")
    if given is not None:
        names = [str(n) for n in given]
        index = {n: i for i, n in enumerate(names)}

        def encode(where: str, value: object) -> int:
            key = str(value)
            if key in index:
                return index[key]
            if _is_int(value) and 0 <= int(value) < len(names):
                return int(value)
            raise DatasetError(f"{where}: label {value!r} is not one of label_names {names}")
        return names, encode
    if all(_is_int(v) for _, v in labels):
        for where, value in labels:
            if int(value) < 0:
                raise DatasetError(f"{where}: class id {value!r} is negative")
        return [str(i) for i in range(max(int(v) for _, v in labels) + 1)], lambda where, v: int(v)
    names = sorted({str(v) for _, v in labels})
    index = {n: i for i, n in enumerate(names)}
    return names, lambda where, v: index[str(v)]


def _is_int(value: object) -> bool:
    if isinstance(value, bool):
        return False  # JSON true/false are class names, not ids
    return isinstance(value, int) or (isinstance(value, str) and _INT.fullmatch(value.strip()) is not None)


# ------------------------------------------------------------------------------------- math
def read_math_table(path: Path, question_column: str = "question", answer_column: str = "answer",
                    solution_column: str = "solution") -> list[dict]:
    return math_rows(path, _records(path, (question_column, answer_column)), question_column, answer_column,
                     solution_column)


def math_rows(source: object, records: Iterable[tuple[str, dict]], question_column: str = "question",
              answer_column: str = "answer", solution_column: str = "solution") -> list[dict]:
    """("where", row) records -> MathDataset rows; the solution defaults to the answer (e.g. GSM8K's
    "steps ... #### 42", whose final number the scorer finds)."""
    rows = []
    for where, row in records:
        question, answer = row[question_column], row[answer_column]
        if not isinstance(question, str) or answer is None or isinstance(answer, (list, dict)):
            raise DatasetError(f"{where}: needs a text {question_column!r} and an {answer_column!r}")
        answer = str(answer).strip()
        solution = row.get(solution_column)
        rows.append({"question": question, "answer": answer,
                     "solution": str(solution) if solution not in (None, "") else answer})
    if not rows:
        raise DatasetError(f"{source}: no examples (the file has no data rows)")
    return rows


# ------------------------------------------------------------------------------------- reading tables
def _table_splits(path: Path) -> dict[str, Path]:
    if path.is_file():
        if path.suffix.lower() not in TABLE_SUFFIXES:
            raise DatasetError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(TABLE_SUFFIXES)}")
        return {"train": path}
    return {split: path / f"{split}{suffix}" for split in SPLIT_NAMES for suffix in TABLE_SUFFIXES
            if (path / f"{split}{suffix}").is_file()}


def table_columns(path: Path) -> list[str]:
    """The columns of a table: a CSV/TSV header, or the keys of a JSONL file's first row (none: an error)."""
    if path.suffix.lower() not in (".jsonl", ".ndjson"):
        with open(path, newline="", encoding="utf-8-sig") as fh:
            header = next(csv.reader(fh, delimiter="\t" if path.suffix.lower() == ".tsv" else ","), None)
        if header is None:
            raise DatasetError(f"{path}: the file is empty (no header row)")
        return header
    for _, row in _jsonl_records(path, ()):
        return list(row)
    raise DatasetError(f"{path}: the file is empty (no JSON object on any line)")


def _records(path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict]]:
    """(\"file:line\", row) for every data row, after checking that the required columns exist."""
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        yield from _jsonl_records(path, required)
    else:
        yield from _csv_records(path, required, "\t" if path.suffix.lower() == ".tsv" else ",")


def _csv_records(path: Path, required: Sequence[str], delimiter: str) -> Iterator[tuple[str, dict]]:
    csv.field_size_limit(2**31 - 1)  # e-mails and reviews can exceed csv's 128 KiB default
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh, delimiter=delimiter, strict=True)
        try:
            header = next(reader, None)
            if header is None:
                raise DatasetError(f"{path}: the file is empty (no header row)")
            _check_columns(path, header, required)
            for fields in reader:
                where = f"{path}:{reader.line_num}"
                if not fields:
                    continue  # blank line
                if len(fields) != len(header):
                    raise DatasetError(f"{where}: malformed row: {len(fields)} fields where the header "
                                       f"has {len(header)}")
                yield where, dict(zip(header, fields))
        except csv.Error as err:
            raise DatasetError(f"{path}:{reader.line_num}: malformed CSV: {err}") from err
        except UnicodeDecodeError as err:
            raise DatasetError(f"{path}: not UTF-8 text ({err})") from err


def _jsonl_records(path: Path, required: Sequence[str]) -> Iterator[tuple[str, dict]]:
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, start=1):
            where = f"{path}:{number}"
            if not line.strip():
                continue
            try:
                row = json.loads(line.decode("utf-8-sig" if number == 1 else "utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as err:
                raise DatasetError(f"{where}: malformed JSON line: {err}") from err
            if not isinstance(row, dict):
                raise DatasetError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            _check_columns(where, list(row), required)
            yield where, row


def _check_columns(where: object, found: Sequence[str], required: Sequence[str]) -> None:
    for column in required:
        if column not in found:
            raise DatasetError(f"{where}: no column {column!r}; columns found: {', '.join(map(str, found)) or 'none'}. "
                               f"Choose the column names with the *_column options.")


# ------------------------------------------------------------------------------------- image folders
def load_image_folder(root: Path, image_size: int | tuple[int, int] | None = None) -> ImageDataset:
    """Class-per-sub-folder images -> uint8 arrays; grey if every image is grey, else RGB."""
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder")
    folders = _subfolders(root)
    if folders and all(f.name in SPLIT_NAMES for f in folders):
        split_roots = {f.name: f for f in folders}
    else:
        split_roots = {"train": root}
    files = {split: _class_files(folder) for split, folder in split_roots.items()}
    names = sorted({cls for listing in files.values() for _, cls in listing})
    index = {n: i for i, n in enumerate(names)}
    size = (image_size, image_size) if isinstance(image_size, int) else image_size
    mode, size = common_format(_opened(p for listing in files.values() for p, _ in listing), size)
    splits = {}
    for split, listing in files.items():
        images = np.stack([_read_image(p, mode, size) for p, _ in listing])
        splits[split] = (images, np.array([index[c] for _, c in listing], dtype=np.int64))
    return ImageDataset(splits, names)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _class_files(folder: Path) -> list[tuple[Path, str]]:
    classes = _subfolders(folder)
    if not classes:
        raise DatasetError(f"{folder}: no class sub-folders; expected {folder}/<class name>/<image file>")
    listing = []
    for cls in classes:
        images = sorted(p for p in cls.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise DatasetError(f"{cls}: class folder holds no images ({', '.join(IMAGE_SUFFIXES)})")
        listing += [(p, cls.name) for p in images]
    return listing


def _open_image(path: Path):
    try:
        return _pil().open(path)
    except Exception as err:  # PIL raises many kinds for a broken file
        raise DatasetError(f"{path}: not a readable image ({err})") from err


def _opened(paths: Iterable[Path]) -> Iterator[tuple[str, object]]:
    """("path", PIL image) for each file, each open only while the caller looks at it."""
    for path in paths:
        with _open_image(path) as image:
            yield str(path), image


def common_format(images: Iterable[tuple[str, object]], size: tuple[int, int] | None) -> tuple[str, tuple[int, int]]:
    """Pixel mode and (height, width) shared by ("where", PIL image) pairs: grey if every image is grey,
    else RGB; a size of their own only if they all have the same one. Reads headers only."""
    grey, sizes = True, {}
    for where, im in images:
        grey &= im.mode in ("1", "L", "LA", "I", "I;16", "F")
        sizes.setdefault((im.height, im.width), where)
    if not sizes:
        raise DatasetError("no images")
    if size is None and len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DatasetError(f"images differ in size: {p1} is {s1[1]}x{s1[0]}, {p2} is {s2[1]}x{s2[0]}; "
                           f"pass image_size to resize them all")
    return ("L" if grey else "RGB"), (size or next(iter(sizes)))


def _read_image(path: Path, mode: str, size: tuple[int, int]) -> np.ndarray:
    with _open_image(path) as image:
        return image_array(str(path), image, mode, size)


def image_array(where: str, image, mode: str, size: tuple[int, int]) -> np.ndarray:
    """A PIL image as uint8 pixels in `mode` at (height, width) `size`."""
    try:
        image = image.convert(mode)
        if (image.height, image.width) != size:
            image = image.resize((size[1], size[0]), _pil().BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    except Exception as err:
        raise DatasetError(f"{where}: not a readable image ({err})") from err


def _pil():
    try:
        from PIL import Image
    except ImportError as err:
        raise DatasetError("reading images needs Pillow: pip install pillow") from err
    return Image
