"""File-system helpers for runs: atomic writes and the output-directory guard.

Every file a run leaves behind is written to a temporary name in the same directory and then
renamed, so a crash or Ctrl-C never leaves a half-written metrics.json or adapter behind.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

RUN_MARKER = "run.json"  # written first by `gpart train`; marks a directory as a gpart run


class RunDirError(RuntimeError):
    """The output directory cannot be used as asked (holds another run, nothing to resume, ...)."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    # numpy scalars and paths show up in metrics; store them as plain JSON values
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync_tree(path: str | os.PathLike, *, files: bool = True) -> None:
    """Flush a directory's files (recursively, unless files=False) and the directory entries to disk,
    so a rename that publishes it is not undone by a power cut. Best effort where unsupported."""
    path = Path(path)
    dirs = [path]
    if files:
        for root, subdirs, names in os.walk(path):
            dirs += [Path(root) / d for d in subdirs]
            for name in names:
                _fsync(Path(root) / name)
    for d in dirs:
        _fsync(d)


def _fsync(path: Path) -> None:
    """fsync one file or directory; silently skipped where the OS refuses (best effort)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_dir(path: str | os.PathLike):
    """Yield a temporary sibling directory; on success it replaces `path` in (almost) one step.

    A directory cannot be swapped atomically, so an existing `path` is first renamed aside and only
    deleted once the new one is in place: at every instant one complete version exists on disk.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~_umask())
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(path: str | os.PathLike, *, resume: bool, overwrite: bool) -> Path:
    """Check that `path` may receive a run; returns it as a Path.

    - new or empty directory: fine (a new one is not created here);
    - holds a gpart run: an error unless --resume (continue it) or --overwrite (replace it; the
      deletion waits for reset_run_dir, so a run that fails to start leaves the old one intact);
    - holds anything else: always an error, we never delete files we did not write.
    """
    path = Path(path)
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite contradict each other; pass one of them")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"output dir {path} exists and is not a directory")
    entries = [p for p in path.iterdir()] if path.exists() else []
    is_run = (path / RUN_MARKER).exists()
    if resume:
        if not is_run:
            raise RunDirError(f"--resume: {path} holds no gpart run (no {RUN_MARKER}); nothing to resume")
        return path
    if not entries:
        return path  # created when the run starts (run.json): input refused before then leaves nothing
    if not is_run:
        raise RunDirError(
            f"output dir {path} is not empty and is not a gpart run; choose another --output-dir "
            "(gpart never deletes files it did not write)"
        )
    if not overwrite:
        raise RunDirError(
            f"output dir {path} already holds a run; pass --resume to continue it, "
            "--overwrite to replace it, or choose another --output-dir"
        )
    return path  # the old run is deleted by reset_run_dir, once the new one is ready to start


def reset_run_dir(path: Path) -> None:
    """Empty a directory that prepare_output_dir accepted for --overwrite (it holds a gpart run)."""
    if (path / RUN_MARKER).exists():
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
