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

.PHONY: install test coverage demo demo-docs bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadfile

# Line coverage of llmstages/ with the subprocesses counted (config: [tool.coverage.*] in pyproject.toml);
# fails when any module is under COVERAGE_FLOOR percent.
COVERAGE_FLOOR ?= 90
coverage: $(STAMP)
	rm -f .coverage .coverage.*
	COVERAGE_FILE=$(abspath .coverage) $(BIN)/python -m coverage run -m pytest -q -n 2 --dist loadfile
	$(BIN)/python -m coverage combine -q
	$(BIN)/python -m coverage report
	$(BIN)/python -m coverage json -q -o coverage.json
	$(BIN)/python tests/scripts/coverage_floor.py coverage.json $(COVERAGE_FLOOR)

# Results stay in the demo's store (store-demo/, ignored by git). `make demo-docs` copies the last demo's
# results and loss plot into docs/, the README's figures: run it only when the README is to change.
demo: $(STAMP)
	$(BIN)/python -m llmstages.demo

demo-docs: $(STAMP)
	$(BIN)/python -m llmstages.demo --publish docs

bench: $(STAMP)
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) store .pytest_cache .coverage .coverage.* coverage.json
