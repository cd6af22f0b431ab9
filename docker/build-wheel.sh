#!/usr/bin/env bash
# Build the llama-cpp-python 0.3.36 wheel for one target, the way the images do (Dockerfile.cpu/.cuda RUN it).
#
#   docker/build-wheel.sh cpu|cuda|metal [OUT_DIR]        (OUT_DIR default: ./wheels)
#
# cpu, cuda: GGML_NATIVE=OFF with runtime CPU variants (GGML_BACKEND_DL=ON, GGML_CPU_ALL_VARIANTS=ON): the CPU code
#   is built once per x86-64 level (sse42 … haswell … zen4, sapphirerapids) and ggml picks the best one for the
#   machine it runs on. cuda adds -DGGML_CUDA=on for CUDA_ARCHS (default 80;86;89;90: A100, A10/3090, L4/L40/4090,
#   H100/H200). The backends are dynamically loaded modules; they are installed into llama_cpp/lib, beside
#   libggml.so, and the worker (worker/engine/llama.py) loads them from there before it initialises llama.cpp.
# metal: Apple GPUs (macOS), a plain build: -DGGML_METAL=on.
#
# Environment:
#   LLAMA_CPP_SRC   what to build: default "llama-cpp-python==0.3.36" from PyPI; or a path to its sdist or tree
#   CUDA_ARCHS      CMAKE_CUDA_ARCHITECTURES for cuda (default "80;86;89;90")
#   OFFLINE=1       no downloads: --no-build-isolation --no-index (scikit-build-core, cmake and ninja installed)
#   PYTHON          the interpreter (default: python3)
#   JOBS            parallel compile jobs (default: all cores)
#   EXTRA_CMAKE_ARGS  appended to the CMake arguments
#   PREBUILT        a wheel this script already built for TARGET: no compile, only copied to OUT_DIR and checked
#                   (the images' LLAMA_CPP_WHEEL build argument, so that CI compiles llama.cpp once)
#   DROP_CPU_VARIANTS  CPU variants taken out of the wheel (cpu, cuda; default: sapphirerapids). Its AMX code
#                   (tilezero) dies with SIGILL on a VM that reports AMX: seen on this project's Firecracker VMs on
#                   Sapphire Rapids, found by tests/image. ggml then picks the next best variant (zen4: AVX-512 with
#                   VNNI and BF16). DROP_CPU_VARIANTS= keeps it, for hosts where AMX works.
set -euo pipefail

TARGET=${1:?usage: build-wheel.sh cpu|cuda|metal [OUT_DIR]}
OUT=${2:-wheels}
PYTHON=${PYTHON:-python3}
LLAMA_CPP_VERSION=0.3.36
SRC=${LLAMA_CPP_SRC:-llama-cpp-python==${LLAMA_CPP_VERSION}}
CUDA_ARCHS=${CUDA_ARCHS:-80;86;89;90}
DROP_CPU_VARIANTS=${DROP_CPU_VARIANTS-sapphirerapids}

# Shared by cpu and cuda. CMAKE_INSTALL_BINDIR: ggml installs its dynamically loaded backends there; inside
# the wheel, llama_cpp/lib keeps them next to libggml.so (the default, bin/, would land in site-packages/bin).
# LLAVA_BUILD=OFF: the worker needs no multimodal library (llama_cpp imports it only for vision chat handlers).
# llama.cpp's tests, examples and tools are off already (a subdirectory build). Its common library (a third of
# the compile, measured) is forced on by llama-cpp-python and installed, so no option leaves it out.
DL_ARGS="-DGGML_NATIVE=OFF -DGGML_BACKEND_DL=ON -DGGML_CPU_ALL_VARIANTS=ON -DCMAKE_INSTALL_BINDIR=llama_cpp/lib"
DL_ARGS="$DL_ARGS -DLLAVA_BUILD=OFF"

case "$TARGET" in
  cpu)   CMAKE_ARGS="$DL_ARGS" ;;
  cuda)  CMAKE_ARGS="$DL_ARGS -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=${CUDA_ARCHS}" ;;
  metal) CMAKE_ARGS="-DGGML_METAL=on -DLLAVA_BUILD=OFF" ;;
  *) echo "build-wheel.sh: unknown target '$TARGET' (cpu, cuda or metal)" >&2; exit 2 ;;
esac
CMAKE_ARGS="$CMAKE_ARGS ${EXTRA_CMAKE_ARGS:-}"
export CMAKE_ARGS
export CMAKE_BUILD_PARALLEL_LEVEL=${JOBS:-$(getconf _NPROCESSORS_ONLN)}

# --no-cache-dir: pip's wheel cache keys on the version, not on CMAKE_ARGS, and would hand a CPU build to cuda.
PIP_FLAGS=(--no-cache-dir --no-deps --no-binary llama-cpp-python --wheel-dir "$OUT")
if [ "${OFFLINE:-0}" = 1 ]; then
  PIP_FLAGS+=(--no-build-isolation --no-index)
fi

mkdir -p "$OUT"
if [ -n "${PREBUILT:-}" ]; then
  echo "build-wheel.sh: $TARGET: prebuilt $PREBUILT"
  cp "$PREBUILT" "$OUT"/
else
  echo "build-wheel.sh: $TARGET: CMAKE_ARGS=$CMAKE_ARGS (jobs: $CMAKE_BUILD_PARALLEL_LEVEL)"
  start=$(date +%s)
  "$PYTHON" -m pip wheel "${PIP_FLAGS[@]}" "$SRC"
fi
wheels=("$OUT"/llama_cpp_python-"${LLAMA_CPP_VERSION}"-*.whl)
wheel=${wheels[0]}
[ -n "${PREBUILT:-}" ] || echo "build-wheel.sh: built $wheel in $(( $(date +%s) - start )) s"

# Drop DROP_CPU_VARIANTS (file and RECORD line); then the wheel must hold what the target promises: the CPU
# variants (and the CUDA backend) in llama_cpp/lib.
"$PYTHON" - "$wheel" "$TARGET" "$DROP_CPU_VARIANTS" <<'EOF'
import os, sys, zipfile
wheel, target, drop = sys.argv[1], sys.argv[2], sys.argv[3].split() if sys.argv[3:] else []
if target in ("cpu", "cuda") and drop:
    gone = {f"llama_cpp/lib/libggml-cpu-{v}.so" for v in drop}
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(wheel + ".tmp", "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename in gone:
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if line.split(b",")[0].decode() not in gone)
            dst.writestr(info, data)
    os.replace(wheel + ".tmp", wheel)
    print("build-wheel.sh: dropped CPU variants", " ".join(drop))
names = [n for n in zipfile.ZipFile(wheel).namelist() if n.startswith("llama_cpp/lib/")]
libs = sorted({n.rsplit("/", 1)[1].split(".so")[0].removesuffix(".dylib") for n in names
               if ".so" in n or n.endswith(".dylib")})
print("build-wheel.sh: llama_cpp/lib holds", " ".join(libs))
missing = []
if target in ("cpu", "cuda"):
    variants = [n for n in libs if n.startswith("libggml-cpu-")]
    if len(variants) < 2:
        missing.append("CPU variants libggml-cpu-*.so")
    if target == "cuda" and "libggml-cuda" not in libs:
        missing.append("libggml-cuda.so")
for need in ("libllama", "libggml", "libggml-base"):
    if need not in libs:
        missing.append(need)
if missing:
    sys.exit("build-wheel.sh: the wheel lacks " + ", ".join(missing))
EOF
