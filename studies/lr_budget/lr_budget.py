#!/usr/bin/env python
"""GPart's learning-rate rule across training length (issue 17, item 1): text domain.

    python studies/lr_budget/lr_budget.py run --phase sweep|seeds|authors [--budgets 1024,256,32] [--jobs 2 --threads 1]
    python studies/lr_budget/lr_budget.py report   # studies/lr_budget/: lr_budget.{json,md,png}

The rule (gpart.lr) was fitted on 60-step runs. Here the quality study's text setting (all-MiniLM-L6-v2 on
SpamAssassin, its default targets, batch, length and evaluation subset) runs at other step budgets, with the
CLI's default schedule (linear warm-up over 6% of the steps, then linear decay to 0) and one validation pass
at the end. Each cell (budget, d) sweeps the rule's base value on a factor-2 ladder around the task's default
(`--base-lr`, so theta's lr and weight decay follow the rule as `gpart train` sets them; the default itself is
the ladder's middle point), extended while the best is at an end (lr_rule's sweep). Learning rates are chosen
on validation (seed 0), never on test. Then seeds 1, 2 at the chosen base and at the default, so every cell
holds the CLI's untuned default against its tuned best, paired by seed. One more arm: the authors' GLUE
setting, theta lr 5e-3 at d = 23,040, for the longest budget.

Same runner as benchmarks/quality.py (one `gpart train` process per run, resumable).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the shared script loader
from study_scripts import load_script  # noqa: E402

lr_rule = load_script("studies/lr_rule/lr_rule.py")
quality = lr_rule.quality

DOMAIN = "text"
RUNS = Path(__file__).resolve().parent / "runs"  # only metrics.json files are kept in git
OUT = Path(__file__).resolve().parent
BUDGETS = (1024, 256, 32)  # optimizer steps; the longest first: it is the one the defaults are judged at
DS = (23040, 1440)  # the text default d, and one 16x smaller
DEFAULT_BASE = lr_rule.STUDIES[DOMAIN].base_lr  # the text recipe's base value (what `gpart train` uses)
BASES = [DEFAULT_BASE * 2.0 ** k for k in range(-6, 6)]  # the ladder of base values, a factor 2 apart
FIRST = (DEFAULT_BASE / 2, DEFAULT_BASE, DEFAULT_BASE * 2)
AUTHORS_LR = 5e-3  # the authors' theta lr on GLUE at d = 23,040 (with the recipe's weight decay 0.1)
AUTHORS_D = 23040
SEEDS_MORE = lr_rule.SEEDS_MORE


def budget_flags(steps: int) -> tuple[str, ...]:
    """The quality study's text budget with another step count (later flags win in `gpart train`)."""
    return ("--max-steps", str(steps), "--eval-steps", str(steps))


def rule_run(steps: int, d: int, base: float, seed: int = 0) -> quality.Run:
    """`gpart train` with theta's lr from the rule at this base value (the default: no --lr, --base-lr 0.1)."""
    return quality.Run(DOMAIN, "gpart", seed, None, d, variant=f"T{steps}-base{base:g}",
                       extra=(*budget_flags(steps), "--base-lr", f"{base:g}"))


def authors_run(steps: int, seed: int = 0) -> quality.Run:
    return quality.Run(DOMAIN, "gpart", seed, AUTHORS_LR, AUTHORS_D, variant=f"T{steps}-authors",
                       extra=budget_flags(steps))


def cells(budgets=BUDGETS) -> dict:
    """(steps, d) -> (make(base) for seed 0, first bases), in the order they should run."""
    return {(t, d): ((lambda b, t=t, d=d: rule_run(t, d, b)), FIRST) for t in budgets for d in DS}


def best_base(runs: Path, make, first) -> float | None:
    return lr_rule.best_lr(runs, DOMAIN, make, first, BASES)


def seed_runs(runs: Path, budgets=BUDGETS) -> list[quality.Run]:
    """Seeds 1, 2 at each swept cell's default and at its chosen base (one set when they are the same)."""
    out = []
    for (t, d), (make, first) in cells(budgets).items():
        best = best_base(runs, make, first)
        if best is None:
            continue
        out += [rule_run(t, d, b, s) for b in dict.fromkeys((DEFAULT_BASE, best)) for s in SEEDS_MORE]
    return out


def cmd_run(args) -> int:
    runs, budgets = Path(args.runs_dir), tuple(int(x) for x in args.budgets.split(","))
    if args.phase == "sweep":
        lr_rule.sweep(runs, DOMAIN, cells(budgets), args.jobs, args.threads, BASES)
    elif args.phase == "seeds":
        quality.execute(runs, seed_runs(runs, budgets), args.jobs, args.threads)
    else:
        seeds = [int(x) for x in args.seeds.split(",")]
        quality.execute(runs, [authors_run(max(budgets), s) for s in seeds], args.jobs, args.threads)
    return 0

# ----------------------------------------------------------------------------------------------- analysis
COMMAND = ("python studies/lr_budget/lr_budget.py run --phase sweep --budgets 1024 && "
           "python studies/lr_budget/lr_budget.py run --phase sweep --budgets 256,32 && "
           "python studies/lr_budget/lr_budget.py run --phase seeds && "
           "python studies/lr_budget/lr_budget.py run --phase authors && python studies/lr_budget/lr_budget.py report")
# the LLM's step time, from a committed artifact (what a causal-LM budget study would cost here)
LLM_STEP_TIME = quality.ROOT / "docs" / "benchmarks" / "step_time-smollm2-135m-qv-d131072-b8x128.json"
NEAR = 0.01  # validation accuracy within this of a cell's best counts as "near the best"


def rule_factor(d: int) -> float:
    return lr_rule.RULES[lr_rule.RULE_NAME](0, d, 0)


def power_of_inverse_d(at_small: float, at_large: float, ds=DS) -> float:
    """k such that a quantity worth at_small at the smaller of `ds` and at_large at the larger goes as d^-k."""
    return math.log(at_small / at_large) / math.log(max(ds) / min(ds))


def rule_exponent() -> float:
    """The rule's power of 1/d, read off its factors at the study's two d."""
    return power_of_inverse_d(rule_factor(min(DS)), rule_factor(max(DS)))


def _seeds(runs: Path, run) -> dict | None:
    """Test and validation scores of `run` on every seed done (run is the seed-0 one)."""
    ms = [(s, m) for s in quality.SEEDS if (m := quality.load_metrics(runs, lr_rule.with_seed(run, s)))]
    if not ms:
        return None
    tests = [quality.test_metric(DOMAIN, m) for _, m in ms]
    mean, sd = quality.mean_sd(tests)
    return {"seeds": [s for s, _ in ms], "test": tests, "validation": [lr_rule.score(DOMAIN, m) for _, m in ms],
            "mean": mean, "sd": sd}


def bracket(bases: list[float], best: float) -> str:
    """Whether a sweep located its best: "bracketed", or which end of what was tried the best sits at."""
    if len(bases) < 3:
        return "fewer than 3 points"
    return "lowest tried" if best == bases[0] else "highest tried" if best == bases[-1] else "bracketed"


def cell_summary(runs: Path, steps: int, d: int) -> dict | None:
    make, first = cells((steps,))[(steps, d)]
    pts = lr_rule.curve(runs, DOMAIN, make, lr_rule.tried(runs, make, first, BASES))
    if not pts:
        return None
    best = max(pts, key=lambda p: p[1])
    factor = rule_factor(d)
    out = {"steps": steps, "d": d, "factor": factor, "default_base": DEFAULT_BASE, "default_lr": DEFAULT_BASE * factor,
           "curve": [{"base": b, "lr": b * factor, "validation": v, "test": t} for b, v, t in pts],
           "best_base": best[0], "best_lr": best[0] * factor, "best_validation": best[1],
           "bracket": bracket([p[0] for p in pts], best[0]),
           "near_best_bases": [p[0] for p in pts if p[1] >= best[1] - NEAR]}
    ms = [m for b, _, _ in pts if (m := quality.load_metrics(runs, make(b)))]
    out["step_s"] = quality.median_step_seconds(ms)
    default, tuned = _seeds(runs, make(DEFAULT_BASE)), _seeds(runs, make(best[0]))
    out["default"], out["tuned"] = default, tuned
    if default and tuned and len(pts) >= 3:  # a tuned best needs a sweep; a verdict needs a spread
        gap = default["mean"] - tuned["mean"]
        paired = lr_rule.paired(default, tuned)
        out["default_minus_tuned"] = {"mean": gap, "paired": paired, "within_one_sd": (
            gap >= 0 or -gap <= tuned["sd"]) if min(len(default["test"]), len(tuned["test"])) >= 2 else None}
    return out


def movement(cell_rows: list[dict], ds=DS) -> dict:
    """Per d: the best theta lr at each budget, and its fitted power of the budget (log-log slope; None
    with fewer than two budgets). Only bracketed cells count (a best at an end of its sweep, or a tie there,
    is no located optimum); a factor-2 ladder puts each best within sqrt(2) of the true one."""
    out = {}
    for d in ds:
        rows = sorted((c for c in cell_rows if c["d"] == d and c["bracket"] == "bracketed"), key=lambda c: c["steps"])
        if not rows:
            continue
        xs, ys = [math.log(c["steps"]) for c in rows], [math.log(c["best_lr"]) for c in rows]
        slope = None
        if len(rows) >= 2:
            mx, my = statistics.mean(xs), statistics.mean(ys)
            slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        out[str(d)] = {"best_lr": {str(c["steps"]): c["best_lr"] for c in rows},
                       "longest_over_shortest": rows[-1]["best_lr"] / rows[0]["best_lr"], "slope": slope}
    return out


def d_exponent(cell_rows: list[dict], budgets=BUDGETS, ds=DS) -> dict:
    """Per budget where both d's cells are bracketed: the power of 1/d that their best theta lrs imply,
    log(lr*(small d) / lr*(large d)) / log(large d / small d), against the rule's 3/4."""
    small, large = min(ds), max(ds)
    best = {(c["steps"], c["d"]): c["best_lr"] for c in cell_rows if c["bracket"] == "bracketed"}
    return {str(t): power_of_inverse_d(best[(t, small)], best[(t, large)], ds)
            for t in budgets if (t, small) in best and (t, large) in best}


def authors_summary(runs: Path, cell_rows: list[dict]) -> dict | None:
    steps = max(BUDGETS)
    r = _seeds(runs, authors_run(steps))
    if r is None:
        return None
    out = {"steps": steps, "d": AUTHORS_D, "lr": AUTHORS_LR, **r}
    cell = next((c for c in cell_rows if (c["steps"], c["d"]) == (steps, AUTHORS_D)), None)
    for key in ("default", "tuned"):
        if cell and cell.get(key):
            out[f"minus_{key}"] = lr_rule.paired(r, cell[key])
    return out


def llm_step_time() -> dict:
    r = json.loads(LLM_STEP_TIME.read_text())
    return {"artifact": str(LLM_STEP_TIME.relative_to(quality.ROOT)), "command": r["command"],
            "median_s": r["summary"]["gpart"]["median_s"]}


def collect(runs: Path) -> dict:
    rows = [c for t in BUDGETS for d in DS if (c := cell_summary(runs, t, d))]
    example = next((quality.load_metrics(runs, cells((t,))[(t, d)][0](DEFAULT_BASE)) for t in BUDGETS for d in DS
                    if quality.load_metrics(runs, cells((t,))[(t, d)][0](DEFAULT_BASE))), None)
    schedule = ({k: example["run"][k] for k in ("scheduler", "warmup", "weight_decay", "head_lr", "batch_size")}
                if example and "run" in example else None)
    return {"command": COMMAND, "budgets": list(BUDGETS), "d": list(DS), "default_base": DEFAULT_BASE,
            "schedule": schedule, "cells": rows, "movement": movement(rows), "d_exponent": d_exponent(rows),
            "authors": authors_summary(runs, rows), "llm_step": llm_step_time()}


def _curve_text(c: dict) -> str:
    return "; ".join(("**" if p["base"] == c["best_base"] else "") + f"{p['base']:g} → {p['validation']:.3f}"
                     + ("**" if p["base"] == c["best_base"] else "") for p in c["curve"])


def _ms(r: dict | None) -> str:
    if not r:
        return "–"
    if len(r["test"]) == 1:
        return f"{r['test'][0]:.3f} (seed {r['seeds'][0]} only)"
    return f"{r['mean']:.3f} ± {r['sd']:.3f} ({len(r['test'])}): {lr_rule.seeds_text(r['test'])}"


def _pair_text(p: dict | None) -> str:
    if not p or not p["diffs"]:
        return "–"
    return f"{p['mean']:+.3f} ± {p['sd']:.3f} ({', '.join(f'{x:+.3f}' for x in p['diffs'])})"


def _verdict(gap: dict | None) -> str:
    if not gap:
        return "– (fewer than 3 bases swept)"
    return {True: "yes", False: "no", None: "– (one seed)"}[gap["within_one_sd"]]


def movement_lines(result: dict, ds=DS) -> list[str]:
    """The report's bullets on how the best lr moves with the budget (per d) and with d (per budget)."""
    L = []
    for d, mv in result["movement"].items():
        parts = ", ".join(f"{int(t):,} steps {lr:.3g}" for t, lr in mv["best_lr"].items())
        ratio = ("" if mv["slope"] is None else f"; longest / shortest budget: {mv['longest_over_shortest']:.2g}x, "
                 f"fitted lr* ∝ steps^{mv['slope']:.2f}")
        L.append(f"- d = {int(d):,}, bracketed cells: best theta lr {parts}{ratio}.")
    for t, k in result["d_exponent"].items():
        L.append(f"- {int(t):,} steps, both d bracketed: the best theta lrs scale as d^-{k:.2f} between d = "
                 f"{min(ds):,} and {max(ds):,} (the rule: d^-{rule_exponent():.2f}).")
    return L


def render(result: dict) -> str:
    sch = result["schedule"]
    L = ["## GPart's learning-rate rule across training length (text)", "",
         f"Produced by `{result['command']}` (one thread per run, up to 2 runs at once, on a 2-core CPU shared with other jobs; raw numbers: "
         "[lr_budget.json](lr_budget.json)). The quality study's text setting (`gpart train "
         + " ".join(quality.DOMAINS[DOMAIN]["args"]) + "`, default targets query and value) with `--max-steps` and "
         "`--eval-steps` set to each budget: one validation pass at the end."]
    if sch:
        L += ["", f"Schedule: the CLI's default for text, `{sch['scheduler']}` with warm-up over {sch['warmup']:g} of "
              f"the steps, then linear decay to 0 at the last step, so a longer budget also decays later; AdamW, "
              f"batch {sch['batch_size']}, head lr {sch['head_lr']:g} at every budget, weight decay {sch['weight_decay']:g} "
              "(theta's scaled by the rule's inverse factor)."]
    L += ["", "Each cell sweeps the rule's base value (`--base-lr`, so theta's lr = base × (10⁴/d)^¾ and its weight "
          f"decay follow the rule as `gpart train` sets them) on a factor-2 ladder around the default "
          f"{result['default_base']:g}, seed 0, chosen on validation accuracy, extended while the best is at an "
          "end. Then seeds 1 and 2 at the default and at the chosen base.", "", "![lr_budget](lr_budget.png)", "",
          "### The best learning rate by budget", "",
          "| steps | d | theta's lr at the default base | base → validation accuracy (seed 0; best in bold) | best base | best theta lr | located? | train s/step |",
          "|---|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        L.append(f"| {c['steps']:,} | {c['d']:,} | {c['default_lr']:.3g} | {_curve_text(c)} | {c['best_base']:g} | "
                 f"{c['best_lr']:.3g} | {c['bracket']} | {c['step_s']:.2f} |")
    L += ["", "Ties go to the smaller base (the validation split is 484 examples: one example is 0.002). "
          "Train s/step: the median over the cell's runs of Trainer's train runtime (including the one validation "
          "pass, which dominates at 32 steps) over the steps, with other jobs on the machine: a cost estimate, not a benchmark.", ""]
    L += movement_lines(result, DS)
    L += ["", "### The CLI's default against the tuned best, by seed", "",
          "| steps | d | default base: test accuracy mean ± sd (seeds): per seed | tuned base | tuned: test accuracy | "
          "default − tuned, paired: mean ± sd (per seed) | within one sd of the tuned? |",
          "|---|---|---|---|---|---|---|"]
    for c in result["cells"]:
        g = c.get("default_minus_tuned")
        same = c["best_base"] == c["default_base"]
        if len(c["curve"]) < 3:
            L.append(f"| {c['steps']:,} | {c['d']:,} | {_ms(c['default'])} | – | – | – | {_verdict(g)} |")
            continue
        L.append(f"| {c['steps']:,} | {c['d']:,} | {_ms(c['default'])} | {c['best_base']:g}{' (the default)' if same else ''} | "
                 f"{'same runs' if same else _ms(c['tuned'])} | {_pair_text(g['paired']) if g else '–'} | "
                 f"{_verdict(g)} |")
    a = result.get("authors")
    if a:
        L += ["", "### The authors' setting", "",
              f"Theta lr {a['lr']:g} (their GLUE value) at d = {a['d']:,}, {a['steps']:,} steps, weight decay as the "
              f"recipe's (0.1, unscaled: an explicit `--lr`): test accuracy {_ms(a)}; minus the CLI default "
              f"{_pair_text(a.get('minus_default'))}; minus the tuned best {_pair_text(a.get('minus_tuned'))} (paired by seed)."]
    llm = result["llm_step"]
    L += ["", "### The other domains", "",
          "The LLM task's budgets have their own page, [llm_budget.md](llm_budget.md) (`llm_budget.py` in this "
          f"folder). They are slow here: one SmolLM2-135M training step with GPart (batch 8 × 128 as in the LLM "
          f"study, q and v adapted, 2 threads) takes {llm['median_s']:.1f} s on this CPU (`{llm['command']}`, "
          f"[{Path(llm['artifact']).name}](../../{llm['artifact']})), so a 1,024-step run is over an hour. Vision "
          "(DINOv2-small, batch 32) was not measured, for the same reason.", ""]
    analysis = OUT / "lr_budget_analysis.md"
    if analysis.exists():
        L += [analysis.read_text().rstrip(), ""]
    return "\n".join(L)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for d, color in zip(DS, ("C3", "C0")):
        rows = [c for c in result["cells"] if c["d"] == d]
        if not rows:
            continue
        factor = rows[0]["factor"]
        for c in rows:  # bars: every lr within NEAR of the best (how flat the optimum is)
            near = [b * factor for b in c["near_best_bases"]]
            left.plot([c["steps"]] * 2, [min(near), max(near)], color=color, alpha=0.3, lw=7)
            left.plot([c["steps"]], [c["best_lr"]], "o", color=color,
                      mfc=color if c["bracket"] == "bracketed" else "none")
            right.plot([p["base"] for p in c["curve"]], [p["validation"] for p in c["curve"]], "o-", color=color,
                       alpha=0.35 + 0.65 * math.log(c["steps"] / 16) / math.log(max(BUDGETS) / 16),
                       label=f"d = {d:,}, {c['steps']:,} steps")
        left.axhline(DEFAULT_BASE * factor, color=color, ls="--", lw=1, label=f"the rule's default, d = {d:,}")
        left.plot([], [], "o", color=color, label=f"best lr, d = {d:,} (open: not bracketed)")
    if result.get("authors"):
        left.plot([result["authors"]["steps"]], [AUTHORS_LR], "*", color="k", ms=10, label="the authors' lr (d = 23,040)")
    left.set(xscale="log", yscale="log", xlabel="training steps", ylabel="theta's learning rate")
    left.set_title(f"best lr by budget (bars: within {NEAR} of the best)", fontsize=9)
    left.legend(fontsize=6.5)
    right.axvline(DEFAULT_BASE, color="grey", ls=":", lw=1)
    right.set(xscale="log", xlabel="base value (theta's lr at d = 10,000)", ylabel="validation accuracy (seed 0)")
    right.set_title("each cell's sweep (dotted: the default base)", fontsize=9)
    right.legend(fontsize=6.5)
    fig.tight_layout()
    fig.savefig(OUT / "lr_budget.png", dpi=110)
    plt.close(fig)


def cmd_report(args) -> int:
    result = collect(Path(args.runs_dir))
    quality.write_atomic(OUT / "lr_budget.json", json.dumps(result, indent=1) + "\n")
    plot(result)
    quality.write_atomic(OUT / "lr_budget.md", render(result) + "\n")
    print(f"wrote {OUT / 'lr_budget.md'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("sweep", "seeds", "authors"), required=True)
    r.add_argument("--budgets", default=",".join(map(str, BUDGETS)), help="step budgets, comma-separated")
    r.add_argument("--seeds", default="0,1,2", help="authors: seeds")
    r.add_argument("--jobs", type=int, default=2, help="runs at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--runs-dir", default=str(RUNS))
    rep = sub.add_parser("report")
    rep.add_argument("--runs-dir", default=str(RUNS))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
