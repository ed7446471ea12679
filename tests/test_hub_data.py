"""Hugging Face hub datasets (`--dataset org/name[:config]`), read from the `datasets` cache offline.

This machine cannot reach the hub, so each test dataset is put into a temporary `datasets` cache the way
a download leaves it: the real `datasets` Parquet builder writes its Arrow files, and they are placed
where `load_dataset("org/name")` looks when offline (<cache>/org___name/<config>/<version>/<commit>/).
Everything after that is the stock library's own offline path.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")

from gpart.assets import DatasetError, ImageDataset, MathDataset, TextDataset, load_dataset  # noqa: E402
from gpart.assets.hub_data import is_hub_id  # noqa: E402


def cache_hub_dataset(cache: Path, repo_id: str, config: str, splits: dict, features) -> None:
    """Write `splits` (name -> column dict) into `cache` as a download of `repo_id`, configuration `config`."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    work = cache.parent / f"build-{repo_id.replace('/', '-')}-{config}"
    work.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, columns in splits.items():
        files[split] = str(work / f"{split}.parquet")
        datasets.Dataset.from_dict(columns, features=features).to_parquet(files[split])
    name = repo_id.split("/")[-1]
    builder = Parquet(cache_dir=str(work / "arrow"), dataset_name=name, config_name=config, data_files=files,
                      features=features)
    builder.download_and_prepare()
    org = repo_id.split("/")[0]
    shutil.copytree(builder.cache_dir, cache / f"{org}___{name}" / config / "0.0.0" / "0123456789abcdef")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A private datasets cache, offline (gpart's default)."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    return cache


REVIEWS = datasets.Features({"sentence": datasets.Value("string"),
                             "label": datasets.ClassLabel(names=["negative", "positive"])})


def _reviews(cache):
    cache_hub_dataset(cache, "gpart-test/reviews", "sst2", {
        "train": {"sentence": ["great film", "dull", "loved it", "awful plot"], "label": [1, 0, 1, 0]},
        "validation": {"sentence": ["fine", "boring"], "label": [1, 0]},
        "test": {"sentence": ["a", "b"], "label": [-1, -1]},  # GLUE-style hidden test labels
    }, REVIEWS)


def test_text_dataset_from_the_cache_with_class_names_and_hidden_test_labels(hub_cache):
    _reviews(hub_cache)
    with pytest.warns(UserWarning, match="test split has no labels"):
        ds = load_dataset("gpart-test/reviews:sst2", "text-classification", text_column="sentence")
    assert isinstance(ds, TextDataset)
    assert ds.label_names == ["negative", "positive"]
    assert set(ds.splits) == {"train", "validation"}  # the unlabelled test split is left out
    assert ds["train"] == [{"text": "great film", "label": 1}, {"text": "dull", "label": 0},
                           {"text": "loved it", "label": 1}, {"text": "awful plot", "label": 0}]
    assert ds["validation"] == [{"text": "fine", "label": 1}, {"text": "boring", "label": 0}]
    # class names given by the user are matched by name, in the user's order
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        flipped = load_dataset("gpart-test/reviews:sst2", "text-classification", text_column="sentence",
                               label_names=["positive", "negative"])
    assert flipped.label_names == ["positive", "negative"]
    assert [r["label"] for r in flipped["train"]] == [0, 1, 0, 1]


def test_image_dataset_from_the_cache(hub_cache):
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(5, 6, 4, 3), dtype=np.uint8)
    features = datasets.Features({"img": datasets.Image(), "fine_label": datasets.ClassLabel(names=["cat", "dog", "eel"])})
    cache_hub_dataset(hub_cache, "gpart-test/pets", "plain", {
        "train": {"img": [Image.fromarray(p) for p in pixels[:3]], "fine_label": [2, 0, 1]},
        "test": {"img": [Image.fromarray(p) for p in pixels[3:]], "fine_label": [1, 1]},
    }, features)
    ds = load_dataset("gpart-test/pets:plain")  # task inferred from the image column
    assert isinstance(ds, ImageDataset)
    assert ds.label_names == ["cat", "dog", "eel"]  # the one ClassLabel column stands in for "label"
    images, labels = ds["train"]
    assert images.shape == (3, 6, 4, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, pixels[:3])  # PNG round trip is lossless
    np.testing.assert_array_equal(labels, [2, 0, 1])
    resized, _ = load_dataset("gpart-test/pets:plain", "image-classification", image_size=8)["test"]
    assert resized.shape == (2, 8, 8, 3)
    with pytest.raises(DatasetError, match="no image column 'image'; image columns: img"):
        load_dataset("gpart-test/pets:plain", image_column="image")
    with pytest.raises(DatasetError, match="no column 'coarse_label'.*--label-column"):
        load_dataset("gpart-test/pets:plain", label_column="coarse_label")


def test_math_dataset_from_the_cache_keeps_gsm8k_answers(hub_cache):
    features = datasets.Features({"question": datasets.Value("string"), "answer": datasets.Value("string")})
    cache_hub_dataset(hub_cache, "gpart-test/gsm", "main", {
        "train": {"question": ["2+3?", "4*5?"], "answer": ["2+3=5\n#### 5", "4*5=20\n#### 20"]},
        "test": {"question": ["1+1?"], "answer": ["1+1=2\n#### 2"]},
    }, features)
    ds = load_dataset("gpart-test/gsm:main", "math")
    assert isinstance(ds, MathDataset)
    assert ds["train"][1] == {"question": "4*5?", "answer": "4*5=20\n#### 20", "solution": "4*5=20\n#### 20"}
    from gpart.recipes.metrics import exact_match

    assert exact_match(["... so 2. #### 2"], [r["answer"] for r in ds["test"]])["exact_match"] == 1.0


def test_chat_datasets_from_the_cache(hub_cache):
    from gpart.assets import ChatDataset

    turn = {"role": datasets.Value("string"), "content": datasets.Value("string")}
    cache_hub_dataset(hub_cache, "gpart-test/chat", "default", {
        "train": {"messages": [[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
                               [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]],
                  "answer": ["hello", "4"]},
    }, datasets.Features({"messages": [turn], "answer": datasets.Value("string")}))
    ds = load_dataset("gpart-test/chat", "causal-lm")
    assert isinstance(ds, ChatDataset) and ds.format == "messages"
    assert ds["train"][1] == {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}],
                              "train_from": 0, "answer": "4", "where": "gpart-test/chat [train] row 1"}
    cache_hub_dataset(hub_cache, "gpart-test/pc", "default", {
        "train": {"prompt": ["2+2=", "3+3="], "completion": [" 4", " 6"]},
        "test": {"prompt": ["1+1="], "completion": [" 2"]},
    }, datasets.Features({"prompt": datasets.Value("string"), "completion": datasets.Value("string")}))
    ds = load_dataset("gpart-test/pc", "causal-lm")
    assert ds.format == "prompt-completion" and ds["test"] == [{"prompt": "1+1=", "completion": " 2", "answer": None,
                                                                 "where": "gpart-test/pc [test] row 0"}]
    cache_hub_dataset(hub_cache, "gpart-test/badchat", "default", {
        "train": {"messages": [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "x"}]]},
    }, datasets.Features({"messages": [turn]}))
    with pytest.raises(DatasetError, match=r"gpart-test/badchat \[train\] row 0: 'messages' has no assistant message"):
        load_dataset("gpart-test/badchat", "causal-lm")


def test_clear_errors(hub_cache, monkeypatch):
    _reviews(hub_cache)
    with pytest.raises(DatasetError, match="'gpart-test/absent'.*not in the local datasets cache.*HF_HUB_OFFLINE=0"):
        load_dataset("gpart-test/absent")
    with pytest.raises(DatasetError, match="'gpart-test/reviews:nope'.*could not load.*'nope'.*org/name:CONFIG|"
                                           "'gpart-test/reviews:nope'.*could not load.*gpart-test/reviews:CONFIG"):
        load_dataset("gpart-test/reviews:nope")
    with pytest.raises(DatasetError, match=r"gpart-test/reviews:sst2 \[train\]: no column 'text'.*sentence"):
        load_dataset("gpart-test/reviews:sst2", "text-classification")
    # a path whose folder exists is a path, not a hub id: the typo gets the file error
    (hub_cache.parent / "data").mkdir()
    monkeypatch.chdir(hub_cache.parent)
    with pytest.raises(DatasetError, match="neither a built-in dataset, an existing file"):
        load_dataset("data/reviws.csv")
    # without the datasets package: the error names it
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(DatasetError, match="needs the `datasets` package"):
        load_dataset("gpart-test/reviews:sst2")


def test_hub_id_syntax():
    assert is_hub_id("nyu-mll/glue:sst2") and is_hub_id("openai/gsm8k") and is_hub_id("uoft-cs/cifar10")
    assert not is_hub_id("spam") and not is_hub_id("/abs/path") and not is_hub_id("a/b/c") and not is_hub_id("x/")


from conftest import reviews  # noqa: E402


def test_cli_trains_on_a_cached_hub_dataset_and_eval_finds_it_again(hub_cache, text_setup, tmp_path, capsys):
    """`gpart train --dataset org/name:config` offline from the cache; `gpart eval --adapter` then reads the
    same hub dataset and column from the adapter's settings and reproduces the run's test metrics."""
    import json

    from gpart.cli import main

    rows = {"train": reviews(48, 0), "test": reviews(16, 1)}
    features = datasets.Features({"sentence": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])})
    cache_hub_dataset(hub_cache, "gpart-test/tinyreviews", "default", {
        split: {"sentence": [r["text"] for r in rs], "label": [["neg", "pos"].index(r["label"]) for r in rs]}
        for split, rs in rows.items()}, features)
    out = tmp_path / "run"
    assert main(["train", "--task", "text-classification", "--model", str(text_setup / "bert"),
                 "--dataset", "gpart-test/tinyreviews:default", "--text-column", "sentence", "--d", "64",
                 "--max-steps", "4", "--batch-size", "8", "--lr", "0.05", "--output-dir", str(out), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test"]["n"] == 16 and not metrics["test_is_validation"]  # the hub dataset's own test split
    capsys.readouterr()
    assert main(["eval", "--adapter", str(out / "adapter"), "--output", str(tmp_path / "eval.json")]) == 0
    again = json.loads((tmp_path / "eval.json").read_text())
    assert again["n"] == 16 and again["accuracy"] == pytest.approx(metrics["test"]["accuracy"])
    assert again["mcc"] == pytest.approx(metrics["test"]["mcc"])
    rc = main(["eval", "--adapter", str(out / "adapter"), "--dataset", "gpart-test/missing"])
    assert rc == 2 and "not in the local datasets cache" in capsys.readouterr().err
