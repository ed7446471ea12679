"""Turning the step-time runs into a summary, a markdown report and a plot.

Pure functions of the results dict that step_time.py writes as JSON, so a report can be re-rendered
from a stored JSON file (`step_time.py --from-json FILE`) without measuring again.
"""
from __future__ import annotations

import statistics

LABELS = {
    "gpart": "GPart (ours)",
    "gpart-v1": "GPart, partition version 1",
    "lora-r8": "LoRA r=8",
    "lora-r64": "LoRA r=64",
    "vera": "VeRA r=256",
    "unilora": "Uni-LoRA r=4",
    "full": "full fine-tuning",
    "head-only": "head only",
    "floor": "floor (frozen, dL/dW on targets, no optimizer)",
}

# What every summary row carries (None where it does not apply); the tests check these.
SUMMARY_FIELDS = (
    "median_s", "min_s", "max_s", "n_steps", "repeat_medians_s", "cpu_median_s", "peak_rss_mib",
    "rss_before_setup_mib", "peak_cuda_mib", "trainable_params", "adapter_params", "adapter_bytes", "setup_s",
    "setup_min_s", "setup_max_s", "D", "errors", "skipped",
)


def _median(xs):
    return statistics.median(xs) if xs else None


def summarize(runs: list[dict], methods: list[str]) -> dict:
    """Per method: pooled timed steps over all repeats (median / min / max), the median of each repeat,
    the largest peak RSS over repeats, median setup time, and counts taken from the runs."""
    out = {}
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        ok = [r for r in rs if r.get("ok")]
        steps = [t for r in ok for t in r.get("step_times_s", [])]
        setups = [r["setup_s"] for r in ok if r.get("setup_s") is not None]

        def first(key):
            for r in ok:
                if r.get(key) is not None:
                    return r[key]
            return None

        def biggest(key):
            vals = [r[key] for r in ok if r.get(key) is not None]
            return max(vals) if vals else None

        growth = [r["rss_now_after_mib"] - r["rss_now_before_mib"] for r in ok
                  if r.get("rss_now_after_mib") is not None and r.get("rss_now_before_mib") is not None]
        out[m] = {
            "median_s": _median(steps),
            "min_s": min(steps) if steps else None,
            "max_s": max(steps) if steps else None,
            "n_steps": len(steps),
            "repeat_medians_s": [_median(r["step_times_s"]) for r in ok if r.get("step_times_s")],
            "cpu_median_s": _median([t for r in ok for t in r.get("step_cpu_s", [])]),
            "peak_rss_mib": biggest("peak_rss_mib"),
            "rss_before_setup_mib": biggest("rss_before_setup_mib"),
            "rss_growth_mib": max(growth) if growth else None,
            "peak_cuda_mib": biggest("peak_cuda_mib"),
            "trainable_params": first("trainable_params"),
            "adapter_params": first("adapter_params"),
            "adapter_bytes": first("adapter_bytes"),
            "setup_s": _median(setups),
            "setup_min_s": min(setups) if setups else None,
            "setup_max_s": max(setups) if setups else None,
            "D": first("D"),
            "kernel_backends": sorted({r["kernel_backend"] for r in ok if r.get("kernel_backend")}),
            "src_shas": sorted({r["src_sha"] for r in rs if r.get("src_sha")}),
            "errors": sorted({r["error"] for r in rs if r.get("error")}),
            "skipped": next((r["skipped"] for r in rs if r.get("skipped")), None),
        }
    return out


def ratio(summary: dict, runs: list[dict], num: str, den: str) -> dict | None:
    """median(num) / median(den), plus the range of the per-repeat ratios (each repeat's two medians were
    measured minutes apart, so their spread shows how much machine noise moved the ratio)."""
    a, b = summary.get(num, {}), summary.get(den, {})
    if not a.get("median_s") or not b.get("median_s"):
        return None
    per_repeat = []
    by_rep = {}
    for r in runs:
        if r.get("ok") and r.get("step_times_s") and r["method"] in (num, den):
            by_rep.setdefault(r["repeat"], {})[r["method"]] = _median(r["step_times_s"])
    for rep in sorted(by_rep):
        pair = by_rep[rep]
        if num in pair and den in pair and pair[den] > 0:
            per_repeat.append(pair[num] / pair[den])
    return {
        "ratio": a["median_s"] / b["median_s"],
        "min_ratio": a["min_s"] / b["min_s"] if a.get("min_s") and b.get("min_s") else None,
        "cpu_ratio": a["cpu_median_s"] / b["cpu_median_s"] if a.get("cpu_median_s") and b.get("cpu_median_s") else None,
        "per_repeat": per_repeat,
        "per_repeat_min": min(per_repeat) if per_repeat else None,
        "per_repeat_max": max(per_repeat) if per_repeat else None,
    }


def all_ratios(summary: dict, runs: list[dict]) -> dict:
    out = {}
    for m in summary:
        for den in ("floor", "lora-r8"):
            if m != den:
                r = ratio(summary, runs, m, den)
                if r is not None:
                    out[f"{m}/{den}"] = r
    return out


# ---------------------------------------------------------------------------------------- formatting
def fmt_s(x, digits=3) -> str:
    if x is None:
        return "–"
    if x >= 100:
        return f"{x:.0f}"
    if x >= 10:
        return f"{x:.1f}"
    return f"{x:.{digits}g}" if x < 1 else f"{x:.2f}"


def fmt_int(x) -> str:
    return "–" if x is None else f"{x:,}"


def fmt_bytes(x) -> str:
    if x is None:
        return "–"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if x >= k:
            return f"{x / k:.3g} {unit}"
    return f"{x} B"


def fmt_ratio(r) -> str:
    if r is None:
        return "–"
    s = f"{r['ratio']:.2f}x"
    if r.get("per_repeat_min") is not None and len(r["per_repeat"]) > 1:
        s += f" ({r['per_repeat_min']:.2f}–{r['per_repeat_max']:.2f})"
    return s


def fmt_mib(x) -> str:
    return "–" if x is None else f"{x:,.0f}"


def _status(s: dict) -> str | None:
    if s.get("skipped"):
        return f"skipped: {s['skipped']}"
    if s.get("errors") and s.get("median_s") is None and s.get("setup_s") is None:
        return "failed: " + "; ".join(e[:160] for e in s["errors"])
    return None


def render_markdown(result: dict) -> str:
    cfg, env = result["config"], result["environment"]
    summary, ratios = result["summary"], result["ratios"]
    setup_only = cfg.get("setup_only", False)
    lines = [f"# {result['title']}", ""]
    lines += ["Produced by:", "", "```", result["command"], "```", ""]
    if not result.get("complete", True):
        lines += ["**Incomplete run**: the numbers below cover only the repeats finished so far.", ""]
    lines += [f"- Shape: {cfg['shape_description']}"]
    lines += [f"- Targets: {cfg['targets']} = `{', '.join(cfg['target_modules'])}` "
              f"(D = {fmt_int(cfg.get('D'))} targeted weights); d = {fmt_int(cfg['d'])} (GPart, Uni-LoRA)"]
    if not setup_only:
        cast = f" under {cfg['autocast']} autocast" if cfg.get("autocast") else ""
        lines += [f"- Batch {cfg['batch']} x {cfg['seq']} tokens, {cfg['dtype']}{cast} on {cfg['device']}; per method and "
                  f"repeat: {cfg['warmup']} warm-up + {cfg['steps']} timed steps in a fresh subprocess; "
                  f"{cfg['repeats']} repeats, methods interleaved round-robin (order rotated each repeat)."]
        lines += ["- Step = forward + loss + backward + AdamW step (the floor: forward + backward only)."]
        if cfg.get("quant"):
            lines += [f"- Base quantized with bitsandbytes ({cfg['quant']}): every linear layer of the blocks, loaded "
                      "with transformers' BitsAndBytesConfig from a bf16 checkpoint of the shape (embeddings and "
                      "lm_head unquantized); the adapter methods only."]
        pol = cfg.get("omp_wait_policy")
        if pol and pol != "inherit":
            lines += [f"- Workers ran with OMP_WAIT_POLICY={pol}"
                      + (" (spinning OpenMP threads made steps several times slower and erratic whenever other "
                         "jobs ran on this shared machine; see README.md)." if pol == "PASSIVE" else ".")]
    else:
        lines += [f"- Setup only (meta device): get_peft_model time and RSS growth, {cfg['repeats']} repeats, "
                  "one fresh subprocess each."]
    lines += [f"- Machine: {env.get('cpu')} ({env.get('cpu_count')} CPUs, torch threads {env.get('torch_threads')}), "
              f"{env.get('cuda') or 'no GPU'}; torch {env.get('torch')}, transformers {env.get('transformers')}, "
              f"peft {env.get('peft')}, gpart {env.get('gpart')} (git {env.get('git')}), "
              f"GPART_KERNELS={env.get('GPART_KERNELS') or 'unset'}"]
    g = summary.get("gpart", {})
    if g.get("kernel_backends"):
        lines += [f"- GPart's element-wise path (gpart.kernels.backend_for): {', '.join(g['kernel_backends'])}."]
    shas = sorted({sha for s in summary.values() for sha in s.get("src_shas", [])})
    if len(shas) > 1:
        lines += [f"- **The gpart source changed during this run** (hashes {', '.join(shas)}): methods measured "
                  "under different code."]
    elif shas:
        lines += [f"- gpart source hash (the modules a training step runs): {shas[0]}."]
    la = result.get("load_average", {})
    if la:
        lines += [f"- Load average (1/5/15 min) at start {_la(la.get('start'))}, at end {_la(la.get('end'))}; "
                  f"wall time {fmt_s(result.get('wall_s'))} s."]
    lines += [""]
    if setup_only:
        lines += _setup_table(summary)
    else:
        lines += _step_table(summary, ratios, cfg)
    lines += [""]
    lines += _headline(summary, ratios, setup_only, cfg)
    notes = result.get("notes") or []
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    if result.get("plot"):
        lines += ["", f"![plot]({result['plot']})"]
    return "\n".join(lines) + "\n"


def _la(v) -> str:
    return "–" if not v else "/".join(f"{x:.2f}" for x in v)


def _step_table(summary, ratios, cfg) -> list[str]:
    cuda = any(s.get("peak_cuda_mib") is not None for s in summary.values())
    head = ["method", "median step (s)", "min", "max", "vs floor", "vs LoRA r8", "CPU s/step", "CPU vs floor",
            "peak RSS (MiB)"]
    if cuda:
        head.append("peak CUDA (MiB)")
    head += ["trainable params (adapter + head)", "saved file", "setup (s)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in summary.items():
        status = _status(s)
        label = LABELS.get(m, m)
        if status:
            lines.append(f"| {label} | {status} |" + " |" * (len(head) - 2))
            continue
        trainable = fmt_int(s["trainable_params"])
        if s.get("adapter_params") is not None and s["adapter_params"] != s["trainable_params"]:
            trainable += f" ({fmt_int(s['adapter_params'])} + {fmt_int(s['trainable_params'] - s['adapter_params'])})"
        row = [label, fmt_s(s["median_s"]), fmt_s(s["min_s"]), fmt_s(s["max_s"]),
               "1 (ref)" if m == "floor" else fmt_ratio(ratios.get(f"{m}/floor")),
               "1 (ref)" if m == "lora-r8" else fmt_ratio(ratios.get(f"{m}/lora-r8")),
               fmt_s(s.get("cpu_median_s")),
               "1 (ref)" if m == "floor" else _cpu_ratio(ratios.get(f"{m}/floor")),
               fmt_mib(s["peak_rss_mib"])]
        if cuda:
            row.append(fmt_mib(s.get("peak_cuda_mib")))
        row += [trainable, fmt_bytes(s["adapter_bytes"]), fmt_s(s["setup_s"])]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Ratios are of pooled medians of wall time; in brackets the range of the per-repeat ratios (each "
              "repeat's two medians measured close together in time). CPU s/step is the median process CPU time "
              "(all threads) per timed step: on a shared machine it moves less with other users' load than wall "
              "time does, so its ratio is the steadier estimate of the work each method does. Peak RSS is "
              "ru_maxrss of the method's own process "
              f"(it includes the model itself: {_model_rss(summary)}). The saved file is save_pretrained's "
              "directory for adapters (including the trained task head on encoders), the trained tensors as "
              "safetensors for full / head-only."]
    return lines


def _cpu_ratio(r) -> str:
    return "–" if not r or r.get("cpu_ratio") is None else f"{r['cpu_ratio']:.2f}x"


def _model_rss(summary) -> str:
    vals = [s["rss_before_setup_mib"] for s in summary.values() if s.get("rss_before_setup_mib")]
    return f"about {min(vals):,.0f} MiB after building the model and batch" if vals else "–"


def _setup_table(summary) -> list[str]:
    head = ["method", "setup median (s)", "min", "max", "RSS growth (MiB)", "peak RSS (MiB)", "trainable params"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m, s in summary.items():
        status = _status(s)
        if status:
            lines.append(f"| {LABELS.get(m, m)} | {status} |" + " |" * (len(head) - 2))
            continue
        lines.append("| " + " | ".join([
            LABELS.get(m, m), fmt_s(s["setup_s"]), fmt_s(s["setup_min_s"]), fmt_s(s["setup_max_s"]),
            fmt_mib(s.get("rss_growth_mib")), fmt_mib(s["peak_rss_mib"]), fmt_int(s["trainable_params"])]) + " |")
    lines += ["", "RSS growth = resident set size right after get_peft_model minus right before it (current RSS, "
              "after gc), in the method's own process; the model's weights live on the meta device, so any "
              "growth is the adapter's own bookkeeping."]
    return lines


def _headline(summary, ratios, setup_only, cfg) -> list[str]:
    g = summary.get("gpart")
    if not g or _status(g):
        return ["GPart did not run: see the table."]
    if setup_only:
        D = cfg.get("D") or g.get("D")
        growth = g.get("rss_growth_mib")
        per = f"; {growth * 2**20 / D:.2g} bytes per targeted weight" if growth is not None and D else ""
        goal = "meets" if g["setup_s"] is not None and g["setup_s"] <= 1.0 else "misses"
        return [f"**GPart setup: median {fmt_s(g['setup_s'])} s (min {fmt_s(g['setup_min_s'])}, max "
                f"{fmt_s(g['setup_max_s'])}) for D = {fmt_int(D)} and d = {fmt_int(cfg['d'])}: {goal} the <= 1 s "
                f"goal. RSS growth {fmt_mib(growth)} MiB{per}.**"]
    parts = []
    for den, name in (("floor", "floor"), ("lora-r8", "LoRA r=8")):
        r = ratios.get(f"gpart/{den}")
        if r:
            extra = [f"fastest steps {r['min_ratio']:.2f}x"] if r.get("min_ratio") else []
            extra += [f"CPU time {r['cpu_ratio']:.2f}x"] if r.get("cpu_ratio") else []
            parts.append(f"GPart / {name} = {fmt_ratio(r)}" + (f" [{', '.join(extra)}]" if extra else ""))
    med = f"GPart median {fmt_s(g['median_s'])} s"
    for den in ("floor", "lora-r8"):
        if summary.get(den, {}).get("median_s"):
            med += f", {LABELS[den].split(' (')[0]} {fmt_s(summary[den]['median_s'])} s"
    lines = [f"**{'; '.join(parts)}** ({med} per step)."]
    lora = summary.get("lora-r8", {})
    if cfg.get("quant") and g.get("peak_rss_mib") and lora.get("peak_rss_mib"):
        lines += ["", f"**Peak RSS: GPart {fmt_mib(g['peak_rss_mib'])} MiB, LoRA r=8 {fmt_mib(lora['peak_rss_mib'])} MiB "
                      f"(GPart / LoRA r=8 = {g['peak_rss_mib'] / lora['peak_rss_mib']:.3f}x).**"]
    return lines


# --------------------------------------------------------------------------------------------- plot
def render_plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary, cfg = result["summary"], result["config"]
    rows = [(m, s) for m, s in summary.items() if not _status(s)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.5 * len(rows) + 2.2))
    names = [LABELS.get(m, m).split(" (")[0] + (" (ours)" if m == "gpart" else "") for m, _ in rows]
    colors = ["tab:red" if m == "gpart" else "tab:gray" if m == "floor" else "tab:blue" for m, _ in rows]
    y = range(len(rows))
    if cfg.get("setup_only"):
        vals = [s["setup_s"] or 0 for _, s in rows]
        lo = [v - (s["setup_min_s"] or v) for v, (_, s) in zip(vals, rows)]
        hi = [(s["setup_max_s"] or v) - v for v, (_, s) in zip(vals, rows)]
        axes[0].barh(y, vals, xerr=[lo, hi], color=colors, capsize=3)
        axes[0].axvline(1.0, color="k", ls="--", lw=0.8, label="goal: 1 s")
        axes[0].legend(loc="lower right")
        axes[0].set_xlabel("get_peft_model time (s), median, min-max")
        axes[1].barh(y, [s.get("rss_growth_mib") or 0 for _, s in rows], color=colors)
        axes[1].set_xlabel("RSS growth during setup (MiB)")
    else:
        vals = [s["median_s"] for _, s in rows]
        lo = [v - s["min_s"] for v, (_, s) in zip(vals, rows)]
        hi = [s["max_s"] - v for v, (_, s) in zip(vals, rows)]
        axes[0].barh(y, vals, xerr=[lo, hi], color=colors, capsize=3)
        floor = summary.get("floor", {}).get("median_s")
        if floor:
            axes[0].axvline(floor, color="k", ls="--", lw=0.8, label="floor")
            axes[0].legend(loc="lower right")
            for i, ((_, s), v) in enumerate(zip(rows, vals)):
                axes[0].text(s["max_s"], i, f"  {v / floor:.2f}x", va="center", fontsize=8)
        for i, (m, _) in enumerate(rows):  # every timed step, all repeats
            pts = [t for r in result.get("runs", []) if r.get("method") == m and r.get("ok")
                   for t in r.get("step_times_s", [])]
            axes[0].plot(pts, [i] * len(pts), ".", color="gold", ms=4, zorder=3)
        axes[0].set_xlabel("step time (s): median, min-max")
        key = "peak_cuda_mib" if any(s.get("peak_cuda_mib") for _, s in rows) else "peak_rss_mib"
        axes[1].barh(y, [s.get(key) or 0 for _, s in rows], color=colors)
        axes[1].set_xlabel("peak CUDA memory (MiB)" if key == "peak_cuda_mib" else "peak RSS (MiB)")
        base = [s["rss_before_setup_mib"] for _, s in rows if s.get("rss_before_setup_mib")]
        if key == "peak_rss_mib" and base:
            axes[1].axvline(min(base), color="k", ls="--", lw=0.8, label="model + batch, before setup")
            axes[1].legend(loc="lower right", fontsize=8)
    for ax in axes:
        ax.set_yticks(list(y))
        ax.set_yticklabels(names)
        ax.invert_yaxis()
        ax.grid(axis="x", alpha=0.3)
    axes[1].set_yticklabels([])
    fig.suptitle(result["title"], fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
