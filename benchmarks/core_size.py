#!/usr/bin/env python
"""Lines of the library core: src/gpart without recipes/, assets/, kernels/, the CLI and the demo.

    python benchmarks/core_size.py [--ref COMMIT] [--out-dir docs/benchmarks]

Prints a markdown table per module: total and code lines. Code lines exclude blank lines, comments and
docstrings. With --ref, the same count for that commit's files (read with `git show`), so a redesign's
before and after come from one command. With --out-dir, also writes core_size[-REF].{json,md} there.
"""
from __future__ import annotations

import argparse
import ast
import io
import json
import shlex
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))  # the scripts' shared helpers
from study_scripts import write_atomic  # noqa: E402
OUTSIDE_CORE = ("src/gpart/recipes/", "src/gpart/assets/", "src/gpart/kernels/", "src/gpart/cli.py",
                "src/gpart/demo.py")
LAYOUT = (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER)


def line_counts(source: str) -> tuple[int, int]:
    """(all lines, code lines) of one module's source."""
    docstrings = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                docstrings.update(range(first.lineno, first.end_lineno + 1))
    code = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in LAYOUT:
            code.update(n for n in range(tok.start[0], tok.end[0] + 1) if n not in docstrings)
    return len(source.splitlines()), len(code)


def core_files(ref: str | None) -> dict[str, str]:
    """path -> source of every core module, in the working tree or at commit `ref`."""
    if ref is None:
        paths = [str(p.relative_to(ROOT)) for p in sorted((ROOT / "src" / "gpart").rglob("*.py"))]
        read = lambda p: (ROOT / p).read_text()  # noqa: E731
    else:
        listing = subprocess.run(["git", "ls-tree", "-r", "--name-only", ref, "src/gpart"], cwd=ROOT, check=True,
                                 capture_output=True, text=True).stdout.split()
        paths = sorted(p for p in listing if p.endswith(".py"))
        read = lambda p: subprocess.run(["git", "show", f"{ref}:{p}"], cwd=ROOT, check=True,  # noqa: E731
                                        capture_output=True, text=True).stdout
    return {p: read(p) for p in paths if not p.startswith(OUTSIDE_CORE)}


def totals(rows: dict) -> tuple[int, int]:
    """(lines, code lines) of the whole core, from {path: (lines, code lines)}."""
    return sum(t for t, _ in rows.values()), sum(c for _, c in rows.values())


def table(rows: dict, label: str) -> str:
    """The markdown table of {path: (lines, code lines)}, with the core's totals last."""
    lines = [f"| module ({label}) | lines | code lines |", "|---|---|---|"]
    lines += [f"| {path.removeprefix('src/gpart/')} | {total} | {code} |" for path, (total, code) in rows.items()]
    lines.append("| **core, {} modules** | **{}** | **{}** |".format(len(rows), *totals(rows)))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", default=None, help="count that commit's files instead of the working tree's")
    p.add_argument("--out-dir", default=None, help="also write core_size[-REF].{json,md} in this folder")
    args = p.parse_args(argv)
    rows = {path: line_counts(src) for path, src in core_files(args.ref).items()}
    label = args.ref or f"working tree on {_head() or 'an unknown commit'}"
    report = table(rows, label)
    print(report)
    if args.out_dir:
        out, name = Path(args.out_dir), "core_size" + (f"-{args.ref}" if args.ref else "")
        out.mkdir(parents=True, exist_ok=True)
        lines, code = totals(rows)
        command = shlex.join(["python", "benchmarks/core_size.py", *(argv if argv is not None else sys.argv[1:])])
        result = {"benchmark": "core_size", "ref": args.ref, "command": command,
                  "modules": {path: {"lines": t, "code_lines": c} for path, (t, c) in rows.items()},
                  "lines": lines, "code_lines": code}
        write_atomic(out / f"{name}.json", json.dumps(result, indent=2) + "\n")
        write_atomic(out / f"{name}.md", f"# Library core size ({label})\n\nCommand: `{command}`\n\n"
                     f"Core: src/gpart without {', '.join(OUTSIDE_CORE)}. Code lines exclude blank lines, comments "
                     f"and docstrings.\n\n{report}\n")
    return 0


def _head() -> str:
    """This checkout's short commit id ('' outside a git checkout)."""
    return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
