"""Load a script of benchmarks/ as a module, for the tests of the benchmark harnesses."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """benchmarks/ is not a package, and it must not go on sys.path (its kernels.py would shadow the
    `kernels` package transformers probes for): load benchmarks/<name>.py by file, once."""
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
