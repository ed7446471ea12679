#!/usr/bin/env python
"""GPart's learning-rate rule across training length (issue 17, item 1): the LLM task.

    python studies/lr_budget/llm_budget.py run --phase sweep|seeds|authors [--steps 1024,300,32] [--ds 131072,8192]
                                               [--jobs 1 --threads 1]
    python studies/lr_budget/llm_budget.py status   # per cell: points, chosen base, runs to do
    python studies/lr_budget/llm_budget.py report   # studies/lr_budget/: llm_budget.{json,md}

The LLM study's arithmetic task (studies/llm_methods: SmolLM2-135M-Instruct, batches of 8 x 128 tokens,
validation loss on 200 items, greedy exact match on 200 test items) at 32, 300 and 1,024 optimizer steps, at
the causal-lm default d (131,072) and at one 16x smaller (8,192). Each cell sweeps GPart's base value on the
LLM study's ladder (a factor 2 apart around the causal-lm default 0.2, so the default is the middle point),
seed 0, chosen on validation loss, extended while the best is at an end; then seeds 1, 2 at the default
and at the chosen base, so every cell holds the CLI's untuned default against its tuned best, paired by seed.
One more run: the authors' MetaMathQA theta lr (2e-4, given as --lr) at the longest budget and the default d,
seed 0; the recipe's schedule is already theirs (cosine, 5% warm-up, weight decay 0.01, dropout 0.05).

A 1,024-step run (over an hour on one CPU thread) validates and checkpoints every 256 steps, as `gpart train`
does by default for a --max-steps run (the best of the four validation points is kept), so a stopped run
continues from its last checkpoint; the shorter ones validate once, at the end.

The runs live in the LLM study's folder: the 300-step cell at d = 131,072 is that study's own GPart sweep
and seeds (the same runs), and every other cell's runs carry their budget (T32-, T1024-) and d in their names.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpart.recipes.training import checkpoint_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the shared script loader
from study_scripts import load_script  # noqa: E402

lm = load_script("studies/llm_methods/llm_methods.py")
lb = load_script("studies/lr_budget/lr_budget.py")
quality = lm.quality

TASK = "arithmetic"
OUT = Path(__file__).resolve().parent
ANALYSIS = OUT / "llm_budget_analysis.md"  # written by hand; the report includes it
STUDY_STEPS = lm.STUDY_STEPS  # the LLM study's own budget: 300
STEPS = (1024, STUDY_STEPS, 32)  # the longest first: it is the one the defaults are judged at
DS = (lm.D, lm.D // 16)
AUTHORS_LR = 2e-4  # the authors' theta lr on MetaMathQA at d = 131,072 (Qwen2.5-0.5B)
AUTHORS_STEPS = max(STEPS)  # their runs are long: the arm sits at the longest budget, beside its default
COMMAND = ("python studies/lr_budget/llm_budget.py run --phase sweep && "
           "python studies/lr_budget/llm_budget.py run --phase seeds && "
           "python studies/lr_budget/llm_budget.py run --phase authors && python studies/lr_budget/llm_budget.py report")


def cell(steps: int, d: int):
    """The (steps, d) sweep as an LLM-study cell: at the study's own budget and d it is the study's GPart cell."""
    return lm.Cell(TASK, "gpart", None if steps == STUDY_STEPS else steps, d)


def cells(steps=STEPS, ds=DS) -> list:
    return [cell(t, d) for t in steps for d in ds]


def steps_of(c) -> int:
    return c.steps or STUDY_STEPS


def seed_runs(runs: Path, todo_cells: list) -> list[quality.Run]:
    """Seeds 1, 2 at each finished cell's default base and at its chosen one (one set when they are the same)."""
    out = []
    for c in todo_cells:
        best = lm.chosen(runs, c)
        if best is not None:
            out += [lm.lr_rule.with_seed(c.make(b), s)
                    for b in dict.fromkeys((lm.DEFAULT_BASE, best)) for s in lm.SEEDS_MORE]
    return sorted(dict.fromkeys(out), key=lambda r: r.seed)


def authors_run(seed: int = 0) -> quality.Run:
    """The authors' lr, as an explicit --lr (so weight decay stays the recipe's 0.01, theirs), at the default d."""
    return quality.Run(lm.domain(TASK), "gpart", seed, AUTHORS_LR, lm.D, variant=f"T{AUTHORS_STEPS}-authors",
                       extra=lm.budget_flags(AUTHORS_STEPS))


def cmd_run(args) -> int:
    steps = tuple(map(int, lm.csv_choices(args.steps, tuple(map(str, STEPS)))))
    ds = tuple(map(int, lm.csv_choices(args.ds, tuple(map(str, DS)))))
    runs, todo = Path(args.runs_dir), cells(steps, ds)
    if args.phase == "sweep":
        lm.sweep(runs, todo, args.jobs, args.threads)
    elif args.phase == "seeds":
        lm.run_and_prune(runs, seed_runs(runs, todo), args.jobs, args.threads)
    else:
        lm.run_and_prune(runs, [authors_run()], args.jobs, args.threads)
    return 0


# ----------------------------------------------------------------------------------------------- analysis

def cell_summary(runs: Path, c) -> dict | None:
    st = lm.sweep_state(runs, c)
    if not st["points"]:
        return None
    factor = lm.theta_lr(1.0, c.d)
    best = max(st["points"], key=lambda p: p[1])[0]  # the best so far; "chosen" only once the sweep is finished
    out = {"steps": steps_of(c), "d": c.d, "factor": factor, "default_base": lm.DEFAULT_BASE,
           "default_lr": lm.DEFAULT_BASE * factor,
           "curve": [{"base": b, "lr": b * factor, "validation_loss": -v, "test": t} for b, v, t in st["points"]],
           "finished": st["finished"], "best_base": best, "best_lr": best * factor,
           "bracket": st["where"] or "not finished"}
    ms = [m for b, _, _ in st["points"] if (m := quality.load_metrics(runs, c.make(b)))]
    out["step_s"] = quality.median_step_seconds(ms)
    out["default"] = lm.seeds_of(runs, c.make(lm.DEFAULT_BASE))
    out["tuned"] = lm.seeds_of(runs, c.make(best)) if st["finished"] else None
    out["default_minus_tuned"] = lm.paired(out["default"], out["tuned"]) if best != lm.DEFAULT_BASE else None
    return out


def authors_summary(runs: Path, rows: list[dict]) -> dict | None:
    """The authors' run beside the CLI default (and the tuned best) of its cell, paired by seed."""
    r = lm.seeds_of(runs, authors_run())
    if r is None:
        return None
    cell = next((c for c in rows if (c["steps"], c["d"]) == (AUTHORS_STEPS, lm.D)), None) or {}
    return {"steps": AUTHORS_STEPS, "d": lm.D, "lr": AUTHORS_LR, **r,
            "default_lr": lm.theta_lr(lm.DEFAULT_BASE),
            "minus_default": lm.paired(r, cell.get("default")),
            "minus_tuned": None if cell.get("best_base") == lm.DEFAULT_BASE else lm.paired(r, cell.get("tuned"))}


def missing(runs: Path, rows: list[dict]) -> list[str]:
    done = {(r["steps"], r["d"]): r for r in rows}
    out = []
    for c in cells():
        r = done.get((steps_of(c), c.d))
        where = f"{steps_of(c):,} steps, d = {c.d:,}"
        if r is None or not r["finished"]:
            n = len(r["curve"]) if r else 0
            out.append(f"{where}: sweep not finished ({n} point{'' if n == 1 else 's'})")
            continue
        arms = ("default",) if r["best_base"] == lm.DEFAULT_BASE else ("default", "tuned")
        for x in arms:
            if todo := lm.missing_seeds(r[x]):
                out.append(f"{where}: seed{'s' if ',' in todo else ''} {todo} at the {x} base")
    if not quality.load_metrics(runs, authors_run()):
        out.append(f"the authors' lr ({AUTHORS_STEPS:,} steps, d = {lm.D:,}, seed 0)")
    return out


def kept_steps(runs: Path) -> dict:
    """The runs that validate more than once (budgets over the study's): the step of the checkpoint each kept,
    the one of best validation loss, by run name. Where it is not the last step, the run's result is earlier."""
    out = {}
    for steps in (t for t in STEPS if t > STUDY_STEPS):
        for f in sorted(runs.glob(f"llm-{TASK}/gpart-T{steps}-*/metrics.json")):
            best = json.loads(f.read_text()).get("best_checkpoint")
            if best:  # every run that validated has one
                out[f.parent.name] = {"steps": steps, "kept": checkpoint_step(best)}
    return out


def collect(runs: Path) -> dict:
    rows = [r for c in cells() if (r := cell_summary(runs, c))]
    return {"command": COMMAND, "task": TASK, "dataset": lm.TASKS[TASK], "steps": list(STEPS), "d": list(DS),
            "default_base": lm.DEFAULT_BASE, "study_budget": list(lm.BUDGET), "cells": rows,
            "movement": lb.movement(rows, DS), "d_exponent": lb.d_exponent(rows, STEPS, DS),
            "kept_checkpoints": kept_steps(runs), "authors": authors_summary(runs, rows),
            "missing": missing(runs, rows)}


def kept_text(kept: dict) -> str:
    if not kept:
        return f"No run over {STUDY_STEPS} steps has finished yet."
    early = [f"{tag} (step {k['kept']:,} of {k['steps']:,})" for tag, k in kept.items() if k["kept"] != k["steps"]]
    return (f"Checkpoint kept at the end: the last one in {len(kept) - len(early)} of the {len(kept)} finished runs over "
            f"{STUDY_STEPS} steps" + (f"; an earlier one in {', '.join(early)}." if early else "."))


def _curve_text(c: dict) -> str:
    return "; ".join(("**" if p["base"] == c["best_base"] else "") + f"{p['base']:g} → {p['validation_loss']:.3f} "
                     f"({p['test']:.3f})" + ("**" if p["base"] == c["best_base"] else "") for p in c["curve"])


def render(result: dict) -> str:
    L = ["## GPart's learning-rate rule across training length (LLM)", "",
         f"Produced by `{result['command']}` (one thread per run, up to 2 runs at once, on a 2-core CPU shared with "
         "other jobs; raw numbers: [llm_budget.json](llm_budget.json)). The LLM study's task, `gpart train --task "
         f"causal-lm --dataset {result['dataset']} " + " ".join(result["study_budget"]) + "` (SmolLM2-135M-Instruct, "
         "q, k, v, o), with `--max-steps` set to each budget and one validation pass at the end; the 1,024-step runs validate every "
         f"{lm.CHECKPOINT_EVERY} steps instead and keep the checkpoint of best validation loss, as `gpart train` does, "
         "so a stopped run resumes. " + kept_text(result["kept_checkpoints"]) + " Greedy exact match on 200 test items. "
         "Schedule: the causal-lm recipe's default at every budget.", "",
         "Each cell sweeps the rule's base value (`--base-lr`: theta's lr = base × (10⁴/d)^¾) a factor 2 apart "
         f"around the default {result['default_base']:g}, seed 0, chosen on validation loss, extended while the best "
         "is at an end; then seeds 1 and 2 at the default and at the chosen base. The 300-step cell at "
         f"d = {DS[0]:,} is the LLM study's GPart sweep (the same runs).", "",
         "### The best learning rate by budget", "",
         "| steps | d | theta's lr at the default base | base → validation loss (test exact match), seed 0; best in bold "
         "| best base | best theta lr | located? | train s/step |", "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        L.append(f"| {c['steps']:,} | {c['d']:,} | {c['default_lr']:.3g} | {_curve_text(c)} | {c['best_base']:g} | "
                 f"{c['best_lr']:.3g} | {c['bracket']} | {c['step_s']:.2f} |")
    L += ["", "Train s/step: the median over the cell's runs of Trainer's train runtime over the steps, with other "
          "jobs on the machine: a cost estimate, not a benchmark.", ""]
    L += lb.movement_lines(result, DS)
    L += ["", "### The CLI's default against the tuned best, by seed", "",
          "| steps | d | default base: test exact match, mean ± sd: per seed | validation loss per seed | tuned base | "
          "tuned: test exact match | validation loss per seed | default − tuned, paired | where the default stands |",
          "|---|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        if not c["finished"]:
            continue
        same = c["best_base"] == c["default_base"]
        p = c["default_minus_tuned"]
        verdict = "is the tuned best" if same else ((p or {}).get("verdict") or "– (no verdict)")
        L.append(f"| {c['steps']:,} | {c['d']:,} | {lm.seeds_text(c['default'])} | {lm.loss_text(c['default'])} | "
                 f"{c['best_base']:g}{' (the default)' if same else ''} | "
                 f"{'same runs' if same else lm.seeds_text(c['tuned'])} | {'–' if same else lm.loss_text(c['tuned'])} | "
                 f"{'–' if same else lm.pair_text(p)} | "
                 f"{verdict} |")
    L += ["", "\"ahead\" / \"behind\": the mean paired difference in test exact match beyond one sd of the differences; "
          "a cell with fewer than 3 seeds has no sd and no verdict. The tuned base was chosen on seed 0's validation "
          "loss; the validation losses of seeds 1 and 2 say whether that choice holds beyond seed 0.", ""]
    a = result.get("authors")
    if a:
        L += ["### The authors' setting", "",
              f"Theta lr {a['lr']:g} (their MetaMathQA value for d = {a['d']:,}; {a['default_lr'] / a['lr']:.0f}x below "
              f"the CLI default {a['default_lr']:.3g}) at {a['steps']:,} steps, with the recipe's schedule, which is "
              f"theirs: test exact match {lm.seeds_text(a)}, validation loss {lm.loss_text(a)}; minus the CLI default "
              f"{lm.pair_text(a['minus_default'])}" + (f"; minus the tuned best {lm.pair_text(a['minus_tuned'])}"
                                                       if a["minus_tuned"] else "") + " (paired by seed).", ""]
    L += ["Missing: " + ("; ".join(result["missing"]) + "." if result["missing"] else "nothing.")]
    if ANALYSIS.exists():
        L += ["", ANALYSIS.read_text().rstrip()]
    return "\n".join(L) + "\n"


def cmd_report(args) -> int:
    out = Path(args.out_dir)
    result = collect(Path(args.runs_dir))
    quality.write_atomic(out / "llm_budget.json", json.dumps(result, indent=1) + "\n")
    quality.write_atomic(out / "llm_budget.md", render(result))
    print(f"wrote {out / 'llm_budget.md'}")
    return 0


def status_text(runs: Path) -> str:
    """Per cell: its points, what its sweep runs next, and the seeds to do; CPU time from finished runs."""
    step_s = quality.median_step_seconds([m for c in cells() for b in lm.GPART_LADDER
                                          if (m := quality.load_metrics(runs, c.make(b)))])
    lines, total = [f"runs: {runs}", f"train s/step (median of finished runs): {step_s or '–'}"], 0.0
    for c in cells():
        st = lm.sweep_state(runs, c)
        todo = [c.make(b) for b in st["todo"]] + ([c.make(st["next"])] if st["next"] is not None else [])
        todo += [r for r in seed_runs(runs, [c]) if not quality.load_metrics(runs, r)]
        total += len(todo) * steps_of(c) * (step_s or 0.0)
        pts = "; ".join(f"{b:g} → {-v:.3f}" for b, v, _ in st["points"]) or "no points yet"
        state = f"chosen {st['chosen']:g} ({st['where']})" if st["finished"] else "sweeping"
        lines.append(f"{steps_of(c):5d} steps, d {c.d:6d}: {state}: {pts}; to do: "
                     + (", ".join(r.tag for r in todo) or "nothing"))
    if not quality.load_metrics(runs, authors_run()):
        total += AUTHORS_STEPS * (step_s or 0.0)
        lines.append(f"the authors' lr: to do: {authors_run().tag}")
    lines.append(f"CPU time left (training only, runs known now): ~{total / 3600:.1f} h")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("sweep", "seeds", "authors"), required=True)
    r.add_argument("--steps", default=",".join(map(str, STEPS)), help="step budgets, comma-separated")
    r.add_argument("--ds", default=",".join(map(str, DS)), help="d values, comma-separated")
    r.add_argument("--jobs", type=int, default=1, help="runs at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    st = sub.add_parser("status")
    rep = sub.add_parser("report")
    rep.add_argument("--out-dir", default=str(OUT))
    for sp in (r, st, rep):
        sp.add_argument("--runs-dir", default=str(lm.RUNS), help="default: the LLM study's runs")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    lm.register()
    if args.cmd == "status":
        print(status_text(Path(args.runs_dir)))
        return 0
    return {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
