"""The on-disk cache: where assets live, and how a cache entry is written so that it is all or nothing.

Every entry is a directory. It is built in a temporary sibling directory and renamed into place only
once complete, with a marker file inside; a directory without the marker is never trusted. An
interrupted build (exception, Ctrl-C, kill -9, power loss) therefore leaves at worst a `.tmp-*`
directory, which a later build removes once the process that made it is gone.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from collections.abc import Callable

MARKER = ".gpart-complete"
_TMP_PREFIX = ".tmp-"


def cache_dir() -> Path:
    """Root of the gpart cache: $GPART_CACHE if set, else ~/.cache/gpart."""
    env = os.environ.get("GPART_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gpart"


def say(message: str) -> None:
    """Progress for long fetches and conversions; on stderr so it never mixes with a command's output."""
    if os.environ.get("GPART_QUIET") != "1":
        print(f"gpart: {message}", file=sys.stderr, flush=True)


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_complete(path: Path) -> bool:
    """True only for a directory that a finished build renamed into place."""
    return (path / MARKER).is_file()


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def ensure_dir(dest: Path, build: Callable[[Path], None], meta: dict | None = None) -> Path:
    """Return `dest`, first building it with `build(tmp_dir)` if it is not complete yet.

    `build` fills an empty temporary directory; on success the marker is written and the directory
    renamed to `dest` in one step. If another process finished the same entry first, ours is dropped.
    """
    if is_complete(dest):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_tmp(dest.parent)
    if dest.exists():  # left by something other than a finished build (e.g. a hand copy): rebuild it
        _remove(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{dest.name}-{os.getpid()}-", dir=dest.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the cache entry should read like any other folder
        build(tmp)
        (tmp / MARKER).write_text(json.dumps({**(meta or {}), "built": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        try:
            os.rename(tmp, dest)
        except OSError:
            if not is_complete(dest):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # a concurrent build won the race; use theirs
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def clean_stale_tmp(parent: Path) -> None:
    """Remove temporary build directories whose owning process no longer runs (a killed build)."""
    for entry in parent.glob(f"{_TMP_PREFIX}*"):
        pid = _owner_pid(entry.name)
        if pid is not None and not _pid_alive(pid):
            shutil.rmtree(entry, ignore_errors=True)


def _owner_pid(name: str) -> int | None:
    # names are .tmp-<entry>-<pid>-<random>; the entry itself may contain dashes
    parts = name.rsplit("-", 2)
    return int(parts[1]) if len(parts) == 3 and parts[1].isdigit() else None


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    # rename first so a half-deleted tree never sits under the real name
    trash = path.with_name(f"{_TMP_PREFIX}{path.name}-{os.getpid()}-trash")
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
