#!/usr/bin/env python
"""Start-up costs a user pays before any work: the interpreter with gpart's PEFT hook installed, and the
`gpart` command's help. Writes docs/benchmarks/startup.{json,md}.

    python benchmarks/startup.py [--repeats 21]

Each case runs as a fresh process, the cases interleaved repeat by repeat; medians are reported.
`_gpart_autoload` is the module gpart-autoload.pth imports at every interpreter start: its own import
time comes from `python -X importtime -c pass`.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GPART = shutil.which("gpart") or str(Path(sys.executable).with_name("gpart"))
CASES = {
    "python -c pass": [sys.executable, "-c", "pass"],
    "gpart --help": [GPART, "--help"],
    "gpart train --help": [GPART, "train", "--help"],
}


def autoload_import_us() -> float:
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", "pass"], capture_output=True, text=True).stderr
    # lines: "import time: self [us] | cumulative | imported package"
    return next(float(line.split("|")[1]) for line in err.splitlines() if line.rstrip().endswith("_gpart_autoload"))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=21)
    p.add_argument("--out-dir", default=str(ROOT / "docs" / "benchmarks"))
    args = p.parse_args()
    load = [os.getloadavg()[0]]
    wall = {name: [] for name in CASES}
    autoload = []
    for _ in range(args.repeats):
        for name, cmd in CASES.items():
            t = time.perf_counter()
            subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
            wall[name].append(time.perf_counter() - t)
        autoload.append(autoload_import_us())
    load.append(os.getloadavg()[0])
    result = {"created": datetime.now(timezone.utc).isoformat(timespec="seconds"), "repeats": args.repeats,
              "command": "python benchmarks/startup.py" + ("" if args.repeats == 21 else f" --repeats {args.repeats}"),
              "load_average": load, "median_wall_s": {k: statistics.median(v) for k, v in wall.items()},
              "wall_s": wall, "median_autoload_import_us": statistics.median(autoload), "autoload_import_us": autoload}
    out = Path(args.out_dir)
    (out / "startup.json").write_text(json.dumps(result, indent=1) + "\n")
    rows = "\n".join(f"| `{k}` | {v * 1000:.0f} |" for k, v in result["median_wall_s"].items())
    (out / "startup.md").write_text(
        f"# Start-up\n\nCommand: `{result['command']}`\n\nCreated {result['created']} on {os.cpu_count()} CPUs, "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end. Medians of {args.repeats} interleaved "
        f"runs, each a fresh process.\n\n| command | wall ms |\n|---|---|\n{rows}\n\n"
        f"`_gpart_autoload` (imported at every interpreter start by gpart-autoload.pth): "
        f"{result['median_autoload_import_us']:.0f} us of import time (`python -X importtime -c pass`, median).\n")
    print((out / "startup.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
