# Strata: `make run` brings the suite up locally, `make test` runs every test layer.
# Both set up what they need (virtualenv, dependencies, generated code) on a fresh machine.

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUF_VERSION := 1.75.0
BUF := .tools/node_modules/.bin/buf
INSTALLED := $(VENV)/.installed
PROTOS := $(shell find protos -name '*.proto')
GEN := gen/python
NODE_CLIENT := clients/node
NODE_INSTALLED := $(NODE_CLIENT)/node_modules/.installed
# `buf breaking` compares protos/ with this commit: the merge-base with origin/main when that
# ref exists, else the commit that added protos/buf.yaml (the first v1 contract).
# Override: make proto-check BREAKING_AGAINST=<commit>.
BREAKING_AGAINST ?= $(shell git merge-base HEAD origin/main 2>/dev/null \
	|| git log --diff-filter=A --format=%H -- protos/buf.yaml 2>/dev/null | tail -1)

.DEFAULT_GOAL := help
.PHONY: help install proto proto-check lint fmt run test test-unit test-grpc test-stack test-resilience bench-cache bench-tracing bench-soak profile clean node-client

help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z_-]+:.*## / {printf "  %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

install: $(INSTALLED) $(BUF) ## Create .venv with pinned dependencies and install buf locally

$(INSTALLED): requirements.txt requirements-dev.txt requirements-nodeps.txt pyproject.toml
	@echo "==> creating $(VENV) and installing pinned dependencies"
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install --quiet --upgrade pip
	@$(PY) -m pip install --quiet -r requirements-dev.txt
	@$(PY) -m pip install --quiet --no-deps -r requirements-nodeps.txt
	@$(PY) -m pip install --quiet --no-deps -e .
	@touch $@

$(BUF):
	@echo "==> installing buf $(BUF_VERSION) from npm into .tools/"
	@mkdir -p .tools
	@npm install --silent --no-save --no-audit --no-fund --prefix .tools @bufbuild/buf@$(BUF_VERSION) >/dev/null

proto: $(INSTALLED) ## Regenerate gen/python from protos/
	@echo "==> generating Python code from protos/ into $(GEN)"
	@$(PY) -m strata_cli.protogen protos $(GEN)

proto-check: $(INSTALLED) $(BUF) ## Fail when buf lint or buf breaking fails or gen/python is stale
	@echo "==> buf lint"
	@cd protos && ../$(BUF) lint
	@base="$(BREAKING_AGAINST)"; \
	if [ -z "$$base" ]; then \
	  echo "==> buf breaking: skipped (no git history to compare with)"; \
	else \
	  echo "==> buf breaking against $$base (protos/, rules from protos/buf.yaml)"; \
	  cd protos && ../$(BUF) breaking --against "../.git#ref=$$base,subdir=protos"; \
	fi
	@echo "==> checking that $(GEN) matches protos/"
	@$(PY) -m strata_cli.protogen protos $(GEN) --check

lint: $(INSTALLED) $(BUF) ## ruff, mypy and buf lint
	@echo "==> ruff"
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/ruff format --check .
	@echo "==> mypy"
	@$(VENV)/bin/mypy
	@echo "==> buf lint"
	@cd protos && ../$(BUF) lint

fmt: $(INSTALLED) ## Format the code with ruff
	@$(VENV)/bin/ruff format .
	@$(VENV)/bin/ruff check --fix .

run: $(INSTALLED) ## Start the four services locally on the mock provider and stream an answer
	@$(PY) -m strata_cli dev

test: $(INSTALLED) $(NODE_INSTALLED) ## Run every test layer: unit, grpc, stack, resilience
	@echo "==> tests: unit, grpc, stack, resilience (real Redis; a private redis-server when none answers)"
	@$(PY) -m pytest tests/unit tests/grpc tests/stack tests/resilience

test-unit: $(INSTALLED) ## Unit tests only (no sockets)
	@$(PY) -m pytest tests/unit

test-grpc: $(INSTALLED) ## Each service through real stubs
	@$(PY) -m pytest tests/grpc

test-stack: $(INSTALLED) $(NODE_INSTALLED) ## The four services as processes with Redis and an HTTP upstream
	@$(PY) -m pytest tests/stack

test-resilience: $(INSTALLED) ## Real faults: killed, paused and restarted processes, cut connections
	@$(PY) -m pytest tests/resilience

bench-cache: $(INSTALLED) ## Semantic cache quality on labelled pairs, and lookup latency
	@$(PY) -m bench.cache_quality
	@$(PY) -m bench.cache_latency

bench-tracing: $(INSTALLED) ## Latency of Generate with traces exported vs not (p50, p95)
	@$(PY) -m bench.tracing_overhead

bench-soak: $(INSTALLED) ## RSS of each service over 500k requests (SOAK_ARGS="--requests 20000" for a short run)
	@$(PY) -m bench.soak $(SOAK_ARGS)

profile: $(INSTALLED) ## py-spy profile of each service under load (PROFILE_ARGS="--concurrency 4 --native", or "--perf")
	@$(PY) -m bench.profile_stack $(PROFILE_ARGS)

node-client: $(NODE_INSTALLED) ## Install the Node.js client's pinned dependencies (clients/node)

$(NODE_INSTALLED): $(NODE_CLIENT)/package.json $(NODE_CLIENT)/package-lock.json
	@echo "==> installing the Node.js client's pinned dependencies (npm ci in $(NODE_CLIENT))"
	@cd $(NODE_CLIENT) && npm ci --prefer-offline --no-audit --no-fund --ignore-scripts --loglevel=error >/dev/null
	@touch $@

clean: ## Remove the virtualenv, local tools and run state
	rm -rf $(VENV) .tools .run .pytest_cache .mypy_cache .ruff_cache

.PHONY: validate-deploy
validate-deploy: $(INSTALLED) ## Check deploy/k8s and docker-compose.yml against schemas and the code
	@$(PY) -m pytest -q tests/unit/test_deploy.py

.PHONY: certs
CERTS_DIR ?= .run/certs
CERT_SANS ?= DNS:localhost,IP:127.0.0.1,DNS:orchestrator,DNS:jobs,DNS:control,DNS:cache,DNS:executor,DNS:gateway
certs: ## Development CA and a service certificate (server and client) for mutual TLS, in .run/certs
	@mkdir -p $(CERTS_DIR)
	@cd $(CERTS_DIR) && set -e; \
	ec="-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes"; \
	openssl req -x509 $$ec -days 3650 -subj "/CN=Strata development CA" \
		-keyout ca-key.pem -out ca.pem 2>/dev/null; \
	openssl req $$ec -subj "/CN=strata-service" -keyout service-key.pem -out service.csr 2>/dev/null; \
	printf 'subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\nbasicConstraints=CA:FALSE\n' \
		'$(CERT_SANS)' > service.ext; \
	openssl x509 -req -in service.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days 825 \
		-extfile service.ext -out service.pem 2>/dev/null; \
	rm -f service.csr service.ext ca.srl; chmod 600 ca-key.pem service-key.pem
	@echo "==> $(CERTS_DIR): ca.pem, service.pem, service-key.pem (SANs $(CERT_SANS))"

.PHONY: bench
bench: $(INSTALLED) ## Gateway overhead vs the upstream and LiteLLM (BENCH_ARGS="--requests 20 --rounds 1" for a smoke run)
	@$(PY) -m bench.gateway_overhead $(BENCH_ARGS)
