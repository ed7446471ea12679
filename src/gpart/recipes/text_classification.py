"""Sequence classification (sentiment, spam, NLI, ...) with an encoder and a fresh classifier head."""
from __future__ import annotations

import torch

from . import data as D
from .base import TaskData, TaskRecipe
from .metrics import classification_metrics


class TextClassification(TaskRecipe):
    name = "text-classification"
    task_type = "SEQ_CLS"
    target_family = "attention-qv"
    primary_metric = "accuracy"
    # GPart's GLUE settings (d, theta lr, weight decay, warmup, dropout); head lr and epochs sized
    # for short CPU runs, max length 128 for speed (the reference uses 512).
    defaults = dict(model="minilm", dataset="spam", d=23040, lr=5e-3, head_lr=5e-3, epochs=3,
                    batch_size=16, weight_decay=0.1, warmup=0.06, dropout=0.1, scheduler="linear",
                    max_length=128)

    # ------------------------------------------------------------------ data
    def load_data(self, args, *, saved=None) -> TaskData:
        label_names = (saved or {}).get("labels") or (args.labels.split(",") if args.labels else None)
        splits, builtin_labels = _read_source(args)
        text_col, label_col = args.text_column, args.label_column
        cols = [text_col, label_col] + ([args.text_pair_column] if args.text_pair_column else [])
        for split, rows in splits.items():
            D.require_columns(rows, cols, f"{args.dataset} [{split}]")
        if label_names is None:
            label_names = builtin_labels or _infer_label_names([r[label_col] for rows in splits.values() for r in rows])
        to_id = _label_mapper(label_names, args.dataset)
        records = {
            split: [
                {"text": str(r[text_col]), "pair": str(r[args.text_pair_column]) if args.text_pair_column else None,
                 "label": to_id(r[label_col])}
                for r in rows
            ]
            for split, rows in splits.items()
        }
        records = D.limit_splits(D.finish_splits(records, seed=args.seed, val_fraction=args.val_fraction), args)
        return TaskData(splits=records, labels=list(label_names), source=args.dataset)

    # ------------------------------------------------------------------ model
    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def load_model(self, path, args, labels):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(
            path, local_files_only=True, num_labels=len(labels),
            id2label=dict(enumerate(labels)), label2id={n: i for i, n in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a saved classifier with another label count gets a fresh head
        )
        _ensure_pad(tokenizer, model)
        return model, tokenizer

    def load_saved_model(self, path, labels):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        _ensure_pad(tokenizer, model)
        return model, tokenizer

    # ------------------------------------------------------------------ inputs
    def make_dataset(self, records, tokenizer, args, data, *, train):
        texts = [r["text"] for r in records]
        pairs = [r["pair"] for r in records] if records and records[0]["pair"] is not None else None
        enc = tokenizer(texts, pairs, truncation=True, max_length=args.max_length)
        return [
            {**{k: enc[k][i] for k in enc.keys()}, "labels": r["label"]} for i, r in enumerate(records)
        ]

    def collator(self, tokenizer, args):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, data):
        n = len(data.labels)

        def compute(eval_pred):
            logits, labels = eval_pred.predictions, eval_pred.label_ids
            logits = logits[0] if isinstance(logits, tuple) else logits
            return classification_metrics(logits.argmax(-1), labels, n)

        return compute

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, model, tokenizer, records, args, data):
        features = self.make_dataset(records, tokenizer, args, data, train=False)
        predictions = predict_classes(model, features, self.collator(tokenizer, args), args.eval_batch_size)
        labels = [r["label"] for r in records]
        return {**classification_metrics(predictions, labels, len(data.labels)), "n": len(records)}

    def task_info(self, args, data):
        return {"labels": data.labels, "max_length": args.max_length, "text_column": args.text_column,
                "text_pair_column": args.text_pair_column, "label_column": args.label_column}


def predict_classes(model, features, collate, batch_size):
    """Argmax class per feature, batching by length (much less padding) and restoring order."""
    from tqdm.auto import tqdm

    model.eval()
    order = sorted(range(len(features)), key=lambda i: len(features[i].get("input_ids", ())))
    out = [0] * len(features)
    for start in tqdm(range(0, len(order), batch_size), desc="eval", leave=False, disable=len(order) <= batch_size):
        idx = order[start:start + batch_size]
        batch = collate([{k: v for k, v in features[i].items() if k != "labels"} for i in idx])
        logits = model(**{k: v.to(model.device) for k, v in batch.items()}).logits
        for i, p in zip(idx, logits.argmax(-1).tolist()):
            out[i] = p
    return out


def _read_source(args):
    """A built-in dataset or a file/directory -> ({split: rows}, label names or None)."""
    from pathlib import Path

    if Path(args.dataset).expanduser().exists():
        return D.read_splits(Path(args.dataset).expanduser(), getattr(args, "single_file_split", "train")), None
    return D.builtin(args.dataset, "text-classification")


def _infer_label_names(values) -> list[str]:
    values = [str(v).strip() for v in values]
    if all(v.lstrip("-").isdigit() for v in values):
        ids = sorted({int(v) for v in values})
        if ids[0] < 0:
            raise D.DataError(f"negative class id {ids[0]}; use class ids 0..K-1 or class names")
        return [str(i) for i in range(ids[-1] + 1)]  # ids are positions: keep 0..max even if one is absent
    return sorted(set(values))


def _label_mapper(names, where):
    index = {str(n): i for i, n in enumerate(names)}

    def to_id(value):
        key = str(value).strip()
        if key in index:
            return index[key]
        if key.lstrip("-").isdigit() and 0 <= int(key) < len(names):
            return int(key)
        raise D.DataError(f"{where}: label {value!r} is not one of the classes {list(names)}")

    return to_id


def _ensure_pad(tokenizer, model):
    # decoder-style tokenizers often lack a pad token; padding with EOS is the standard fix
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


RECIPE = TextClassification()
