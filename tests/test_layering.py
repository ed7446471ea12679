"""The library's layering: each module imports only modules on lower floors.

partition -> the other projections (fastfood; projection chooses among them) -> kernels -> functional
-> layers and lr -> model -> the package's entry points; recipes and the CLI sit on top, and nothing below them
imports them. A module missing from FLOORS fails here, so a new one gets its floor deliberately.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "gpart"

# module (dotted, relative to gpart; a package stands for all its modules) -> floor
FLOORS = {
    "version": -1,  # imports nothing; the partition names it in its version check
    "partition": 0,
    "scope": 1,
    "grouping": 1,
    "fastfood": 1,
    "theta": 1,
    "quantization": 1,
    "projection": 2,
    "model_card": 2,
    "config": 3,
    "kernels": 3,
    "functional": 4,
    "layers": 5,
    "model": 6,
    "registration": 7,
    "export": 7,
    "lr": 5,  # the rule and its first-step check, which the tuner switches on
    "__init__": 8,
    "assets": 8,
    "recipes": 9,
    "cli": 10,
    "demo": 11,
}


def _unit(module: str) -> str:
    """The FLOORS key a dotted module name (relative to gpart) belongs to."""
    first = module.split(".")[0]
    return first if first in FLOORS else module


def _gpart_imports(path: Path) -> set[str]:
    """Modules of gpart that `path` imports (relative imports resolved), as dotted names under gpart."""
    rel = path.relative_to(SRC).with_suffix("")
    package = list(rel.parts[:-1]) if rel.name != "__init__" else list(rel.parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = base + (node.module.split(".") if node.module else [])
                names = [target + [alias.name] for alias in node.names] if not node.module else [target]
            elif node.module and node.module.split(".")[0] == "gpart":
                names = [node.module.split(".")[1:]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1:] for a in node.names if a.name.split(".")[0] == "gpart"]
        else:
            continue
        for parts in names:
            if parts:
                found.add(".".join(parts))
    return found


def _library_files():
    return sorted(p for p in SRC.rglob("*.py"))


@pytest.mark.parametrize("path", _library_files(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_only_lower_floors(path):
    own = _unit(".".join(path.relative_to(SRC).with_suffix("").parts))
    if own.endswith(".__init__"):
        own = own[: -len(".__init__")]
    assert own in FLOORS, f"gpart/{path.relative_to(SRC)} has no floor: add it to FLOORS in {__file__}"
    for imported in _gpart_imports(path):
        unit = _unit(imported)
        if unit == own or imported.split(".")[0] == own:
            continue  # within one unit (a package's own modules)
        assert unit in FLOORS, f"{path.name} imports gpart.{imported}, which has no floor in FLOORS"
        assert FLOORS[unit] < FLOORS[own], (
            f"gpart/{path.relative_to(SRC)} (floor {FLOORS[own]}, {own}) imports gpart.{imported} "
            f"(floor {FLOORS[unit]}, {unit}): a module may only use the floors below its own"
        )


def test_kernels_and_functional_do_not_import_each_other():
    kernel_imports = set().union(*(_gpart_imports(p) for p in (SRC / "kernels").glob("*.py")))
    assert not {i for i in kernel_imports if _unit(i) == "functional"}
    assert "partition" in kernel_imports  # the kernels compute the partition's ids, nothing above it


def test_cpu_kernels_ship_as_a_cpp_source():
    from gpart.kernels import cpu

    assert cpu.SOURCE_PATH.name == "cpu_kernels.cpp" and cpu.SOURCE_PATH.is_file()
    assert 'extern "C"' in cpu.SOURCE and cpu.SOURCE == cpu.SOURCE_PATH.read_text()


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_a_linear_forward_is_at_most_six_calls_deep(dropout):
    """One fp32 nn.Linear training forward through the C++ kernels, counted over gpart's own frames: the
    kernels are chosen once, no pass-through wrapper sits between the layer and them, and DropConnect's
    kernel scalars are computed when its mask is drawn."""
    import sys

    import torch
    from peft import get_peft_model

    import gpart
    from gpart.kernels import cpu, use_backend

    if not cpu.available():
        pytest.skip(f"C++ kernels unavailable here: {cpu.load_error()}")
    model = get_peft_model(torch.nn.Sequential(torch.nn.Linear(16, 8)),
                           gpart.GPartConfig(d=64, seed=0, target_modules=["0"], dropout=dropout))
    model.train()
    layer, x = model.base_model.model[0], torch.randn(2, 16)
    deepest, chain = [], []

    def profile(frame, event, arg):
        nonlocal deepest
        if str(SRC) not in frame.f_code.co_filename:
            return
        if event == "call":
            chain.append(frame.f_code.co_name)
            deepest = max(deepest, list(chain), key=len)
        elif event == "return":
            chain.pop()

    with use_backend("cpp"):
        layer(x)  # the first call chooses the kernels
        sys.setprofile(profile)
        try:
            layer(x)
        finally:
            sys.setprofile(None)
    assert deepest[:4] == ["forward", "forward", "forward_operands", "delta"], deepest
    assert len(deepest) <= 6, " > ".join(deepest)
