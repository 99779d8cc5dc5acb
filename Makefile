# kiln: `make demo` runs the main job, `make test` the test suite. Both create .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PYTHON ?= python3
# The CPU build of torch goes in first, so that resolving `torch` never pulls CUDA wheels.
TORCH ?= torch==2.13.0

.PHONY: demo test lint bench-compile clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e ".[dev,mlir]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/kiln compile llama-tiny --dump-dir demo-dumps
	$(VENV)/bin/kiln export-onnx llama-tiny -o demo-dumps/llama-tiny.onnx

test: $(VENV)/.installed
	KILN_DEBUG=1 $(PY) -m pytest -q -n 2 --durations=15 tests

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check compiler passes backends runtime tests examples benchmarks

bench-compile: $(VENV)/.installed
	$(PY) benchmarks/bench_compile_time.py

clean:
	rm -rf $(VENV) demo-dumps .pytest_cache
