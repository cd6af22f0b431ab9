#!/usr/bin/env bash
# Where a decode step's time goes, on the device machine (after bench/gpu.sh made the model):
# one stream greedy vs sampled (engine_stats: ms a step, queueing it and waiting for its tokens), then 32 streams under cProfile.
set -uo pipefail
source .gpu-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
MODEL=${MODEL:-/tmp/m1b-Q4_K_M.gguf}
run() {  # run NAME STREAMS TOKENS [load flags] -- [worker flags]
  local name=$1 streams=$2 tokens=$3 load_flags=$4; shift 4
  timeout 120 python3 -m worker --model "$MODEL" --port 18300 --parallel 32 --ctx-size 512 --batch-size 2048 \
    --flash-attn on "$@" > /tmp/$name.log 2>&1 &
  local pid=$!
  for _ in $(seq 100); do curl -sf localhost:18300/v1/ready >/dev/null && break; sleep 0.2; done
  timeout 60 python3 -m bench.load --url http://127.0.0.1:18300 --streams "$streams" --tokens "$tokens" $load_flags | tail -1
  kill -TERM $pid; wait $pid
  echo "$name: $(grep -o 'engine_stats: [^(]*' /tmp/$name.log)"
}
run greedy-1 1 256 --greedy
run sampled-1 1 256 ""
run sampled-32 32 256 ""
run profiled-32 32 128 "" --profile-dir /tmp/prof
python3 - <<'PY'
import pstats
for f in ("/tmp/prof/loop.prof", "/tmp/prof/scheduler.prof"):
    try:
        pstats.Stats(f).sort_stats("tottime").print_stats(14)
    except (FileNotFoundError, TypeError) as exc:
        print(f, exc)
PY
