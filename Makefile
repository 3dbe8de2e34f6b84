# llmstages — the two README commands are `make demo` (the whole pipeline on a CPU) and `make test`.
# torch is installed first and pinned; TORCH=... picks another build (CPU-only or CUDA index), after `make clean`.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Real data for tests and the demo; CI points this at ../shared/data. Without a local copy the demo
# downloads from the recipes' URLs.
export LLMSTAGES_TEST_DATA ?= $(abspath ../shared/data)
export LLMSTAGES_DATA ?= $(wildcard $(abspath ../shared/data))

.PHONY: install test demo bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

demo: $(STAMP)
	$(BIN)/python -m llmstages.demo

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) store .pytest_cache
