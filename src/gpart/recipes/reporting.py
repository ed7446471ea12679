"""What a finished run leaves for people: metrics.json, a training-curve PNG and a short report.md."""
from __future__ import annotations

import importlib.util
import io
import sys
import warnings
from pathlib import Path

from .io import atomic_write_bytes, atomic_write_json, atomic_write_text

METRICS_FILE, CURVE_FILE, REPORT_FILE = "metrics.json", "training_curve.png", "report.md"


_TIMING = ("runtime", "samples_per_second", "steps_per_second")


def split_history(log_history: list[dict]) -> tuple[list[dict], list[dict]]:
    """Trainer's log history -> (training-loss points, evaluation points), timings dropped."""
    train = [{"step": e["step"], "loss": e["loss"], "epoch": e.get("epoch")} for e in log_history if "loss" in e]
    evals = [
        {"step": e["step"], "epoch": e.get("epoch"),
         **{k[5:]: v for k, v in e.items() if k.startswith("eval_") and k[5:] not in _TIMING}}
        for e in log_history if any(k.startswith("eval_") for k in e)
    ]
    return train, evals


def write_metrics(out: Path, metrics: dict) -> Path:
    atomic_write_json(out / METRICS_FILE, metrics)
    return out / METRICS_FILE


NO_PLOT = ("matplotlib is not installed, so training_curve.png is not drawn (the metrics and report are "
           "written as usual); pip install 'gpart[train]' adds it")


def plotting_available() -> bool:
    """Whether the curve can be drawn: checked before training so that a missing plotting library never
    costs a finished run (it only skips the picture)."""
    if "matplotlib" in sys.modules:
        return sys.modules["matplotlib"] is not None
    return importlib.util.find_spec("matplotlib") is not None


def write_curve(out: Path, train: list[dict], evals: list[dict], metric: str, title: str) -> Path | None:
    """The curve PNG, or None (with a warning) when matplotlib is missing."""
    try:
        import matplotlib
    except ImportError:
        warnings.warn(NO_PLOT, stacklevel=2)
        return None

    matplotlib.use("Agg")  # no display on servers; must precede pyplot
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(9, 3.5))
    if train:
        ax_loss.plot([p["step"] for p in train], [p["loss"] for p in train], label="train loss")
    eval_loss = [p for p in evals if "loss" in p]
    if eval_loss:
        ax_loss.plot([p["step"] for p in eval_loss], [p["loss"] for p in eval_loss], "o-", label="eval loss")
    ax_loss.set(xlabel="step", ylabel="loss", title="loss")
    ax_loss.legend(loc="best")
    points = [p for p in evals if metric in p]
    if points:
        ax_metric.plot([p["step"] for p in points], [p[metric] for p in points], "o-", color="C2")
    else:
        ax_metric.text(0.5, 0.5, "no evaluation during training", ha="center", va="center", transform=ax_metric.transAxes)
    ax_metric.set(xlabel="step", ylabel=metric, title=f"eval {metric}")
    fig.suptitle(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    atomic_write_bytes(out / CURVE_FILE, buf.getvalue())
    return out / CURVE_FILE


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def write_report(out: Path, m: dict) -> Path:
    run, params = m["run"], m["params"]
    has_head = params["head"] > 0
    lines = [
        f"# {run['task']}: {run['method']} on {run['model']} / {run['dataset']}",
        "",
        f"- trainable parameters: {_fmt(params['trainable'])} of {_fmt(params['total'])} "
        f"(adapter {_fmt(params['adapter'])}" + (f", head {_fmt(params['head'])})" if has_head else ")"),
    ]
    if m.get("D"):
        lines.append(f"- adapted weights D = {_fmt(m['D'])}, d = {_fmt(run.get('d'))} (D/d = {m['D'] / run['d']:.1f})"
                     if run["method"] in ("gpart", "unilora") else f"- adapted weights D = {_fmt(m['D'])}")
    lines += [
        f"- saved adapter: {_fmt(m['adapter_bytes'])} bytes in `{m['saved']}`",
        f"- training: {_fmt(m['train']['steps'])} steps, {m['train']['runtime_s']:.1f} s"
        + (f" (since the resume at step {m['train']['resumed_from_step']})" if m['train'].get('resumed_from_step') else "")
        + ", "
        f"final train loss {_fmt(m['train'].get('final_loss'))}",
        f"- seed {run['seed']}, lr {run['lr']:g}{_lr_source(run)}" + (f", head lr {run['head_lr']:g}" if has_head else ""),
        *([f"- skipped (longer than --max-length): "
           + ", ".join(f"{n:,} {split}" for split, n in m["skipped"].items())] if m.get("skipped") else []),
        *_test_items(m),
        "",
        *_metrics_table(m),
        *_examples(m.get("test", {}).get("examples")),
        "",
        f"![training curve]({CURVE_FILE})" if (out / CURVE_FILE).exists() else "(no training curve: "
        "matplotlib is not installed; pip install 'gpart[train]')",
        "",
    ]
    atomic_write_text(out / REPORT_FILE, "\n".join(lines))
    return out / REPORT_FILE


def _test_items(m: dict) -> list[str]:
    items = m.get("test_items")
    if not items:
        return []
    held_out = ("the validation split (test fraction 0)" if m.get("test_is_validation")
                else f"held out of {m['run']['dataset']} by seed {items['seed']}")
    return [f"- test items: {_fmt(m['test'].get('n'))}, {held_out}; sha256 {items['sha256']} "
            "(`gpart eval` prints the same digest when it scores the same items)"]


def _metrics_table(m: dict) -> list[str]:
    """validation / test metrics with a number or a short word as value, one row per split."""
    splits = [s for s in ("validation", "test") if m.get(s)]
    keys = sorted({k for s in splits for k, v in m[s].items() if isinstance(v, (int, float, str))})
    if not keys:
        return []
    return ["| split | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|",
            *(f"| {s} | " + " | ".join(_cell(_fmt(m[s].get(k, ""))) for k in keys) + " |" for s in splits)]


def _examples(examples: list[dict] | None) -> list[str]:
    if not examples:
        return []
    keys = list(examples[0])
    return ["", "Test examples:", "", "| " + " | ".join(keys) + " |", "|---" * len(keys) + "|",
            *("| " + " | ".join(_cell(str(e.get(k, ""))) for k in keys) + " |" for e in examples)]


def _cell(text: str) -> str:
    """Text that stays inside one Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\r\n", "\n").replace("\n", "<br>") or " "


def _lr_source(run: dict) -> str:
    """How theta's lr was derived, when GPart's rule chose it (gpart.lr)."""
    rule = run.get("lr_rule") or {}
    if rule.get("source") != "rule":
        return ""
    return (f" (GPart's rule: base {rule['base_lr']:g} x (10,000/d)^0.75, d = {rule['d']:,}; "
            f"theta weight decay {rule['weight_decay']:.3g})")
