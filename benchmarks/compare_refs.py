#!/usr/bin/env python
"""Step time of this tree against an older commit, interleaved round by round on one machine.

    python benchmarks/compare_refs.py --ref 6ee8381 --rounds 5 -- --shape roberta-base --targets all \
        --d 131072 --methods gpart,floor

Each round runs `benchmarks/step_time.py ARGS --repeats 1` once in a checkout of --ref and once in this
tree (the order alternates by round), each with its own `src` first on PYTHONPATH, so both sides meet
the same machine noise. The per-round ratio this/ref of every method's median step time is the figure
to quote; the floor method (no adapter) shows how much of a difference is the machine. Writes
docs/benchmarks/<name>.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


def one_run(tree: Path, step_args: list[str], out: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [sys.executable, "benchmarks/step_time.py", *step_args, "--repeats", "1",
           "--out-dir", str(out), "--name", "run"]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "run.json").read_text())["summary"]
    failed = {m: s["errors"] for m, s in summary.items() if s.get("errors")}
    if failed:
        raise SystemExit(f"step_time.py failed in {tree}: {failed}")
    return {m: s["median_s"] for m, s in summary.items() if s.get("median_s") is not None}


def render(result: dict) -> str:
    lines = [f"## Step time: this tree ({result['this']}) against {result['ref']}", "",
             f"Produced by `{result['command']}` ({result['rounds']} rounds, order alternating; "
             f"load average {result['load_start']} at the start, {result['load_end']} at the end).", "",
             "| method | ref median s/step | this median s/step | this/ref, median of per-round ratios | per round |",
             "|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        lines.append(f"| {m} | {r['ref_s']:.3f} | {r['this_s']:.3f} | {r['ratio']:.3f} | "
                     + ", ".join(f"{x:.3f}" for x in r["per_round"]) + " |")
    floor = result["methods"].get("floor")
    if floor:  # the adapter's overhead over the same run's no-adapter step, per side: immune to slow rounds
        lines += ["", "| method | ref: over floor, median of per-round ratios | this: over floor |", "|---|---|---|"]
        for m, r in result["methods"].items():
            if m != "floor":
                over = [statistics.median(a / b for a, b in zip(r[f"{side}_rounds_s"], floor[f"{side}_rounds_s"]))
                        for side in ("ref", "this")]
                lines.append(f"| {m} | {over[0]:.3f} | {over[1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ref", required=True, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default=None, help="output stem (default compare-<ref>-<shape>)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--from-json", type=Path, default=None, help="re-render the markdown of a stored result")
    p.add_argument("step_args", nargs=argparse.REMAINDER, help="after --: arguments of benchmarks/step_time.py")
    args = p.parse_args(argv)
    if args.from_json:
        args.from_json.with_suffix(".md").write_text(render(json.loads(args.from_json.read_text())))
        return 0
    step_args = [a for a in args.step_args if a != "--"]
    shape = step_args[step_args.index("--shape") + 1] if "--shape" in step_args else "roberta-base"
    name = args.name or f"compare-{args.ref}-{shape}"
    times: dict[str, dict[str, list[float]]] = {"ref": {}, "this": {}}
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        git("worktree", "add", "--detach", str(ref_tree), args.ref)
        try:
            for i in range(args.rounds):
                sides = [("ref", ref_tree), ("this", ROOT)]
                for side, tree in sides if i % 2 == 0 else sides[::-1]:
                    medians = one_run(tree, step_args, Path(tmp) / side / str(i))
                    for m, s in medians.items():
                        times[side].setdefault(m, []).append(s)
        finally:
            git("worktree", "remove", "--force", str(ref_tree))
    methods = {}
    for m in times["this"]:
        if m not in times["ref"]:
            continue
        per_round = [t / r for t, r in zip(times["this"][m], times["ref"][m])]
        methods[m] = {"ref_s": statistics.median(times["ref"][m]), "this_s": statistics.median(times["this"][m]),
                      "ratio": statistics.median(per_round), "per_round": per_round,
                      "ref_rounds_s": times["ref"][m], "this_rounds_s": times["this"][m]}
    command = "python benchmarks/compare_refs.py " + shlex.join(
        ["--ref", args.ref, "--rounds", str(args.rounds), "--", *step_args])
    result = {"benchmark": "compare_refs", "command": command, "ref": args.ref,
              "this": git("rev-parse", "--short", "HEAD"), "rounds": args.rounds,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()], "methods": methods}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", render(result))):
        target = args.out_dir / f"{name}{suffix}"
        tmp_file = target.with_suffix(suffix + ".tmp")
        tmp_file.write_text(text)
        tmp_file.replace(target)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
