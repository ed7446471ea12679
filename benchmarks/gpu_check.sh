#!/usr/bin/env bash
# Issue 3's GPU check in one command, for a machine with a CUDA GPU and PyTorch, transformers, peft and
# Triton already installed (the lent H200 has them; a missing package can travel as wheels in .whl/).
# About 6 minutes on an H200. Everything it measures lands in $OUT (default /tmp/gpart-gpu):
#   env.txt             versions, GPU
#   tests.log           every test marked cuda: tests/test_cuda.py (compiled Triton kernels and a CUDA training
#                       step against the CPU reference), the partition's and the bitsandbytes wrappers' CUDA tests
#   step_time-*.{json,md,png}   bf16 Llama decoder with Qwen2.5-0.5B's dimensions, random init, every linear
#                       layer, d = 524,288, batch 8 x 512: GPart, GPart on partition version 1, the floor and
#                       LoRA r=8 (issue 3's goal: GPart <= 1.15x the floor)
#   kernels.{json,md}   the element-wise kernels alone (Triton on the GPU, both partition versions)
# Copy those files into docs/benchmarks/gpu/ and quote them in docs/performance.md.
#
#   bash benchmarks/gpu_check.sh             # on the GPU machine
#   bash benchmarks/gpu_check.sh --dry-run   # anywhere, on the CPU with tiny sizes: checks the script itself
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpart-gpu}
PY=${PY:-python3}
mkdir -p "$OUT"
if [ "${1:-}" = "--dry-run" ]; then
  DEVICE=cpu SHAPE=tiny-llama DTYPE=float32 BATCH="--batch 2 --seq 16" D=64 REPEATS=1
  KERNELS=(--threads 1 --repeats 2 --shape 64 64 --D 100000 --d 1000 --ref-len 4096)
else
  DEVICE=cuda SHAPE=llama-0.5b DTYPE=bfloat16 BATCH="--batch 8 --seq 512" D=524288 REPEATS=3
  KERNELS=(--threads 16 --repeats 11 --shape 8192 4096 --D 357826560 --d 524288)
fi
if compgen -G ".whl/*.whl" > /dev/null; then  # packages carried as wheels (docs/benchmarks/README.md)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
CUDA_TESTS="tests/test_cuda.py tests/test_partition.py tests/test_quantized.py"  # every file with a cuda mark
status=0
"$PY" - <<'EOF' 2>&1 | tee "$OUT/env.txt" || status=1
import importlib, torch
for name in ("torch", "transformers", "peft", "accelerate", "triton"):
    try:
        print(name, importlib.import_module(name).__version__)
    except ImportError as e:
        print(name, "MISSING", e)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF
"$PY" -m pytest -q -rs -p no:cacheprovider $CUDA_TESTS -m cuda \
  2>&1 | tee "$OUT/tests.log" || status=1
"$PY" benchmarks/step_time.py --shape "$SHAPE" --targets all --d "$D" $BATCH --dtype "$DTYPE" --device "$DEVICE" \
  --methods gpart,gpart-v1,floor,lora-r8 --repeats "$REPEATS" --out-dir "$OUT" \
  --note "benchmarks/gpu_check.sh $*" 2>&1 | tee "$OUT/step_time.log" || status=1
"$PY" benchmarks/kernel_speed.py "${KERNELS[@]}" --out-dir "$OUT" 2>&1 | tail -n 20 || status=1
ls -l "$OUT"
exit $status
