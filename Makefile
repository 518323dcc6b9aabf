# Lodestar developer entry points. From a clean clone:  make setup test
#
#   make setup     create .venv (python3.11, else python3) if missing; pip install -e '.[dev]'
#   make services  start the local Kafka broker and Redis (scripts/services start); idempotent
#   make status    are they up? (exit 0 if both answer)
#   make stop      stop the services this tree started
#   make test      the Helm chart's tools (scripts/chart_tools install: helm built from Go modules, checkov;
#                  cached outside the checkout, minutes the first time on a machine, instant after), the
#                  services with their secure endpoints (scripts/services start --secure), then the WHOLE
#                  suite, integration tests included (-m ""), in TEST_WORKERS processes (pytest-xdist, one
#                  test file per process at a time; default 2: 5.5 instead of 8.4 min here; TEST_WORKERS=0:
#                  one process); extra pytest arguments: make test PYTEST_ARGS='-k kafka -x'
#   make lint      ruff check
#   make demo      the whole pipeline, heuristic vs learned routing (`lodestar up`, ~3 min; docs/demo.md);
#                  through the OpenAI-compatible gateway: make demo DEMO_ARGS=--gateway

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV := .venv
# test processes for make test: tests are isolated by namespace (own topics, groups, keys, ports), and much of
# an integration test's time is spent waiting on the broker, so two processes use a 2-core host's idle time
TEST_WORKERS ?= 2
PY := $(VENV)/bin/python
BOOTSTRAP_PYTHON ?= $(shell command -v python3.11 || command -v python3)
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: help setup services status stop test lint demo

help:
	@sed -n '1,/^$$/p' $(firstword $(MAKEFILE_LIST)) | sed 's/^# \{0,1\}//'

setup:
	@if [ ! -x $(PY) ]; then \
		[ -n "$(BOOTSTRAP_PYTHON)" ] || { echo "make setup: no python3.11 or python3 on PATH" >&2; exit 1; }; \
		echo "make setup: creating $(VENV) with $(BOOTSTRAP_PYTHON) ($$($(BOOTSTRAP_PYTHON) --version))"; \
		$(BOOTSTRAP_PYTHON) -m venv $(VENV); \
	fi
	$(PY) -m pip install --disable-pip-version-check -q -e '.[dev]'

services:
	scripts/services start

status:
	scripts/services status

stop:
	scripts/services stop

# pytest exits 5 when it collected no test: that must fail, never pass as green
test:
	@[ -x $(VENV)/bin/pytest ] || { echo "make test: $(VENV)/bin/pytest is missing: run 'make setup' first (or 'make setup test')" >&2; exit 1; }
	scripts/chart_tools install
	scripts/services start --secure
	@rc=0; $(VENV)/bin/pytest -m "" -n $(TEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: FAILED: pytest collected no tests (exit 5); a run with zero tests is not a pass" >&2; exit 1; fi; \
	exit $$rc

lint:
	$(VENV)/bin/ruff check .

# lodestar up starts Kafka/Redis itself when they do not answer, and stops only what it started
demo:
	@[ -x $(VENV)/bin/lodestar ] || { echo "make demo: $(VENV)/bin/lodestar is missing: run 'make setup' first (or 'make setup demo')" >&2; exit 1; }
	$(VENV)/bin/lodestar up $(DEMO_ARGS)
