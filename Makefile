# OrchestratR for Python: one virtual environment at .venv/, made and reused here.
#
#   make demo        run the one-process demo (needs only Python 3.11+)
#   make test        install, start the services, ruff, mypy, import-linter, the default test suite
#   make install     .venv/ with every distribution (editable), every extra, dev tools
#   make lint        ruff check + ruff format --check
#   make typecheck   mypy (strict, configured in pyproject.toml)
#   make layers      import-linter: the layer contracts in pyproject.toml
#   make test-slow   the minutes-long fault tests (pytest -m slow); also: make chaos
#   make chaos-record the quick chaos suite, figures into the tracked benchmarks/results/chaos.json
#   make chaos-cluster the cluster fault tests (pytest -m cluster; brings the RabbitMQ cluster up): docs/reliability.md
#   make test-rabbitmq4 the RabbitMQ tests and quick chaos variants on RabbitMQ 4.0.5 (.ci/infra rabbitmq4)
#   make bench       the benchmarks beside Celery and Dramatiq, PostgreSQL alone beside RabbitMQ, one vs four kinds (docs/benchmarks.md)
#   make bench-quick the same, scaled down (under 10 minutes)
#   make docs-images regenerate the dashboard screenshots in docs/images/ (browser tests)
#   make format      ruff format + ruff check --fix
#   make services    check and start PostgreSQL, MariaDB and RabbitMQ
#   make clean       remove .venv/ and caches
#
# Installs are skipped when nothing changed: a stamp file in .venv/ is newer
# than every pyproject.toml.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip install --quiet --disable-pip-version-check
PYTEST_ARGS ?=

PYPROJECTS := pyproject.toml $(wildcard orchestratr_*/pyproject.toml)
FULL_STAMP := $(VENV)/.installed-full
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: help install demo test test-slow chaos chaos-cluster chaos-record test-rabbitmq4 bench bench-quick docs-images lint typecheck format services clean

help:
	@grep -E '^#   make ' Makefile | sed 's/^#   //'

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
		{ echo "error: $(PYTHON) is $$($(PYTHON) --version 2>&1); OrchestratR needs Python 3.11+ (make PYTHON=python3.11 ...)" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

$(FULL_STAMP): $(BIN)/python $(PYPROJECTS)
	$(PIP) -e './orchestratr_core[web,otel]' -e ./orchestratr_memory -e './orchestratr_sql[all]' \
		-e ./orchestratr_rabbitmq -e '.[dev]'
	@touch $@ $(DEMO_STAMP)

# The demo needs the core, the memory backends and the SQLite storage only.
$(DEMO_STAMP): $(BIN)/python $(PYPROJECTS)
	$(PIP) -e ./orchestratr_core -e ./orchestratr_memory -e './orchestratr_sql[sqlite]'
	@touch $@

install: $(FULL_STAMP)

demo: $(DEMO_STAMP)
	$(BIN)/orchestratr demo

services:
	bash .ci/services

test: install services
	bash orchestratr_sql/scripts/install-odbc.sh
	bash tests/web/install-browser.sh
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports --no-cache
	@rc=0; $(BIN)/pytest $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest collected no tests (exit status 5)" >&2; fi; \
	exit $$rc

test-slow: install services
	$(BIN)/pytest -m slow $(PYTEST_ARGS)

chaos: test-slow

# Brings the three RabbitMQ nodes up (idempotent; left running: `bash .ci/infra rabbitmq-cluster down`).
chaos-cluster: install services
	bash .ci/infra rabbitmq-cluster up
	$(BIN)/pytest -m cluster $(PYTEST_ARGS)

# RabbitMQ 4.0.5 from a cached Debian trixie root (made once with debootstrap, a few minutes).
RABBITMQ4_CHAOS := test_kill_9_a_server or test_silent_partition or test_broker_restart
test-rabbitmq4: install services
	bash .ci/infra rabbitmq4 up
	ORCHESTRATR_TEST_BROKER=rabbitmq4 $(BIN)/pytest -m rabbitmq tests/rabbitmq $(PYTEST_ARGS)
	ORCHESTRATR_TEST_BROKER=rabbitmq4 $(BIN)/pytest tests/chaos/test_faults.py -k '$(RABBITMQ4_CHAOS)' $(PYTEST_ARGS)

chaos-record: install services
	ORCHESTRATR_CHAOS_RESULTS=record $(BIN)/pytest -q tests/chaos $(PYTEST_ARGS)

BENCH_STAMP := $(VENV)/.installed-bench

$(BENCH_STAMP): $(FULL_STAMP)
	$(PIP) -e '.[dev,bench]'
	@touch $@

bench: $(BENCH_STAMP) services
	$(BIN)/python -m benchmarks.run
	$(BIN)/python -m benchmarks.pg_transport
	$(BIN)/python -m benchmarks.kinds

bench-quick: $(BENCH_STAMP) services
	$(BIN)/python -m benchmarks.run --quick

# The browser tests write their screenshots to a temporary folder unless told where.
docs-images: install
	bash tests/web/install-browser.sh
	ORCHESTRATR_SCREENSHOTS=$(CURDIR)/docs/images $(BIN)/pytest tests/web/test_dashboard.py $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

.PHONY: layers
layers: install
	$(BIN)/lint-imports --no-cache

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
