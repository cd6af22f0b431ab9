#!/usr/bin/env bash
# One stream on the GPU: the in-process ceiling (bench/ceiling.py, sampling in the graph) against the worker with
# 1 and 32 slots, greedy and sampled, to see what a single stream pays for the worker and for idle slots.
set -uo pipefail
source .gpu-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
MODEL=${MODEL:-/tmp/m1b-Q4_K_M.gguf}
[ -f "$MODEL" ] || python3 .gpu-kit/synth_gguf.py .gpu-kit/ggml-vocab-llama-bpe.gguf /tmp/m1b.gguf 1b --quant Q4_K_M >/tmp/synth.log 2>&1
llama-bench -m "$MODEL" -p 0 -n 256 -ngl 99 -fa 1 -o md | grep tg
for s in "" --greedy; do
  echo "ceiling ${s:-sampled}: $(python3 -m bench.ceiling --model "$MODEL" --gpu-layers 99 --backend-sampling --streams 1 --tokens 256 $s)"
done
for slots in 1 32; do
  timeout 120 python3 -m worker --model "$MODEL" --port 18500 --parallel $slots --ctx-size 512 --flash-attn on > /tmp/w$slots.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf localhost:18500/v1/ready >/dev/null && break; sleep 0.2; done
  for s in "" --greedy; do
    python3 -m bench.load --url http://127.0.0.1:18500 --streams 1 --tokens 16 $s >/dev/null
    echo "worker --parallel $slots ${s:-sampled}: $(python3 -m bench.load --url http://127.0.0.1:18500 --streams 1 --tokens 256 --rounds 2 $s | tail -1)"
  done
  kill -TERM $pid; wait $pid
done
