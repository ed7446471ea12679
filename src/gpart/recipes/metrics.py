"""Task metrics: classification scores and exact match on a final numeric answer.

Written with numpy alone so the package needs neither scikit-learn nor `evaluate`.
"""
from __future__ import annotations

import math
import re
import string

import numpy as np


def classification_metrics(predictions, labels, num_labels: int | None = None) -> dict[str, float]:
    """accuracy, macro-F1 (over classes present in labels or predictions) and Matthews correlation."""
    pred = np.asarray(predictions).reshape(-1).astype(np.int64)
    true = np.asarray(labels).reshape(-1).astype(np.int64)
    if pred.shape != true.shape:
        raise ValueError(f"{pred.shape[0]} predictions for {true.shape[0]} labels")
    if true.size == 0:
        return {"accuracy": float("nan"), "macro_f1": float("nan"), "mcc": float("nan")}
    k = int(max(num_labels or 0, pred.max() + 1, true.max() + 1))
    cm = np.zeros((k, k), dtype=np.float64)  # rows = true class, columns = predicted class
    np.add.at(cm, (true, pred), 1)
    return {"accuracy": float(np.trace(cm) / cm.sum()), "macro_f1": _macro_f1(cm), "mcc": _mcc(cm)}


def _macro_f1(cm: np.ndarray) -> float:
    tp = np.diag(cm)
    support, predicted = cm.sum(1), cm.sum(0)
    present = (support + predicted) > 0  # classes that never occur would only dilute the mean
    denom = support + predicted
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(f1[present].mean())


def _mcc(cm: np.ndarray) -> float:
    # Multi-class Matthews correlation (Gorodkin 2004), equal to the binary MCC for two classes.
    t, p = cm.sum(1), cm.sum(0)
    c, s = np.trace(cm), cm.sum()
    denom = math.sqrt(s * s - p @ p) * math.sqrt(s * s - t @ t)
    return float((c * s - t @ p) / denom) if denom > 0 else 0.0


_NUMBER = r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_MARKERS = (r"####", r"the answer is", r"answer:", r"\\boxed\{")


def extract_final_number(text: str) -> str | None:
    """The final numeric answer in a model's output, normalised ("1,234.50" -> "1234.5").

    Prefers the first number after the last answer marker ("#### 42", "The answer is 42",
    \\boxed{42}); otherwise the last number in the text. None when there is no number.
    """
    if text is None:
        return None
    lowered = text.lower()
    tail = None
    for marker in _MARKERS:
        hits = [m.end() for m in re.finditer(marker, lowered)]
        if hits and (tail is None or hits[-1] > tail):
            tail = hits[-1]
    if tail is not None:
        m = re.search(_NUMBER, text[tail:])
        if m:
            return normalise_number(m.group())
    numbers = re.findall(_NUMBER, text)
    return normalise_number(numbers[-1]) if numbers else None


def normalise_number(s) -> str | None:
    s = str(s).strip().replace(",", "").rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s or None
    if not math.isfinite(value):
        return s
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(round(value, 6)).rstrip("0").rstrip(".")


def exact_match(predicted_texts, answers) -> dict[str, float]:
    """Share of outputs whose extracted final number equals the reference answer's number."""
    answers = list(answers)
    if not answers:
        return {"exact_match": float("nan")}
    hits = sum(
        extract_final_number(out) is not None and extract_final_number(out) == normalise_number(ref_number(ans))
        for out, ans in zip(predicted_texts, answers)
    )
    return {"exact_match": hits / len(answers)}


def ref_number(answer) -> str:
    """Reference answers may be a bare number or a worked solution ending in '#### N'."""
    text = str(answer)
    if "####" in text or not re.fullmatch(r"\s*(" + _NUMBER + r")\s*", text):
        extracted = extract_final_number(text)
        return extracted if extracted is not None else text
    return text


_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalise_text(text) -> str:
    """Text compared for exact match: case, punctuation and runs of white space ignored (as SQuAD's
    exact match, which also drops articles; we keep them)."""
    return " ".join(str(text).lower().translate(_PUNCTUATION).split())


def is_numeric_answer(reference) -> bool:
    """A bare number, or a worked answer ending in "#### N" (GSM8K): scored on the final number."""
    text = str(reference)
    return "####" in text or re.fullmatch(r"\s*(" + _NUMBER + r")\s*", text) is not None


def reference_match(predicted_texts, references) -> dict[str, float]:
    """Exact match against free-form references: numeric ones (is_numeric_answer) on the output's final
    number, as exact_match does; any other on the whole output, after normalise_text."""
    references = list(references)
    if not references:
        return {"exact_match": float("nan")}
    hits = 0
    for out, ref in zip(predicted_texts, references):
        if is_numeric_answer(ref):
            hits += extract_final_number(out) is not None and extract_final_number(out) == normalise_number(ref_number(ref))
        else:
            hits += normalise_text(out) == normalise_text(ref)
    return {"exact_match": hits / len(references)}


def classification_compute_metrics(num_labels: int):
    """A Trainer `compute_metrics` callback giving classification_metrics and the loss from logits."""

    def compute(eval_pred):
        logits = eval_pred.predictions[0] if isinstance(eval_pred.predictions, tuple) else eval_pred.predictions
        logits = np.asarray(logits)
        return {"loss": mean_cross_entropy(logits, eval_pred.label_ids),
                **classification_metrics(logits.argmax(-1), eval_pred.label_ids, num_labels)}

    return compute


def mean_cross_entropy(logits, labels) -> float:
    """Mean over examples of -log softmax(logits)[label] (the classifiers' training loss), in float64."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    z = np.asarray(logits, dtype=np.float64).reshape(y.size, -1)
    top = z.max(-1)
    log_norm = top + np.log(np.exp(z - top[:, None]).sum(-1))
    return float((log_norm - z[np.arange(y.size), y]).mean())
