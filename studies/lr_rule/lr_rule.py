#!/usr/bin/env python
"""GPart's learning-rate rule, by measurement, and the isometry ablations (issue 11), per domain.

    python studies/lr_rule/lr_rule.py run --domain text|vision|llm --phase rule|ablation|validate|tuned [--jobs 1 --threads 1]
    python studies/lr_rule/lr_rule.py report   # studies/lr_rule/: lr_rule.{json,md}, lr_rule.png, ablation.png

Same runner, budgets and data as benchmarks/quality.py (one `gpart train` process per run, resumable: a
run whose metrics.json exists is skipped). Learning rates are chosen on validation (seed 0), never on
test. Phases, each for one domain (its Study below):

rule      - for two target sets whose D differ 10x or more and d from about D/600 to D/5, an lr sweep
            (seed 0, factor 2). A cell's sweep is extended by one factor of 2 while its best lr is at an
            end of what was tried. Each candidate rule implies a base value per cell; the report shows
            how much validation score one base value loses in each cell.
ablation  - at the quality study's d and default targets: Fastfood and the partition with column gains
            4:1 and 16:1, each with its own lr sweep (seed 0) and then seeds 1, 2 at its best lr. The
            balanced partition and Uni-LoRA come from the quality study (docs/quality/results.json:
            same budget, d and seeds).
validate  - the default targets at several d with theta's lr from the rule and the task's base value
            (what `gpart train` does by default), seeds 0, 1, 2.
sgd       - the ablation's maps (and the balanced partition) under SGD with momentum 0.9, where column gains
            act squared: one lr for theta and the head, swept per arm, then seeds 1, 2 at its best.
tuned     - the per-d tuned best that `validate` is held against: at the same d, an lr sweep (seed 0),
            then seeds 1, 2 at its best lr.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the shared script loader
from study_scripts import load_script  # noqa: E402

quality = load_script("benchmarks/quality.py")

ROOT = quality.ROOT
RUNS = ROOT / "runs" / "lr_rule"
QUALITY = ROOT / "docs" / "quality"  # the quality study's results, which this study compares with
OUT = Path(__file__).resolve().parent  # this study's report, data and figures
LADDER = [1e-2 * 2.0 ** k for k in range(-6, 12)]  # 1.5625e-4 ... 20.48, a factor 2 apart (SGD needs the top)
MAX_POINTS = 7
SEEDS_MORE = (1, 2)

ARMS = {  # ablation arm -> its `gpart train` flags
    "fastfood": ("--projection", "fastfood"),
    "gain16": ("--column-gain-ratio", "16"),
    "gain4": ("--column-gain-ratio", "4"),
}
# Under SGD (momentum 0.9) column gains act squared and nothing normalises them away, so the maps are run
# again there, the balanced partition included. One lr for theta and the head (no AdamW-tuned head lr
# carries over); the first lrs are a factor 4 apart because SGD's scale is not known beforehand.
SGD_ARMS = {"sgd-partition": (), "sgd-gain16": ARMS["gain16"], "sgd-fastfood": ARMS["fastfood"]}
SGD_FIRST = (0.16, 0.64, 2.56)


@dataclass(frozen=True)
class Study:
    """One domain's cells. D and fan_in from `gpart info --targets ...`; fan_in is the D-weighted mean
    fan-in of the adapted matrices (for the muP-style rule). First lrs: three ladder points around the
    geometric mean of what the per-weight and per-norm rules predict from the quality study's optimum."""
    domain: str
    base_lr: float  # the task's shipped base value (its recipe's defaults["lr"]); validate passes it as --base-lr
    targets: dict  # target set -> dict(targets=..., D=..., fan_in=...)
    rule_cells: dict = field(default_factory=dict)  # (target set, d) -> first lrs
    arms_first: tuple = ()  # first lrs of every ablation arm, at the quality study's d
    validate_d: tuple = ()
    tuned_first: dict = field(default_factory=dict)  # d -> first lrs of the per-d tuned sweep (default targets)
    default_D: int = 0  # D of the default targets (validate, tuned, ablation)

    @property
    def d(self) -> int:  # the quality study's d
        return quality.DOMAINS[self.domain]["d"]


STUDIES = {
    # MiniLM: query only vs every linear layer (12x in D). The middle cells ran last.
    "text": Study(
        "text", 1e-1,
        targets={"q": dict(targets="query", D=884_736, fan_in=384.0),
                 "all": dict(targets="query,key,value,dense", D=10_764_288, fan_in=762.65)},
        rule_cells={("q", 1440): (4e-2, 8e-2, 1.6e-1), ("q", 184320): (5e-3, 1e-2, 2e-2),
                    ("all", 23040): (2e-2, 4e-2, 8e-2), ("all", 2211840): (2.5e-3, 5e-3, 1e-2),
                    ("q", 11520): (4e-2, 8e-2, 1.6e-1), ("all", 184320): (1e-2, 2e-2, 4e-2)},
        arms_first=(2e-2, 4e-2, 8e-2),
        validate_d=(2880, 5760, 368640),  # 5,760 (+ the head): under 1/10 of LoRA r=8's trainable floats
        tuned_first={2880: (4e-2, 8e-2, 1.6e-1), 5760: (8e-2, 1.6e-1, 3.2e-1), 368640: (5e-3, 1e-2, 2e-2)},
        default_D=1_769_472),
    # DINOv2-small: q_proj vs every linear layer of the blocks (12x in D)
    "vision": Study(
        "vision", 2.5e-2,
        targets={"q": dict(targets="q_proj", D=1_769_472, fan_in=384.0),
                 "all": dict(targets="q_proj,k_proj,v_proj,o_proj,fc1,fc2", D=21_233_664, fan_in=768.0)},
        rule_cells={("q", 2880): (2e-2, 4e-2, 8e-2), ("q", 368640): (1.25e-3, 2.5e-3, 5e-3),
                    ("all", 34560): (1e-2, 2e-2, 4e-2), ("all", 4423680): (6.25e-4, 1.25e-3, 2.5e-3)},
        arms_first=(5e-3, 1e-2, 2e-2),
        validate_d=(5760, 18000, 737280),  # 5,760 (+ the head): under 1/10 of LoRA r=8's trainable floats
        tuned_first={5760: (1e-2, 2e-2, 4e-2), 737280: (1.25e-3, 2.5e-3, 5e-3)},
        default_D=3_538_944),
    # SmolLM2-135M-Instruct: q_proj vs every linear layer (10.7x in D), minus the validation loss. The
    # quality study's optimum: 3e-2 at q,k,v,o (D = 26,542,080), d = 131,072. Validate: GPart at 1/10 of
    # LoRA r=8's trainable floats under the rule's default.
    "llm": Study(
        "llm", 2e-1,
        targets={"q": dict(targets="q_proj", D=9_953_280, fan_in=576.0),
                 "all": dict(targets=quality.ALL_LINEAR, D=106_168_320, fan_in=816.0)},
        rule_cells={("q", 16384): (4e-2, 8e-2, 1.6e-1), ("q", 1990656): (2.5e-3, 5e-3, 1e-2),
                    # one run only at every linear layer and d = D/5: it took 22 minutes on one core
                    ("all", 172032): (2e-2, 4e-2, 8e-2), ("all", 21233664): (2.5e-3,)},
        validate_d=(92160,),
        default_D=26_542_080),
}


def rule_run(study: Study, tset: str, d: int, lr: float, seed: int = 0) -> quality.Run:
    return quality.Run(study.domain, "gpart", seed, lr, d, variant=tset, extra=("--targets", study.targets[tset]["targets"]))


def arm_run(study: Study, arm: str, lr: float, seed: int = 0) -> quality.Run:
    if arm in SGD_ARMS:
        extra = (*SGD_ARMS[arm], "--optimizer", "sgd", "--head-lr", f"{lr:g}")
        return quality.Run(study.domain, "gpart", seed, lr, study.d, variant=arm, extra=extra)
    return quality.Run(study.domain, "gpart", seed, lr, study.d, variant=arm, extra=ARMS[arm])


def rule_default_run(study: Study, d: int, seed: int, rule: str | None = None) -> quality.Run:
    """`gpart train` without --lr: theta's lr from the shipped rule and the task's base value. Another rule
    of VALIDATED: the runs made while gpart shipped it (read back; the same command now gets the shipped rule)."""
    label, bases = VALIDATED[rule or RULE_NAME]
    base = study.base_lr if bases is None else bases[study.domain]
    return quality.Run(study.domain, "gpart", seed, None, d, variant=label, extra=("--base-lr", f"{base:g}"))


def tuned_run(study: Study, d: int, lr: float, seed: int = 0) -> quality.Run:
    return quality.Run(study.domain, "gpart", seed, lr, d)


def score(domain: str, m: dict) -> float:
    return quality.selection_score(domain, m)


def curve(runs: Path, domain: str, make, lrs) -> list[tuple[float, float, float]]:
    """(lr, validation, test) of the runs done among make(lr) for lr in lrs, by lr."""
    out = []
    for lr in sorted(lrs):
        m = quality.load_metrics(runs, make(lr))
        if m:
            out.append((lr, score(domain, m), quality.test_metric(domain, m)))
    return out


def tried(runs: Path, make, first, ladder=LADDER) -> list[float]:
    """The lrs a cell's sweep has reached: its first ones plus ladder points run since (found on disk)."""
    return sorted({*first, *(lr for lr in ladder if quality.load_metrics(runs, make(lr)))})


def extension(runs: Path, domain: str, make, first, ladder=LADDER) -> float | None:
    """The next lr to try when the best so far is at an end of the sweep (None: bracketed or capped)."""
    lrs = tried(runs, make, first, ladder)
    pts = curve(runs, domain, make, lrs)
    if len(first) < 2 or len(pts) < len(lrs) or len(lrs) >= MAX_POINTS:  # a one-point cell is not swept
        return None
    best = max(pts, key=lambda p: p[1])[0]
    step = -1 if best == lrs[0] else (1 if best == lrs[-1] else 0)
    if not step:
        return None
    i = min(range(len(ladder)), key=lambda k: abs(math.log(ladder[k] / best)))
    j = i + step
    return ladder[j] if 0 <= j < len(ladder) else None


def best_lr(runs: Path, domain: str, make, first, ladder=LADDER) -> float | None:
    pts = curve(runs, domain, make, tried(runs, make, first, ladder))
    return max(pts, key=lambda p: p[1])[0] if pts else None


def sweep(runs: Path, domain: str, cells: dict, jobs: int, threads: int, ladder=LADDER) -> None:
    """First lrs of every cell, then rounds of extensions until every best lr is bracketed (on `ladder`)."""
    # the middle lr of every cell first, so an interrupted phase has every cell started
    order = sorted((((i != 1, i), make(lr)) for make, first in cells.values() for i, lr in enumerate(first)),
                   key=lambda x: x[0])
    quality.execute(runs, [run for _, run in order], jobs, threads)
    while True:
        more = [make(lr) for make, first in cells.values()
                if (lr := extension(runs, domain, make, first, ladder)) is not None]
        if not more:
            return
        quality.execute(runs, more, jobs, threads)


def rule_cells(study: Study) -> dict:
    return {key: ((lambda lr, t=key[0], d=key[1]: rule_run(study, t, d, lr)), first)
            for key, first in study.rule_cells.items()}


def arm_cells(study: Study, sgd: bool = False) -> dict:
    if not study.arms_first:
        return {}
    arms = {arm: SGD_FIRST for arm in SGD_ARMS} if sgd else {arm: study.arms_first for arm in ARMS}
    return {arm: ((lambda lr, a=arm: arm_run(study, a, lr)), first) for arm, first in arms.items()}


def tuned_cells(study: Study) -> dict:
    return {d: ((lambda lr, d=d: tuned_run(study, d, lr)), first) for d, first in study.tuned_first.items()}


def more_seeds(runs: Path, study: Study, cells: dict) -> list[quality.Run]:
    """Seeds 1, 2 at each cell's best lr (make(lr) is seed 0; the same run with another seed)."""
    out = []
    for make, first in cells.values():
        lr = best_lr(runs, study.domain, make, first)
        if lr is not None:
            out += [with_seed(make(lr), s) for s in SEEDS_MORE]
    return sorted(out, key=lambda r: r.seed)


def with_seed(run: quality.Run, seed: int) -> quality.Run:
    return replace(run, seed=seed)


def cmd_run(args) -> int:
    runs, study = Path(args.runs_dir), STUDIES[args.domain]
    if args.phase == "rule":
        sweep(runs, study.domain, rule_cells(study), args.jobs, args.threads)
    elif args.phase in ("ablation", "sgd", "tuned"):
        cells = tuned_cells(study) if args.phase == "tuned" else arm_cells(study, sgd=args.phase == "sgd")
        sweep(runs, study.domain, cells, args.jobs, args.threads)
        if not args.sweep_only:
            quality.execute(runs, more_seeds(runs, study, cells), args.jobs, args.threads)
    elif args.phase == "validate":
        seeds = [int(x) for x in args.seeds.split(",")]
        quality.execute(runs, [rule_default_run(study, d, s) for s in seeds for d in study.validate_d],
                        args.jobs, args.threads)
    return 0


# ----------------------------------------------------------------------------------------------- analysis
# Each rule: lr = base * factor(D, d, fan_in). A cell's optimum lr* implies base = lr* / factor.
RULES = {
    "constant": lambda D, d, f: 1.0,
    "R-weight": lambda D, d, f: math.sqrt(D / d),  # fixed per-weight Adam step lr * sqrt(d / D)
    # fixed per-step ||Delta W||_F bound lr * sqrt(d); base = theta's lr at d = 10,000 (as gpart.lr ships it)
    "R-norm": lambda D, d, f: math.sqrt(10_000 / d),
    "muP-style": lambda D, d, f: math.sqrt(D / d) * 384.0 / f,  # per-weight step ~ 1 / fan_in
    # fixed first-order loss change per Adam step: lr * ||P^T g||_1 ~ lr * d * (rms per-weight gradient)
    "R-linear": lambda D, d, f: 10_000 / d,
    "R-3/4": lambda D, d, f: (10_000 / d) ** 0.75,  # between R-norm and R-linear
}
RULE_NAME = "R-3/4"  # the rule the library ships (gpart.lr); the report checks it against the others
# Every rule gpart has shipped, with its validate runs' folder label and base values (None: the Study's, i.e.
# the shipped rule's). R-norm shipped first (text cells only); R-linear was the text cells' best and was
# validated on text and vision; the LLM cells then pointed to a slope between the two, R-3/4.
VALIDATED = {
    "R-3/4": ("rule-34", None),
    "R-linear": ("rule-linear", {"text": 9e-2, "vision": 3e-2, "llm": 4e-1}),
    "R-norm": ("rule", {"text": 6e-2, "vision": 2e-2, "llm": 1.1e-1}),
}


def _base(study: Study, rule: str) -> float:
    bases = VALIDATED[rule][1]
    return study.base_lr if bases is None else bases[study.domain]


def interp(pts: list[tuple[float, float, float]], lr: float) -> tuple[float, bool]:
    """Validation score at `lr`, linear in log lr between measured points; (value, extrapolated)."""
    if lr <= pts[0][0]:
        return pts[0][1], lr < pts[0][0] / 1.001
    if lr >= pts[-1][0]:
        return pts[-1][1], lr > pts[-1][0] * 1.001
    for (a, va, _), (b, vb, _) in zip(pts, pts[1:]):
        if a <= lr <= b:
            t = math.log(lr / a) / math.log(b / a)
            return va + t * (vb - va), False
    raise AssertionError


def _factor(name: str, study: Study, cell: dict) -> float:
    return RULES[name](cell["D"], cell["d"], study.targets[cell["targets"]]["fan_in"])


def _losses(study: Study, cells: list[dict], name: str, base: float) -> list[dict]:
    out = []
    for c in cells:
        lr = base * _factor(name, study, c)
        v, extrap = interp(c["points"], lr)
        out.append({"targets": c["targets"], "d": c["d"], "lr": lr, "loss": c["best_validation"] - v, "extrapolated": extrap})
    return out


def rule_summary(runs: Path, study: Study) -> dict:
    cells = []
    for (tset, d), (make, first) in rule_cells(study).items():
        pts = curve(runs, study.domain, make, tried(runs, make, first))
        if not pts:
            continue
        best = max(pts, key=lambda p: p[1])
        spec = study.targets[tset]
        cells.append({"targets": tset, "target_modules": spec["targets"], "D": spec["D"], "d": d,
                      "D_over_d": spec["D"] / d, "curve": [{"lr": a, "validation": v, "test": t} for a, v, t in pts],
                      "best_lr": best[0], "best_validation": best[1], "points": pts, "scored": len(pts) >= 3})
    out = {"cells": cells, "rules": {}}
    every = cells
    cells = [c for c in cells if c["scored"]]  # a cell of fewer than 3 lrs has no located optimum
    if not cells:
        for c in every:
            del c["points"]
        return out
    grid = [10 ** (k / 40) for k in range(-40 * 6, 40 * 3)]  # candidate base values, 1e-6 ... 1e3
    for name in RULES:
        implied = [c["best_lr"] / _factor(name, study, c) for c in cells]
        best_base, best_key = None, None
        for base in grid:
            if not min(implied) / 4 <= base <= max(implied) * 4:
                continue
            losses = [p["loss"] for p in _losses(study, cells, name, base)]
            # ties (flat curves): the base nearest the implied ones' geometric mean
            centre = abs(math.log(base) - statistics.mean(math.log(x) for x in implied))
            key = (round(max(losses), 6), round(statistics.mean(losses), 6), centre)
            if best_key is None or key < best_key:
                best_base, best_key = base, key
        out["rules"][name] = {"implied_base": implied, "implied_spread": max(implied) / min(implied), "base": best_base,
                              "max_loss": best_key[0], "mean_loss": best_key[1],
                              "per_cell": _losses(study, cells, name, best_base)}
    # a free power law: log lr* = a + b log d + c log D (least squares)
    out["power_law"] = _lstsq([(1.0, math.log(c["d"]), math.log(c["D"])) for c in cells],
                              [math.log(c["best_lr"]) for c in cells])
    # the task's shipped base value under the shipped rule
    # every rule gpart has shipped, at its task's base value (the first is the shipped one)
    out["defaults"] = [{"rule": r, "base": _base(study, r), "per_cell": _losses(study, cells, r, _base(study, r))}
                       for r in VALIDATED]
    for c in every:
        del c["points"]
    return out


def _lstsq(xs, ys):
    import numpy as np

    if len(xs) < 3 or len({x[1] for x in xs}) < 2 or len({x[2] for x in xs}) < 2:
        return None
    coef, *_ = np.linalg.lstsq(np.array(xs), np.array(ys), rcond=None)
    return {"log_lr": "a + b*log(d) + c*log(D)", "a": float(coef[0]), "b_d": float(coef[1]), "c_D": float(coef[2])}


def _study_results(domain: str) -> dict | None:
    return json.loads((QUALITY / "results.json").read_text())["domains"].get(domain)


def _seeds_at(runs: Path, make, lr: float) -> list[tuple[int, dict]]:
    return [(s, m) for s in quality.SEEDS if (m := quality.load_metrics(runs, with_seed(make(lr), s)))]


def ablation_summary(runs: Path, study: Study) -> dict:
    arms = {}
    for arm, (make, first) in (arm_cells(study) | arm_cells(study, sgd=True)).items():
        pts = curve(runs, study.domain, make, tried(runs, make, first))
        if not pts:
            continue
        lr = max(pts, key=lambda p: p[1])[0]
        ms = _seeds_at(runs, make, lr)
        tests = [quality.test_metric(study.domain, m) for _, m in ms]
        mean, sd = quality.mean_sd(tests)
        arms[arm] = {"curve": [{"lr": a, "validation": v, "test": t} for a, v, t in pts], "lr": lr,
                     "seeds": [s for s, _ in ms], "test": tests, "mean": mean, "sd": sd}
    res = _study_results(study.domain)
    if arms and res:
        for arm, method in (("partition", "gpart"), ("uni-lora", "unilora")):
            r = res["methods"][method]
            arms[arm] = {"curve": [{"lr": p["lr"], "validation": p["validation"], "test": p["test"]}
                                   for p in res["lr_sweep"][method]],
                         "lr": r["lr"], "seeds": r["seeds"], "test": r["test"], "mean": r["mean"], "sd": r["sd"],
                         "from": "quality study"}
    return arms


def paired(a: dict, b: dict) -> dict:
    """a - b per seed (seeds both have), with mean and sd."""
    by_seed = dict(zip(b["seeds"], b["test"]))
    diffs = [t - by_seed[s] for s, t in zip(a["seeds"], a["test"]) if s in by_seed]
    mean, sd = quality.mean_sd(diffs)
    return {"diffs": diffs, "mean": mean, "sd": sd}


def tuned_summary(runs: Path, study: Study) -> dict:
    """Per d: the sweep (seed 0, validation) and the test scores at its best lr over the seeds done. The
    quality study's d comes from its own sweep (docs/quality/results.json)."""
    out = {}
    for d, (make, first) in tuned_cells(study).items():
        pts = curve(runs, study.domain, make, tried(runs, make, first))
        if not pts:
            continue
        lr = max(pts, key=lambda p: p[1])[0]
        ms = _seeds_at(runs, make, lr)
        tests = [quality.test_metric(study.domain, m) for _, m in ms]
        mean, sd = quality.mean_sd(tests)
        out[str(d)] = {"curve": [{"lr": a, "validation": v, "test": t} for a, v, t in pts], "lr": lr,
                       "seeds": [s for s, _ in ms], "test": tests, "mean": mean, "sd": sd}
    res = _study_results(study.domain)
    if res and study.d in study.validate_d:
        r = res["methods"]["gpart"]
        out[str(study.d)] = {"curve": res["lr_sweep"]["gpart"], "lr": r["lr"], "seeds": r["seeds"], "test": r["test"],
                             "mean": r["mean"], "sd": r["sd"], "from": "quality study"}
    return out


def _rule_default(runs: Path, study: Study, d: int, rule: str) -> dict | None:
    ms = [(s, m) for s in quality.SEEDS if (m := quality.load_metrics(runs, rule_default_run(study, d, s, rule)))]
    if not ms:
        return None
    tests = [quality.test_metric(study.domain, m) for _, m in ms]
    mean, sd = quality.mean_sd(tests)
    return {"rule": rule, "base_lr": _base(study, rule), "lr": ms[0][1]["run"]["lr"],
            "weight_decay": ms[0][1]["run"]["lr_rule"]["weight_decay"], "seeds": [s for s, _ in ms], "test": tests,
            "validation": [score(study.domain, m) for _, m in ms], "mean": mean, "sd": sd,
            "trainable": ms[0][1]["params"]["trainable"]}


def validate_summary(runs: Path, study: Study) -> dict:
    """Each shipped rule's default across d, beside the per-d tuned best and the quality study's one fixed lr
    (same seeds); and GPart at <= 1/10 of LoRA r=8's trainable floats against LoRA r=8 (tuned), by seed."""
    res = _study_results(study.domain) or {"methods": {}, "d_sweep": {}}
    tuned = tuned_summary(runs, study)
    out = {"fixed_lr": res["methods"].get("gpart", {}).get("lr"), "d": {}}
    for d in study.validate_d:
        rules = [r for rule in VALIDATED if (r := _rule_default(runs, study, d, rule))]
        if not rules:
            continue
        row = {"rules": rules}
        fixed = res["d_sweep"].get(str(d))
        if fixed:
            row["fixed_lr"] = {"test": fixed["test"], "mean": fixed["mean"], "sd": fixed["sd"]}
        t = tuned.get(str(d))
        if t:
            row["tuned"] = t
            for r in rules:
                gap = r["mean"] - t["mean"]
                r["minus_tuned"] = {"mean": gap, "within_one_sd": gap >= 0 or -gap <= (t["sd"] or 0.0),
                                    "paired": paired(r, t)}
        out["d"][str(d)] = row
    lora = res["methods"].get("lora")
    if lora:
        out["lora"] = {"lr": lora["lr"], "trainable": lora["trainable"], "seeds": lora["seeds"], "test": lora["test"],
                       "mean": lora["mean"], "sd": lora["sd"], "vs": []}
        for d, row in out["d"].items():
            for r in row["rules"]:
                if r["trainable"] * 10 <= lora["trainable"]:
                    out["lora"]["vs"].append({"d": int(d), "rule": r["rule"], "lr": r["lr"], "trainable": r["trainable"],
                                              "ratio": r["trainable"] / lora["trainable"]} | paired(r, lora))
    return out

COMMAND = ("for dom in text vision llm; do for ph in rule validate tuned ablation sgd; do "
           "python studies/lr_rule/lr_rule.py run --domain $dom --phase $ph; done; done && python studies/lr_rule/lr_rule.py report")
FACTORS = {"constant": "1", "R-weight": "√(D/d)", "R-norm": "√(10⁴/d)", "muP-style": "√(D/d)·384/fan_in",
           "R-linear": "10⁴/d", "R-3/4": "(10⁴/d)^¾"}
MAPS = {"partition": "P^T P = I exactly", "fastfood": "isometric in expectation (Fastfood)",
        "gain16": "P^T P = diag(g²), gains 16:1", "gain4": "P^T P = diag(g²), gains 4:1",
        "uni-lora": "isometric into LoRA's factors, not end to end"}


def _curve_text(curve: list[dict], best: float | None = None) -> str:
    return "; ".join(("**" if p["lr"] == best else "") + f"{p['lr']:g} → {p['validation']:.3f}" +
                     ("**" if p["lr"] == best else "") for p in curve)


def seeds_text(xs) -> str:
    return ", ".join(f"{x:.3f}" for x in xs or [])


def _ms(r: dict) -> str:
    return f"{r['mean']:.3f} ± {r['sd']:.3f} ({len(r['test'])})"


def render_rule(study: Study, rule: dict, val_name: str) -> list[str]:
    sets = " and ".join(f"`--targets {s['targets']}` (D = {s['D']:,})" for s in study.targets.values())
    L = ["#### Which lr is best, by d and D", "",
         f"Target sets {sets}. {val_name} by theta's lr (best in bold):", "",
         "| targets | D | d | D/d | lr → validation | best lr | implied base: R-linear lr·d/10⁴ | R-norm lr·√(d/10⁴) |",
         "|---|---|---|---|---|---|---|---|"]
    for c in rule["cells"]:
        L.append(f"| {c['target_modules']} | {c['D']:,} | {c['d']:,} | {c['D_over_d']:.0f} | "
                 f"{_curve_text(c['curve'], c['best_lr'])}{'' if c['scored'] else ' (fewer than 3 lrs: not scored)'} | {c['best_lr']:g} | "
                 f"{c['best_lr'] * c['d'] / 1e4:.3f} | {c['best_lr'] * math.sqrt(c['d'] / 1e4):.3f} |")
    if not rule["rules"]:
        return L + [""]
    L += ["", "Each candidate rule, lr = base × factor(D, d), with the one base value that loses least in the worst "
          "cell (the score at an lr between two measured ones is interpolated in log lr; outside the measured range, "
          "the nearest end's value, so the loss shown is a lower bound, marked *):", "",
          "| rule | factor | base | spread of the implied bases (max/min) | validation lost per cell | worst | mean |",
          "|---|---|---|---|---|---|---|"]
    for name, r in rule["rules"].items():
        per = ", ".join(f"{p['loss']:.3f}" + ("*" if p["extrapolated"] else "") for p in r["per_cell"])
        L.append(f"| {name} | {FACTORS[name]} | {r['base']:.3g} | {r['implied_spread']:.1f}x | {per} | "
                 f"{r['max_loss']:.3f} | {r['mean_loss']:.3f} |")
    for i, sh in enumerate(rule["defaults"]):
        label = "shipped, the task's default base" if i == 0 else "shipped before, its base"
        per = ", ".join(f"{p['loss']:.3f}" + ("*" if p["extrapolated"] else "") for p in sh["per_cell"])
        L.append(f"| {sh['rule']}, {label} | {FACTORS[sh['rule']]} | {sh['base']:.3g} | – | {per} | "
                 f"{max(p['loss'] for p in sh['per_cell']):.3f} | {statistics.mean(p['loss'] for p in sh['per_cell']):.3f} |")
    if rule.get("power_law"):
        pl = rule["power_law"]
        L += ["", f"A free fit log lr* = a + b·log d + c·log D over the cells gives b = {pl['b_d']:.2f} and "
              f"c = {pl['c_D']:.2f} (R-weight: -0.5 and +0.5; R-norm: -0.5 and 0; constant: 0 and 0)."]
    return L + [""]


def render_validate(study: Study, val: dict, metric: str) -> list[str]:
    L = ["#### Each rule's default across d, against the per-d tuned best", "",
         f"Default targets (D = {study.default_D:,}). A rule's default: theta's lr from the rule with its task base "
         f"value, what `gpart train` does without `--lr` while gpart ships that rule (theta's weight decay scaled by "
         f"the inverse factor; {RULE_NAME} ships now). The tuned best: an lr sweep at that d (seed 0, validation), "
         f"then its best lr on every seed. Test {metric}, mean ± sd (seeds):", "",
         "| d | tuned: lr sweep → validation | tuned: test | per seed | fixed lr " + (f"{val['fixed_lr']:g} " if val["fixed_lr"] else "")
         + "(quality study) |", "|---|---|---|---|---|"]
    for d, row in val["d"].items():
        t, fixed = row.get("tuned"), row.get("fixed_lr")
        L.append(f"| {int(d):,} | " + (f"{_curve_text(t['curve'], t['lr'])}{' (quality study)' if t.get('from') else ''} | "
                                       f"{_ms(t)} | {seeds_text(t['test'])}" if t else "– | – | –")
                 + (f" | {fixed['mean']:.3f} ± {fixed['sd']:.3f} |" if fixed else " | – |"))
    L += ["", "| d | rule | base | theta's lr | test | per seed | rule − tuned: means | paired by seed |", "|---|---|---|---|---|---|---|---|"]
    for d, row in val["d"].items():
        for r in row["rules"]:
            gap = r.get("minus_tuned")
            L.append(f"| {int(d):,} | {r['rule']}{' (shipped)' if r['rule'] == RULE_NAME else ''} | {r['base_lr']:g} | "
                     f"{r['lr']:.3g} | {_ms(r)} | {seeds_text(r['test'])} | "
                     + (f"{gap['mean']:+.3f} (tuned sd {row['tuned']['sd']:.3f}) | {gap['paired']['mean']:+.3f} ± "
                        f"{gap['paired']['sd']:.3f} ({len(gap['paired']['diffs'])}) |" if gap else "– | – |"))
    lo = val.get("lora") or {}
    if lo.get("vs"):
        L += ["", f"GPart at no more than 1/10 of LoRA r=8's trainable floats (lr from a rule, untuned) against LoRA "
              f"r=8 ({lo['trainable']:,} trainable, lr {lo['lr']:g} tuned in the quality study; test "
              f"{lo['mean']:.3f} ± {lo['sd']:.3f}), paired by seed:", "",
              "| d | rule | theta's lr | GPart trainable (with the head) | share of LoRA's | GPart − LoRA per seed | mean ± sd |",
              "|---|---|---|---|---|---|---|"]
        for v in lo["vs"]:
            L.append(f"| {v['d']:,} | {v['rule']} | {v['lr']:.3g} | {v['trainable']:,} | {100 * v['ratio']:.1f}% | "
                     f"{', '.join(f'{x:+.3f}' for x in v['diffs'])} | {v['mean']:+.3f} ± {v['sd']:.3f} |")
    return L + [""]


def _arm_table(arms: dict, ref: str) -> list[str]:
    L = ["| arm | map | lr → validation | best lr | test | per seed | arm − partition, paired |", "|---|---|---|---|---|---|---|"]
    for arm, r in arms.items():
        pair = paired(r, arms[ref]) if ref in arms and arm != ref else None
        L.append(f"| {arm} | {MAPS[arm.removeprefix('sgd-')]} | {_curve_text(r['curve'], r['lr'])} | {r['lr']:g} | {_ms(r)} | "
                 f"{seeds_text(r['test'])} | " + (f"{pair['mean']:+.3f} ± {pair['sd']:.3f}" if pair and pair["diffs"] else "–") + " |")
    return L + [""]


def render_ablation(study: Study, abl: dict, metric: str) -> list[str]:
    L = ["#### Isometry ablations at matched d", "",
         f"Default targets, d = {study.d:,}, AdamW, each arm with its own lr sweep (seed 0, validation), then test "
         f"{metric} at its best lr on every seed. The partition (GPart) and Uni-LoRA are the quality study's runs "
         "(same budget, d and seeds; partition version 1).", ""]
    L += _arm_table({a: r for a, r in abl.items() if a not in SGD_ARMS}, "partition")
    sgd = {a: r for a, r in abl.items() if a in SGD_ARMS}
    if sgd:
        L += ["The same maps under SGD (momentum 0.9; one lr for theta and the head, swept per arm; the balanced "
              "partition run here too):", ""] + _arm_table(sgd, "sgd-partition")
    return L


def render_summary(result: dict) -> list[str]:
    """Each candidate rule in every domain: the validation score its best base value loses in the worst cell,
    and how far apart the cells' implied base values are."""
    doms = [d for d, r in result["domains"].items() if r["rule"].get("rules")]
    if not doms:
        return []
    units = {d: "loss" if quality.DOMAINS[d]["metric"] == "exact_match" else "accuracy" for d in doms}
    L = ["### The candidate rules across the three domains", "",
         "Worst-cell validation " + ", ".join(f"{units[d]} ({d})" for d in doms) + " lost by each rule at its best "
         "base value for that domain (the detail is in each domain's section below; * marks a lower bound), and the "
         "spread of the base values the cells imply (max/min; 1x would be a perfect rule):", "",
         "| rule | factor | " + " | ".join(f"{d}: worst loss | {d}: spread" for d in doms) + " |",
         "|---|---|" + "---|---|" * len(doms)]
    for name in RULES:
        cells = []
        for d in doms:
            r = result["domains"][d]["rule"]["rules"][name]
            star = "*" if any(p["extrapolated"] and abs(p["loss"] - r["max_loss"]) < 1e-6 for p in r["per_cell"]) else ""
            cells += [f"{r['max_loss']:.3f}{star}", f"{r['implied_spread']:.1f}x"]
        bold = "**" if name == RULE_NAME else ""
        L.append(f"| {bold}{name}{bold} | {FACTORS[name]} | " + " | ".join(cells) + " |")
    fits = [f"{d}: d^{result['domains'][d]['rule']['power_law']['b_d']:.2f} · D^{result['domains'][d]['rule']['power_law']['c_D']:.2f}"
            for d in doms if result["domains"][d]["rule"].get("power_law")]
    return L + ["", "A free power law fitted to each domain's cells (lr* ∝ d^b · D^c): " + "; ".join(fits) + ".", ""]


def render(result: dict) -> str:
    L = ["## GPart's learning-rate rule and the isometry ablations", "",
         f"Produced by `{COMMAND}` (one `gpart train` process per run, one thread, each domain's budget above; raw "
         "numbers: [lr_rule.json](lr_rule.json)). Learning rates are chosen on the validation "
         "split (seed 0), never on test.", "", "![lr_rule](lr_rule.png)", ""]
    L += render_summary(result)
    for dom, r in result["domains"].items():
        study = STUDIES[dom]
        exact = quality.DOMAINS[dom]["metric"] == "exact_match"
        metric = "exact match" if exact else "accuracy"
        val_name = "Minus the validation loss" if exact else "Validation accuracy"
        if not (r["rule"]["cells"] or r["validate"]["d"] or r["ablation"]):
            continue
        L += [f"### {quality.DOMAINS[dom]['title']}", ""]
        if r["rule"]["cells"]:
            L += render_rule(study, r["rule"], val_name)
        if r["validate"]["d"]:
            L += render_validate(study, r["validate"], metric)
        if r["ablation"]:
            L += render_ablation(study, r["ablation"], metric)
    if any(r["ablation"] for r in result["domains"].values()):
        L += ["![ablation](ablation.png)", ""]
    analysis = OUT / "lr_rule_analysis.md"
    if analysis.exists():
        L += [analysis.read_text().rstrip(), ""]
    return "\n".join(L)


def plot(result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = [d for d, r in result["domains"].items() if r["rule"]["cells"] or r["validate"]["d"]]
    if doms:
        fig, axes = plt.subplots(1, len(doms), figsize=(5.2 * len(doms), 4.2), squeeze=False)
        ds = [10 ** (k / 10) for k in range(30, 74)]
        for ax, dom in zip(axes[0], doms):
            rule, study = result["domains"][dom]["rule"], STUDIES[dom]
            for (tset, spec), color in zip(study.targets.items(), ("C0", "C3", "C2")):
                cells = [c for c in rule["cells"] if c["targets"] == tset]
                for c in cells:  # every lr within 0.01 of the best: how flat the optimum is
                    near = [p["lr"] for p in c["curve"] if p["validation"] >= c["best_validation"] - 0.01]
                    ax.plot([c["d"]] * 2, [min(near), max(near)], color=color, alpha=0.35, lw=6)
                scored = [c for c in cells if c["scored"]]
                if scored:
                    ax.plot([c["d"] for c in scored], [c["best_lr"] for c in scored], "o", color=color,
                            label=f"best lr, {spec['targets']} (D = {spec['D']:,})")
                for c in cells:
                    if not c["scored"]:
                        ax.plot([c["d"]], [c["best_lr"]], "o", mfc="none", color=color, label="one lr only (not a best)")
            rows = result["domains"][dom]["validate"]["d"]
            pts = [(int(d), r["tuned"]["lr"]) for d, r in rows.items() if r.get("tuned")]
            if pts:
                ax.plot(*zip(*pts), "s", color="C1", mfc="none", label="per-d tuned best, default targets")
            ax.plot(ds, [study.base_lr * RULES[RULE_NAME](0, d, 0) for d in ds], "k--", lw=1.2,
                    label=f"{RULE_NAME} (shipped), base {study.base_lr:g}")
            for rule, style in zip(list(VALIDATED)[1:], (":", "-.")):
                ax.plot(ds, [_base(study, rule) * RULES[rule](0, d, 0) for d in ds], style, color="grey", lw=1.2,
                        label=f"{rule} (shipped before), base {_base(study, rule):g}")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("d")
            ax.set_ylabel("theta's learning rate")
            ax.set_title(f"{dom}: best lr by d (bars: within 0.01 of the best)", fontsize=9)
            ax.legend(fontsize=6.5)
        fig.tight_layout()
        fig.savefig(OUT / "lr_rule.png", dpi=110)
        plt.close(fig)
    panels = [(dom, opt, arms) for dom, r in result["domains"].items() for opt, arms in
              (("AdamW", {a: x for a, x in r["ablation"].items() if a not in SGD_ARMS}),
               ("SGD", {a: x for a, x in r["ablation"].items() if a in SGD_ARMS})) if arms]
    if panels:
        fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 4), squeeze=False)
        for ax, (dom, opt, arms) in zip(axes[0], panels):
            for arm, r in arms.items():
                ax.plot([p["lr"] for p in r["curve"]], [p["validation"] for p in r["curve"]], "o-", label=arm)
            ax.set_xscale("log")
            ax.set_xlabel("theta's learning rate")
            ax.set_ylabel("validation score (seed 0)")
            ax.set_title(f"{dom}, d = {STUDIES[dom].d:,}, {opt}: each map with its own lr sweep", fontsize=8)
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(OUT / "ablation.png", dpi=110)
        plt.close(fig)


def collect(runs: Path) -> dict:
    return {"command": COMMAND, "domains": {
        dom: {"rule": rule_summary(runs, s), "validate": validate_summary(runs, s), "ablation": ablation_summary(runs, s)}
        for dom, s in STUDIES.items()}}


def cmd_report(args) -> int:
    result = collect(Path(args.runs_dir))
    quality.write_atomic(OUT / "lr_rule.json", json.dumps(result, indent=1) + "\n")
    plot(result)
    body = render(result)
    quality.write_atomic(OUT / "lr_rule.md", body + "\n")
    print(f"wrote {OUT / 'lr_rule.md'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--domain", choices=tuple(STUDIES), default="text")
    r.add_argument("--phase", choices=("rule", "ablation", "sgd", "validate", "tuned"), required=True)
    r.add_argument("--jobs", type=int, default=1, help="runs at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--runs-dir", default=str(RUNS))
    r.add_argument("--seeds", default="0,1,2", help="validate: seeds")
    r.add_argument("--sweep-only", action="store_true", help="ablation, sgd, tuned: the lr sweeps, not the other seeds")
    rep = sub.add_parser("report")
    rep.add_argument("--runs-dir", default=str(RUNS))
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    return {"run": cmd_run, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
