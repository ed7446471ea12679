#!/usr/bin/env python
"""One table over every step-time / setup / generation result in docs/benchmarks/: writes docs/benchmarks/results.md.

    python benchmarks/index.py [--dir docs/benchmarks]

Each row links to the run's own report (which carries the command that produced it).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _f(x, digits=2):
    return "–" if x is None else f"{x:.{digits}f}"


def _ratio(result, key, field="ratio"):
    r = result.get("ratios", {}).get(key)
    return None if not r else r.get(field)


def generation_row(path: Path, result: dict) -> str:
    cfg, s = result["config"], result["summary"]
    ratio = result.get("ratios", {}).get(f"gpart/{cfg.get('reference', 'lora-r8')}", {})
    ms = [_f(s.get(m, {}).get("decode_ms_per_token"), 1)
          for m in ("base", "gpart", "gpart-uncached", "gpart-merged", "lora-r8")]
    cache = s.get("gpart", {}).get("cache_bytes")
    return (f"| {cfg['shape']} | {cfg['targets']} | {cfg['d']:,} | {cfg['new_tokens']} | {' | '.join(ms)} | "
            f"{_f(ratio.get('decode'))} | {_f(ratio.get('decode_cpu'))} | "
            f"{_f(None if cache is None else cache / 2**20, 0)} | [{path.stem}]({path.with_suffix('.md').name}) |")


def rows(directory: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    steps, setups, gens, compares = [], [], [], []
    for path in sorted(directory.glob("*.json")):
        try:
            result = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if result.get("benchmark") == "generation":
            gens.append(generation_row(path, result))
            continue
        if result.get("benchmark") == "compare_refs":
            compares += [f"| {result.get('compared', 'step_time')} | {result['ref']} | {result['this']} | {m} | "
                         f"{_f(r['ref_median'])} | {_f(r['this_median'])} | "
                         f"{_f(r['ratio'], 3)} | [{path.stem}]({path.with_suffix('.md').name}) |"
                         for m, r in result["methods"].items()]
            continue
        if result.get("benchmark") not in ("step_time", "setup"):
            continue
        cfg, s = result["config"], result["summary"]
        g, fl, lo = s.get("gpart", {}), s.get("floor", {}), s.get("lora-r8", {})
        link = f"[{path.stem}]({path.with_suffix('.md').name})"
        kernels = result.get("environment", {}).get("GPART_KERNELS") or "auto"
        backends = ",".join(g.get("kernel_backends") or []) or "?"
        done = "" if result.get("complete", True) else " (incomplete)"
        if result["benchmark"] == "setup":
            spread = f"({_f(g.get('setup_min_s'), 3)}–{_f(g.get('setup_max_s'), 3)})"
            setups.append(f"| {cfg['shape']} | {cfg['targets']} | {cfg['d']:,} | {cfg.get('D') or 0:,} | "
                          f"{_f(g.get('setup_s'), 3)} {spread} | "
                          f"{_f(g.get('rss_growth_mib'), 0)} | {_f(lo.get('setup_s'), 3)} | {link}{done} |")
            continue
        steps.append(
            f"| {cfg['shape']} | {cfg['targets']} | {cfg['d']:,} | {cfg['batch']}x{cfg['seq']} | "
            f"{kernels} ({backends}) | "
            f"{_f(g.get('median_s'))} | {_f(fl.get('median_s'))} | {_f(lo.get('median_s'))} | "
            f"{_f(_ratio(result, 'gpart/floor'))} | {_f(_ratio(result, 'gpart/floor', 'cpu_ratio'))} | "
            f"{_f(_ratio(result, 'gpart/lora-r8'))} | {_f(_ratio(result, 'gpart/lora-r8', 'cpu_ratio'))} | "
            f"{_f(g.get('peak_rss_mib'), 0)} / {_f(fl.get('peak_rss_mib'), 0)} / {_f(lo.get('peak_rss_mib'), 0)} | "
            f"{_f(g.get('setup_s'), 3)} | {link}{done} |")
    return steps, setups, gens, compares


def render(directory: Path) -> str:
    steps, setups, gens, compares = rows(directory)
    out = ["# Benchmark results (generated)", "",
           "Written by `python benchmarks/index.py` from the JSON files here; see README.md for what is measured "
           "and how to read it. Every linked report carries the exact command that produced it.", ""]
    if steps:
        out += ["## Step time (forward + backward + AdamW step; the floor: forward + backward, no optimizer)", "",
                "| shape | targets | d | batch | GPART_KERNELS (path) | GPart s | floor s | LoRA r8 s | GPart/floor "
                "| (CPU time) | GPart/LoRA r8 | (CPU time) | peak RSS MiB GPart / floor / LoRA r8 | GPart setup s "
                "| report |",
                "|" + "---|" * 15] + steps + [""]
    if gens:
        out += ["## Generation (greedy, batch 1; decode ms per token, medians; benchmarks/generation.py)", "",
                "| shape | targets | d | new tokens | base | GPart (eval cache) | GPart uncached | GPart merged "
                "| LoRA r8 | GPart / LoRA r8 | (CPU time) | cache MiB | report |",
                "|" + "---|" * 13] + gens + [""]
    if compares:
        out += ["## Against an older commit (benchmarks/compare_refs.py, interleaved by round)", "",
                "| compared | older commit | this tree | method | older (s/step or ms/token) | this | "
                "this/older, median per round | report |",
                "|" + "---|" * 8] + compares + [""]
    if setups:
        out += ["## Setup only (meta device)", "",
                "| shape | targets | d | D | GPart get_peft_model s, median (min–max) | GPart RSS growth MiB "
                "| LoRA r8 setup s | report |", "|" + "---|" * 8] + setups + [""]
    return "\n".join(out)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default=str(ROOT / "docs" / "benchmarks"))
    args = p.parse_args(argv)
    directory = Path(args.dir)
    (directory / "results.md").write_text(render(directory))
    print(f"wrote {directory / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
