"""Sequence classification (sentiment, spam, NLI, ...) with an encoder and a fresh classifier head."""
from __future__ import annotations

from . import data as D
from .base import TaskData, TaskRecipe
from .metrics import classification_compute_metrics, classification_metrics
from .predict import predict_classes


class TextClassification(TaskRecipe):
    name = "text-classification"
    task_type = "SEQ_CLS"
    target_family = "attention-qv"
    primary_metric = "accuracy"
    # GPart's GLUE settings (d, weight decay, warmup, dropout); head lr and epochs sized for short CPU
    # runs, max length 128 for speed (the reference uses 512). lr: the base learning rate of GPart's rule
    # (theta's lr = lr * (10,000 / d)^0.75: 5.3e-2 at the default d; the base that lost least over the
    # learning-rate study's cells, docs/lr.md).
    defaults = dict(model="minilm", dataset="spam", d=23040, lr=1e-1, head_lr=5e-3, epochs=3,
                    batch_size=16, weight_decay=0.1, warmup=0.06, dropout=0.1, scheduler="linear",
                    max_length=128)

    # ------------------------------------------------------------------ data
    def load_data(self, args, *, saved=None) -> TaskData:
        names = (saved or {}).get("labels") or (args.labels.split(",") if args.labels else None)
        dataset = D.load(args, "text-classification", text_column=args.text_column,
                         label_column=args.label_column, label_names=names)
        if names is not None and list(dataset.label_names) != list(names):
            raise D.DataError(f"{args.dataset}: classes {dataset.label_names} differ from the adapter's {names}")
        splits = D.finish_splits(dataset.splits, seed=args.seed, val_fraction=args.val_fraction,
                                 test_fraction=getattr(args, "test_fraction", 0.0))
        return TaskData(splits=D.limit_splits(splits, args), labels=list(dataset.label_names), source=args.dataset)

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

    def load_saved_model(self, path, args, labels):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        model = AutoModelForSequenceClassification.from_pretrained(path, local_files_only=True)
        _ensure_pad(tokenizer, model)
        return model, tokenizer

    # ------------------------------------------------------------------ inputs
    def make_dataset(self, records, tokenizer, args, data, *, train):
        enc = tokenizer([r["text"] for r in records], truncation=True, max_length=args.max_length)
        return [
            {**{k: enc[k][i] for k in enc.keys()}, "labels": r["label"]} for i, r in enumerate(records)
        ]

    def collator(self, tokenizer, args):
        from transformers import DataCollatorWithPadding

        return DataCollatorWithPadding(tokenizer)

    def compute_metrics(self, data):
        return classification_compute_metrics(len(data.labels))

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, model, tokenizer, records, args, data):
        features = self.make_dataset(records, tokenizer, args, data, train=False)
        predictions = predict_classes(model, features, self.collator(tokenizer, args), args.eval_batch_size)
        labels = [r["label"] for r in records]
        return {**classification_metrics(predictions, labels, len(data.labels)), "n": len(records)}

    def task_info(self, args, data):
        return {"labels": data.labels, "max_length": args.max_length, "text_column": args.text_column,
                "label_column": args.label_column}


def _ensure_pad(tokenizer, model):
    # decoder-style tokenizers often lack a pad token; padding with EOS is the standard fix
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


RECIPE = TextClassification()
