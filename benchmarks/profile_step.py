"""Where a training step's time goes: torch.profiler over a few steps of one benchmark shape and method.

    python benchmarks/profile_step.py --shape roberta-base --targets all --method gpart \
        --out docs/benchmarks/profile-roberta-base-all-gpart.txt

Builds the model exactly as step_time.py's workers do (bench_harness), runs 2 untimed steps, then profiles
3 steps and writes the operator table sorted by self time. GPart's element-wise sweeps show up as the
self time of `_GPartOp` (the forward merge) and `_GPartOpBackward` (the backward's merge + scatter): the
C++ kernels run inside them. The profiler's times are wall time on the calling thread.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "src"), str(HERE.parent / "studies")]  # studies/: the one script loader
from study_scripts import load_script  # noqa: E402


def main(argv=None) -> int:
    H = load_script("benchmarks/bench_harness.py")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=list(H.SHAPES), default="roberta-base")
    ap.add_argument("--targets", choices=("qv", "all"), default="all")
    ap.add_argument("--method", choices=H.METHODS, default="gpart")
    ap.add_argument("--d", type=int, default=131072)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--out", default=None, help="also write the table to this file")
    args = ap.parse_args(argv)

    import torch
    from torch.profiler import ProfilerActivity, profile

    family = H.SHAPES[args.shape].family
    model = H.build_model(args.shape, 0)
    batch = H.make_batch(model, family, args.batch, args.seq, 0, torch.device("cpu"))
    model, _ = H.apply_method(model, args.method, family, H.target_names(args.shape, args.targets), args.d, 0)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = None if args.method == "floor" else torch.optim.AdamW(params, lr=1e-4)

    def step():
        model(**batch).loss.backward()
        if opt is not None:
            opt.step()
        for p in params:
            p.grad = None

    for _ in range(2):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.steps):
            step()
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    header = (f"{' '.join(['python', 'benchmarks/profile_step.py', *(argv if argv is not None else sys.argv[1:])])}\n"
              f"{args.steps} profiled steps of {args.shape}, targets {args.targets}, method {args.method}, "
              f"d={args.d}, batch {args.batch}x{args.seq}, torch threads {torch.get_num_threads()}\n")
    print(header + table)
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(header + table + "\n")
        tmp.replace(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
