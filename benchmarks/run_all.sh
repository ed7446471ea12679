#!/usr/bin/env bash
# The commands behind every step-time / setup / generation result in docs/benchmarks/ (about 2 hours on 2 shared CPU cores).
# Run from anywhere: bash benchmarks/run_all.sh. One run at a time: runs in parallel would time each other.
# Each command writes docs/benchmarks/<name>.{json,md,png}; each markdown carries its own command.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
run() { echo "== $*"; "$PY" benchmarks/step_time.py "$@"; }

# 7B-shaped Llama on the meta device: get_peft_model time and RSS growth (goal: <= 1 s, nothing ~ D)
run --shape llama-7b-meta --targets all --d 524288 --repeats 5
# the real all-MiniLM-L6-v2
run --shape minilm --targets qv --d 131072
run --shape minilm --targets all --d 131072
# RoBERTa-base shape
run --shape roberta-base --targets qv --d 131072
run --shape roberta-base --targets all --d 131072
# the current kernels, GPart / floor / LoRA r=8 only, 5 repeats (docs/performance.md quotes these; run them idle)
run --shape roberta-base --targets qv --d 131072 --methods gpart,floor,lora-r8 --repeats 5 --name step_time-roberta-base-qv-d131072-b8x128-kernels-v2
run --shape roberta-base --targets all --d 131072 --methods gpart,floor,lora-r8 --repeats 5 --name step_time-roberta-base-all-d131072-b8x128-kernels-v2-idle
# partition version 2 against version 1, the same build side by side (docs/performance.md quotes these)
run --shape roberta-base --targets all --d 131072 --methods gpart,gpart-v1,floor,lora-r8 --repeats 5 --name step_time-roberta-base-all-d131072-b8x128-partition-v2
OMP_WAIT_POLICY=PASSIVE "$PY" benchmarks/kernel_speed.py --repeats 31 --out-dir docs/benchmarks/partition-v2
# half precision: bf16 weights, and fp32 weights with the forward under bf16 autocast
run --shape roberta-base --targets all --d 131072 --methods gpart,floor,lora-r8 --dtype bfloat16
run --shape roberta-base --targets all --d 131072 --methods gpart,floor,lora-r8 --autocast bfloat16
# SmolLM2-135M shape (Llama decoder, causal LM loss)
run --shape smollm2-135m --targets qv --d 131072
# d sweep on RoBERTa-base query,value (d changes only GPart's and Uni-LoRA's cost)
run --shape roberta-base --targets qv --d 23040 --methods gpart,unilora,lora-r8,floor
run --shape roberta-base --targets qv --d 524288 --methods gpart,unilora,lora-r8,floor
# GPart's reference (plain PyTorch) path, to show what the fast kernels buy
GPART_KERNELS=reference run --shape minilm --targets all --d 131072 --methods gpart,lora-r8,floor
# greedy generation, batch 1: GPart with the eval cache on / off, merged, LoRA r=8, base (docs/llm.md quotes it)
"$PY" benchmarks/generation.py --repeats 7
"$PY" benchmarks/startup.py

"$PY" benchmarks/index.py
