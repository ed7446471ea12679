#!/usr/bin/env bash
# Create .venv (once) and install gpart with its test, training, data, hub, llm (bitsandbytes, TRL) and eval
# (lm-evaluation-harness) extras,
# and Triton (gpu extra: on a machine without a GPU the tests run the Triton kernels under its interpreter).
#
# torch is installed first and must be a CPU build, so that no dependency pulls a multi-GB CUDA build.
# pip's resolution is checked before anything is downloaded: where the configured indexes offer only a
# CUDA build (plain Linux), set GPART_TORCH_INDEX to PyTorch's CPU wheel index (PyTorch's install
# instructions, "Compute Platform: CPU") or install a CPU torch into .venv first.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.gpart-installed
torch_spec="torch==${GPART_TORCH_VERSION:-2.13.0}"

install_cpu_torch() {
  if [ -n "${GPART_TORCH_INDEX:-}" ]; then
    "$VPY" -m pip install -q --index-url "$GPART_TORCH_INDEX" "$torch_spec"
    return
  fi
  local report
  report=$(mktemp)
  "$VPY" -m pip install -q --dry-run --ignore-installed --report "$report" "$torch_spec"
  if ! "$VPY" - "$report" <<'PYEOF'
import json, sys
install = json.load(open(sys.argv[1]))["install"]
torch = next(i["metadata"]["version"] for i in install if i["metadata"]["name"].lower() == "torch")
cuda = sorted(i["metadata"]["name"] for i in install if i["metadata"]["name"].lower().startswith("nvidia-"))
if cuda and "+cpu" not in torch:
    sys.exit(f"bootstrap: pip would install torch {torch}, a CUDA build (with {', '.join(cuda[:3])}, ...). "
             "Set GPART_TORCH_INDEX to PyTorch's CPU wheel index (its install instructions, Compute Platform: "
             "CPU) and rerun, or install a CPU torch into .venv first.")
PYEOF
  then
    rm -f "$report"
    exit 1
  fi
  rm -f "$report"
  "$VPY" -m pip install -q "$torch_spec"
}

# src/_gpart_autoload.py is copied into site-packages (also by an editable install): a change needs a reinstall
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/bootstrap.sh -nt "$stamp" ] \
   || [ src/_gpart_autoload.py -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    install_cpu_torch
  fi
  "$VPY" -c "import torch; print('bootstrap: torch', torch.__version__, '(CUDA build)' if torch.version.cuda else '(CPU build)')"
  "$VPY" -m pip install -q -e ".[test,train,data,hub,llm,eval,gpu]"
  touch "$stamp"
fi
