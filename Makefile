# Qwen3-VL on Triton Inference Server.
#   make test    create .venv from scratch (CPU torch) and run the test suite
#   make serve   set everything up and serve the embedded tiny model (MODEL=/path for a real one)
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
CACHE := .cache
TINY := $(CACHE)/tiny-moe
MODEL ?= $(TINY)
PYTEST_ARGS ?=

.PHONY: venv test lint serve tiny triton clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	# the Qwen vocabulary ships inside this wheel; its own dependencies are not needed
	$(PY) -m pip install -q --no-deps dashscope==2.0.2
	touch $@

tiny: venv
	@test -f $(TINY)/config.json || $(PY) -m qwen3vl_backend.tools.make_tiny_checkpoint $(TINY)

triton: venv
	@$(PY) -m qwen3vl_backend.tools.install_triton --dest $(CACHE)/triton

lint: venv
	$(PY) -m ruff check --select F qwen3vl_backend kernels openai_frontend client benchmarks tests model_repository

test: venv lint
	QWEN3VL_TEST_CACHE=$(CACHE)/tests $(PY) -m pytest -q $(PYTEST_ARGS)

serve: venv tiny triton
	$(PY) -m qwen3vl_backend.launch --model-path $(MODEL) --host 127.0.0.1 --port 8000 --enable-metrics --enable-cache-report

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
