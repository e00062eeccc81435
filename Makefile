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

.PHONY: venv test lint serve tiny triton clean gpu-bundle

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
	$(PY) -m ruff check --select F qwen3vl_backend qwen3vl_kernels openai_frontend client benchmarks tests model_repository

test: venv lint
	QWEN3VL_TEST_CACHE=$(CACHE)/tests $(PY) -m pytest -q --durations=15 $(PYTEST_ARGS)

serve: venv tiny triton
	$(PY) -m qwen3vl_backend.launch --model-path $(MODEL) --host 127.0.0.1 --port 8000 --enable-metrics --enable-cache-report

# For the GPU machine (Python 3.12, its own torch, no package index): Triton + numpy<2 + the
# serving packages it lacks, as wheels in .gpu-bundle (source .gpu-bundle/activate.sh there).
# decord (13.6 MB, one wheel for every Python 3) is its video decoder: without one, video is refused.
GPU_WHEELS := fastapi==0.163.2 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated_types==0.8.0 \
	typing_extensions==4.16.0 typing_inspection==0.4.5 uvicorn==0.54.0 httptools==0.7.1 uvloop==0.23.0 \
	pybase64==1.5.1 simplejpeg==1.9.0 pyspng==0.1.4 deflate==0.9.0 opentelemetry_api==1.45.2 importlib_metadata==10.2.0 decord==0.6.0
# llguidance's wheel is tagged manylinux_2_31, a platform bundle.sh does not ask for
GPU_WHEELS_2_31 := llguidance==1.9.1
gpu-bundle:
	bash ../shared/gpu-host/bundle.sh .gpu-bundle $(GPU_WHEELS)
	python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_31_x86_64 -d .gpu-bundle/wheels $(GPU_WHEELS_2_31)
	cp ../shared/gpu-host/activate.sh .gpu-bundle/

clean:
	rm -rf $(VENV) $(CACHE) .pytest_cache
