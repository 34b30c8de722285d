# posttrade developer commands. Run from the repository root; the local stack keeps its data
# in ./.posttrade (git-ignored) unless POSTTRADE_HOME says otherwise.
#
#   make setup   .venv with posttrade and its dev tools, plus the pinned QuestDB jar
#   make up      everything locally: the servers, the six services, a demo feed (Ctrl-C stops); `make down` stops all
#   make test    unit tests, then integration tests (the dashboards in a real chromium, installed with apt
#                when missing) and the validation gate against a stack it starts and stops
#   make bench   every benchmarks/*.py against the stack; results in benchmarks/results/

SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# pip runs again only when pyproject.toml is newer than this stamp.
STAMP := $(VENV)/.posttrade-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup up down test bench

help:
	@sed -n 's/^#   //p' Makefile

setup: $(STAMP)
	@$(BIN)/posttrade stack fetch >/dev/null

$(STAMP): pyproject.toml
	@[ -x $(BIN)/python ] || { [ -n "$(PYTHON)" ] || { echo "python3.11 (or python3) not found" >&2; exit 1; }; $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --no-input -e '.[dev]'
	@touch $@

up: setup
	@$(BIN)/posttrade up

down:
	@if [ -x $(BIN)/posttrade ]; then $(BIN)/posttrade down; else echo "no $(BIN)/posttrade: nothing to stop"; fi

# Unit tests first, in their own process and without servers (one embedded ClickHouse
# path per process: the integration tests' must not decide the unit tests'); then the
# integration tests, the validation gate among them, against the stack.
test: setup
	@scripts/install-chromium.sh
	@$(BIN)/python -m pytest -q -ra $(PYTEST_ARGS) tests/unit
	@scripts/with-stack.sh $(BIN)/python -m pytest -q -ra $(PYTEST_ARGS) tests/integration

bench: setup
	@scripts/with-stack.sh scripts/bench.sh
