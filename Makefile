# emerg-stream developer commands. `make help` lists them.
# Every target runs inside ./.venv, created on first use (torch 2.13.0 first, pinned so the
# project's range never resolves to another release, then the project with its dev extras;
# PyPI's Linux wheel is the CUDA build, several GB, and runs on the CPU without a GPU).
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help setup lint format test test-all test-kafka test-registry kafka schema-registry demo bench config-doc infra

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP) ## create ./.venv with torch (CPU) and the project (dev extras)

lint: $(STAMP) ## ruff (lint + format check) and mypy strict
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy

format: $(STAMP) ## apply ruff's formatting and safe fixes
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

test: $(STAMP) ## the default test run: unit + integration (real embedded broker), no slow tests
	$(PY) -m pytest -m "not slow and not gpu" $(PYTEST_ARGS)

test-kafka: $(STAMP) ## every integration test on Apache Kafka (Java 17+, Maven; jars fetched once)
	EMERG_TEST_BROKER=kafka $(PY) -m pytest -m "integration and not slow and not gpu" tests/integration $(PYTEST_ARGS)

kafka: $(STAMP) ## run Apache Kafka on 127.0.0.1 (PLAINTEXT + SASL_SSL/SCRAM) until Ctrl-C
	$(VENV)/bin/emerg-stream broker --kafka

test-registry: $(STAMP) ## the schema-registry tests on a real registry (Apicurio, built once with Maven; Java 17+)
	$(PY) -m emerg_stream.stream.schema_registry_server --build-only
	EMERG_TEST_SCHEMA_REGISTRY=apicurio $(PY) -m pytest -m "integration and not slow and not gpu" tests/integration/test_schema_registry.py $(PYTEST_ARGS)

schema-registry: $(STAMP) ## run Apicurio Registry (Confluent-compatible API) on 127.0.0.1 until Ctrl-C
	$(PY) -m emerg_stream.stream.schema_registry_server

test-all: $(STAMP) ## every test, slow ones included
	$(PY) -m pytest $(PYTEST_ARGS)

test-gpu: $(STAMP) ## the CUDA variants of the device tests (a machine with a GPU)
	$(PY) -m pytest -m gpu $(PYTEST_ARGS)

demo: $(STAMP) ## the main job end to end on ml-100k: broker, train/reuse, worker, replay, table
	$(VENV)/bin/emerg-stream demo --reuse

bench: $(STAMP) ## quick benchmarks (JSON + markdown tables)
	$(PY) benchmarks/run_all.py --quick

config-doc: $(STAMP) ## regenerate docs/CONFIGURATION.md from the settings classes
	$(VENV)/bin/emerg-stream config doc > docs/CONFIGURATION.md

infra: $(STAMP) ## regenerate infra/topics.yaml and the ConfigMap's topic names from emerg_stream/topic_roles.py
	$(VENV)/bin/python -m emerg_stream.topic_roles .
