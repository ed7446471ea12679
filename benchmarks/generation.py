#!/usr/bin/env python
"""Greedy generation speed with an unmerged adapter: GPart (eval cache on / off), GPart merged, LoRA r=8, base.

One process; every method is built once from the same base weights, then the methods take turns,
the order rotated each repeat, so machine noise hits them alike. Each timed call generates exactly
--new-tokens tokens (batch 1, greedy, the KV cache on) from a fixed prompt; a streamer timestamps every
token, which splits the call into the prefill (the prompt's forward and the first token) and the decode
steps. GPart's eval cache is freed before each of its timed calls, so its prefill includes building
the cache (the cost of a first call). Writes JSON + markdown + PNG under docs/benchmarks/.

    python benchmarks/generation.py                       # SmolLM2-135M shape, q,k,v,o, d=131,072
    python benchmarks/generation.py --dtype bfloat16                  # bf16 base weights
    python benchmarks/generation.py --quant nf4-dq                    # the CLI's --load-in-4bit base (NF4, fp32 compute)
    python benchmarks/generation.py --shape tiny-llama --repeats 1 --new-tokens 4 --out-dir /tmp/g   # smoke
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
from gpart.recipes.methods import TARGET_SETS, build_peft_config  # noqa: E402 - the CLI's method settings
sys.path.insert(0, str(ROOT / "studies"))  # the repository's one script loader
from study_scripts import load_script  # noqa: E402

harness = load_script("benchmarks/bench_harness.py")
QKVO = ",".join(TARGET_SETS["decoder"]["attn"])  # the LLM recipe's default targets

METHODS = ("base", "gpart", "gpart-uncached", "gpart-merged", "lora-r8")
REFERENCE = "lora-r8"
PAIRS = (("gpart", "gpart-merged"), ("gpart", "base"), ("gpart-merged", "base"))  # also compared repeat by repeat
DESCRIPTIONS = {
    "base": "the frozen base model, no adapter",
    "gpart": "GPart unmerged, eval cache on (the default)",
    "gpart-uncached": "GPart unmerged, eval cache off (GPART_EVAL_CACHE=0 / eval_cache=False): Delta_W rebuilt every step",
    "gpart-merged": "GPart merged into the weights (merge_and_unload)",
    "lora-r8": "PEFT LoRA r=8 unmerged (lora_B non-zero)",
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=("smollm2-135m", "tiny-llama"), default="smollm2-135m")
    p.add_argument("--targets", default=QKVO)
    p.add_argument("--d", type=int, default=131072)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="the base weights' dtype (with --quant: bitsandbytes' compute dtype)")
    p.add_argument("--quant", default=None, choices=harness.QUANT_MODES,
                   help="load the base with bitsandbytes (nf4-dq: what the CLI's --load-in-4bit loads)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1: a shared machine's noise matters less)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--update-scale", type=float, default=1.0,
                   help="multiplies the random adapters (theta ~ N(0, 0.05^2), lora_B ~ N(0, 0.01^2))")
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "benchmarks"))
    p.add_argument("--name", default=None)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--from-json", default=None, help="re-render the markdown and plot of a stored result")
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(METHODS)}")
    if min(args.d, args.prompt_len, args.repeats, args.threads) < 1 or args.new_tokens < 2:
        p.error("d, prompt-len, repeats and threads must be >= 1, new-tokens >= 2")
    return args


def default_name(args) -> str:
    targets = "qkvo" if args.targets == QKVO else args.targets.replace(",", "+")
    suffix = "".join(f"-{x}" for x in (None if args.dtype == "float32" else args.dtype, args.quant) if x)
    return f"generation-{args.shape}-{targets}-d{args.d}{suffix}"


# ------------------------------------------------------------------------------------------- models
def build_models(args) -> dict:
    """{method: model in eval mode}; GPart cached and uncached share one model (the switch is toggled)."""
    import torch
    from peft import get_peft_model

    targets = args.targets.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        new_base = base_loader(args, tmp)
        base = new_base()
        models = {"base": base}
        gen = torch.Generator().manual_seed(args.seed + 7)
        common = dict(d=args.d, targets=targets, seed=args.seed, dropout=0.0, head=[], task_type=None)
        gp = get_peft_model(new_base(), build_peft_config("gpart", **common))
        with torch.no_grad():  # a trained-looking theta, so the outputs are not the base model's
            theta = gp.base_model.gpart_theta["default"]
            theta.copy_(torch.randn(theta.shape, generator=gen) * 0.05 * args.update_scale)
        gp.eval()
        models["gpart"] = models["gpart-uncached"] = gp
        if "gpart-merged" in args.methods:
            merged = get_peft_model(new_base(), build_peft_config("gpart", **common))
            with torch.no_grad():
                merged.base_model.gpart_theta["default"].copy_(theta)
            models["gpart-merged"] = merged.merge_and_unload().eval()  # 4-bit: re-quantized (a warning says how much is lost)
        if "lora-r8" in args.methods:
            lora = get_peft_model(new_base(), build_peft_config("lora", r=8, **common))
            with torch.no_grad():
                for name, p in lora.named_parameters():
                    if "lora_B" in name:
                        p.copy_(torch.randn(p.shape, generator=gen) * 0.01 * args.update_scale)
            models["lora-r8"] = lora.eval()
    return models


def base_loader(args, tmp: str):
    """A function that returns a fresh copy of the base model in --dtype (and --quant). A quantized base is
    saved once as a float checkpoint, then loaded with bitsandbytes for each method (as step_time does)."""
    import torch

    dtype = getattr(torch, args.dtype)
    if args.quant:
        harness.save_float_checkpoint(args.shape, args.seed, tmp)
        return lambda: harness.load_quantized(tmp, args.quant, "cpu", dtype).eval()
    base = harness.build_model(args.shape, args.seed).to(dtype).eval()
    return lambda: copy.deepcopy(base)


def base_description(args) -> str:
    return f"bitsandbytes {args.quant} base, {args.dtype} compute" if args.quant else f"{args.dtype} base"


def set_method(models: dict, method: str):
    """The model to time for `method`, with GPart's switch set; the cache starts empty (a first call)."""
    model = models[method]
    if method in ("gpart", "gpart-uncached"):
        model.base_model.eval_cache = method == "gpart"
        model.base_model.clear_gpart_cache()
    return model


def cache_bytes(model) -> int:
    """Bytes of the tensors GPart's wrappers keep that are not the base weights themselves."""
    from gpart.layers import GPartLayer

    seen, total = set(), 0
    for m in model.modules():
        if not isinstance(m, GPartLayer):
            continue
        base = m.get_base_layer()
        own = {t.untyped_storage().data_ptr() for t in (base.weight, getattr(base, "bias", None)) if t is not None}
        for _key, value in m._gpart_cache.values():
            for t in value:
                if t is None:
                    continue
                ptr = t.untyped_storage().data_ptr()
                if ptr not in own and ptr not in seen:
                    seen.add(ptr)
                    total += t.untyped_storage().nbytes()
    return total


class TokenClock:
    """A generate() streamer that timestamps each put() (wall and process CPU time): the first holds the
    prompt, then one per token. With one thread, CPU time moves less than wall time with others' load."""

    def __init__(self):
        self.times: list[float] = []
        self.cpu: list[float] = []

    def put(self, value):
        self.times.append(time.perf_counter())
        self.cpu.append(time.process_time())

    def end(self):
        pass


def generate_once(model, ids, new_tokens: int) -> tuple[dict, list[int]]:
    import torch

    clock = TokenClock()
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0, streamer=clock)
        total = time.perf_counter() - t0
    tokens = out[0, ids.shape[1]:].tolist()
    steps, cpu = clock.times[1:], clock.cpu[1:]  # one per generated token
    assert len(steps) == new_tokens == len(tokens), (len(steps), new_tokens, len(tokens))
    return {
        "total_s": total,
        "prefill_s": steps[0] - t0,  # the prompt's forward and the first token
        "decode_ms_per_token": 1000 * (steps[-1] - steps[0]) / (new_tokens - 1),
        "decode_cpu_ms_per_token": 1000 * (cpu[-1] - cpu[0]) / (new_tokens - 1),
        "ms_per_token": 1000 * total / new_tokens,
    }, tokens


# ------------------------------------------------------------------------------------------- driver
def measure(args, argv) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    t_build = time.perf_counter()
    models = build_models(args)
    build_s = time.perf_counter() - t_build
    vocab = models["base"].config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt_len), generator=torch.Generator().manual_seed(args.seed + 1))
    D = harness.targeted_numel(models["base"], args.targets.split(","))
    result = {
        "benchmark": "generation",
        "title": (f"Greedy generation: {args.shape} ({base_description(args)}), targets {args.targets}, d={args.d:,}, batch 1, prompt "
                  f"{args.prompt_len} tokens, {args.new_tokens} new tokens, {args.threads} thread(s), CPU"),
        "command": "python benchmarks/generation.py " + shlex.join(argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {**{k: v for k, v in vars(args).items() if k not in ("out_dir", "note")}, "D": D,
                   "shape_description": harness.SHAPES[args.shape].description, "reference": REFERENCE},
        "environment": harness.environment(),
        "load_average": {"start": list(os.getloadavg())},
        "build_s": build_s,
        "methods": {m: DESCRIPTIONS[m] for m in args.methods},
        "runs": [],
        "notes": list(args.note),
    }
    result["environment"]["torch_threads"] = torch.get_num_threads()
    tokens = {}
    for method in args.methods:  # warm-up: allocator, kernels, first-call paths
        generate_once(set_method(models, method), ids, min(4, args.new_tokens))
    for rep in range(args.repeats):
        k = rep % len(args.methods)
        for method in args.methods[k:] + args.methods[:k]:
            model = set_method(models, method)
            run, toks = generate_once(model, ids, args.new_tokens)
            if method == "gpart":
                run["cache_bytes"] = cache_bytes(model)
            tokens.setdefault(method, toks)
            run.update(method=method, repeat=rep, loadavg_1m=os.getloadavg()[0])
            result["runs"].append(run)
            print(f"[repeat {rep}] {method:<15} decode {run['decode_ms_per_token']:7.2f} ms/token, "
                  f"prefill {1000 * run['prefill_s']:7.1f} ms", flush=True)
    gp = models["gpart"]
    gp.base_model.eval_cache = None
    with torch.no_grad():
        gp(ids)
    result["cache_bytes_before_train"] = cache_bytes(gp)
    gp.train()
    result["cache_bytes_after_train"] = cache_bytes(gp)
    result["load_average"]["end"] = list(os.getloadavg())
    result["tokens_equal"] = {m: tokens[m] == tokens.get("gpart-uncached", tokens.get("gpart"))
                              for m in tokens if m.startswith("gpart")}
    result["tokens_differ_from_base"] = {m: tokens[m] != tokens["base"] for m in tokens if m != "base"} \
        if "base" in tokens else {}
    result["adapted_weight_bytes"] = D * 4
    summarize(result)
    return result


def summarize(result: dict) -> None:
    summary = {}
    for method in result["methods"]:
        runs = [r for r in result["runs"] if r["method"] == method]
        if not runs:
            continue
        med = {key: statistics.median(r[key] for r in runs)
               for key in ("decode_ms_per_token", "decode_cpu_ms_per_token", "ms_per_token", "prefill_s")}
        med["min_decode_ms_per_token"] = min(r["decode_ms_per_token"] for r in runs)
        med["max_decode_ms_per_token"] = max(r["decode_ms_per_token"] for r in runs)
        med["repeats"] = len(runs)
        if any("cache_bytes" in r for r in runs):
            med["cache_bytes"] = max(r.get("cache_bytes", 0) for r in runs)
        summary[method] = med
    result["summary"] = summary
    ref = result["config"]["reference"]
    ratios = {}
    if ref in summary:
        for method, med in summary.items():
            paired = per_repeat_ratios(result["runs"], method, ref, "decode_ms_per_token")
            ratios[f"{method}/{ref}"] = {
                "decode": med["decode_ms_per_token"] / summary[ref]["decode_ms_per_token"],
                "decode_paired_median": statistics.median(paired) if paired else None,
                "decode_cpu": med["decode_cpu_ms_per_token"] / summary[ref]["decode_cpu_ms_per_token"],
                "total": med["ms_per_token"] / summary[ref]["ms_per_token"],
                "prefill": med["prefill_s"] / summary[ref]["prefill_s"],
            }
    result["ratios"] = ratios
    result["paired_cpu"] = {}
    for a, b in PAIRS:
        per = per_repeat_ratios(result["runs"], a, b, "decode_cpu_ms_per_token")
        if per:
            result["paired_cpu"][f"{a}/{b}"] = {"median": statistics.median(per),
                                               "slower_in": sum(v > 1 for v in per), "repeats": len(per)}


def per_repeat_ratios(runs: list[dict], a: str, b: str, key: str) -> list[float]:
    """a's `key` over b's, one ratio per repeat that ran both: each repeat ran them back to back, so the ratio
    cancels the machine's slow drift."""
    of_b = {r["repeat"]: r[key] for r in runs if r["method"] == b}
    return [r[key] / of_b[r["repeat"]] for r in runs if r["method"] == a and r["repeat"] in of_b]

# ------------------------------------------------------------------------------------------ reports
def render_markdown(result: dict) -> str:
    cfg, s, ref = result["config"], result["summary"], result["config"]["reference"]
    env = result["environment"]
    lines = [f"# {result['title']}", "", f"Command: `{result['command']}`", "",
             f"Created {result['created']} on {env.get('cpu')} ({env.get('cpu_count')} CPUs, torch "
             f"{env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}, "
             f"{env.get('torch_threads')} torch thread(s), git {env.get('git')}). Load average "
             f"{_load_str(result)}.", "",
             *_busy_note(result),
             f"Model: {cfg['shape_description']}. Adapted weights: {cfg['targets']}, D = {cfg['D']:,} "
             f"({result['adapted_weight_bytes'] / 2**20:.1f} MiB in fp32). Medians over {cfg['repeats']} "
             "repeats, methods interleaved in one process (order rotated each repeat).", "",
             f"| method | decode ms/token (min–max) | CPU ms/token | ms/token incl. prefill | prefill ms "
             f"| decode vs {ref} | paired | CPU time vs {ref} | prefill vs {ref} |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method, med in s.items():
        r = result["ratios"].get(f"{method}/{ref}", {})
        paired = r.get("decode_paired_median")
        lines.append(
            f"| {method} | {med['decode_ms_per_token']:.2f} ({med['min_decode_ms_per_token']:.2f}–"
            f"{med['max_decode_ms_per_token']:.2f}) | {med['decode_cpu_ms_per_token']:.2f} | {med['ms_per_token']:.2f} | "
            f"{1000 * med['prefill_s']:.1f} | {_r(r.get('decode'))} | {_r(paired)} | {_r(r.get('decode_cpu'))} | "
            f"{_r(r.get('prefill'))} |")
    lines += ["", "Methods:", ""] + [f"- `{m}`: {d}" for m, d in result["methods"].items()] + [""]
    g = s.get("gpart", {})
    if g.get("cache_bytes") is not None:
        lines += [f"Memory kept by GPart's eval cache: {g['cache_bytes'] / 2**20:.1f} MiB ({g['cache_bytes'] / cfg['D']:.1f} bytes per adapted weight; freed by `model.train()`, merge/unmerge, adapter changes, `.to()` and "
                  "`model.base_model.clear_gpart_cache()`); after `model.train()`: "
                  f"{result.get('cache_bytes_after_train', 0) / 2**20:.1f} MiB.", ""]
    lines += ["Generated tokens: " + ", ".join(f"{m} {'equal to' if ok else 'DIFFERENT from'} GPart uncached"
                                               for m, ok in result["tokens_equal"].items() if m != "gpart-uncached")
              + "; " + ", ".join(f"{m} {'differs from' if ok else 'equals'} the base model"
                                 for m, ok in result["tokens_differ_from_base"].items()) + ".", ""]
    lines += ["Decode ms/token: (time of the last token - time of the first) / (new tokens - 1), from a "
              "streamer's timestamps; CPU ms/token: the same with the process's CPU time. Prefill: from the call to the first token (the prompt's forward; for "
              "`gpart` it includes building the cache, which is freed before each timed call). Paired: the "
              "median over repeats of the per-repeat ratio.", ""]
    if result.get("paired_cpu"):
        lines += ["Paired CPU time per decoded token (median of the per-repeat ratios; in how many repeats the first "
                  "was slower): " + ", ".join(f"{k} {v['median']:.3f} ({v['slower_in']} of {v['repeats']})"
                                               for k, v in result["paired_cpu"].items()) + ".", ""]
    if result.get("plot"):
        lines += [f"![decode time per token]({result['plot']})", ""]
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines).rstrip() + "\n"


def _busy_note(result: dict) -> list[str]:
    """A warning when other jobs held the CPUs: wall times then stretch with their load, CPU time much less."""
    cpus = result["environment"].get("cpu_count") or 1
    load = max(result.get("load_average", {}).get("start", [0])[0], result.get("load_average", {}).get("end", [0])[0])
    if load <= cpus:
        return []
    return [f"**Busy machine**: load average up to {load:.1f} on {cpus} CPUs, so other jobs took most of the "
            "wall time; compare the CPU-time column (process CPU time per token, one thread), which moves far "
            "less with others' load.", ""]


def _r(x):
    return "–" if x is None else f"{x:.3f}"


def _load_str(result):
    la = result.get("load_average", {})
    return f"{la.get('start', ['?'])[0]:.2f} at the start, {la.get('end', ['?'])[0]:.2f} at the end" \
        if la.get("end") else "?"


def render_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = result["summary"]
    methods = list(s)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    for i, m in enumerate(methods):
        runs = [r["decode_ms_per_token"] for r in result["runs"] if r["method"] == m]
        ax.barh(i, s[m]["decode_ms_per_token"], color="tab:orange" if m.startswith("gpart") else "tab:gray")
        ax.plot(runs, [i] * len(runs), "k.", ms=4)
    ax.set_yticks(range(len(methods)), methods)
    ax.invert_yaxis()
    ax.set_xlabel("decode ms per token (median; dots: repeats)")
    ax.set_title(result["title"], fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(result: dict, out_dir: Path, stem: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    png = out_dir / f"{stem}.png"
    result["plot"] = png.name
    try:
        render_plot(result, png)
    except Exception as e:  # noqa: BLE001 - a broken plot must not lose the measurements
        result["plot"] = None
        print(f"plot failed: {e}", file=sys.stderr)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(render_markdown(result))


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.from_json:
        path = Path(args.from_json)
        result = json.loads(path.read_text())
        summarize(result)
        write(result, path.parent, path.stem)
        print(f"re-rendered {path.with_suffix('.md')}")
        return 0
    result = measure(args, argv)
    stem = args.name or default_name(args)
    write(result, Path(args.out_dir), stem)
    print(f"wrote {Path(args.out_dir) / stem}.{{json,md,png}}")
    print(render_markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
