#!/usr/bin/env python
"""Step time or generation speed of this tree against an older commit, interleaved round by round.

    python benchmarks/compare_refs.py --ref 6ee8381 --rounds 5 -- --shape roberta-base --targets all \
        --d 131072 --methods gpart,floor
    python benchmarks/compare_refs.py --benchmark generation --ref 6ee8381 --rounds 5 -- \
        --methods base,gpart,gpart-merged

Each round runs the benchmark script (`benchmarks/step_time.py` or `benchmarks/generation.py`) with ARGS
and `--repeats 1` once in a checkout of --ref and once in this tree (the order alternates by round), each
with its own `src` first on PYTHONPATH, so both sides meet the same machine noise. The per-round ratio
this/ref of every method's figure is what to quote; the reference method (step time: the floor, no
adapter; generation: the merged model) gives, per side, the adapter's overhead over a run that met the
same noise. Writes docs/benchmarks/<name>.{json,md}.
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
sys.path.insert(0, str(ROOT / "studies"))  # the scripts' shared helpers
from study_scripts import write_atomic  # noqa: E402


def git(*args: str, cwd: Path = ROOT) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout.strip()


# benchmark -> (its script, the summary field compared, its unit, the method others are set against)
BENCHMARKS = {
    "step_time": ("benchmarks/step_time.py", "median_s", "s/step", "floor"),
    "generation": ("benchmarks/generation.py", "decode_ms_per_token", "ms/token", "gpart-merged"),
}


def one_run(benchmark: str, tree: Path, bench_args: list[str], out: Path) -> dict:
    script, field, _, _ = BENCHMARKS[benchmark]
    env = dict(os.environ, PYTHONPATH=str(tree / "src"))
    cmd = [sys.executable, script, *bench_args, "--repeats", "1", "--out-dir", str(out), "--name", "run"]
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)
    summary = json.loads((out / "run.json").read_text())["summary"]
    failed = {m: s["errors"] for m, s in summary.items() if s.get("errors")}
    if failed:
        raise SystemExit(f"{script} failed in {tree}: {failed}")
    return {m: s[field] for m, s in summary.items() if s.get(field) is not None}


def render(result: dict) -> str:
    benchmark = result.get("compared", "step_time")
    _, _, unit, reference = BENCHMARKS[benchmark]
    lines = [f"## {benchmark.replace('_', ' ').capitalize()}: this tree ({result['this']}) against {result['ref']}", "",
             f"Produced by `{result['command']}` ({result['rounds']} rounds, order alternating; "
             f"load average {result['load_start']} at the start, {result['load_end']} at the end).", "",
             f"| method | ref median {unit} | this median {unit} | this/ref, median of per-round ratios | per round |",
             "|---|---|---|---|---|"]
    for m, r in result["methods"].items():
        lines.append(f"| {m} | {r['ref_median']:.3f} | {r['this_median']:.3f} | {r['ratio']:.3f} | "
                     + ", ".join(f"{x:.3f}" for x in r["per_round"]) + " |")
    floor = result["methods"].get(reference)
    if floor:  # each method over the same round's reference, per side: immune to slow rounds
        lines += ["", f"| method | ref: over {reference}, median of per-round ratios | this: over {reference} |",
                  "|---|---|---|"]
        for m, r in result["methods"].items():
            if m != reference:
                over = [statistics.median(a / b for a, b in zip(r[f"{side}_rounds"], floor[f"{side}_rounds"]))
                        for side in ("ref", "this")]
                lines.append(f"| {m} | {over[0]:.3f} | {over[1]:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--benchmark", choices=tuple(BENCHMARKS), default="step_time")
    p.add_argument("--ref", required=True, help="the commit to compare against")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--name", default=None, help="output stem (default compare-<ref>-<shape>)")
    p.add_argument("--out-dir", type=Path, default=ROOT / "docs" / "benchmarks")
    p.add_argument("--from-json", type=Path, default=None, help="re-render the markdown of a stored result")
    p.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: the benchmark script's arguments")
    args = p.parse_args(argv)
    if args.from_json:
        write_atomic(args.from_json.with_suffix(".md"), render(json.loads(args.from_json.read_text())))
        return 0
    bench_args = [a for a in args.bench_args if a != "--"]
    shape = bench_args[bench_args.index("--shape") + 1] if "--shape" in bench_args else "default"
    name = args.name or f"compare-{args.ref}-{args.benchmark}-{shape}"
    times: dict[str, dict[str, list[float]]] = {"ref": {}, "this": {}}
    load_start = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as tmp:
        ref_tree = Path(tmp) / "ref"
        git("worktree", "add", "--detach", str(ref_tree), args.ref)
        try:
            for i in range(args.rounds):
                sides = [("ref", ref_tree), ("this", ROOT)]
                for side, tree in sides if i % 2 == 0 else sides[::-1]:
                    medians = one_run(args.benchmark, tree, bench_args, Path(tmp) / side / str(i))
                    for m, s in medians.items():
                        times[side].setdefault(m, []).append(s)
        finally:
            git("worktree", "remove", "--force", str(ref_tree))
    methods = {}
    for m in times["this"]:
        if m not in times["ref"]:
            continue
        per_round = [t / r for t, r in zip(times["this"][m], times["ref"][m])]
        methods[m] = {"ref_median": statistics.median(times["ref"][m]), "this_median": statistics.median(times["this"][m]),
                      "ratio": statistics.median(per_round), "per_round": per_round,
                      "ref_rounds": times["ref"][m], "this_rounds": times["this"][m]}
    flags = [] if args.benchmark == "step_time" else ["--benchmark", args.benchmark]
    command = "python benchmarks/compare_refs.py " + shlex.join(
        [*flags, "--ref", args.ref, "--rounds", str(args.rounds), "--", *bench_args])
    result = {"benchmark": "compare_refs", "compared": args.benchmark, "command": command, "ref": args.ref,
              "this": git("rev-parse", "--short", "HEAD"), "rounds": args.rounds,
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "load_start": load_start, "load_end": [round(x, 2) for x in os.getloadavg()], "methods": methods}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=2) + "\n"), (".md", render(result))):
        target = args.out_dir / f"{name}{suffix}"
        write_atomic(target, text)
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
