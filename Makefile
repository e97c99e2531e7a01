# tide: every target that needs Python depends on the venv, so any of them works as the first command.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CACHE  ?= runs/digits.zarr
SAES   ?= runs/saes
SPLICE_OUT ?= runs/splice
STEER_OUT  ?= runs/steer-demo

.PHONY: setup harvest train splice steer-demo eval test test-all bench lint demo-model demo-grid clean

setup: $(STAMP)

# torch goes in first: on a machine without CUDA a pinned CPU build, so nothing pulls GBs of CUDA wheels.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@if $(BIN)/python -c "import torch" 2>/dev/null; then echo "torch already installed"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install -q torch; \
	else $(BIN)/pip install -q torch==2.13.0; fi
	@# The distribution was called `tide` before (now tide-sae): its editable install would map the same package.
	@if $(BIN)/pip show -q tide 2>/dev/null; then $(BIN)/pip uninstall -q -y tide; fi
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

harvest: $(STAMP)
	$(BIN)/tide harvest --out $(CACHE)

train: $(STAMP)
	@test -d $(CACHE) || $(MAKE) harvest
	$(BIN)/tide train --store $(CACHE) --out $(SAES)

# SAEs inside the denoising loop: fidelity recovered (tide splice) and steering digits into chosen classes.
splice: $(STAMP)
	@test -d $(SAES) || $(MAKE) train
	$(BIN)/tide splice $(SAES) --num-samples 40 --batch-size 40 --out $(SPLICE_OUT) --overwrite

steer-demo: $(STAMP)
	@test -d $(SAES) || $(MAKE) train
	$(BIN)/python -m tide.train.loop.steer_demo --saes $(SAES) --out $(STEER_OUT) --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest -q --durations=15

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python -m tests.bench

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

demo-model: $(STAMP)
	$(BIN)/tide demo-model train

demo-grid: $(STAMP)
	$(BIN)/tide demo-model grid

clean:
	rm -rf runs .pytest_cache
