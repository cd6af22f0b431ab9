#!/usr/bin/env bash
# Checks Dockerfile.cuda's recipe where no Docker engine runs: on the GPU machine (no network), from the repo root,
# with a carried folder $KIT (default .gpu-kit) holding llama_cpp_python-0.3.36-trimmed-sdist.tar.gz, whl/ (the
# worker's dependencies the machine lacks), synth_gguf.py and ggml-vocab-llama-bpe.gguf from the gpu-kit.
# The steps of the image, one by one:
#   1. builder: docker/build-wheel.sh cuda, offline, from the kit's sdist (build deps: the machine's
#      scikit-build-core, cmake, ninja, nvcc)
#   2. runtime: that wheel beside the worker (the worker's deps that the machine lacks come from the kit's whl/),
#      started as the images' console script does (python3 -m worker.cli: the worker loads the wheel's
#      dynamically built backends)
#   3. the worker serves a synthetic model with every layer on the GPU: /health, one generation, /metrics, SIGTERM
#
#   bash docker/device-check.sh            CUDA_ARCHS=90 by default, to fit in one 10-minute command; the image
#                                          builds 80;86;89;90 (CUDA_ARCHS="80;86;89;90" to check those too)
# Prints "device-check: PASS" at the end; the log of every step goes to $LOGS (default /tmp/device-check).
set -euo pipefail
KIT=${KIT:-.gpu-kit}
LOGS=${LOGS:-/tmp/device-check}
export CUDA_ARCHS=${CUDA_ARCHS:-90}
WHEELS=/tmp/device-check-wheels
SITE=/tmp/device-check-site
PORT=${PORT:-18080}
mkdir -p "$LOGS"
say() { echo "device-check: $*"; }
t0=$(date +%s)

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
nvcc --version | tail -n 1
python3 -c 'import scikit_build_core, sys; print("python", sys.version.split()[0], "scikit-build-core", scikit_build_core.__version__)' \
  || say "scikit-build-core is missing: the offline build needs it"

# 1. the builder stage's step (kept when it exists, so that a second call after a time-out goes on from here)
if ! compgen -G "$WHEELS/llama_cpp_python-0.3.36-*.whl" >/dev/null; then
  LLAMA_CPP_SRC=$KIT/llama_cpp_python-0.3.36-trimmed-sdist.tar.gz OFFLINE=1 PYTHON=python3 \
    bash docker/build-wheel.sh cuda "$WHEELS" 2>&1 | tee "$LOGS/build.log"
fi
say "wheel: $(ls "$WHEELS") ($(du -h "$WHEELS"/llama_cpp_python-*.whl | cut -f1)) at $(( $(date +%s) - t0 )) s"

# 2. the runtime stage's install: the built wheel, no prebuilt llama.cpp from the kit
rm -rf "$SITE"
python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$KIT"/whl/*.whl "$WHEELS"/llama_cpp_python-*.whl
export PYTHONPATH=$SITE:$PWD
unset LLAMA_CPP_LIB_PATH
python3 - <<'EOF' | tee "$LOGS/backends.txt"
from worker.llamacpp.backend import backends
from worker.narration import configure

configure(worker_id=None, level="warning")
for key, value in backends().items():
    print(f"{key}: {value}")
EOF
if ! grep -q "^backends: .*CUDA" "$LOGS/backends.txt"; then
  ldd "$SITE"/llama_cpp/lib/libggml-cuda.so* | grep "not found" || true   # why the module did not load
  say "FAIL: no CUDA backend loaded"; exit 1
fi
grep -q "^backends: .*CPU" "$LOGS/backends.txt" || { say "FAIL: no CPU backend loaded"; exit 1; }

# 3. serve a synthetic model on the GPU
python3 "$KIT/synth_gguf.py" "$KIT/ggml-vocab-llama-bpe.gguf" /tmp/device-check-model.gguf tiny >"$LOGS/synth.log" 2>&1
LLORCH_API_TOKEN=device-check python3 -m worker.cli --model /tmp/device-check-model.gguf \
  --config configs/cuda.toml --port "$PORT" --log-format json >"$LOGS/worker.log" 2>&1 &
pid=$!
set +e
python3 - "$PORT" <<'EOF' 2>&1 | tee "$LOGS/check.txt"
import json, sys, time, urllib.error, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
def get(path):
    with urllib.request.urlopen(base + path, timeout=10) as r:
        return r.status, r.read().decode()
deadline = time.time() + 180
while True:
    try:
        if get("/v1/ready")[0] == 200:
            break
    except (urllib.error.URLError, OSError):
        pass
    if time.time() > deadline:
        sys.exit("device-check: FAIL: not ready after 180 s")
    time.sleep(0.5)
health = json.loads(get("/health")[1])
print("health:", json.dumps(health))
assert health["status"] == "ready" and health["backend"] == "cuda", health
req = urllib.request.Request(base + "/v1/inference", method="POST", headers={
    "Authorization": "Bearer device-check", "Content-Type": "application/json"},
    data=json.dumps({"prompt": "Once upon a time", "max_tokens": 64, "temperature": 0, "stream": False,
                     "ignore_eos": True}).encode())
with urllib.request.urlopen(req, timeout=60) as r:
    out = json.loads(r.read())
print("inference:", json.dumps({k: out[k] for k in ("tokens_out", "ttft_ms", "tokens_per_sec", "stop_reason")}))
assert out["tokens_out"] == 64, out
import subprocess
try:
    apps = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                          capture_output=True, text=True).stdout.strip()
except OSError as exc:
    apps = str(exc)
print("nvidia-smi compute apps:", apps or "(none listed)")
metrics = get("/metrics")[1]
used = [line for line in metrics.splitlines() if line.startswith("llm_worker_device_memory_used_bytes")]
info = [line for line in metrics.splitlines() if line.startswith("llm_worker_model_info")]
print("\n".join(used + info))
assert info and 'backend="cuda"' in info[0], info
assert used and max(float(line.rsplit(" ", 1)[1]) for line in used) > 0, (
    "llm_worker_device_memory_used_bytes is missing or 0: worker/metrics.py must open libllama's own libggml "
    "(libggml.so.0), not a second copy (libggml.so) whose backend registry is empty in a GGML_BACKEND_DL build")
EOF
status=${PIPESTATUS[0]}
set -e
kill -TERM "$pid"
code=0; wait "$pid" || code=$?
grep -h "offloaded\|CUDA" "$LOGS/worker.log" | head -n 5 || true
tail -n 5 "$LOGS/worker.log"
say "worker exit code after SIGTERM: $code"
if [ "$status" != 0 ] || [ "$code" != 0 ]; then say "FAIL"; exit 1; fi
say "PASS in $(( $(date +%s) - t0 )) s (CUDA_ARCHS=$CUDA_ARCHS)"
