"""Image classification with a ViT-style backbone (ViT, DINOv2, ...) and a fresh classifier head."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from . import data as D
from .base import TaskData, TaskRecipe
from .metrics import classification_compute_metrics, classification_metrics
from .predict import predict_classes

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CPU_IMAGE_SIZE = 98  # DINOv2 says 518 (its pretraining size) but interpolates; 98 px keeps CPU runs short


def _take(split, idx):
    images, labels = split
    return images[idx], labels[idx]


class ImageClassification(TaskRecipe):
    name = "image-classification"
    task_type = None  # PEFT has no image task type; modules_to_save carries the head
    target_family = "attention-qv"
    primary_metric = "accuracy"
    # GPart's ViT-B settings: theta lr 4e-3, head lr 3e-3, weight decay 0.01, dropout 0. The reference
    # d=72,000 is for ViT-B (D = 14.2M); the same d/D on ViT-S/14 (D = 3.5M) gives about 18,000.
    # Warm-up 10% instead of the reference's 40%, which suits 20-epoch runs, not short CPU runs.
    # lr: the base learning rate of GPart's rule (theta's lr = lr * (10,000 / d)^0.75: 1.6e-2 at the default
    # d, the quality study's best; docs/lr.md).
    defaults = dict(model="dinov2-small", dataset="fashion-mnist", d=18000, lr=2.5e-2, head_lr=3e-3, epochs=1,
                    batch_size=32, weight_decay=0.01, warmup=0.1, dropout=0.0, scheduler="linear")

    def load_data(self, args, *, saved=None) -> TaskData:
        dataset = D.load(args, "image-classification", image_size=args.image_size, label_column=args.label_column,
                         image_column=getattr(args, "image_column", None))
        names = (saved or {}).get("labels")
        if names is not None and list(dataset.label_names) != list(names):
            raise D.DataError(f"{args.dataset}: classes {dataset.label_names} differ from the adapter's {names}")
        splits = D.finish_splits(dataset.splits, seed=args.seed, val_fraction=args.val_fraction,
                                 test_fraction=getattr(args, "test_fraction", 0.0), take=_take)
        return TaskData(D.limit_splits(splits, args, take=_take), list(dataset.label_names), args.dataset)

    def auto_class(self):
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification

    def load_model(self, path, args, labels):
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(
            path, local_files_only=True, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={n: i for i, n in enumerate(labels)}, ignore_mismatched_sizes=True)
        inputs = ImageInputs.from_model(path, model.config, args.image_size)
        args.image_size = inputs.size  # saved with the adapter, so evaluation feeds the same size
        return model, inputs

    def load_saved_model(self, path, args, labels):
        from transformers import AutoModelForImageClassification

        model = AutoModelForImageClassification.from_pretrained(path, local_files_only=True)
        return model, ImageInputs.from_model(path, model.config, args.image_size)

    def make_dataset(self, split, inputs, args, data, *, train):
        images, labels = split
        return ImageSplit(images, labels, flip=train and not args.no_augment)

    def collator(self, inputs, args):
        return inputs.collate

    def compute_metrics(self, data):
        return classification_compute_metrics(len(data.labels))

    def evaluate(self, model, inputs, split, args, data):
        features = self.make_dataset(split, inputs, args, data, train=False)
        predictions = predict_classes(model, [features[i] for i in range(len(features))], inputs.collate,
                                      args.eval_batch_size)
        labels = split[1]
        return {**classification_metrics(predictions, labels, len(data.labels)), "n": int(len(labels))}

    def task_info(self, args, data):
        return {"labels": data.labels, "image_size": args.image_size, "label_column": args.label_column,
                "image_column": getattr(args, "image_column", None)}


class ImageSplit(torch.utils.data.Dataset):
    """uint8 images kept as loaded; the collator does the float work per batch."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, flip: bool):
        self.images, self.labels, self.flip = images, labels, flip

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        image = torch.from_numpy(np.ascontiguousarray(self.images[i]))
        if self.flip and torch.rand(()) < 0.5:  # horizontal flip, the reference's cheap augmentation
            image = image.flip(1)
        return {"pixel_values": image, "labels": int(self.labels[i])}


@dataclass
class ImageInputs:
    """Turns uint8 images into the model's input: RGB, square `size`, normalised by mean/std."""

    mean: tuple
    std: tuple
    size: int
    channels: int
    source: Path | None = None  # where preprocessor_config.json came from, copied on save
    interpolate: bool = False  # ViT needs interpolate_pos_encoding=True off its native size

    @classmethod
    def from_model(cls, path, config, size):
        path = Path(path)
        proc = path / "preprocessor_config.json"
        spec = json.loads(proc.read_text()) if proc.exists() else {}
        if size is None:
            size = CPU_IMAGE_SIZE if config.model_type == "dinov2" else int(config.image_size)
        native = getattr(config, "image_size", size)
        interpolate = int(size) != int(native) and config.model_type != "dinov2"  # DINOv2 always interpolates
        return cls(tuple(spec.get("image_mean", IMAGENET_MEAN)), tuple(spec.get("image_std", IMAGENET_STD)),
                   int(size), int(getattr(config, "num_channels", 3)), proc if proc.exists() else None,
                   interpolate)

    def collate(self, features):
        x = torch.stack([f["pixel_values"] for f in features]).float() / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)  # NHW / NHWC -> NCHW
        if x.shape[1] != self.channels:
            x = x.expand(-1, self.channels, -1, -1) if x.shape[1] == 1 else x.mean(1, keepdim=True)
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor(self.mean[: self.channels]).view(1, -1, 1, 1)
        std = torch.tensor(self.std[: self.channels]).view(1, -1, 1, 1)
        batch = {"pixel_values": (x - mean) / std}
        if self.interpolate:
            batch["interpolate_pos_encoding"] = True
        if "labels" in features[0]:
            batch["labels"] = torch.tensor([f["labels"] for f in features])
        return batch

    def save_pretrained(self, out):
        out = Path(out)
        if self.source is not None:
            shutil.copyfile(self.source, out / "preprocessor_config.json")
        else:
            (out / "preprocessor_config.json").write_text(json.dumps({
                "image_processor_type": "ViTImageProcessor", "image_mean": list(self.mean),
                "image_std": list(self.std), "size": {"height": self.size, "width": self.size}}, indent=2))


RECIPE = ImageClassification()
