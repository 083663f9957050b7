# followups: `make run` to try it, `make test` to check it. `make help` lists the rest.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCKS := requirements.lock requirements-dev.lock
STAMP := $(VENV)/.installed-$(shell cat $(LOCKS) pyproject.toml | sha1sum | cut -c1-12)
# Both locks are written from pyproject.toml with hashes; the dev lock keeps the runtime's versions.
UV_COMPILE := $(BIN)/uv pip compile pyproject.toml --universal --python-version 3.11 --generate-hashes --quiet

.PHONY: help install lock services run test test-unit test-integration test-e2e lint format typecheck check docs bench chaos cluster n8n-check clean

help:
	@echo "make run        install, migrate, declare the topology, run the three services"
	@echo "make test       install and run every test tier against local PostgreSQL and RabbitMQ"
	@echo "make check      lint (ruff), format check, types (mypy) and the tests"
	@echo "make docs       regenerate docs/asyncapi.json and the deploy/ files made from the code"
	@echo "make lock       rewrite requirements.lock and requirements-dev.lock from pyproject.toml"
	@echo "make bench      benchmarks (not part of make test)"
	@echo "make cluster    3-node RabbitMQ cluster, kill a node mid-run: no timer lost (needs root)"
	@echo "make n8n-check  the n8n gateway workflow in a real n8n (N8N_BIN=.../n8n; not in make test)"

$(STAMP): $(LOCKS) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --require-hashes -r requirements.lock -r requirements-dev.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@rm -f $(VENV)/.installed-*
	@touch $@

install: $(STAMP)

# After changing a dependency in pyproject.toml. Versions already locked are kept; to move one:
# make lock LOCK_ARGS="--upgrade-package NAME".
LOCK_ARGS ?=
lock: install
	$(UV_COMPILE) $(LOCK_ARGS) -o requirements.lock
	$(UV_COMPILE) $(LOCK_ARGS) --extra dev -c requirements.lock -o requirements-dev.lock

services:
	@scripts/ensure-services.sh

run: install services
	$(BIN)/followups migrate
	$(BIN)/followups declare
	$(BIN)/followups run all

test: install services
	$(BIN)/pytest tests

test-unit: install
	$(BIN)/pytest tests/unit

test-integration: install services
	$(BIN)/pytest tests/integration

test-e2e: install services
	$(BIN)/pytest tests/e2e

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

typecheck: install
	$(BIN)/mypy shared services bench

check: lint typecheck test

# Generated from the code; `make test` fails when they are out of date.
docs: install
	$(BIN)/followups docs asyncapi --out docs/asyncapi.json
	$(BIN)/followups topology export --out deploy/rabbitmq/definitions.json
	$(BIN)/followups docs effectiveness-dashboard --out deploy/grafana/effectiveness.json
	$(BIN)/python -m deploy.n8n.workflow --out deploy/n8n/followups-gateway.json

chaos: install services
	$(BIN)/pytest -m chaos tests/chaos -s

# BENCH_PEER=DIR (a prepared copy of the BullMQ design, docs/performance.md) runs it alongside;
# arguments for the bench go in BENCH_ARGS, e.g. make bench BENCH_ARGS="--scenario capacity".
bench: install services
	$(BIN)/python -m bench $(BENCH_ARGS)

# A few minutes; starts three RabbitMQ nodes of its own beside the machine's (see README).
cluster: install services
	$(BIN)/python -m cluster

# A few minutes; an n8n installed outside the repo (deploy/n8n/README.md, Tests).
N8N_BIN ?= n8n
n8n-check: install services
	N8N_BIN=$(N8N_BIN) $(BIN)/python -m deploy.n8n.check

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
