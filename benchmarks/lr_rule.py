#!/usr/bin/env python
"""GPart's learning-rate rule, by measurement, and the isometry ablations (issue 11).

    python benchmarks/lr_rule.py run --phase rule|ablation|validate [--jobs 1 --threads 1]
    python benchmarks/lr_rule.py report   # docs/quality/lr_rule.{json,md}, lr_rule.png, ablation.png

Same runner, budget and data as benchmarks/quality.py (one `gpart train` process per run, resumable:
a run whose metrics.json exists is skipped). Phases:

rule      - for two target sets of the text model whose D differ 12x (query only: D = 884,736; every
            linear layer: D = 10,764,288) and d from about D/600 to D/5, an lr sweep (seed 0, factor 2,
            chosen on validation). A cell's sweep is extended by one factor of 2 while its best lr is at
            an end of what was tried. Each candidate rule implies a base value per cell; the report
            shows how much validation accuracy one base value loses in each cell.
ablation  - at the quality study's text setting (q,v targets, d = 23,040): Fastfood and the partition
            with column gains 4:1 and 16:1, each with its own lr sweep (seed 0, on validation) and then
            seeds 1, 2 at its best lr. The balanced partition and Uni-LoRA come from the quality study
            (docs/quality/results.json: same budget, same d, same seeds).
validate  - the quality study's text d sweep (q,v targets) at d = 2,880, 5,760 and 368,640, with theta's
            lr from the rule and the text task's base value (what `gpart train` now does by default), seeds
            0, 1, 2: against the same d at the one lr tuned at d = 23,040 (docs/quality/results.json).
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path


def _load_quality():
    """benchmarks/quality.py (the study's runner: Run, execute, load_metrics, DOMAINS), by path: putting
    benchmarks/ on sys.path would shadow packages by its script names (kernels.py)."""
    import importlib.util

    if "quality" in sys.modules:  # already loaded (tests load it by file too)
        return sys.modules["quality"]
    spec = importlib.util.spec_from_file_location("quality", Path(__file__).resolve().parent / "quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


quality = _load_quality()

ROOT = quality.ROOT
RUNS = ROOT / "runs" / "lr_rule"
DOCS = ROOT / "docs" / "quality"
LADDER = [1e-2 * 2.0 ** k for k in range(-5, 7)]  # 3.125e-4 ... 0.64, a factor 2 apart
MAX_POINTS = 7

# Target sets of MiniLM (every run: the quality study's text budget). D from `gpart info --targets ...`;
# fan_in: the D-weighted mean fan-in of the adapted matrices (for the muP-style rule).
TARGETS = {
    "q": dict(targets="query", D=884_736, fan_in=384.0),
    "all": dict(targets="query,key,value,dense", D=10_764_288, fan_in=762.65),
}
# (target set, d) -> the first lrs tried: three points around the geometric mean of what the
# per-weight and per-norm rules predict from the quality study's optimum (4e-2 at q,v, d = 23,040).
# Both ends of d/D for both D: at matched D/d (1440 vs 23040, 184320 vs 2211840) the per-weight rule
# predicts the same lr and the per-norm rule 3.5x apart; along d at fixed D, constant vs 1/sqrt(d).
# The cells between the ends come last (run after the ablations).
RULE_CELLS = {
    ("q", 1440): (4e-2, 8e-2, 1.6e-1),
    ("q", 184320): (5e-3, 1e-2, 2e-2),
    ("all", 23040): (2e-2, 4e-2, 8e-2),
    ("all", 2211840): (2.5e-3, 5e-3, 1e-2),
    ("q", 11520): (4e-2, 8e-2, 1.6e-1),
    ("all", 184320): (1e-2, 2e-2, 4e-2),
}
ABLATION_D = 23040
ABLATION_ARMS = {  # arm -> (gpart train flags, first lrs)
    "fastfood": (("--projection", "fastfood"), (2e-2, 4e-2, 8e-2)),
    "gain16": (("--column-gain-ratio", "16"), (2e-2, 4e-2, 8e-2)),
    "gain4": (("--column-gain-ratio", "4"), (2e-2, 4e-2, 8e-2)),
}
SEEDS_MORE = (1, 2)
# The text task's base learning rate (src/gpart/recipes/text_classification.py defaults["lr"]), chosen from
# the rule phase; the validate runs pass it as --base-lr so that they are what the CLI's default does.
TEXT_BASE_LR = 6e-2
VALIDATE_D = (2880, 5760, 368640)  # 5,760 (+ the head): under 1/10 of LoRA r=8's trainable floats


def rule_run(tset: str, d: int, lr: float, seed: int = 0) -> quality.Run:
    return quality.Run("text", "gpart", seed, lr, d, variant=tset, extra=("--targets", TARGETS[tset]["targets"]))


def arm_run(arm: str, lr: float, seed: int = 0) -> quality.Run:
    return quality.Run("text", "gpart", seed, lr, ABLATION_D, variant=arm, extra=ABLATION_ARMS[arm][0])


def rule_default_run(d: int, seed: int) -> quality.Run:
    return quality.Run("text", "gpart", seed, None, d, variant="rule", extra=("--base-lr", f"{TEXT_BASE_LR:g}"))


def _val(m: dict) -> float:
    return quality.selection_score("text", m)


def curve(runs: Path, make, lrs) -> list[tuple[float, float, float]]:
    """(lr, validation, test) of the runs done among make(lr) for lr in lrs, by lr."""
    out = []
    for lr in sorted(lrs):
        m = quality.load_metrics(runs, make(lr))
        if m:
            out.append((lr, _val(m), quality.test_metric("text", m)))
    return out


def tried(runs: Path, make, first) -> list[float]:
    """The lrs a cell's sweep has reached: its first ones plus ladder points run since (found on disk)."""
    return sorted({*first, *(lr for lr in LADDER if quality.load_metrics(runs, make(lr)))})


def extension(runs: Path, make, first) -> float | None:
    """The next lr to try when the best so far is at an end of the sweep (None: bracketed or capped)."""
    lrs = tried(runs, make, first)
    pts = curve(runs, make, lrs)
    if len(pts) < len(lrs) or len(lrs) >= MAX_POINTS:
        return None
    best = max(pts, key=lambda p: p[1])[0]
    step = -1 if best == lrs[0] else (1 if best == lrs[-1] else 0)
    if not step:
        return None
    i = min(range(len(LADDER)), key=lambda k: abs(math.log(LADDER[k] / best)))
    j = i + step
    return LADDER[j] if 0 <= j < len(LADDER) else None


def best_lr(runs: Path, make, first) -> float | None:
    pts = curve(runs, make, tried(runs, make, first))
    return max(pts, key=lambda p: p[1])[0] if pts else None


def sweep(runs: Path, cells: dict, jobs: int, threads: int) -> None:
    """First lrs of every cell, then rounds of extensions until every best lr is bracketed."""
    # the middle lr of every cell first, so an interrupted phase has every cell started
    order = sorted((((i != 1, i), make(lr)) for make, first in cells.values() for i, lr in enumerate(first)),
                   key=lambda x: x[0])
    quality.execute(runs, [run for _, run in order], jobs, threads)
    while True:
        more = [make(lr) for make, first in cells.values() if (lr := extension(runs, make, first)) is not None]
        if not more:
            return
        quality.execute(runs, more, jobs, threads)


def rule_cells() -> dict:
    return {key: ((lambda lr, t=key[0], d=key[1]: rule_run(t, d, lr)), first) for key, first in RULE_CELLS.items()}


def arm_cells() -> dict:
    return {arm: ((lambda lr, a=arm: arm_run(a, lr)), first) for arm, (_, first) in ABLATION_ARMS.items()}


def cmd_run(args) -> int:
    runs = Path(args.runs_dir)
    if args.phase == "rule":
        sweep(runs, rule_cells(), args.jobs, args.threads)
    elif args.phase == "ablation":
        sweep(runs, arm_cells(), args.jobs, args.threads)
        if not args.sweep_only:
            todo = [arm_run(arm, best_lr(runs, make, first), s) for arm, (make, first) in arm_cells().items()
                    for s in SEEDS_MORE]
            quality.execute(runs, sorted(todo, key=lambda r: r.seed), args.jobs, args.threads)
    elif args.phase == "validate":
        seeds = [int(x) for x in args.seeds.split(",")]
        quality.execute(runs, [rule_default_run(d, s) for s in seeds for d in VALIDATE_D], args.jobs, args.threads)
    return 0


# ----------------------------------------------------------------------------------------------- analysis
# Each rule: lr = base * factor(D, d, fan_in). A cell's optimum lr* implies base = lr* / factor.
RULES = {
    "constant": lambda D, d, f: 1.0,
    "R-weight": lambda D, d, f: math.sqrt(D / d),  # fixed per-weight Adam step lr * sqrt(d / D)
    # fixed per-step ||Delta W||_F bound lr * sqrt(d); base = theta's lr at d = 10,000 (as gpart.lr ships it)
    "R-norm": lambda D, d, f: math.sqrt(10_000 / d),
    "muP-style": lambda D, d, f: math.sqrt(D / d) * 384.0 / f,  # per-weight step ~ 1 / fan_in
}


def interp(pts: list[tuple[float, float, float]], lr: float) -> tuple[float, bool]:
    """Validation accuracy at `lr`, linear in log lr between measured points; (value, extrapolated)."""
    if lr <= pts[0][0]:
        return pts[0][1], lr < pts[0][0] / 1.001
    if lr >= pts[-1][0]:
        return pts[-1][1], lr > pts[-1][0] * 1.001
    for (a, va, _), (b, vb, _) in zip(pts, pts[1:]):
        if a <= lr <= b:
            t = math.log(lr / a) / math.log(b / a)
            return va + t * (vb - va), False
    raise AssertionError


def rule_summary(runs: Path) -> dict:
    cells = []
    for (tset, d), (make, first) in rule_cells().items():
        pts = curve(runs, make, tried(runs, make, first))
        if not pts:
            continue
        best = max(pts, key=lambda p: p[1])
        spec = TARGETS[tset]
        cells.append({"targets": tset, "target_modules": spec["targets"], "D": spec["D"], "d": d,
                      "D_over_d": spec["D"] / d, "curve": [{"lr": a, "validation": v, "test": t} for a, v, t in pts],
                      "best_lr": best[0], "best_validation": best[1], "points": pts})
    out = {"cells": cells, "rules": {}}
    if not cells:
        return out
    grid = [10 ** (k / 40) for k in range(-40 * 6, 40 * 3)]  # candidate base values, 1e-6 ... 1e3
    for name, factor in RULES.items():
        implied = [c["best_lr"] / factor(c["D"], c["d"], TARGETS[c["targets"]]["fan_in"]) for c in cells]
        best_base, best_loss = None, None
        for base in grid:
            if not min(implied) / 4 <= base <= max(implied) * 4:
                continue
            losses = [c["best_validation"] - interp(c["points"], base * factor(c["D"], c["d"], TARGETS[c["targets"]]["fan_in"]))[0]
                      for c in cells]
            # ties (flat curves): the base nearest the implied ones' geometric mean
            centre = abs(math.log(base) - statistics.mean(math.log(x) for x in implied))
            key = (round(max(losses), 6), round(statistics.mean(losses), 6), centre)
            if best_loss is None or key < best_loss:
                best_base, best_loss = base, key
        per_cell = []
        for c in cells:
            lr = best_base * factor(c["D"], c["d"], TARGETS[c["targets"]]["fan_in"])
            v, extrap = interp(c["points"], lr)
            per_cell.append({"targets": c["targets"], "d": c["d"], "lr": lr, "loss": c["best_validation"] - v,
                             "extrapolated": extrap})
        spread = max(implied) / min(implied)
        out["rules"][name] = {"implied_base": implied, "implied_spread": spread, "base": best_base,
                              "max_loss": best_loss[0], "mean_loss": best_loss[1], "per_cell": per_cell}
    # a free power law: log lr* = a + b log d + c log D (least squares)
    xs = [(1.0, math.log(c["d"]), math.log(c["D"])) for c in cells]
    ys = [math.log(c["best_lr"]) for c in cells]
    out["power_law"] = _lstsq(xs, ys)
    # the shipped base value (the text task's default, tuned on q,v at d = 23,040) under the shipped rule
    shipped = []
    for c in cells:
        lr = TEXT_BASE_LR * RULES[RULE_NAME](c["D"], c["d"], TARGETS[c["targets"]]["fan_in"])
        v, extrap = interp(c["points"], lr)
        shipped.append({"targets": c["targets"], "d": c["d"], "lr": lr, "loss": c["best_validation"] - v,
                        "extrapolated": extrap})
    out["shipped"] = {"rule": RULE_NAME, "base": TEXT_BASE_LR, "per_cell": shipped}
    for c in cells:
        del c["points"]
    chosen = RULE_NAME
    if chosen in out["rules"]:
        base = out["rules"][chosen]["base"]
        for c, pc in zip(cells, out["rules"][chosen]["per_cell"]):
            c["rule_lr"] = pc["lr"]
            c["rule_lr_on_ladder"] = min(LADDER, key=lambda x: abs(math.log(x / pc["lr"])))
        out["chosen"] = {"rule": chosen, "base": base}
    return out


RULE_NAME = "R-norm"  # the rule the library ships (gpart.lr); the report checks it against the others


def _lstsq(xs, ys):
    import numpy as np

    if len(xs) < 3:
        return None
    coef, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    return {"log_lr": "a + b*log(d) + c*log(D)", "a": float(coef[0]), "b_d": float(coef[1]), "c_D": float(coef[2])}


def ablation_summary(runs: Path) -> dict:
    arms = {}
    for arm, (make, first) in arm_cells().items():
        pts = curve(runs, make, tried(runs, make, first))
        if not pts:
            continue
        lr = max(pts, key=lambda p: p[1])[0]
        tests = [quality.test_metric("text", m) for s in (0, *SEEDS_MORE) if (m := quality.load_metrics(runs, arm_run(arm, lr, s)))]
        mean, sd = quality._mean_sd(tests)
        arms[arm] = {"curve": [{"lr": a, "validation": v, "test": t} for a, v, t in pts], "lr": lr,
                     "test": tests, "mean": mean, "sd": sd}
    study = json.loads((DOCS / "results.json").read_text())["domains"]["text"]
    for arm, method in (("partition", "gpart"), ("uni-lora", "unilora")):
        r = study["methods"][method]
        arms[arm] = {"curve": [{"lr": p["lr"], "validation": p["validation"], "test": p["test"]}
                               for p in study["lr_sweep"][method]],
                     "lr": r["lr"], "test": r["test"], "mean": r["mean"], "sd": r["sd"], "from": "quality study"}
    return arms


def validate_summary(runs: Path) -> dict:
    """The rule's default at the d sweep's ends, beside the quality study's fixed-lr numbers (same seeds)."""
    study = json.loads((DOCS / "results.json").read_text())["domains"]["text"]
    fixed_lr = study["methods"]["gpart"]["lr"]
    out = {"base_lr": TEXT_BASE_LR, "fixed_lr": fixed_lr, "d": {}}
    for d in VALIDATE_D:
        ms = [(s, m) for s in quality.SEEDS if (m := quality.load_metrics(runs, rule_default_run(d, s)))]
        if not ms:
            continue
        tests = [quality.test_metric("text", m) for _, m in ms]
        mean, sd = quality._mean_sd(tests)
        fixed = study["d_sweep"].get(str(d), {})
        out["d"][str(d)] = {"lr": ms[0][1]["run"]["lr"], "weight_decay": ms[0][1]["run"]["lr_rule"]["weight_decay"],
                            "seeds": [s for s, _ in ms], "test": tests, "validation": [_val(m) for _, m in ms],
                            "mean": mean, "sd": sd, "fixed_lr_test": fixed.get("test"),
                            "fixed_lr_mean": fixed.get("mean"), "fixed_lr_sd": fixed.get("sd"),
                            "trainable": ms[0][1]["params"]["trainable"]}
    # GPart at <= 1/10 of LoRA r=8's trainable floats (lr from the rule, untuned) against LoRA r=8 (lr tuned in
    # the quality study, same budget and seeds): per-seed differences, paired by seed
    lora = study["methods"]["lora"]
    out["lora"] = {"lr": lora["lr"], "trainable": lora["trainable"], "test": lora["test"], "mean": lora["mean"],
                   "sd": lora["sd"], "vs": {}}
    for d, r in out["d"].items():
        if r["trainable"] * 10 > lora["trainable"]:
            continue
        by_seed = dict(zip(lora["seeds"], lora["test"]))
        diffs = [t - by_seed[s] for s, t in zip(r["seeds"], r["test"]) if s in by_seed]
        mean, sd = quality._mean_sd(diffs)
        out["lora"]["vs"][d] = {"trainable": r["trainable"], "ratio": r["trainable"] / lora["trainable"],
                                "diffs": diffs, "mean": mean, "sd": sd}
    return out


COMMAND = ("python benchmarks/lr_rule.py run --phase rule && python benchmarks/lr_rule.py run --phase validate && "
           "python benchmarks/lr_rule.py run --phase ablation && python benchmarks/lr_rule.py report")


def _curve_text(curve: list[dict], best: float | None = None) -> str:
    return "; ".join(("**" if p["lr"] == best else "") + f"{p['lr']:g} → {p['validation']:.3f}" +
                     ("**" if p["lr"] == best else "") for p in curve)


def render(result: dict) -> str:
    rule, val, abl = result["rule"], result["validate"], result["ablation"]
    L = ["## GPart's learning-rate rule and the isometry ablations (text)", "",
         f"Produced by `{COMMAND}` (one `gpart train` process per run, one thread, the text budget above; raw "
         "numbers: [quality/lr_rule.json](quality/lr_rule.json)). Learning rates are chosen on validation "
         "accuracy (seed 0), never on test.", ""]
    if rule["cells"]:
        L += ["### Which lr is best, by d and D", "",
              "MiniLM with two target sets 12x apart in D (`--targets query`: D = 884,736; "
              "`--targets query,key,value,dense`: every linear layer, D = 10,764,288). Validation accuracy by "
              "theta's lr (best in bold):", "",
              "| targets | D | d | D/d | lr → validation accuracy | best lr | implied base: R-weight lr·√(d/D) | R-norm lr·√(d/10⁴) |",
              "|---|---|---|---|---|---|---|---|"]
        for c in rule["cells"]:
            L.append(f"| {c['target_modules']} | {c['D']:,} | {c['d']:,} | {c['D_over_d']:.0f} | "
                     f"{_curve_text(c['curve'], c['best_lr'])} | {c['best_lr']:g} | "
                     f"{c['best_lr'] * math.sqrt(c['d'] / c['D']):.2e} | {c['best_lr'] * math.sqrt(c['d'] / 1e4):.3f} |")
        L += ["", "Each candidate rule, lr = base × factor(D, d), with the one base value that loses least in the "
              "worst cell (accuracy at an lr between two measured ones is interpolated in log lr; outside the "
              "measured range, the nearest end's value, so the loss shown is a lower bound, marked *):", "",
              "| rule | factor | base | spread of the implied bases (max/min) | validation accuracy lost per cell | worst | mean |",
              "|---|---|---|---|---|---|---|"]
        factors = {"constant": "1", "R-weight": "√(D/d)", "R-norm": "√(10⁴/d)", "muP-style": "√(D/d)·384/fan_in"}
        for name, r in rule["rules"].items():
            per = ", ".join(f"{p['loss']:.3f}" + ("*" if p["extrapolated"] else "") for p in r["per_cell"])
            L.append(f"| {name} | {factors[name]} | {r['base']:.3g} | {r['implied_spread']:.1f}x | {per} | "
                     f"{r['max_loss']:.3f} | {r['mean_loss']:.3f} |")
        sh = rule.get("shipped")
        if sh:
            per = ", ".join(f"{p['loss']:.3f}" + ("*" if p["extrapolated"] else "") for p in sh["per_cell"])
            L.append(f"| {sh['rule']}, the text task's default base | {factors[sh['rule']]} | {sh['base']:.3g} | – | "
                     f"{per} | {max(p['loss'] for p in sh['per_cell']):.3f} | "
                     f"{statistics.mean(p['loss'] for p in sh['per_cell']):.3f} |")
        if rule.get("power_law"):
            pl = rule["power_law"]
            L += ["", f"A free fit log lr* = a + b·log d + c·log D over the cells gives b = {pl['b_d']:.2f} and "
                  f"c = {pl['c_D']:.2f} (R-weight: -0.5 and +0.5; R-norm: -0.5 and 0; constant: 0 and 0)."]
        L += ["", "![lr_rule](quality/lr_rule.png)", ""]
    if val["d"]:
        L += ["### The rule's default across the d sweep", "",
              f"q,v targets (D = 1,769,472), theta's lr from the rule with the text task's base "
              f"{val['base_lr']:g} (what `gpart train` does without `--lr`; theta's weight decay scaled by the "
              f"same factor), against the quality study's d sweep at the one lr tuned at d = 23,040 "
              f"({val['fixed_lr']:g}); test accuracy, same seeds:", "",
              "| d | rule's lr | test accuracy (rule) | per seed | fixed lr (quality study) | per seed |",
              "|---|---|---|---|---|---|"]
        for d, r in val["d"].items():
            fixed = "–" if r["fixed_lr_mean"] is None else f"{r['fixed_lr_mean']:.3f} ± {r['fixed_lr_sd']:.3f}"
            L.append(f"| {int(d):,} | {r['lr']:.3g} | {r['mean']:.3f} ± {r['sd']:.3f} ({len(r['test'])}) | "
                     f"{', '.join(f'{x:.3f}' for x in r['test'])} | {fixed} | "
                     f"{', '.join(f'{x:.3f}' for x in r['fixed_lr_test'] or [])} |")
        lo = val.get("lora") or {}
        if lo.get("vs"):
            L += ["", f"GPart at under 1/10 of LoRA r=8's trainable floats (lr from the rule, untuned) against LoRA r=8 "
                  f"({lo['trainable']:,} trainable, lr {lo['lr']:g} tuned in the quality study; test "
                  f"{lo['mean']:.3f} ± {lo['sd']:.3f}), paired by seed:", "",
                  "| d | GPart trainable (with the head) | share of LoRA's | GPart − LoRA per seed | mean ± sd |",
                  "|---|---|---|---|---|"]
            for d, v in lo["vs"].items():
                L.append(f"| {int(d):,} | {v['trainable']:,} | {100 * v['ratio']:.1f}% | "
                         f"{', '.join(f'{x:+.3f}' for x in v['diffs'])} | {v['mean']:+.3f} ± {v['sd']:.3f} |")
        L.append("")
    if abl:
        L += ["### Isometry ablations at matched d", "",
              "q,v targets, d = 23,040, AdamW, each arm with its own lr sweep (seed 0, validation), then test "
              "accuracy at its best lr. GPart (the balanced partition) and Uni-LoRA r=4 are the quality study's "
              "runs (same budget, d and seeds; partition version 1).", "",
              "| arm | map | lr → validation accuracy | best lr | test accuracy | per seed |", "|---|---|---|---|---|---|"]
        maps = {"partition": "P^T P = I exactly", "fastfood": "isometric in expectation (Fastfood)",
                "gain16": "P^T P = diag(g²), gains 16:1", "gain4": "P^T P = diag(g²), gains 4:1",
                "uni-lora": "isometric into LoRA's factors, not end to end"}
        for arm, r in abl.items():
            L.append(f"| {arm} | {maps[arm]} | {_curve_text(r['curve'], r['lr'])} | {r['lr']:g} | "
                     f"{r['mean']:.3f} ± {r['sd']:.3f} ({len(r['test'])}) | {', '.join(f'{x:.3f}' for x in r['test'])} |")
        L += ["", "![ablation](quality/ablation.png)", ""]
    analysis = DOCS / "lr_rule_analysis.md"
    if analysis.exists():
        L += [analysis.read_text().rstrip(), ""]
    return "\n".join(L)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rule = result["rule"]
    if rule["cells"]:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        ds = [10 ** (k / 10) for k in range(30, 66)]
        for tset, color in (("q", "C0"), ("all", "C3")):
            cells = [c for c in rule["cells"] if c["targets"] == tset]
            if not cells:
                continue
            D = cells[0]["D"]
            for c in cells:  # every lr within 0.01 of the best: how flat the optimum is
                near = [p["lr"] for p in c["curve"] if p["validation"] >= c["best_validation"] - 0.01]
                ax.plot([c["d"]] * 2, [min(near), max(near)], color=color, alpha=0.35, lw=6)
            ax.plot([c["d"] for c in cells], [c["best_lr"] for c in cells], "o", color=color,
                    label=f"best lr, {cells[0]['target_modules']} (D = {D:,})")
            r = rule["rules"]["R-weight"]
            ax.plot(ds, [r["base"] * RULES["R-weight"](D, d, 0) for d in ds], "-", color=color, lw=1,
                    label=f"R-weight, its best base {r['base']:.2g}, D = {D:,}")
        val = result["validate"]["d"]
        if val:
            ax.plot([int(d) for d in val], [r["lr"] for r in val.values()], "kx",
                    label="the rule's lr in the validation runs (q,v)")
        sh = rule.get("shipped")
        if sh:
            ax.plot(ds, [sh["base"] * RULES[sh["rule"]](0, d, 0) for d in ds], "k--", lw=1.2,
                    label=f"{sh['rule']} (shipped), base {sh['base']:g}: any D")
        c = rule["rules"]["constant"]
        ax.axhline(c["base"], color="grey", ls=":", lw=1, label=f"constant, its best value {c['base']:.2g}")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("d")
        ax.set_ylabel("theta's learning rate")
        ax.set_title("Text (MiniLM): best lr by d and D (bars: within 0.01 of the best), and the rules", fontsize=9)
        ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(DOCS / "lr_rule.png", dpi=110)
        plt.close(fig)
    if result["ablation"]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, r in result["ablation"].items():
            ax.plot([p["lr"] for p in r["curve"]], [p["validation"] for p in r["curve"]], "o-", label=arm)
        ax.set_xscale("log")
        ax.set_xlabel("theta's learning rate")
        ax.set_ylabel("validation accuracy (seed 0)")
        ax.set_title("Text, d = 23,040: each map with its own lr sweep", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(DOCS / "ablation.png", dpi=110)
        plt.close(fig)


MARK_BEGIN, MARK_END = "<!-- lr_rule: begin (benchmarks/lr_rule.py report) -->", "<!-- lr_rule: end -->"


def cmd_report(args) -> int:
    runs = Path(args.runs_dir)
    result = {"command": COMMAND, "rule": rule_summary(runs), "validate": validate_summary(runs),
              "ablation": ablation_summary(runs)}
    _write(DOCS / "lr_rule.json", json.dumps(result, indent=1) + "\n")
    plot(result)
    body = render(result)
    _write(DOCS / "lr_rule.md", body + "\n")
    target = ROOT / "docs" / "results.md"
    text = target.read_text()
    block = f"{MARK_BEGIN}\n{body}\n{MARK_END}"
    if MARK_BEGIN in text:
        text = text[:text.index(MARK_BEGIN)] + block + text[text.index(MARK_END) + len(MARK_END):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    _write(target, text)
    print(f"wrote {DOCS / 'lr_rule.md'} and {target}")
    return 0


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("rule", "ablation", "validate"), required=True)
    r.add_argument("--jobs", type=int, default=1, help="runs at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--runs-dir", default=str(RUNS))
    r.add_argument("--seeds", default="0,1,2", help="validate: seeds")
    r.add_argument("--sweep-only", action="store_true", help="ablation: the lr sweeps, not the other seeds")
    rep = sub.add_parser("report")
    rep.add_argument("--runs-dir", default=str(RUNS))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
