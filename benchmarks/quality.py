#!/usr/bin/env python
"""The quality study: GPart vs LoRA r=8, VeRA, Uni-LoRA, full fine-tuning and head-only (or the untouched
base model) in three domains: text, vision and an LLM on chat data.

    python benchmarks/quality.py run [--jobs 2] [--phase sweep|grid|dsweep|diag|all] [--domains text,vision,llm]
    python benchmarks/quality.py report          # docs/results.md + docs/quality/{results.json,*.png}
    python benchmarks/quality.py partition-check # GPart's grid runs again under the current partition version

Every run is one `gpart train` process with the same data, step budget and batch for every method of a
domain. Runs whose metrics.json exists are skipped, so `run` resumes where it stopped. Phases, in order:

1. sweep  - learning rates on seed 0, chosen by the validation split (never the test split): accuracy in
            text and vision, the validation loss of the LLM domain (the CLI generates on test only).
2. grid   - every method x seeds 0, 1, 2 at the chosen learning rates (unswept: the CLI's defaults).
3. dsweep - GPart's d on the text domain, seeds 0, 1, 2.
4. diag   - GPart variants (d, target modules, learning rate) on seed 0 where a domain lists them (llm).

The "math" domain (GSM-Symbolic) is the first LLM attempt, a null result; it is no longer run by default,
and `report` keeps its committed numbers (a domain with no runs keeps its entry of results.json).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "studies"))  # the scripts' shared helpers
from gpart.recipes.methods import DEFAULT_LR, TARGET_SETS  # noqa: E402
from gpart.recipes.training import CHECKPOINTS, last_complete_checkpoint  # noqa: E402
from study_scripts import write_atomic  # noqa: E402 - the studies call it as quality.write_atomic
SEEDS = (0, 1, 2)

# the other studies' summaries in docs/results.md, written by hand (numbers quoted from their reports)
STUDIES_SUMMARY = ROOT / "docs" / "studies-summary.md"
ALL_LINEAR = ",".join(TARGET_SETS["decoder"]["all"])  # every linear layer of a Llama block

# One fixed budget per domain, sized so a run takes a few minutes on one CPU core.
DOMAINS = {
    "text": dict(
        title="Text: all-MiniLM-L6-v2 on SpamAssassin (ham / spam)",
        args=["--task", "text-classification", "--dataset", "spam", "--max-steps", "60", "--batch-size", "16",
              "--max-length", "64", "--eval-steps", "60", "--max-eval-samples", "500"],
        metric="accuracy", d=23040,
        methods=("gpart", "lora", "vera", "unilora", "full", "head-only"),
        lr_sweep={"gpart": (2e-3, 5e-3, 1e-2, 2e-2, 4e-2, 8e-2), "lora": (2e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3),
                  "unilora": (5e-3, 2e-2, 4e-2), "vera": (1e-2, 4e-2), "full": (2e-5, 1e-4)},
        d_sweep=(2880, 5760, 23040, 92160, 368640),
    ),
    "vision": dict(
        title="Vision: DINOv2-small on CIFAR-10 (56 px)",
        args=["--task", "image-classification", "--dataset", "cifar10", "--image-size", "56", "--max-steps", "60",
              "--batch-size", "32", "--eval-steps", "60", "--max-eval-samples", "500"],
        metric="accuracy", d=18000,
        methods=("gpart", "lora", "vera", "unilora", "full", "head-only"),
        lr_sweep={"gpart": (2e-3, 4e-3, 8e-3, 1.6e-2, 3.2e-2), "lora": (1e-3, 2e-3, 4e-3, 8e-3),
                  "unilora": (5e-3, 1.6e-2, 3.2e-2), "vera": (1e-2, 4e-2), "full": (2e-5, 1e-4)},
        d_sweep=(),
    ),
    "llm": dict(
        title="LLM: SmolLM2-135M-Instruct on word-reversal (chat, greedy exact match)",
        args=["--task", "causal-lm", "--dataset", "word-reversal", "--max-steps", "16", "--batch-size", "8",
              "--max-length", "128", "--eval-steps", "16", "--max-eval-samples", "64", "--max-new-tokens", "24"],
        metric="exact_match", d=131072,
        methods=("base", "gpart", "lora", "unilora", "full"),
        lr_sweep={"gpart": (1e-2, 3e-2, 9e-2), "lora": (2e-3, 6e-3, 1.8e-2), "unilora": (1e-2, 3e-2, 9e-2), "full": (3e-5, 1e-4, 3e-4)},
        d_sweep=(),
        # phase diag: GPart variants on seed 0 around its chosen setting, (d, lr factor, targets)
        diagnostics=((262144, 1.0, None), (32768, 1.0, None), (131072, 1.0, ALL_LINEAR), (131072, 2.0, ALL_LINEAR)),
    ),
    # the first LLM study: kept as the null result it is (its runs are not re-run; `report` carries its
    # numbers over from docs/quality/results.json)
    "math": dict(
        title="Math (null result, superseded by the LLM study above): SmolLM2-135M-Instruct on GSM-Symbolic "
              "(greedy exact match)",
        args=["--task", "causal-lm", "--dataset", "gsm-symbolic", "--max-steps", "16", "--batch-size", "4",
              "--max-length", "192", "--eval-steps", "16", "--max-train-samples", "64", "--max-eval-samples", "24",
              "--max-new-tokens", "128"],
        metric="exact_match", d=131072,
        # causal-lm has no fresh head, so there is no head-only baseline; "base" is the untouched model
        methods=("base", "gpart", "lora", "vera", "unilora", "full"),
        lr_sweep={"gpart": (1e-3, 5e-3), "lora": (1e-3, 5e-3)},
        d_sweep=(),
    ),
}
# Methods not swept in a domain keep the CLI's default learning rate; None = no --lr flag (head-only trains
# only the head, the base model does not train).
FIXED_LR = {**DEFAULT_LR, "head-only": None, "base": None}


@dataclass(frozen=True)
class Run:
    domain: str
    method: str
    seed: int
    lr: float | None
    d: int | None = None
    variant: str = ""  # a label for `extra` in the run's folder name (e.g. "q" for --targets query)
    extra: tuple[str, ...] = ()  # more `gpart train` flags (other studies: targets, projection, ...)
    targets: str | None = None  # None: the CLI's default target family (q,k,v,o for causal-lm)

    @property
    def uses_d(self) -> bool:
        return self.d is not None and self.method in ("gpart", "unilora")

    @property
    def tag(self) -> str:
        parts = [self.method] + ([self.variant] if self.variant else [])
        if self.uses_d:
            parts.append(f"d{self.d}")
        if self.lr is not None:
            parts.append(f"lr{self.lr:g}")
        if self.targets is not None:
            parts.append(self.targets.replace(",", "+"))
        return "-".join(parts) + f"-s{self.seed}"

    def argv(self, out: Path) -> list[str]:
        if self.method == "base":  # the untouched model on the same test subset (no training)
            return ["eval", *eval_args(DOMAINS[self.domain]["args"]), "--seed", str(self.seed),
                    "--output", str(out / "eval.json")]
        a = ["train", *DOMAINS[self.domain]["args"], "--method", self.method, "--seed", str(self.seed),
             "--output-dir", str(out), "--quiet"]
        if self.uses_d:
            a += ["--d", str(self.d)]
        if self.lr is not None:
            a += ["--lr", f"{self.lr:g}"]
        if self.targets is not None:
            a += ["--targets", self.targets]
        return a + list(self.extra)


def eval_args(train_args: list[str]) -> list[str]:
    """The data / generation flags of a training command, which `gpart eval` shares."""
    keep = ("--task", "--dataset", "--max-length", "--max-eval-samples", "--max-new-tokens", "--image-size")
    return [x for i in range(0, len(train_args), 2) if train_args[i] in keep for x in train_args[i:i + 2]]


def write_base_metrics(out: Path) -> None:
    """Give a base-model evaluation the shape of a training run's metrics.json."""
    test = json.loads((out / "eval.json").read_text())
    metrics = {"test": test, "validation": {}, "params": {"trainable": 0}, "adapter_bytes": 0, "saved": "nothing",
               "train": {"runtime_s": 0.0}}
    write_atomic(out / "metrics.json", json.dumps(metrics, indent=1))


def run_dir(runs: Path, run: Run) -> Path:
    return runs / run.domain / run.tag


def load_metrics(runs: Path, run: Run) -> dict | None:
    p = run_dir(runs, run) / "metrics.json"
    return json.loads(p.read_text()) if p.exists() else None


def step_seconds(metrics: dict) -> float | None:
    """A finished run's training seconds per optimizer step. runtime_s timed only the launch that finished the
    run: after a resume, the steps since resumed_from_step (none when it resumed at its last step)."""
    t = metrics.get("train", {})
    n = t.get("steps", 0) - t.get("resumed_from_step", 0)
    return t["runtime_s"] / n if n > 0 and t.get("runtime_s") else None


def train_seconds(metrics: dict) -> float | None:
    """A finished run's training time: as timed, or after a resume its timed steps' rate times all its steps."""
    t = metrics["train"]
    if not t.get("resumed_from_step"):
        return t["runtime_s"]
    per_step = step_seconds(metrics)
    return None if per_step is None else per_step * t["steps"]


def median_step_seconds(metrics: list[dict]) -> float | None:
    xs = [x for m in metrics if (x := step_seconds(m)) is not None]
    return statistics.median(xs) if xs else None


def selection_score(domain: str, metrics: dict) -> float:
    """Higher is better, on the validation split: the metric, or minus the loss for math."""
    val = metrics["validation"]
    return -val["loss"] if DOMAINS[domain]["metric"] == "exact_match" else val[DOMAINS[domain]["metric"]]


def sweep_runs(domain: str) -> list[Run]:
    spec = DOMAINS[domain]
    return [Run(domain, m, 0, lr, spec["d"]) for m, lrs in spec["lr_sweep"].items() for lr in lrs]


def chosen_lr(runs: Path, domain: str, method: str) -> float | None:
    """The swept learning rate with the best validation score (seed 0); FIXED_LR otherwise."""
    lrs = DOMAINS[domain]["lr_sweep"].get(method)
    if not lrs:
        return FIXED_LR[method]
    scored = [(selection_score(domain, m), lr) for lr in lrs
              if (m := load_metrics(runs, Run(domain, method, 0, lr, DOMAINS[domain]["d"])))]
    if len(scored) < len(lrs):
        raise RuntimeError(f"{domain}/{method}: the learning-rate sweep is incomplete; run --phase sweep first")
    return max(scored)[1]


def grid_runs(runs: Path, domain: str, seeds=SEEDS) -> list[Run]:
    spec = DOMAINS[domain]
    return [Run(domain, m, s, chosen_lr(runs, domain, m), spec["d"]) for s in seeds for m in spec["methods"]]


def dsweep_runs(runs: Path, domain: str, seeds=SEEDS) -> list[Run]:
    lr = chosen_lr(runs, domain, "gpart")
    return [Run(domain, "gpart", s, lr, d) for d in DOMAINS[domain]["d_sweep"] for s in seeds]


def diag_runs(runs: Path, domain: str, seeds=(0,)) -> list[Run]:
    lr = chosen_lr(runs, domain, "gpart")
    return [Run(domain, "gpart", s, lr * f, d, t) for d, f, t in DOMAINS[domain].get("diagnostics", ()) for s in seeds]


def restart_flag(out: Path) -> list[str]:
    """How `gpart train` takes up a run folder: a new run needs nothing; an unfinished one continues from its
    last complete checkpoint (--resume: the CLI refuses it if the run's settings changed) or, with none,
    starts afresh (--overwrite)."""
    if not (out / "run.json").exists():
        return []
    return ["--resume"] if last_complete_checkpoint(out / CHECKPOINTS) else ["--overwrite"]


def execute(runs: Path, todo: list[Run], jobs: int, threads: int) -> None:
    todo = [r for r in dict.fromkeys(todo) if load_metrics(runs, r) is None]
    print(f"{len(todo)} runs to do", flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), TOKENIZERS_PARALLELISM="false")
    gpart_cli = [sys.executable, "-m", "gpart.cli"]

    def one(run: Run) -> None:
        out = run_dir(runs, run)
        out.parent.mkdir(parents=True, exist_ok=True)
        flag = restart_flag(out)
        log = out.parent / f"{run.tag}.log"
        t = time.time()
        with open(log, "w") as fh:
            rc = subprocess.call([*gpart_cli, *run.argv(out), *flag], stdout=fh, stderr=subprocess.STDOUT, env=env)
        if rc == 0 and run.method == "base":
            write_base_metrics(out)
        print(f"{'ok ' if rc == 0 else f'FAILED rc={rc}'} {run.domain}/{run.tag} {time.time() - t:.0f}s", flush=True)

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(one, todo))


def cmd_run(args) -> int:
    runs = Path(args.runs_dir)
    domains = args.domains.split(",")
    seeds = [int(s) for s in args.seeds.split(",")]
    phases = ["sweep", "grid", "dsweep", "diag"] if args.phase == "all" else [args.phase]
    for phase in phases:
        todo = []
        for dom in domains:
            if phase == "sweep":
                todo += sweep_runs(dom)
            elif phase == "grid":
                todo += grid_runs(runs, dom, seeds)
            elif phase == "diag":
                todo += diag_runs(runs, dom)
            else:
                todo += dsweep_runs(runs, dom, seeds)
        # seed-major order, so an interrupted study still has every method at the first seeds
        todo.sort(key=lambda r: r.seed)
        print(f"== phase {phase}", flush=True)
        execute(runs, todo, args.jobs, args.threads)
    return 0


def cmd_partition_check(args) -> int:
    """GPart's grid runs of the study (same learning rate, d and seeds) again, into another runs folder,
    under the partition version new adapters use now; test metrics beside the study's, in a JSON file."""
    import gpart

    study, runs = Path(args.runs_dir), Path(args.out_runs_dir)
    seeds = [int(s) for s in args.seeds.split(",")]
    todo = [Run(dom, "gpart", s, chosen_lr(study, dom, "gpart"), DOMAINS[dom]["d"])
            for dom in args.domains.split(",") for s in seeds]
    execute(runs, todo, args.jobs, args.threads)
    result = {"partition_version": gpart.VERSION, "command": "python benchmarks/quality.py " + " ".join(args.argv),
              "domains": {}}
    for run in todo:
        dom = result["domains"].setdefault(run.domain, {"lr": run.lr, "d": run.d, "seeds": [], "study": [], "now": []})
        dom["seeds"].append(run.seed)
        dom["study"].append(test_metric(run.domain, load_metrics(study, run)))
        dom["now"].append(test_metric(run.domain, load_metrics(runs, run)))
    for dom in result["domains"].values():
        dom["study_mean_sd"], dom["now_mean_sd"] = mean_sd(dom["study"]), mean_sd(dom["now"])
    write_atomic(Path(args.out), json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


# ----------------------------------------------------------------------------------------------- report

def mean_sd(xs):
    if not xs:
        return None, None
    return statistics.mean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def test_metric(domain: str, m: dict) -> float:
    return m["test"][DOMAINS[domain]["metric"]]


def collect(runs: Path, previous: dict | None = None) -> dict:
    """Everything the report shows, from the runs' metrics.json files. A domain with no runs in `runs`
    keeps its entry of `previous` (the committed results.json), so an earlier study's numbers stay."""
    out = {"domains": {}}
    for dom, spec in DOMAINS.items():
        if not (runs / dom).is_dir() and previous and dom in previous.get("domains", {}):
            out["domains"][dom] = {**previous["domains"][dom], "title": spec["title"]}
            continue
        d = out["domains"][dom] = {"title": spec["title"], "metric": spec["metric"], "args": spec["args"],
                                   "methods": {}, "lr_sweep": {}, "d_sweep": {}, "diagnostics": []}
        for method, lrs in spec["lr_sweep"].items():
            d["lr_sweep"][method] = [
                {"lr": lr, "validation": selection_score(dom, m), "test": test_metric(dom, m)}
                for lr in lrs if (m := load_metrics(runs, Run(dom, method, 0, lr, spec["d"])))]
        for method in spec["methods"]:
            try:
                lr = chosen_lr(runs, dom, method)
            except RuntimeError:
                continue
            ms = [(s, m) for s in SEEDS if (m := load_metrics(runs, Run(dom, method, s, lr, spec["d"])))]
            if not ms:
                continue
            vals = [test_metric(dom, m) for _, m in ms]
            mean, sd = mean_sd(vals)
            last = ms[-1][1]
            d["methods"][method] = {
                "lr": lr, "seeds": [s for s, _ in ms], "test": vals, "mean": mean, "sd": sd,
                "macro_f1": mean_sd([m["test"].get("macro_f1") for _, m in ms if "macro_f1" in m["test"]])[0],
                "trainable": last["params"]["trainable"], "adapter": last["params"].get("adapter"),
                "saved_bytes": last["adapter_bytes"], "saved": last["saved"], "D": last.get("D"),
                "train_s": statistics.median(t for _, m in ms if (t := train_seconds(m)) is not None),
                "n_test": last["test"].get("n"),
                "val_loss": mean_sd([m["validation"]["loss"] for _, m in ms if "loss" in m["validation"]])[0],
            }
        d["diagnostics"] = collect_diagnostics(runs, dom)
        for dd in spec["d_sweep"]:
            try:
                lr = chosen_lr(runs, dom, "gpart")
            except RuntimeError:
                continue
            ms = [m for s in SEEDS if (m := load_metrics(runs, Run(dom, "gpart", s, lr, dd)))]
            if ms:
                vals = [test_metric(dom, m) for m in ms]
                mean, sd = mean_sd(vals)
                d["d_sweep"][str(dd)] = {"test": vals, "mean": mean, "sd": sd, "D": ms[0].get("D"),
                                          "saved_bytes": ms[0]["adapter_bytes"]}
    return out


def collect_diagnostics(runs: Path, dom: str) -> list[dict]:
    """GPart's diagnostic runs (seed 0) beside GPart's and LoRA's seed-0 runs at their chosen settings."""
    spec = DOMAINS[dom]
    if not spec.get("diagnostics"):
        return []
    try:
        reference = [Run(dom, "gpart", 0, chosen_lr(runs, dom, "gpart"), spec["d"]),
                     Run(dom, "lora", 0, chosen_lr(runs, dom, "lora"), spec["d"])]
    except RuntimeError:
        return []
    rows = []
    for run in reference + diag_runs(runs, dom):
        m = load_metrics(runs, run)
        if m is None:
            continue
        rows.append({"method": run.method, "d": run.d if run.uses_d else None, "lr": run.lr,
                     "targets": run.targets or ",".join(TARGET_SETS["decoder"]["attn"]), "D": m.get("D"),
                     "trainable": m["params"]["trainable"], "val_loss": m["validation"].get("loss"),
                     "test": test_metric(dom, m), "train_s": train_seconds(m)})
    return rows


LABEL = {"gpart": "GPart", "lora": "LoRA r=8", "vera": "VeRA r=256", "unilora": "Uni-LoRA r=4", "full": "full FT",
         "head-only": "head-only", "base": "base model (no training)"}


def _fmt_bytes(n):
    return f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB"


def plot(result: dict, out_dir: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    doms = [d for d in result["domains"].values() if d["methods"]]
    if doms:
        fig, axes = plt.subplots(1, len(doms), figsize=(5 * len(doms), 3.8), squeeze=False)
        for ax, d in zip(axes[0], doms):
            methods = list(d["methods"])
            for i, m in enumerate(methods):
                r = d["methods"][m]
                ax.bar(i, r["mean"], color="C3" if m == "gpart" else "C0", alpha=0.6)
                ax.errorbar(i, r["mean"], yerr=r["sd"], color="k", capsize=3)
                ax.scatter([i] * len(r["test"]), r["test"], color="k", s=8, zorder=3)
            ax.set_xticks(range(len(methods)), [LABEL[m] for m in methods], rotation=30, ha="right")
            ax.set_ylabel(f"test {d['metric']}")
            ax.set_title(d["title"].split(":")[0])
            lo = min(min(r["test"]) for r in d["methods"].values())
            ax.set_ylim(max(0.0, lo - 0.1), None)
        fig.tight_layout()
        fig.savefig(out_dir / "methods.png", dpi=110)
        plt.close(fig)
        names.append("methods.png")
    ds = result["domains"]["text"]["d_sweep"]
    if ds:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        xs = sorted(ds, key=int)
        ax.errorbar([int(x) for x in xs], [ds[x]["mean"] for x in xs], yerr=[ds[x]["sd"] for x in xs],
                    marker="o", color="C3", capsize=3, label="GPart")
        lora = result["domains"]["text"]["methods"].get("lora")
        if lora:
            ax.axhline(lora["mean"], color="C0", ls="--", label=f"LoRA r=8 ({lora['trainable']:,} trainable)")
        ax.set_xscale("log")
        ax.set_xlabel("d (trainable floats in theta)")
        ax.set_ylabel("test accuracy")
        ax.set_title("Text: GPart's d sweep (lr fixed at the d = 23,040 optimum)", fontsize=9)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / "d_sweep.png", dpi=110)
        plt.close(fig)
        names.append("d_sweep.png")
    return names


def render(result: dict) -> str:
    cmd = "python benchmarks/quality.py run --jobs 2 --threads 1 && python benchmarks/quality.py report"
    lines = ["# Quality: GPart against LoRA, VeRA, Uni-LoRA, full fine-tuning and head-only", "",
             f"Produced by `{cmd}` (the raw numbers: [quality/results.json](quality/results.json)); "
             "analysis at the end.", ""]
    for dom, d in result["domains"].items():
        if not d["methods"]:
            continue
        lines += [f"## {d['title']}", "", "Budget, identical for every method: `gpart train " + " ".join(d["args"]) + "`", "",
                  f"| method | lr | trainable params | saved | test {d['metric']} mean ± sd (seeds) | per seed | "
                  "validation loss (mean) | train s (median) |",
                  "|---|---|---|---|---|---|---|---|"]
        for m, r in d["methods"].items():
            lr = "–" if m == "base" else "default" if r["lr"] is None else f"{r['lr']:g}"
            saved = {"adapter": _fmt_bytes(r["saved_bytes"]), "nothing": "–"}.get(
                r["saved"], f"{_fmt_bytes(r['saved_bytes'])} whole model ({_fmt_bytes(4 * r['trainable'])} trained)")
            per = ", ".join(f"{v:.3f}" for v in r["test"])
            val = "–" if r["val_loss"] is None else f"{r['val_loss']:.3f}"
            lines.append(f"| {LABEL[m]} | {lr} | {r['trainable']:,} | {saved} | {r['mean']:.3f} ± {r['sd']:.3f} "
                         f"({len(r['test'])}) | {per} | {val} | {r['train_s']:.0f} |")
        n = next(iter(d["methods"].values())).get("n_test")
        lines += ["", f"Test examples per run: {n} (a seeded subset: each seed sees other examples, the same for "
                  "every method). Trainable counts include the task head where there is one; full and head-only "
                  "runs save a standalone model, in brackets the bytes of the tensors they trained (fp32). Train "
                  "times depend on what else ran on the shared 2 cores: they are not a speed comparison "
                  "(benchmarks/step_time.py is)."]
        for method, pts in d["lr_sweep"].items():
            if pts:
                by_loss = d["metric"] == "exact_match"  # selection_score is minus the loss there
                sel = "the lowest validation loss" if by_loss else f"validation {d['metric']}"
                lines += ["", f"Learning-rate sweep for {LABEL[method]} (seed 0; chosen by {sel}): " + "; ".join(
                    f"{p['lr']:g} → {-p['validation'] if by_loss else p['validation']:.3f}" for p in pts) + "."]
        if d.get("diagnostics"):
            lines += ["", "GPart diagnostics (seed 0; the first two rows are GPart's and LoRA's seed-0 runs above):", "",
                      "| method | targets | d | D | lr | trainable | validation loss | test " + d["metric"] + " |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in d["diagnostics"]:
                targets = "all linear" if r["targets"] == ALL_LINEAR else r["targets"].replace("_proj", "")
                dd = "–" if r["d"] is None else f"{r['d']:,}"
                big_d = "–" if not r["D"] else f"{r['D']:,}"
                lines.append(f"| {LABEL[r['method']]} | {targets} | {dd} | {big_d} | {r['lr']:g} | {r['trainable']:,} | "
                             f"{r['val_loss']:.3f} | {r['test']:.3f} |")
        if d["d_sweep"]:
            lines += ["", "GPart d sweep (same lr, seeds 0–2):", "", "| d | D | saved | test accuracy mean ± sd |",
                      "|---|---|---|---|"]
            for dd, r in sorted(d["d_sweep"].items(), key=lambda kv: int(kv[0])):
                lines.append(f"| {int(dd):,} | {r['D']:,} | {_fmt_bytes(r['saved_bytes'])} | {r['mean']:.3f} ± {r['sd']:.3f} |")
        lines.append("")
    return "\n".join(lines)


def cmd_report(args) -> int:
    runs = Path(args.runs_dir)
    out = ROOT / "docs" / "quality"
    previous = json.loads((out / "results.json").read_text()) if (out / "results.json").exists() else None
    result = collect(runs, previous)
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "results.json", json.dumps(result, indent=1))
    pngs = plot(result, out)
    body = render(result) + "\n" + "\n".join(f"![{p}](quality/{p})" for p in pngs) + "\n"
    analysis = ROOT / "docs" / "quality" / "analysis.md"
    if analysis.exists():
        body += "\n" + analysis.read_text()
    body += "\n" + STUDIES_SUMMARY.read_text().split("-->\n", 1)[1]
    arms = ROOT / "studies" / "partition_arms" / "arms.md"
    if arms.exists():  # the authors' partition variants (studies/partition_arms/arms.py)
        body += "\n" + arms.read_text()
    target = ROOT / "docs" / "results.md"
    write_atomic(target, body)
    print(f"wrote {target}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--phase", choices=("sweep", "grid", "dsweep", "diag", "all"), default="all")
    r.add_argument("--domains", default="text,vision,llm")
    r.add_argument("--seeds", default="0,1,2", help="seeds of the grid and d-sweep phases")
    r.add_argument("--jobs", type=int, default=2, help="runs at once")
    r.add_argument("--threads", type=int, default=1, help="torch threads per run")
    r.add_argument("--runs-dir", default=str(ROOT / "runs" / "quality"))
    rep = sub.add_parser("report")
    rep.add_argument("--runs-dir", default=str(ROOT / "runs" / "quality"))
    chk = sub.add_parser("partition-check")
    chk.add_argument("--domains", default="text,vision")
    chk.add_argument("--seeds", default="0,1,2")
    chk.add_argument("--jobs", type=int, default=2)
    chk.add_argument("--threads", type=int, default=1)
    chk.add_argument("--runs-dir", default=str(ROOT / "runs" / "quality"), help="the study's runs (version 1)")
    chk.add_argument("--out-runs-dir", default=str(ROOT / "runs" / "quality-partition-check"))
    chk.add_argument("--out", default=str(ROOT / "docs" / "quality" / "partition-check.json"))
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    args.argv = argv
    return {"run": cmd_run, "report": cmd_report, "partition-check": cmd_partition_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
