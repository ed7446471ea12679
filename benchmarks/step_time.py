#!/usr/bin/env python
"""Step time, memory, parameters, adapter bytes and setup time of GPart against its baselines.

One command per (model shape, targets, d, batch). Every (method, repeat) runs in its own fresh
subprocess; repeats are interleaved round-robin over the methods (the order rotated each repeat) so
that machine noise hits every method alike. Writes JSON + markdown + PNG under docs/benchmarks/.

    python benchmarks/step_time.py --shape roberta-base --targets qv --d 131072
    python benchmarks/step_time.py --shape minilm --targets all --d 131072 --repeats 3 --steps 5
    python benchmarks/step_time.py --shape llama-7b-meta --targets all --d 524288   # setup only
    python benchmarks/step_time.py --shape tiny-bert --steps 1 --warmup 1 --repeats 1 --out-dir /tmp/b  # smoke
    python benchmarks/step_time.py --shape smollm2-135m --targets attn --quant nf4 --methods gpart,lora-r8 --batch 4

Re-render a report from its JSON without measuring: --from-json docs/benchmarks/FILE.json.
The kernel path is whatever GPART_KERNELS says in the environment (recorded in the report).
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "studies"))  # the repository's one script loader
from study_scripts import load_script  # noqa: E402

harness = load_script("benchmarks/bench_harness.py")
report = load_script("benchmarks/bench_report.py")

DEFAULT_OUT = ROOT / "docs" / "benchmarks"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=list(harness.SHAPES), default="roberta-base")
    p.add_argument("--targets", choices=tuple(harness.TARGET_SETS["decoder"]), default="qv",
                   help="qv: query,value (q_proj,v_proj on Llama); attn: q,k,v,o projections (decoders); all: every "
                        "linear layer of the blocks")
    p.add_argument("--d", type=int, default=131072, help="length of GPart's theta (and Uni-LoRA's)")
    p.add_argument("--methods", default=",".join(harness.METHODS),
                   help=f"comma-separated subset of {','.join(harness.METHODS)}")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first, per subprocess")
    p.add_argument("--steps", type=int, default=5, help="timed steps per subprocess")
    p.add_argument("--repeats", type=int, default=3, help="subprocesses per method, interleaved round-robin")
    p.add_argument("--device", default="auto", help="cpu, cuda, or auto (cuda when available)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--autocast", default=None, choices=("bfloat16", "float16"),
                   help="run forward and loss under torch.autocast with this dtype (weights stay --dtype)")
    p.add_argument("--quant", default=None, choices=harness.QUANT_MODES,
                   help="load the base quantized with bitsandbytes (decoder shapes; adapter methods only)")
    p.add_argument("--threads", type=int, default=0, help="torch threads in each worker (0: torch's default)")
    p.add_argument("--omp-wait-policy", default="PASSIVE", choices=("PASSIVE", "ACTIVE", "inherit"),
                   help="OMP_WAIT_POLICY of the workers (default PASSIVE: on a shared CPU, spinning OpenMP threads "
                        "turn other users' load into 2-10x slower, erratic steps; inherit: leave the environment's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds before a worker is killed")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT))
    p.add_argument("--name", default=None, help="file stem of the outputs (default: from the settings)")
    p.add_argument("--note", action="append", default=[], help="a line added to the report's notes")
    p.add_argument("--in-process", action="store_true",
                   help="run the workers in this process (tests and debugging only: memory figures are then "
                        "meaningless)")
    p.add_argument("--from-json", default=None, help="re-render the markdown and plot of a stored result")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # JSON WorkerSpec (internal)
    p.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in harness.METHODS]
    if bad:
        p.error(f"unknown method(s) {bad}; choose from {', '.join(harness.METHODS)}")
    if not args.worker and not args.from_json:
        if min(args.batch, args.seq, args.repeats, args.d) < 1 or args.steps < 1 or args.warmup < 0:
            p.error("batch, seq, d, steps and repeats must be >= 1, warmup >= 0")
        shape = harness.SHAPES[args.shape]
        if args.quant and (shape.family != "decoder" or shape.meta):
            p.error(f"--quant needs a decoder shape that trains (not {args.shape})")
        if args.targets not in harness.TARGET_SETS[shape.family]:
            p.error(f"--targets {args.targets} is not defined for {shape.family} shapes")
    return args


def default_name(args) -> str:
    if harness.SHAPES[args.shape].meta:
        return f"setup-{args.shape}-{args.targets}-d{args.d}"
    kernels = os.environ.get("GPART_KERNELS", "auto").strip().lower() or "auto"
    return (f"step_time-{args.shape}-{args.targets}-d{args.d}-b{args.batch}x{args.seq}"
            + ("" if args.dtype == "float32" else f"-{args.dtype}")
            + ("" if not args.autocast else f"-autocast-{args.autocast}")
            + ("" if not args.quant else f"-{args.quant}")
            + ("" if kernels == "auto" else f"-kernels-{kernels}"))


def command_line(argv) -> str:
    env = f"GPART_KERNELS={os.environ['GPART_KERNELS']} " if os.environ.get("GPART_KERNELS") else ""
    return env + "python benchmarks/step_time.py " + shlex.join(argv)


def resolve_device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------- workers
def run_child(spec: harness.WorkerSpec, timeout: float, omp_wait_policy: str = "inherit") -> dict:
    """One worker in a fresh Python process; its result (or its failure) as a dict."""
    with tempfile.TemporaryDirectory(prefix="gpart-step-") as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(asdict(spec)),
               "--result-file", str(out)]
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false")
        if omp_wait_policy != "inherit":
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        src = str(ROOT / "src")
        env["PYTHONPATH"] = src + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return asdict(harness.WorkerResult(method=spec.method, ok=False, error=f"timed out after {timeout:.0f} s"))
        wall = time.perf_counter() - t0
        if out.exists():
            res = json.loads(out.read_text())
        else:
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-3:]
            res = asdict(harness.WorkerResult(method=spec.method, ok=False,
                                              error=f"worker exited {proc.returncode}: {' | '.join(tail)}"))
        res["process_wall_s"] = wall
        return res


def worker_main(args) -> int:
    spec = harness.WorkerSpec(**json.loads(args.worker))
    res = harness.run_worker(spec)
    Path(args.result_file).write_text(json.dumps(res))
    return 0


# ------------------------------------------------------------------------------------------- driver
def interleaved_order(methods: list[str], repeat: int) -> list[str]:
    """Round-robin order for one repeat, rotated by the repeat index so no method is always first."""
    k = repeat % len(methods)
    return methods[k:] + methods[:k]


def measure(args, argv) -> dict:
    shape = harness.SHAPES[args.shape]
    device = resolve_device(args.device)
    methods = list(args.methods)
    if shape.meta:
        methods = [m for m in methods if m in harness.PEFT_METHODS]
    names = harness.target_names(args.shape, args.targets)
    title = (f"{'Setup' if shape.meta else 'Step time'}: {args.shape}, targets {args.targets}, d={args.d:,}"
             + ("" if shape.meta else f", batch {args.batch}x{args.seq}, {args.dtype}"
                                      f"{f' under {args.autocast} autocast' if args.autocast else ''}, {device}")
             + (f", bitsandbytes {args.quant} base" if args.quant else ""))
    result = {
        "benchmark": "setup" if shape.meta else "step_time",
        "title": title,
        "command": command_line(argv),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": {
            "shape": args.shape, "shape_description": shape.description, "family": shape.family,
            "setup_only": shape.meta, "targets": args.targets, "target_modules": names, "d": args.d,
            "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "steps": args.steps,
            "repeats": args.repeats, "device": device, "dtype": args.dtype, "autocast": args.autocast,
            "methods": methods, "quant": args.quant,
            "in_process": args.in_process, "D": None,
            "omp_wait_policy": "inherit" if args.in_process else args.omp_wait_policy,
            "threads": args.threads or None,
        },
        "environment": harness.environment(),
        "load_average": {"start": list(os.getloadavg())},
        "runs": [],
        "notes": list(args.note),
        "complete": False,
    }
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.name or default_name(args)
    checkpoint = None
    if args.quant:  # saved once here, so that no worker ever holds the float model
        tmp = tempfile.TemporaryDirectory(prefix="gpart-quant-base-")
        checkpoint = tmp.name
        harness.save_float_checkpoint(args.shape, args.seed, checkpoint)
    t_start = time.perf_counter()
    for rep in range(args.repeats):
        for pos, method in enumerate(interleaved_order(methods, rep)):
            spec = harness.WorkerSpec(shape=args.shape, method=method, targets=args.targets, d=args.d,
                                      batch=args.batch, seq=args.seq, warmup=args.warmup, steps=args.steps,
                                      device=device, dtype=args.dtype, autocast=args.autocast, seed=args.seed,
                                      measure_bytes=(rep == 0), threads=args.threads, quant=args.quant,
                                      checkpoint=checkpoint)
            t = time.perf_counter()
            load = os.getloadavg()[0]
            if args.in_process:
                res = harness.run_worker(spec)
            else:
                res = run_child(spec, args.child_timeout, args.omp_wait_policy)
            res.update(repeat=rep, position=pos, started_s=t - t_start, loadavg_1m_at_start=load)
            result["runs"].append(res)
            _progress(rep, method, res)
        result["wall_s"] = time.perf_counter() - t_start
        result["load_average"]["end"] = list(os.getloadavg())
        result["complete"] = rep == args.repeats - 1
        finish(result, out_dir, stem)  # written after every repeat, so a long run keeps what it measured
    return result


def _progress(rep, method, res):
    if res.get("skipped"):
        msg = f"skipped ({res['skipped']})"
    elif not res.get("ok"):
        msg = f"FAILED: {res.get('error')}"
    elif res.get("step_times_s"):
        ts = sorted(res["step_times_s"])
        msg = f"median {ts[len(ts) // 2]:.3f} s/step, peak RSS {res['peak_rss_mib']:.0f} MiB"
    else:
        msg = f"setup {res['setup_s']:.3f} s"
    print(f"[repeat {rep}] {method:<10} {msg}", flush=True)


def finish(result: dict, out_dir: Path, stem: str) -> dict:
    methods = result["config"]["methods"]
    result["summary"] = report.summarize(result["runs"], methods)
    result["ratios"] = report.all_ratios(result["summary"], result["runs"])
    Ds = [r["D"] for r in result["runs"] if r.get("D")]
    result["config"]["D"] = Ds[0] if Ds else None
    png = out_dir / f"{stem}.png"
    result["plot"] = png.name
    try:
        report.render_plot(result, png)
    except Exception as e:  # noqa: BLE001 - a broken plot must not lose the measurements
        result["plot"] = None
        print(f"plot failed: {e}", file=sys.stderr)
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(report.render_markdown(result))
    return result


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)
    if args.from_json:
        path = Path(args.from_json)
        result = json.loads(path.read_text())
        if result.get("benchmark") not in ("step_time", "setup"):
            print(f"{path} is not a step_time.py result", file=sys.stderr)
            return 2
        finish(result, path.parent, path.stem)
        print(f"re-rendered {path.with_suffix('.md')}")
        return 0
    result = measure(args, argv)
    stem = args.name or default_name(args)
    print(f"wrote {Path(args.out_dir) / stem}.{{json,md,png}}")
    print(report.render_markdown(result).split("\n\n")[-2 if result.get("plot") else -1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
