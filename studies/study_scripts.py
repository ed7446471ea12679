"""Load another script of this repository (a study's or a benchmark's) as a module, by its path.

Scripts are not a package: each is loaded once, under its own name, from its path."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(relative_path: str):
    """The module of ROOT/relative_path (e.g. "benchmarks/quality.py"), registered under its file's stem in
    sys.modules (dataclasses look their module up by name); the one already loaded when there is one."""
    name = Path(relative_path).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def write_atomic(path: Path, text: str) -> None:
    """Write a temporary file, then rename it: a reader never sees half a report."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
