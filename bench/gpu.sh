#!/usr/bin/env bash
# On the device machine, from the repo root, with .gpu-kit carried (see ../shared/gpu-kit/README.md):
#   bash bench/gpu.sh [1b|8b] [extra bench.gpu flags]
set -euo pipefail
SHAPE=${1:-1b}; shift || true
source .gpu-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
MODEL=/tmp/m$SHAPE-Q4_K_M.gguf
[ -f "$MODEL" ] || python3 .gpu-kit/synth_gguf.py .gpu-kit/ggml-vocab-llama-bpe.gguf /tmp/m$SHAPE.gguf $SHAPE --quant Q4_K_M >/tmp/synth.log 2>&1
python3 -m bench.gpu --model "$MODEL" --out "${OUT:-bench/results}" "$@"
