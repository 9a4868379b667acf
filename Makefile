# gradest: `make run` trains the default experiment, `make test` runs the suite. `make help` lists targets.
# Everything installs from this file: uv is bootstrapped into .uv-bin/ when it is not on PATH.

SHELL := /bin/bash
PY_BOOT ?= python3
UV := $(shell command -v uv 2>/dev/null || echo $(CURDIR)/.uv-bin/bin/uv)
# The data root: $DATA_ROOT if set, else ../shared/data when it exists (this workplace), else the
# default of conf/data/*.yaml (~/.cache/gradest/data, downloaded on first use).
DATA_ROOT ?= $(if $(wildcard ../shared/data/binarized_mnist),$(abspath ../shared/data),)
export DATA_ROOT
RUN_ARGS ?=
# pytest workers (pytest-xdist): one per core of the 2-core CI machine; TEST_WORKERS=0 runs in one process
TEST_WORKERS ?= 2

.PHONY: help install run test test-fast lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*?## "}; {printf "  %-10s %s\n", $$1, $$2}'

$(CURDIR)/.uv-bin/bin/uv:
	$(PY_BOOT) -m venv $(CURDIR)/.uv-bin
	$(CURDIR)/.uv-bin/bin/pip install --quiet --disable-pip-version-check uv

.venv/.installed: pyproject.toml uv.lock | $(UV)
	$(UV) sync --frozen --all-extras
	@touch $@

install: .venv/.installed ## create .venv from uv.lock (torch, hydra, wandb, ... and the dev tools)

run: install ## train the default experiment (SBN 200-784, binarized MNIST); RUN_ARGS="key=value ..." adds overrides
	$(UV) run --frozen python run.py $(RUN_ARGS)

test: install ## run the whole test suite (offline; real-data tests run when DATA_ROOT holds the files)
	$(UV) run --frozen python -m pytest -n $(TEST_WORKERS)

test-fast: install ## the suite without the slow statistical and end-to-end tests
	$(UV) run --frozen python -m pytest -n $(TEST_WORKERS) -m "not slow"

lint: install ## ruff check and format check
	$(UV) run --frozen ruff check .
	$(UV) run --frozen ruff format --check .

format: install ## ruff fix and format
	$(UV) run --frozen ruff check --fix .
	$(UV) run --frozen ruff format .

bench: install ## benchmarks: training steps/s per model and estimator, variance-measurement time, mixture rsample
	$(UV) run --frozen python bench/bench_train.py
	$(UV) run --frozen python bench/bench_estimators.py
	$(UV) run --frozen python bench/bench_mixture.py --quick

clean: ## remove the environment and run outputs (keeps nothing under outputs/)
	rm -rf .venv .uv-bin outputs multirun .pytest_cache .ruff_cache
