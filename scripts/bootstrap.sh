#!/usr/bin/env bash
# Create .venv (once) and install gpart with its test, training, data, hub, llm (bitsandbytes, TRL) and eval
# (lm-evaluation-harness) extras,
# and Triton (gpu extra: on a machine without a GPU the tests run the Triton kernels under its interpreter).
# torch is installed first, pinned to a CPU build, so that no dependency pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.gpart-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ scripts/bootstrap.sh -nt "$stamp" ]; then
  "$VPY" -m pip install -q --upgrade pip
  if ! "$VPY" -c "import torch" 2>/dev/null; then
    "$VPY" -m pip install -q "torch==${GPART_TORCH_VERSION:-2.13.0}"
  fi
  "$VPY" -m pip install -q -e ".[test,train,data,hub,llm,eval,gpu]"
  touch "$stamp"
fi
