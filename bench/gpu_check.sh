#!/usr/bin/env bash
# The CUDA paths measured on one GPU in one run (issue 18): pretraining GPT-2 124M (bf16, compile),
# the modern preset with Muon, exact resume after a kill, fine-tuning, generation with the KV cache,
# and the loop's host-device syncs under the profiler. One JSON file: OUT_DIR/gpu_check.json.
#
#   bench/gpu_check.sh OUT_DIR                  # on a GPU machine (~5 min on an H100/H200)
#   bench/gpu_check.sh OUT_DIR --cpu-smoke      # tiny sizes on a CPU: checks this script
#   bench/gpu_check.sh OUT_DIR --only profile   # some parts again
#
# Runs from a source checkout with no install (PYTHONPATH); the machine's python3 needs torch, typer,
# tokenizers, safetensors, rich, pyyaml, numpy, jinja2. Data: $LLMSTAGES_DATA (or --data DIR) holding
# gutenberg/, gpt2-tokenizer/, sms_spam/ and instruction-data.json. Fails on the first error (exit 1).
set -euo pipefail
if [[ $# -lt 1 || $1 == -* ]]; then
    echo "usage: bench/gpu_check.sh OUT_DIR [--cpu-smoke] [--only PART,...] [--data DIR]" >&2
    exit 2
fi
out=$1
shift
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec "${PYTHON:-python3}" "$repo/bench/gpu_check.py" --out "$out" "$@"
