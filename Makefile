# emerg-stream developer commands. `make help` lists them.
PY ?= python
PYTEST_ARGS ?=

.PHONY: help setup lint format test test-all demo bench

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-10s %s\n", $$1, $$2}'

setup: ## install torch (CPU build) and the project with dev extras into the current env
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e '.[dev]'

lint: ## ruff (lint + format check) and mypy strict
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: ## apply ruff's formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: ## the default test run: unit + integration (real embedded broker), no slow tests
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-all: ## every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

demo: ## the main job end to end on ml-100k (see README)
	$(PY) -m emerg_stream.cli demo

bench: ## quick benchmarks (JSON + markdown table)
	$(PY) benchmarks/run_all.py --quick
