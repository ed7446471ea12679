"""Micro-benchmark of GPart's element-wise work: ns per weight, reference vs fast paths.

    python benchmarks/kernel_speed.py                      # 2 and 1 threads, writes docs/benchmarks/kernels.{json,md}
    python benchmarks/kernel_speed.py --threads 1 --repeats 31 --out-dir /tmp/k
    python benchmarks/kernel_speed.py --baseline-rev HEAD   # also the C++ kernels of a git revision, same rounds

Each path processes one weight slice (default 768 x 3072 = 2.36M weights, a RoBERTa-base MLP matrix) of
the partition of a RoBERTa-base-shaped model with every linear layer targeted (D = 84,934,656, d = 131,072).
Rounds are interleaved (every path once per round), so that load from other processes on a shared machine
spreads over all paths alike; the table reports the median and the minimum over rounds, of the wall time
and of the process CPU time (all threads: the cores' time a pass costs). The reference runs on a shorter
slice (it is ~100x slower); its cost per weight does not depend on the length. --baseline-rev REV compiles
the C++ kernels as they were at git revision REV and runs them in the same rounds (backend "cpp@REV"), for
before/after comparisons on a noisy machine. Backend "cpp" uses the partition version of new adapters
(gpart.partition.VERSION); "cpp (partition v1)" the same build on version 1's partition (older adapters).
A revision from before version 2 computes version 1 whatever it is asked.

Paths (see gpart.kernels):
  ids            group ids only (int64 out)
  delta          Delta_W = theta_s[g(i)] as fp32 (forward/backward update, gpart.functional.delta)
  delta+drop     the same with DropConnect (p = 0.1)
  merged         W0 + Delta_W in one sweep, fp32 W0 -> fp32 (forward weight)
  merged-bf16    (W0.float() + Delta_W).to(bf16) from a bf16 W0 (backward weight, bf16 models)
  grad           dL/dtheta_s += P^T vec(dL/dW) from fp32 dL/dW (gpart.functional.transpose_add)
  grad+drop      the same with DropConnect
  grad-bf16      the same from a bf16 dL/dW
  merge+grad     the backward in one sweep: merged (fp32) and grad from the same ids (gpart.functional's backward)
  copy / add     memory floor for comparison: W.copy_(W0) and torch.add(W0, Delta, out=W)
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
from bench_harness import cpu_name  # noqa: E402 - stdlib-only at import; needs this folder on sys.path

sys.path.insert(0, str(ROOT / "src"))

import gpart.kernels as K  # noqa: E402
from gpart.functional import DropConnect, TensorSlice, delta, transpose_add  # noqa: E402
from gpart.kernels import cpu  # noqa: E402
from gpart.partition import VERSION, Partition  # noqa: E402

ROBERTA_BASE_ALL_LINEAR_D = 12 * (4 * 768 * 768 + 2 * 768 * 3072)  # 84,934,656 weights
STEP_FLOOR_S = 2.6  # frozen fwd+bwd with weight grads, RoBERTa-base, batch 8x128, 2 cores (a hand check, 2026-11)


def _timeit(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _kernel_source_at(rev: str) -> str:
    """The C++ kernel source at git revision `rev`: a .cpp file since it moved out of _cpu_src.py."""
    def show(path):
        return subprocess.run(["git", "show", f"{rev}:{path}"], cwd=ROOT, capture_output=True, text=True)

    shipped = show("src/gpart/kernels/cpu_kernels.cpp")
    if shipped.returncode == 0:
        return shipped.stdout
    legacy = show("src/gpart/kernels/_cpu_src.py")
    legacy.check_returncode()
    scope: dict = {}
    exec(compile(legacy.stdout, f"{rev}:_cpu_src.py", "exec"), scope)
    return scope["SOURCE"]


def baseline_library(rev: str):
    """The C++ kernels of git revision `rev`, compiled with today's flags into a temporary folder and loaded."""
    source = _kernel_source_at(rev)
    cxx = cpu._compiler()
    folder = tempfile.mkdtemp(prefix="gpart-baseline-")
    cpp, so = os.path.join(folder, "k.cpp"), os.path.join(folder, "k.so")
    Path(cpp).write_text(source)
    err = cpu._try_compile(cxx, cpu._flag_sets()[0], cpp, so)
    if err is not None:
        raise RuntimeError(f"could not compile the kernels of {rev}: {err}")
    lib = ctypes.CDLL(so)
    abi = lib.gpart_abi() if hasattr(lib, "gpart_abi") else None
    if abi != cpu.ABI:  # the calls below pass today's arguments
        raise RuntimeError(f"the kernels of {rev} have ABI {abi}, this checkout's have ABI {cpu.ABI}: "
                           "compare with a revision of the same ABI")
    for name in ("gpart_ids", "gpart_gather", "gpart_scatter", "gpart_merge_scatter"):
        cpu._declare_one(lib, name)
    return lib


def _with_lib(lib, fn):
    """fn run with gpart.kernels.cpu pointed at another build of the kernels."""
    def run():
        saved = cpu._lib
        cpu._lib = lib
        try:
            return fn()
        finally:
            cpu._lib = saved
    return run


def _compiler() -> str:
    cxx = cpu._compiler()
    if not cxx:
        return "no C++ compiler"
    version = cpu._compiler_version(cxx)
    return version.splitlines()[0] if version else cxx


def build_paths(args):
    part = Partition(args.seed, args.D, args.d)
    rows, cols = args.shape
    n = rows * cols
    start = args.D // 2 - n // 2
    torch.manual_seed(0)
    theta_s = torch.randn(part.d)
    w0 = torch.randn(rows, cols) * 0.02
    w0_bf16 = w0.to(torch.bfloat16)
    grad = torch.randn(rows, cols)
    grad_bf16 = grad.to(torch.bfloat16)
    delta = torch.randn(rows, cols)
    out = torch.empty(rows, cols)
    acc = torch.zeros(part.d)
    drop = DropConnect(0.1, 0x1234_5678_9ABC)

    nref = min(n, args.ref_len)
    sl_ref = TensorSlice(part, start, (nref,))
    grad_ref = grad.reshape(-1)[:nref]

    def ref(fn):
        def run():
            with K.use_backend("reference"):
                fn()
        return run

    paths = {
        "reference": {
            "ids": (nref, ref(lambda: part.ids(start, nref))),
            "delta": (nref, ref(lambda: delta(theta_s, sl_ref))),
            "delta+drop": (nref, ref(lambda: delta(theta_s, sl_ref, drop))),
            "grad": (nref, ref(lambda: transpose_add(acc, grad_ref, sl_ref))),
            "grad+drop": (nref, ref(lambda: transpose_add(acc, grad_ref, sl_ref, drop))),
        },
        "memory floor (torch)": {
            "copy": (n, lambda: out.copy_(w0)),
            "add": (n, lambda: torch.add(w0, delta, out=out)),
        },
    }
    def cpp_paths(lib=None, part=part):
        wrap = (lambda fn: fn) if lib is None else (lambda fn: _with_lib(lib, fn))
        ps = {
            "ids": (n, wrap(lambda: cpu.ids(part, start, n))),
            "delta": (n, wrap(lambda: cpu.gather(theta_s, part, start, n))),
            "delta+drop": (n, wrap(lambda: cpu.gather(theta_s, part, start, n, drop=drop))),
            "merged": (n, wrap(lambda: cpu.gather(theta_s, part, start, n, base=w0, out_dtype=torch.float32))),
            "merged-bf16": (n, wrap(lambda: cpu.gather(theta_s, part, start, n, base=w0_bf16,
                                                       out_dtype=torch.bfloat16))),
            "grad": (n, wrap(lambda: cpu.scatter(acc, grad, part, start))),
            "grad+drop": (n, wrap(lambda: cpu.scatter(acc, grad, part, start, drop=drop))),
            "grad-bf16": (n, wrap(lambda: cpu.scatter(acc, grad_bf16, part, start))),
        }
        if lib is None or hasattr(lib, "gpart_merge_scatter"):
            ps["merge+grad"] = (n, wrap(lambda: cpu.merge_scatter(theta_s, part, start, w0, grad, acc)))
        # the worst case for cycle-walking (D just above a power of two) and the wide path (D > 2^32)
        for label, D in (("D=2^26+1", (1 << 26) + 1), ("D=2^33+5", (1 << 33) + 5)):
            p2 = Partition(args.seed, D, args.d, part.version)
            s2 = D - n - 1
            ps[f"delta {label}"] = (n, wrap(lambda p2=p2, s2=s2: cpu.gather(theta_s, p2, s2, n)))
        return ps

    if cpu.available():
        paths["cpp"] = cpp_paths()
        for version in range(1, VERSION):  # the partitions of older adapters, same build and rounds
            paths[f"cpp (partition v{version})"] = cpp_paths(part=Partition(args.seed, args.D, args.d, version))
        if args.baseline_rev:
            paths[f"cpp@{args.baseline_rev}"] = cpp_paths(baseline_library(args.baseline_rev))
    else:
        print(f"C++ kernels unavailable: {cpu.load_error()}", file=sys.stderr)
    if torch.cuda.is_available():
        try:
            tk = K._triton_module(False)
            dev = torch.device("cuda")
            th_c, w0_c, g_c, acc_c = theta_s.to(dev), w0.to(dev), grad.to(dev), acc.to(dev)

            def cuda(fn):
                def run():
                    fn()
                    torch.cuda.synchronize()
                return run

            w0_bf16_c, g_bf16_c = w0_bf16.to(dev), grad_bf16.to(dev)
            for version in range(VERSION, 0, -1):
                pv = part if version == VERSION else Partition(args.seed, args.D, args.d, version)
                label = "triton (cuda)" if version == VERSION else f"triton (cuda, partition v{version})"
                paths[label] = {
                    "ids": (n, cuda(lambda pv=pv: tk.ids(pv, start, n, device=dev))),
                    "delta": (n, cuda(lambda pv=pv: tk.gather(th_c, pv, start, n))),
                    "merged": (n, cuda(lambda pv=pv: tk.gather(th_c, pv, start, n, base=w0_c))),
                    "merged-bf16": (n, cuda(lambda pv=pv: tk.gather(th_c, pv, start, n, base=w0_bf16_c,
                                                                   out_dtype=torch.bfloat16))),
                    "grad": (n, cuda(lambda pv=pv: tk.scatter(acc_c, g_c, pv, start))),
                    "grad-bf16": (n, cuda(lambda pv=pv: tk.scatter(acc_c, g_bf16_c, pv, start))),
                }
            paths["memory floor (torch, cuda)"] = {
                "copy": (n, cuda(lambda: w0_c.clone())),
                "add": (n, cuda(lambda: torch.add(w0_c, g_c))),
            }
        except Exception as exc:  # no triton
            print(f"Triton unavailable: {exc}", file=sys.stderr)
    return paths, n, nref


def measure(paths, repeats: int, warmup: int, threads: int):
    torch.set_num_threads(threads)
    flat = [(group, name, n, fn) for group, items in paths.items() for name, (n, fn) in items.items()]
    for _, _, _, fn in flat:
        for _ in range(warmup):
            fn()
    times = {(g, name): [] for g, name, _, _ in flat}
    cpu_times = {(g, name): [] for g, name, _, _ in flat}
    for _ in range(repeats):
        for g, name, n, fn in flat:
            wall, cpu_s = _timeit(fn)
            times[(g, name)].append(wall / n * 1e9)
            cpu_times[(g, name)].append(cpu_s / n * 1e9)
    return [
        {"backend": g, "path": name, "threads": threads, "weights": n,
         "ns_per_weight_median": statistics.median(times[(g, name)]), "ns_per_weight_min": min(times[(g, name)]),
         "cpu_ns_per_weight_median": statistics.median(cpu_times[(g, name)]),
         "cpu_ns_per_weight_min": min(cpu_times[(g, name)]),
         "repeats": repeats}
        for g, name, n, _ in flat
    ]


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def _reference_key(path: str) -> str:
    base = path.split(" ")[0]
    for a, b in (("merge+grad", "grad"), ("merged", "delta"), ("-bf16", ""), ("+ids", ""), ("(ids)", "")):
        base = base.replace(a, b)
    return base


def write_report(results, meta, out_dir: Path):
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "kernels.json").write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    by = {(r["backend"], r["path"], r["threads"]): r for r in results}
    lines = [
        "# GPart element-wise kernels: ns per weight",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Machine: {meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}, {meta['compiler']}; "
        f"{meta['date']}. Load average (1, 5, 15 min) before/after: {meta['loadavg_before']} / "
        f"{meta['loadavg_after']}. Other processes on a shared machine inflate the medians (a load above the "
        "core count means the threads waited for cores); the minimum over rounds is the figure on idle cores. "
        "CPU: process CPU time, all threads together (the core time a pass costs; about threads x wall when "
        "the threads had their cores).",
        "",
        f"Partition: D = {meta['D']:,}, d = {meta['d']:,}; one slice of {meta['weights']:,} weights "
        f"({meta['shape'][0]} x {meta['shape'][1]}); the reference on {meta['ref_weights']:,} weights. "
        f"{meta['repeats']} interleaved rounds per thread count.",
        "",
        "| backend | path | threads | ns/weight (median) | ns/weight (min) | CPU ns/weight (median) "
        "| CPU ns/weight (min) | speed-up vs reference (median) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        base = by.get(("reference", _reference_key(r["path"]), r["threads"]))
        speedup = "" if base is None or r["backend"] == "reference" else \
            f"{base['ns_per_weight_median'] / r['ns_per_weight_median']:.0f}x"
        lines.append(f"| {r['backend']} | {r['path']} | {r['threads']} | {r['ns_per_weight_median']:.2f} | "
                     f"{r['ns_per_weight_min']:.2f} | {r.get('cpu_ns_per_weight_median', float('nan')):.2f} | "
                     f"{r.get('cpu_ns_per_weight_min', float('nan')):.2f} | {speedup} |")
    est = meta.get("step_estimate")
    if est:
        lines += [
            "",
            f"Per training step on the RoBERTa-base all-linear shape (D = {meta['D']:,} weights; every weight",
            "passes through the forward update, the backward recompute and the gradient scatter), from the",
            "table above; the GEMM floor is 2.6 s (a hand check in 2026-11; batch 8 x 128, 2 cores):",
            "",
            "| schedule | threads | ns/weight/step (median / min) | s/step (median / min) "
            "| share of the floor (median / min) | CPU ns/weight/step (median / min) |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for row in est:
            lines.append(f"| {row['schedule']} | {row['threads']} | {row['ns_median']:.2f} / {row['ns_min']:.2f} | "
                         f"{row['s_median']:.3f} / {row['s_min']:.3f} | "
                         f"{row['share_median']:.1%} / {row['share_min']:.1%} | "
                         f"{row['cpu_ns_median']:.2f} / {row['cpu_ns_min']:.2f} |")
    (out_dir / "kernels.md").write_text("\n".join(lines) + "\n")


def step_estimates(results, D):
    rows = []
    for threads in sorted({r["threads"] for r in results}, reverse=True):
        sel = [r for r in results if r["threads"] == threads]
        med = {(r["backend"], r["path"]): r["ns_per_weight_median"] for r in sel}
        mn = {(r["backend"], r["path"]): r["ns_per_weight_min"] for r in sel}
        cmed = {(r["backend"], r["path"]): r.get("cpu_ns_per_weight_median", float("nan")) for r in sel}
        cmn = {(r["backend"], r["path"]): r.get("cpu_ns_per_weight_min", float("nan")) for r in sel}

        def add(name, keys):
            if all(k in med for k in keys):
                a, b = sum(med[k] for k in keys), sum(mn[k] for k in keys)
                rows.append({"schedule": name, "threads": threads, "ns_median": a, "ns_min": b,
                             "s_median": a * D * 1e-9, "s_min": b * D * 1e-9,
                             "share_median": a * D * 1e-9 / STEP_FLOOR_S, "share_min": b * D * 1e-9 / STEP_FLOOR_S,
                             "cpu_ns_median": sum(cmed[k] for k in keys), "cpu_ns_min": sum(cmn[k] for k in keys)})

        add("reference: delta, add, delta, add, grad",
            [("reference", "delta"), ("memory floor (torch)", "add"), ("reference", "delta"),
             ("memory floor (torch)", "add"), ("reference", "grad")])
        add("cpp via gpart.functional as it is: delta, add, delta, add, grad",
            [("cpp", "delta"), ("memory floor (torch)", "add"), ("cpp", "delta"), ("memory floor (torch)", "add"),
             ("cpp", "grad")])
        add("cpp fused: merged, merged, grad", [("cpp", "merged"), ("cpp", "merged"), ("cpp", "grad")])
        for backend in sorted({r["backend"] for r in sel if r["backend"].startswith("cpp")}):
            add(f"{backend}, backward in one sweep: merged, merge+grad",
                [(backend, "merged"), (backend, "merge+grad")])
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 1], help="thread counts to measure")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--shape", type=int, nargs=2, default=[768, 3072])
    ap.add_argument("--D", type=int, default=ROBERTA_BASE_ALL_LINEAR_D)
    ap.add_argument("--d", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--ref-len", type=int, default=1 << 17, help="weights in the reference's slice")
    ap.add_argument("--out-dir", default=str(ROOT / "docs" / "benchmarks"))
    ap.add_argument("--baseline-rev", default=None,
                    help="also time the C++ kernels of this git revision (e.g. HEAD) in the same rounds")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    available = cpu.available()  # builds on first use; not timed below
    build_s = time.perf_counter() - t0
    paths, n, nref = build_paths(args)
    before = loadavg()
    results = [r for t in args.threads for r in measure(paths, args.repeats, args.warmup, t)]
    after = loadavg()
    given = sys.argv[1:] if argv is None else list(argv)
    cmd = " ".join(["python benchmarks/kernel_speed.py", *given])
    meta = {
        "command": cmd.strip(),
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "compiler": _compiler(),
        "cpp_available": available,
        "first_use_seconds": round(build_s, 2),
        "D": args.D,
        "d": args.d,
        "shape": args.shape,
        "weights": n,
        "ref_weights": nref,
        "repeats": args.repeats,
        "loadavg_before": before,
        "loadavg_after": after,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    meta["step_estimate"] = step_estimates(results, args.D)
    write_report(results, meta, Path(args.out_dir))
    print((Path(args.out_dir) / "kernels.md").read_text())


if __name__ == "__main__":
    main()
