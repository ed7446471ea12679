#!/usr/bin/env python
"""An LLM study that separates methods (issue 17, item 2; item 3's partition arms on the same tasks).

    python studies/llm_methods/llm_methods.py run --phase sweep|seeds|arms [--tasks reversal,arithmetic]
                                                  [--methods base,gpart,lora,unilora,full] [--jobs 1 --threads 2]
    python studies/llm_methods/llm_methods.py status   # per task and phase: runs done, to do, CPU time left
    python studies/llm_methods/llm_methods.py report   # studies/llm_methods/llm_methods.{json,md}
    add --smoke to any of them: a 2-step budget in runs/llm_methods-smoke, one run per method in the sweep phase
    (an end-to-end check of every kind of run, not a result)

SmolLM2-135M-Instruct on two built-in chat tasks of different skills, word-reversal (copying in reverse
order) and arithmetic (computing), 300 optimizer steps of 8, validation loss on the 200 validation items,
greedy exact match on the 200 test items, per seed. Methods: the untouched base model (`gpart eval`), GPart
at d = 131,072 (the causal-lm default d) with theta's lr from the rule, LoRA r=8, Uni-LoRA at GPart's d, full
fine-tuning. Phases, in the order that gives the most information first:

sweep - seed 0: every method's lr on a ladder (GPart: the rule's base value, `--base-lr`, a factor 2 apart
        around the causal-lm default, so the default is the middle point and "GPart at the rule's lr" is one of
        the runs; the others: `--lr`, a factor 3 apart), every method's middle point first, each ladder
        extended while its best is at an end (at most lr_rule.MAX_POINTS points). Chosen on validation loss
        (quality.selection_score), never on test. And the base model, seed 0.
seeds - seeds 1, 2 for every method at its chosen lr, GPart also at the default base where the tuned one
        differs, and the base model.
arms  - the authors' partition variants at GPart's chosen base: `--partition-scope transformer_block` and
        `--grouping signed_magnitude`, seeds 0, 1, 2, paired by seed with the global partition.

Same runner as benchmarks/quality.py (one `gpart train` process per run, resumable: a run whose metrics.json
exists is skipped, an unfinished one continues from its last checkpoint; only the metrics.json files of `runs/`
are kept in git, so a fresh clone resumes).
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # studies/: the shared script loader
from study_scripts import load_script  # noqa: E402

lr_rule = load_script("studies/lr_rule/lr_rule.py")
quality = lr_rule.quality

OUT = Path(__file__).resolve().parent
RUNS = OUT / "runs"  # only metrics.json files are kept in git
SMOKE_RUNS = quality.ROOT / "runs" / "llm_methods-smoke"  # ignored by git: smoke runs are never results
ANALYSIS = OUT / "llm_methods_analysis.md"  # the verdict, written by hand; the report includes it
TASKS = {"reversal": "word-reversal", "arithmetic": "arithmetic"}  # task -> built-in chat dataset
SEEDS = (0, 1, 2)
SEEDS_MORE = (1, 2)
D = 131072  # the causal-lm default d (CausalLM.defaults["d"]), given explicitly so the runs do not move with it
BUDGET = ("--max-steps", "300", "--batch-size", "8", "--max-length", "128", "--eval-steps", "300",
          "--max-eval-samples", "200", "--max-new-tokens", "24")
STUDY_STEPS = int(BUDGET[BUDGET.index("--max-steps") + 1])  # 300
CHECKPOINT_EVERY = 256  # runs longer than the study's: an hour or more on a CPU, too long to lose whole
# a budget that only checks the machinery end to end (later flags win in `gpart train`)
SMOKE_BUDGET = ("--max-steps", "2", "--batch-size", "8", "--max-length", "128", "--eval-steps", "2",
                "--max-eval-samples", "8", "--max-new-tokens", "4")
METHODS = ("base", "gpart", "lora", "unilora", "full")
SWEPT = ("gpart", "lora", "unilora", "full")
RANK = {"lora": 8, "unilora": 4}  # the CLI's defaults (recipes.methods.DEFAULT_RANK), given explicitly


def _default_base() -> float:
    from gpart.recipes.causal_lm import CausalLM

    return CausalLM.defaults["lr"]


# The ladders are fixed numbers, so the committed runs stay on them if a default moves later. GPart's is
# anchored at the causal-lm default base of when the study began (0.2: theta lr 2.9e-2 at d = 131,072), a
# factor 2 apart; DEFAULT_BASE is what `gpart train` uses now (the same, checked by the tests).
DEFAULT_BASE = _default_base()
GPART_LADDER = [0.2 * 2.0 ** k for k in range(-6, 6)]
# The others a factor 3 apart, the middle one step below what the quality study's 16-step sweeps chose (LoRA
# 6e-3, Uni-LoRA 3e-2, full 1e-4): 300 steps are 19x longer, which usually wants a smaller lr.
LADDERS = {"gpart": GPART_LADDER,
           "lora": [2e-3 * 3.0 ** k for k in range(-6, 7)],
           "unilora": [1e-2 * 3.0 ** k for k in range(-6, 7)],
           "full": [3e-5 * 3.0 ** k for k in range(-6, 7)]}
MIDDLE = {"gpart": 0.2, "lora": 2e-3, "unilora": 1e-2, "full": 3e-5}
ARMS = {"block": ("--partition-scope", "transformer_block"), "signed": ("--grouping", "signed_magnitude")}
LABEL = {"base": "base model (no training)", "gpart": "GPart", "lora": "LoRA r=8", "unilora": "Uni-LoRA r=4",
         "full": "full FT"}


def first_points(method: str) -> tuple[float, float, float]:
    """The three ladder points a sweep starts with, its middle in the middle (values taken from the ladder
    itself, so they match the points an extension reaches exactly)."""
    ladder = LADDERS[method]
    i = min(range(len(ladder)), key=lambda k: abs(math.log(ladder[k] / MIDDLE[method])))
    return tuple(ladder[i - 1:i + 2])


def theta_lr(base: float, d: int = D) -> float:
    """theta's lr at d under the rule `gpart train` applies (gpart.lr)."""
    from gpart.lr import EXPONENT, REFERENCE_LENGTH

    return base * (REFERENCE_LENGTH / d) ** EXPONENT


def domain(task: str) -> str:
    return f"llm-{task}"


def domain_specs(smoke: bool = False) -> dict:
    """quality.DOMAINS entries, one per task (the runner reads a run's budget and metric from there)."""
    budget = SMOKE_BUDGET if smoke else BUDGET
    return {domain(t): dict(title=f"LLM methods: SmolLM2-135M-Instruct on {ds} (chat, greedy exact match)",
                            args=["--task", "causal-lm", "--dataset", ds, *budget], metric="exact_match", d=D)
            for t, ds in TASKS.items()}


def register(smoke: bool = False) -> None:
    """Put this study's domains into quality.DOMAINS. Done when the script runs, not on import, so that a
    process that also uses the quality study (the test suite) sees its table unchanged."""
    quality.DOMAINS.update(domain_specs(smoke))


# ----------------------------------------------------------------------------------------------- runs

def budget_flags(steps: int) -> tuple[str, ...]:
    """Another step budget than the study's (later flags win in `gpart train`): one validation pass at the end, as
    at 300; a longer run validates and checkpoints every CHECKPOINT_EVERY steps, so a stopped one resumes."""
    return ("--max-steps", str(steps), "--eval-steps", str(steps if steps <= STUDY_STEPS else CHECKPOINT_EVERY))


def gpart_run(task: str, base: float, seed: int = 0, arm: str | None = None, steps: int | None = None,
              d: int = D) -> quality.Run:
    """`gpart train` with theta's lr from the rule at this base value (and weight decay as the rule sets it);
    `steps`: another step budget than the study's (the budget study, studies/lr_budget/llm_budget.py)."""
    extra = ("--base-lr", f"{base:g}", *(ARMS[arm] if arm else ()))
    if steps is not None:
        extra += budget_flags(steps)
    variant = (f"{arm}-" if arm else "") + (f"T{steps}-" if steps is not None else "") + f"base{base:g}"
    return quality.Run(domain(task), "gpart", seed, None, d, variant=variant, extra=extra)


def method_run(task: str, method: str, lr: float | None, seed: int = 0) -> quality.Run:
    if method == "base":
        return quality.Run(domain(task), "base", seed, None)
    if method == "gpart":
        return gpart_run(task, lr, seed)
    extra = ("--r", str(RANK[method])) if method in RANK else ()
    return quality.Run(domain(task), method, seed, lr, D, extra=extra)


@dataclass(frozen=True)
class Cell:
    """One (task, method) sweep: make(lr) is its seed-0 run at a ladder point (GPart's: a base value). GPart's
    may also have another step budget and d (the budget study); the study's own cells keep 300 steps and D."""
    task: str
    method: str
    steps: int | None = None
    d: int = D

    def make(self, lr: float) -> quality.Run:
        if self.method == "gpart":
            return gpart_run(self.task, lr, steps=self.steps, d=self.d)
        assert (self.steps, self.d) == (None, D), "only GPart's cells take another budget or d"
        return method_run(self.task, self.method, lr)

    @property
    def domain(self) -> str:
        return domain(self.task)

    @property
    def first(self) -> tuple:
        return first_points(self.method)

    @property
    def ladder(self) -> list[float]:
        return LADDERS[self.method]


def cells(tasks=tuple(TASKS), methods=SWEPT) -> list[Cell]:
    return [Cell(t, m) for t in tasks for m in methods if m in SWEPT]


def sweep_state(runs: Path, cell: Cell) -> dict:
    """What a cell's sweep has reached: its points (lr, -validation loss, test), the next point to run, whether
    it is finished, its chosen lr (only once finished) and where that sits among the points tried."""
    lrs = lr_rule.tried(runs, cell.make, cell.first, cell.ladder)
    pts = lr_rule.curve(runs, cell.domain, cell.make, lrs)
    todo = [lr for lr in lrs if lr not in {p[0] for p in pts}]
    nxt = lr_rule.extension(runs, cell.domain, cell.make, cell.first, cell.ladder)
    finished = not todo and nxt is None
    best = max(pts, key=lambda p: p[1])[0] if pts else None
    where = None
    if finished:
        where = ("lowest tried" if best == lrs[0] else "highest tried" if best == lrs[-1] else "bracketed")
    return {"points": pts, "todo": todo, "next": nxt, "finished": finished, "chosen": best if finished else None,
            "where": where}


def chosen(runs: Path, cell: Cell) -> float | None:
    return sweep_state(runs, cell)["chosen"]


def sweep(runs: Path, todo_cells: list[Cell], jobs: int, threads: int) -> None:
    """lr_rule.sweep with a ladder per cell: every cell's middle point first, then the other first points, then
    rounds of extensions until every best is bracketed or the cell has lr_rule.MAX_POINTS points. A point
    that failed is not tried again in the same call (it would come back every round)."""
    order = sorted(((i != 1, i, c.make(lr)) for c in todo_cells for i, lr in enumerate(c.first)), key=lambda x: x[:2])
    run_and_prune(runs, [run for *_, run in order], jobs, threads)
    attempted = set()
    while True:
        more = [run for c in todo_cells if (lr := sweep_state(runs, c)["next"]) is not None
                and (run := c.make(lr)) not in attempted]
        if not more:
            return
        attempted.update(more)
        run_and_prune(runs, more, jobs, threads)


def seed_runs(runs: Path, tasks=tuple(TASKS), methods=METHODS) -> list[quality.Run]:
    """Seeds 1, 2 at each finished sweep's chosen lr; GPart also seeds 0-2 at the default base (where it is not
    the chosen one); the base model's seeds 1, 2. Seed-major, so a stopped phase leaves every method even."""
    out = []
    for t in tasks:
        for m in methods:
            if m == "base":
                out += [method_run(t, "base", None, s) for s in SEEDS_MORE]
                continue
            lr = chosen(runs, Cell(t, m))
            if lr is None:
                continue
            out += [method_run(t, m, lr, s) for s in SEEDS_MORE]
            if m == "gpart" and lr != DEFAULT_BASE:
                out += [gpart_run(t, DEFAULT_BASE, s) for s in SEEDS]
    return sorted(dict.fromkeys(out), key=lambda r: r.seed)


def arm_runs(runs: Path, tasks=tuple(TASKS), arms=tuple(ARMS)) -> list[quality.Run]:
    """Each arm at GPart's chosen base (once its sweep is finished), seeds 0, 1, 2."""
    out = []
    for t in tasks:
        base = chosen(runs, Cell(t, "gpart"))
        if base is not None:
            out += [gpart_run(t, base, s, arm) for arm in arms for s in SEEDS]
    return sorted(out, key=lambda r: r.seed)


def prune_checkpoints(runs: Path) -> int:
    """Delete the Trainer checkpoints of finished runs (metrics.json written): only an unfinished run resumes
    from one, and a full fine-tuning checkpoint with its optimizer state is over 1.5 GB. Returns how many runs
    were pruned."""
    n = 0
    for metrics_file in runs.glob("*/*/metrics.json"):
        ckpt = metrics_file.parent / "checkpoints"
        if ckpt.is_dir():
            shutil.rmtree(ckpt)
            n += 1
    return n


def run_and_prune(runs: Path, todo: list[quality.Run], jobs: int, threads: int) -> None:
    quality.execute(runs, todo, jobs, threads)
    prune_checkpoints(runs)


def cmd_run(args) -> int:
    runs = Path(args.runs_dir)
    tasks, methods = csv_choices(args.tasks, TASKS), csv_choices(args.methods, METHODS)
    if args.phase == "sweep":
        if "base" in methods:  # the untouched model, seed 0: one evaluation
            run_and_prune(runs, [method_run(t, "base", None) for t in tasks], args.jobs, args.threads)
        if args.smoke:  # one run per method, its middle point: an end-to-end check of each `gpart train`
            run_and_prune(runs, [c.make(c.first[1]) for c in cells(tasks, methods)], args.jobs, args.threads)
        else:
            sweep(runs, cells(tasks, methods), args.jobs, args.threads)
    elif args.phase == "seeds":
        run_and_prune(runs, seed_runs(runs, tasks, methods), args.jobs, args.threads)
    else:
        run_and_prune(runs, arm_runs(runs, tasks, csv_choices(args.arms, ARMS)), args.jobs, args.threads)
    return 0


def csv_choices(text: str, known) -> tuple:
    items = tuple(x for x in text.split(",") if x)
    unknown = [x for x in items if x not in known]
    if unknown:
        raise SystemExit(f"unknown {', '.join(unknown)}; choose from {', '.join(known)}")
    return items


# ----------------------------------------------------------------------------------------------- status

def phase_runs(runs: Path, task: str) -> dict:
    """Per phase: the runs known now, those done and to do, and the runs not known yet per method (the seeds and
    arms that wait for a sweep to choose; a sweep's own extensions are not counted: they depend on its points)."""
    sweep_known = [method_run(task, "base", None)]
    for m in SWEPT:
        c, st = Cell(task, m), sweep_state(runs, Cell(task, m))
        sweep_known += [c.make(lr) for lr in lr_rule.tried(runs, c.make, c.first, c.ladder)]
        if st["next"] is not None:
            sweep_known.append(c.make(st["next"]))
    undecided = [m for m in SWEPT if chosen(runs, Cell(task, m)) is None]
    # GPart: seeds 1, 2 at the default base too, unless the sweep keeps the default
    waiting_seeds = {m: len(SEEDS_MORE) * (2 if m == "gpart" else 1) for m in undecided}
    waiting_arms = {"gpart": len(ARMS) * len(SEEDS)} if "gpart" in undecided else {}
    out = {}
    for phase, known, waiting in (("sweep", sweep_known, {}), ("seeds", seed_runs(runs, (task,)), waiting_seeds),
                                  ("arms", arm_runs(runs, (task,)), waiting_arms)):
        done = [r for r in known if quality.load_metrics(runs, r)]
        out[phase] = {"known": known, "done": done, "todo": [r for r in known if r not in done],
                      "not_known_yet": waiting}
    return out


# the quality study's 16-step LLM runs (word-reversal, same batch and length): the pace before this study has any
QUALITY_RESULTS = quality.ROOT / "docs" / "quality" / "results.json"


def run_seconds(runs: Path, steps: int | None = None) -> tuple[dict, str]:
    """Train seconds per run of each method: the median train runtime of this study's finished runs; a method
    with none, the median s/step of the others x steps, or else the quality study's committed 16-step LLM runs'
    s/step x steps. Base: 0 (it only evaluates). Returns the seconds and where they came from."""
    steps = steps or STUDY_STEPS
    per_step = {}
    for m in runs.glob("llm-*/*/metrics.json"):
        metrics = json.loads(m.read_text())
        method = m.parent.name.split("-")[0]
        if method in SWEPT and (x := quality.step_seconds(metrics)) is not None:
            per_step.setdefault(method, []).append(x)
    source = "this study's finished runs"
    if not per_step and QUALITY_RESULTS.exists():
        llm = json.loads(QUALITY_RESULTS.read_text())["domains"]["llm"]
        n = int(llm["args"][llm["args"].index("--max-steps") + 1])
        per_step = {m: [r["train_s"] / n] for m, r in llm["methods"].items() if m in SWEPT}
        source = f"the quality study's {n}-step LLM runs (docs/quality/results.json)"
    every = [t for ts in per_step.values() for t in ts]
    out = {m: steps * statistics.median(per_step.get(m) or every) if every else None for m in SWEPT}
    return out | {"base": 0.0}, source


def status_text(runs: Path, steps: int | None = None) -> str:
    secs, source = run_seconds(runs, steps)
    lines = [f"runs: {runs}", f"train s per run, from {source}: " + ", ".join(
        f"{m} {'–' if s is None else f'{s:.0f}'}" for m, s in secs.items() if m != "base")]
    total, later = 0.0, 0.0
    for task in TASKS:
        lines.append(f"\n{task} ({TASKS[task]})")
        for phase, p in phase_runs(runs, task).items():
            left = sum(secs[r.method] or 0.0 for r in p["todo"])
            waiting = sum(n * (secs[m] or 0.0) for m, n in p["not_known_yet"].items())
            total, later = total + left, later + waiting
            n_wait = sum(p["not_known_yet"].values())
            more = f"; {n_wait} more once a sweep chooses (~{waiting / 3600:.1f} h)" if n_wait else ""
            lines.append(f"  {phase:6s} done {len(p['done'])}/{len(p['known'])}, to do (~{left / 3600:.1f} h): "
                         + (", ".join(r.tag for r in p["todo"]) or "nothing") + more)
        for m in SWEPT:
            st = sweep_state(runs, Cell(task, m))
            pts = "; ".join(f"{lr:g} → {-v:.3f}" for lr, v, _ in st["points"]) or "no points yet"
            state = f"chosen {st['chosen']:g} ({st['where']})" if st["finished"] else "sweeping"
            lines.append(f"    {m:8s} {state}: {pts}")
    lines.append(f"\nCPU time left: ~{total / 3600:.1f} h of training for the runs known now, ~{later / 3600:.1f} h for "
                 "those that wait for a sweep; not counted: sweep extensions (a best at an end), model loading and "
                 "the test generation of every run (outside train runtime).")
    return "\n".join(lines)


def cmd_status(args) -> int:
    budget = SMOKE_BUDGET if args.smoke else BUDGET
    print(status_text(Path(args.runs_dir), int(budget[budget.index("--max-steps") + 1])))
    return 0


# ----------------------------------------------------------------------------------------------- analysis
COMMAND = ("python studies/llm_methods/llm_methods.py run --phase sweep && "
           "python studies/llm_methods/llm_methods.py run --phase seeds && "
           "python studies/llm_methods/llm_methods.py run --phase arms && "
           "python studies/llm_methods/llm_methods.py report")


def mean_sd(xs: list[float]) -> tuple[float | None, float | None]:
    """Mean, and the sd only with all three seeds (fewer give no spread to judge by)."""
    mean, sd = quality.mean_sd(xs)
    return mean, (sd if len(xs) >= len(SEEDS) else None)


def seeds_of(runs: Path, run: quality.Run) -> dict | None:
    """Test exact match and validation loss of `run` (seed 0) on every seed done."""
    ms = [(s, m) for s in SEEDS if (m := quality.load_metrics(runs, lr_rule.with_seed(run, s)))]
    if not ms:
        return None
    test = [quality.test_metric(run.domain, m) for _, m in ms]
    loss = [m["validation"].get("loss") for _, m in ms]
    mean, sd = mean_sd(test)
    return {"seeds": [s for s, _ in ms], "test": test, "validation_loss": loss, "mean": mean, "sd": sd,
            "n_test": ms[0][1]["test"].get("n")}


def judged(diffs: list[float], words: tuple[str, str]) -> dict:
    """Mean and sd of paired differences, and where the first stands: words[0] / words[1] when the mean is above /
    below zero by more than one sd of the differences, else "within the spread"; verdict None with fewer seeds."""
    mean, sd = mean_sd(diffs)
    verdict = None
    if sd is not None:
        verdict = "within the spread" if abs(mean) <= sd else (words[0] if mean > 0 else words[1])
    return {"diffs": diffs, "mean": mean, "sd": sd, "verdict": verdict}


def seed_diffs(a: dict, b: dict, key: str, seeds: list[int]) -> list[float] | None:
    """a[key] - b[key] on each of `seeds`; None where either has no value on one of them."""
    va, vb = dict(zip(a["seeds"], a[key])), dict(zip(b["seeds"], b[key]))
    if any(va[s] is None or vb[s] is None for s in seeds):
        return None
    return [va[s] - vb[s] for s in seeds]


def paired(a: dict | None, b: dict | None) -> dict | None:
    """a - b in test exact match on the seeds both have, the sd only with three, and where a stands ("ahead" /
    "behind" / "within the spread"); under "loss" the same for validation loss ("lower" is better), None where
    either has none (the base model is not validated)."""
    if not a or not b:
        return None
    seeds = [s for s in a["seeds"] if s in b["seeds"]]
    if not seeds:
        return None
    loss = seed_diffs(a, b, "validation_loss", seeds)
    return {"seeds": seeds, **judged(seed_diffs(a, b, "test", seeds), ("ahead", "behind")),
            "loss": None if loss is None else {"seeds": seeds, **judged(loss, ("higher (worse)", "lower (better)"))}}


def task_summary(runs: Path, task: str) -> dict:
    out = {"dataset": TASKS[task], "methods": {}, "paired": {}, "arms": {}, "missing": []}
    miss = out["missing"]
    base = seeds_of(runs, method_run(task, "base", None))
    out["methods"]["base"] = {"seeds": base}
    if not base:
        miss.append("base model: no evaluation yet")
    for m in SWEPT:
        c = Cell(task, m)
        st = sweep_state(runs, c)
        row = {"sweep": [{"lr": lr, "validation_loss": -v, "test": t} for lr, v, t in st["points"]],
               "finished": st["finished"], "chosen": st["chosen"], "where": st["where"]}
        if m == "gpart":  # the ladder is of base values; theta's lr = base x the rule's factor at d
            row["theta_lr_factor"] = theta_lr(1.0)
            row["default_base"] = DEFAULT_BASE
            row["default"] = seeds_of(runs, gpart_run(task, DEFAULT_BASE))
        row["seeds"] = seeds_of(runs, c.make(st["chosen"])) if st["finished"] else None
        out["methods"][m] = row
        if not st["finished"]:
            todo = len(st["todo"]) + (st["next"] is not None)
            miss.append(f"{LABEL[m]}: lr sweep not finished ({len(st['points'])} points done, {todo} to run next)")
        elif len(row["seeds"]["seeds"]) < len(SEEDS):
            miss.append(f"{LABEL[m]}: seeds {missing_seeds(row['seeds'])} at the chosen lr")
        if st["where"] not in (None, "bracketed"):
            miss.append(f"{LABEL[m]}: the chosen lr is the {st['where']} after {len(st['points'])} points "
                        "(the sweep stopped at its cap or its ladder's end): the best may lie beyond")
    if base and len(base["seeds"]) < len(SEEDS):
        miss.append(f"base model: seeds {missing_seeds(base)}")
    g = out["methods"]["gpart"]
    if g["default"] and len(g["default"]["seeds"]) < len(SEEDS) and g["chosen"] not in (None, DEFAULT_BASE):
        miss.append(f"GPart at the default base: seeds {missing_seeds(g['default'])}")
    refs = {"gpart-default": g["default"], "gpart-tuned": g["seeds"]}
    others = {m: out["methods"][m]["seeds"] for m in METHODS if m != "gpart"}
    for name, ref in refs.items():
        versus = dict(others)
        if name == "gpart-default" and g["chosen"] not in (None, DEFAULT_BASE):
            versus["gpart-tuned"] = g["seeds"]
        out["paired"][name] = {m: paired(ref, other) for m, other in versus.items()}
    for arm in ARMS:
        if g["chosen"] is None:
            miss.append(f"arm {arm}: waits for GPart's sweep")
            continue
        r = seeds_of(runs, gpart_run(task, g["chosen"], 0, arm))
        out["arms"][arm] = {"flags": list(ARMS[arm]), "base": g["chosen"], "seeds": r,
                            "minus_global": paired(r, g["seeds"])}
        if not r or len(r["seeds"]) < len(SEEDS):
            miss.append(f"arm {arm}: seeds {missing_seeds(r)}")
    return out


def missing_seeds(r: dict | None) -> str:
    return ", ".join(str(s) for s in SEEDS if not r or s not in r["seeds"])


def collect(runs: Path) -> dict:
    return {"command": COMMAND, "settings": {
        "model": "SmolLM2-135M-Instruct", "budget": list(BUDGET), "d": D, "seeds": list(SEEDS),
        "gpart_default_base": DEFAULT_BASE, "first_points": {m: first_points(m) for m in SWEPT},
        "ranks": RANK, "max_points": lr_rule.MAX_POINTS, "arms": {a: list(f) for a, f in ARMS.items()}},
        "tasks": {t: task_summary(runs, t) for t in TASKS}}


def _per_seed_text(r: dict | None, values: str, sign: str = "", missing: str = ", no sd") -> str:
    """"mean ± sd: s0 x, s1 y, ..." of r[values] by seed; with fewer than 3 seeds, no sd (and says so)."""
    if not r:
        return "–"
    per = ", ".join(f"s{s} {v:{sign}.3f}" for s, v in zip(r["seeds"], r[values]))
    if r["sd"] is None:
        return f"{r['mean']:{sign}.3f} ({len(r[values])} of 3 seeds{missing}): {per}"
    return f"{r['mean']:{sign}.3f} ± {r['sd']:.3f}: {per}"


def seeds_text(r: dict | None) -> str:
    return _per_seed_text(r, "test")


def loss_text(r: dict | None) -> str:
    if not r or any(v is None for v in r["validation_loss"]):
        return "–"
    vs = r["validation_loss"]
    return ", ".join(f"{v:.3f}" for v in vs) + (f" (mean {statistics.mean(vs):.3f})" if len(vs) > 1 else "")


def pair_text(p: dict | None) -> str:
    return _per_seed_text(p, "diffs", "+", ": no sd, no verdict")


def pair_cells(p: dict | None) -> str:
    """Four table cells: the paired difference in test exact match and its verdict, then in validation loss."""
    cells = []
    for x in (p, (p or {}).get("loss")):
        cells += [pair_text(x), (x or {}).get("verdict") or "– (no verdict)"]
    return " | ".join(cells)


def _lr_text(m: str, lr: float | None) -> str:
    if lr is None:
        return "–"
    return f"base {lr:g} (theta {theta_lr(lr):.2g})" if m == "gpart" else f"{lr:g}"


def render(result: dict) -> str:
    s = result["settings"]
    L = ["## An LLM study that separates methods", "",
         f"Produced by `{result['command']}` (raw numbers: [llm_methods.json](llm_methods.json)). "
         f"{s['model']}, `gpart train --task causal-lm --dataset DATASET " + " ".join(s["budget"]) + "` for every "
         f"method: 300 optimizer steps of 8, one validation pass (200 items) at the end, greedy exact match on the "
         f"200 test items. GPart and Uni-LoRA at d = {s['d']:,}; LoRA r = {s['ranks']['lora']}, Uni-LoRA r = "
         f"{s['ranks']['unilora']}; the base model is evaluated untouched (`gpart eval`).", "",
         "Learning rates: each method's swept on seed 0 and chosen on **validation loss** (never on test), GPart's as "
         f"the rule's base value (`--base-lr`, factor 2; the causal-lm default {s['gpart_default_base']:g} is the "
         "middle point, so GPart at the rule's lr is one of the runs), the others' `--lr` (factor 3), each "
         f"extended while its best is at an end, up to {s['max_points']} points. Then seeds 1 and 2 at the chosen "
         "lr (GPart also at the default base). A cell with fewer than 3 seeds has no sd and no verdict. Seeds "
         "change the initialisation, GPart's partition, the data order and the problems themselves (each seed "
         "draws its own train, validation and test items), so the spread over seeds holds both training noise "
         "and the sampling noise of 200 test items."]
    for task, t in result["tasks"].items():
        L += ["", f"### {task} ({t['dataset']})", "", "| method | sweep (seed 0): lr → validation loss (test exact "
              "match) | chosen lr | test exact match, mean ± sd: per seed | validation loss per seed |",
              "|---|---|---|---|---|"]
        for m, row in t["methods"].items():
            if m == "base":
                L.append(f"| {LABEL[m]} | – | – | {seeds_text(row['seeds'])} | – |")
                continue
            pts = "; ".join(("**" if p["lr"] == row["chosen"] else "") + f"{p['lr']:g} → {p['validation_loss']:.3f} "
                            f"({p['test']:.3f})" + ("**" if p["lr"] == row["chosen"] else "") for p in row["sweep"])
            where = "" if row["where"] in (None, "bracketed") else f" ({row['where']})"
            chosen_text = _lr_text(m, row["chosen"]) + where if row["finished"] else "sweep not finished"
            L.append(f"| {LABEL[m]} | {pts or '–'} | {chosen_text} | {seeds_text(row['seeds'])} | "
                     f"{loss_text(row['seeds'])} |")
            if m == "gpart" and row["chosen"] != row["default_base"]:
                L.append(f"| GPart at the rule's default | (the sweep's middle point) | "
                         f"{_lr_text(m, row['default_base'])} | {seeds_text(row['default'])} | "
                         f"{loss_text(row['default'])} |")
        L += ["", "Paired differences (GPart minus the other, by seed), in test exact match and in validation loss "
              "(lower is better; the base model has none); a verdict where the mean is beyond one sd of the paired "
              "differences:", "",
              "| GPart | minus | test exact match: mean ± sd: per seed | where GPart stands | validation loss: mean ± "
              "sd: per seed | on validation loss |", "|---|---|---|---|---|---|"]
        same = t["methods"]["gpart"]["chosen"] == t["methods"]["gpart"]["default_base"]
        for ref, versus in t["paired"].items():
            if ref == "gpart-tuned" and same:
                continue  # the same runs as at the rule's lr
            name = "at the rule's lr" if ref == "gpart-default" else "tuned"
            for m, p in versus.items():
                other = "GPart tuned" if m == "gpart-tuned" else LABEL[m]
                L.append(f"| {name} | {other} | {pair_cells(p)} |")
        if same:
            L += ["", "The sweep chose the rule's default base: GPart tuned is GPart at the rule's lr."]
        if t["arms"]:
            L += ["", "The authors' partition variants at GPart's chosen base, minus the global partition (same base, "
                  "by seed):", "", "| arm | flags | test exact match | validation loss per seed | minus global: test exact "
                  "match | where the arm stands | minus global: validation loss | on validation loss |",
                  "|---|---|---|---|---|---|---|---|"]
            for arm, a in t["arms"].items():
                L.append(f"| {arm} | `{' '.join(a['flags'])}` | {seeds_text(a['seeds'])} | {loss_text(a['seeds'])} | "
                         f"{pair_cells(a['minus_global'])} |")
        L += ["", "Missing: " + ("; ".join(t["missing"]) + "." if t["missing"] else "nothing.")]
    if ANALYSIS.exists():
        L += ["", ANALYSIS.read_text().rstrip()]
    return "\n".join(L) + "\n"


def cmd_report(args) -> int:
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = collect(Path(args.runs_dir))
    quality.write_atomic(out / "llm_methods.json", json.dumps(result, indent=1) + "\n")
    quality.write_atomic(out / "llm_methods.md", render(result))
    print(f"wrote {out / 'llm_methods.md'}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("sweep", "seeds", "arms"), required=True)
    r.add_argument("--tasks", default=",".join(TASKS))
    r.add_argument("--methods", default=",".join(METHODS), help="sweep, seeds: which methods")
    r.add_argument("--arms", default=",".join(ARMS), help="arms: which arms")
    r.add_argument("--jobs", type=int, default=1, help="runs at once")
    r.add_argument("--threads", type=int, default=2, help="torch threads per run")
    st = sub.add_parser("status")
    rep = sub.add_parser("report")
    for sp in (r, st, rep):
        sp.add_argument("--smoke", action="store_true",
                        help="a 2-step budget (8 eval items, 4 new tokens) in runs/llm_methods-smoke: a check, not a result")
        sp.add_argument("--runs-dir", default=None, help=f"default: {RUNS.relative_to(quality.ROOT)} "
                        f"({SMOKE_RUNS.relative_to(quality.ROOT)} with --smoke)")
    rep.add_argument("--out-dir", default=None, help="default: this folder (the smoke runs' folder with --smoke)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    register(args.smoke)
    args.runs_dir = args.runs_dir or str(SMOKE_RUNS if args.smoke else RUNS)
    if args.cmd == "report":
        args.out_dir = args.out_dir or str(SMOKE_RUNS if args.smoke else OUT)
    return {"run": cmd_run, "status": cmd_status, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
