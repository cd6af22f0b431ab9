source .gpu-kit/setup.sh
export PYTHONPATH=$PWD:$PYTHONPATH
M=/tmp/m1b-Q4_K_M.gguf
[ -f "$M" ] || python3 .gpu-kit/synth_gguf.py .gpu-kit/ggml-vocab-llama-bpe.gguf /tmp/m1b.gguf 1b --quant Q4_K_M >/tmp/synth.log 2>&1
llama-bench -m "$M" -p 0 -n 256 -ngl 99 -fa 1 -o md | grep tg
python3 -m bench.sampling_probe --model $M --threads 4 --variants gpu
run() {
  label=$1; shift
  env "$@" timeout 200 python3 -m worker --model "$M" --port 18500 --parallel 1 --ctx-size 512 --flash-attn on > /tmp/w.log 2>&1 &
  pid=$!
  for _ in $(seq 100); do curl -sf localhost:18500/v1/ready >/dev/null && break; sleep 0.2; done
  python3 -m bench.load --url http://127.0.0.1:18500 --streams 1 --tokens 16 >/dev/null
  echo "$label: $(python3 -m bench.load --url http://127.0.0.1:18500 --streams 1 --tokens 256 --rounds 3 | tail -1)"
  kill -TERM $pid; wait $pid
  grep -o 'engine_stats: [^(]*' /tmp/w.log
}
run log
run nolog X_NOLOG=1
run log2
run nolog2 X_NOLOG=1
llama-bench -m "$M" -p 0 -n 256 -ngl 99 -fa 1 -o md | grep tg
