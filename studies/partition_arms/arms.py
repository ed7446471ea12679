#!/usr/bin/env python
"""The authors' partition variants as arms of the quality study's text domain (issue 17).

    python studies/partition_arms/arms.py run [--arms block,signed] [--jobs 1 --threads 1]
    python studies/partition_arms/arms.py report   # studies/partition_arms/arms.{json,md}, docs/results.md's section

Arms, each at the quality study's text settings (benchmarks/quality.py DOMAINS["text"]: all-MiniLM-L6-v2
on SpamAssassin, 60 steps, d = 23,040, default targets):

- block:  --partition-scope transformer_block (one partition per transformer block)
- signed: --grouping signed_magnitude (groups by the sign and magnitude of W0; experimental)

Each arm: an lr sweep on seed 0 chosen by validation accuracy, then seeds 1, 2 at the chosen lr. The
global partition is the quality study's committed GPart result (docs/quality/results.json: same budget,
d, seeds), and the arms are compared with it paired by seed. Same runner as the quality study (one
`gpart train` process per run, resumable: a run whose metrics.json exists is skipped).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the shared script loader
from study_scripts import load_script  # noqa: E402

quality = load_script("benchmarks/quality.py")

RUNS = quality.ROOT / "runs" / "partition_arms"
OUT = Path(__file__).resolve().parent
DOMAIN = "text"
ARMS = {  # arm -> its `gpart train` flags
    "block": ("--partition-scope", "transformer_block"),
    "signed": ("--grouping", "signed_magnitude"),
}
TITLE = "## The authors' partition variants as arms of the text domain"
LRS = (0.02, 0.04, 0.08)  # around the global partition's chosen 0.04, a factor 2 apart
SEEDS_MORE = (1, 2)
COMMAND = "python studies/partition_arms/arms.py run --arms block,signed && python studies/partition_arms/arms.py report"


def arm_run(arm: str, lr: float, seed: int = 0):
    return quality.Run(DOMAIN, "gpart", seed, lr, quality.DOMAINS[DOMAIN]["d"], variant=arm, extra=ARMS[arm])


def chosen_lr(runs: Path, arm: str) -> float | None:
    """The swept lr with the best validation accuracy on seed 0; None while the sweep is incomplete."""
    scored = [(m["validation"]["accuracy"], lr) for lr in LRS if (m := quality.load_metrics(runs, arm_run(arm, lr)))]
    return max(scored)[1] if len(scored) == len(LRS) else None


def cmd_run(args) -> int:
    runs = Path(args.runs_dir)
    arms = args.arms.split(",")
    quality.execute(runs, [arm_run(a, lr) for a in arms for lr in LRS], args.jobs, args.threads)
    quality.execute(runs, [arm_run(a, chosen_lr(runs, a), s) for s in SEEDS_MORE for a in arms], args.jobs, args.threads)
    return 0


def summary(runs: Path, reference: dict) -> dict:
    """Per arm: its sweep, and test accuracy per seed at the chosen lr beside the global partition's."""
    glob = reference["methods"]["gpart"]
    out = {"settings": {"domain": DOMAIN, "args": quality.DOMAINS[DOMAIN]["args"], "d": quality.DOMAINS[DOMAIN]["d"],
                        "lrs": list(LRS)},
           "command": COMMAND,
           "global": {"lr": glob["lr"], "seeds": glob["seeds"], "test": glob["test"], "mean": glob["mean"],
                      "sweep": reference["lr_sweep"]["gpart"]},
           "arms": {}}
    for arm in ARMS:
        sweep = [{"lr": lr, "validation": m["validation"]["accuracy"], "train_s": quality.train_seconds(m)}
                 for lr in LRS if (m := quality.load_metrics(runs, arm_run(arm, lr)))]
        lr = chosen_lr(runs, arm)
        if lr is None:
            continue
        tests = [quality.load_metrics(runs, arm_run(arm, lr, s)) for s in glob["seeds"]]
        if any(t is None for t in tests):
            continue
        acc = [t["test"]["accuracy"] for t in tests]
        diff = [a - g for a, g in zip(acc, glob["test"])]
        out["arms"][arm] = {"flags": list(ARMS[arm]), "sweep": sweep, "lr": lr, "test": acc,
                            "mean": statistics.mean(acc), "sd": statistics.stdev(acc), "paired_diff": diff,
                            "diff_mean": statistics.mean(diff), "diff_sd": statistics.stdev(diff)}
    return out


def render(result: dict) -> str:
    g = result["global"]
    lines = [TITLE, "",
             "`partition_scope=\"transformer_block\"` and the experimental `grouping=\"signed_magnitude\"` "
             f"(docs/method.md, \"Partition scope\") at the quality study's text settings: all-MiniLM-L6-v2 on SpamAssassin, "
             f"{result['settings']['args'][5]} steps, d = {result['settings']['d']:,}, default targets. Each arm's lr "
             "is chosen on validation accuracy (seed 0); test accuracy on 500 items per seed; the global partition is "
             "the quality study's committed GPart result (docs/quality/results.json: same budget, d and seeds). "
             "Script and data: `studies/partition_arms/` "
             "(`arms.py`, `arms.json`).", "",
             f"Command: `{result['command']}`", "",
             "| arm | lr | test accuracy (seeds 0, 1, 2) | mean | paired diff vs global (mean +- sd) |",
             "|---|---|---|---|---|",
             f"| global (quality study) | {g['lr']:g} | {', '.join(f'{x:.3f}' for x in g['test'])} | {g['mean']:.3f} | - |"]
    for arm, a in result["arms"].items():
        lines.append(f"| {arm} (`{' '.join(a['flags'])}`) | {a['lr']:g} | {', '.join(f'{x:.3f}' for x in a['test'])} | "
                     f"{a['mean']:.3f} | {a['diff_mean']:+.3f} +- {a['diff_sd']:.3f} "
                     f"({', '.join(f'{x:+.3f}' for x in a['paired_diff'])}) |")
    lines += ["", "Validation accuracy of the seed-0 sweeps:", "", "| lr | " + " | ".join(["global", *result["arms"]]) + " |",
              "|---|" + "---|" * (1 + len(result["arms"]))]
    gval = {s["lr"]: s["validation"] for s in g["sweep"]}
    for lr in result["settings"]["lrs"]:
        cells = [gval.get(lr)] + [next((s["validation"] for s in a["sweep"] if s["lr"] == lr), None)
                                  for a in result["arms"].values()]
        lines.append(f"| {lr:g} | " + " | ".join("-" if c is None else f"{c:.3f}" for c in cells) + " |")
    lines.append("")
    for arm, a in result["arms"].items():
        spread = "within" if abs(a["diff_mean"]) <= a["diff_sd"] else "beyond"
        edge = (" Its best lr is at an end of the sweep (not extended)."
                if a["lr"] in (min(result["settings"]["lrs"]), max(result["settings"]["lrs"])) else "")
        lines.append(f"- {arm}: {a['diff_mean']:+.3f} against the global partition, {spread} the spread of the "
                     f"paired differences over 3 seeds.{edge}")
    lines += ["", "Three seeds of one task at 60 steps: the defaults (global scope, random grouping) are unchanged, and "
                  "signed_magnitude stays an experimental option (it keeps D int64 ids computed from W0 and runs "
                  "without a fused kernel)."]
    lines += ["", "The same two arms on the LLM task (arithmetic, 300 steps, three seeds) are part of the LLM study: "
                  "studies/llm_methods/llm_methods.md."]
    return "\n".join(lines) + "\n"


def cmd_report(args) -> int:
    domains = json.loads((quality.ROOT / "docs" / "quality" / "results.json").read_text())["domains"]
    result = summary(Path(args.runs_dir), domains[DOMAIN])
    quality.write_atomic(OUT / "arms.json", json.dumps(result, indent=1) + "\n")
    text = render(result)
    quality.write_atomic(OUT / "arms.md", text)
    # docs/results.md ends with this section (benchmarks/quality.py report appends arms.md the same way)
    results = quality.ROOT / "docs" / "results.md"
    body = results.read_text()
    head = body.split(TITLE)[0].rstrip("\n")
    quality.write_atomic(results, head + "\n\n" + text)
    print(text)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--arms", default=",".join(ARMS))
    r.add_argument("--jobs", type=int, default=1)
    r.add_argument("--threads", type=int, default=1)
    r.add_argument("--runs-dir", default=str(RUNS))
    r.set_defaults(func=cmd_run)
    rep = sub.add_parser("report")
    rep.add_argument("--runs-dir", default=str(RUNS))
    rep.set_defaults(func=cmd_report)
    args = p.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
