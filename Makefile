# Every target works on a fresh clone: the virtual environment is created and filled on first use,
# and refilled whenever pyproject.toml changes. --no-compile halves the install time; Python compiles
# what it imports on first use.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
PIP_FLAGS ?= --quiet --disable-pip-version-check --no-compile
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1
export HF_HUB_OFFLINE := 1

.PHONY: setup run test test-slow bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install $(PIP_FLAGS) -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(BIN)/pip install $(PIP_FLAGS) -e '.[test,flower]'
	touch $@

setup: $(VENV)/.installed-test  ## the environment for development: package, test tools, Flower

JOB ?= examples/quickstart.toml

run: $(VENV)/.installed  ## a job (default: the quickstart; make run JOB=examples/sst2-lora-private.toml)
	$(BIN)/securefed run $(JOB)

test: $(VENV)/.installed-test  ## the default (fast) test tier
	$(BIN)/python -m pytest

test-slow: $(VENV)/.installed-test  ## the slow tier: whole jobs on real data, Flower on 127.0.0.1
	$(BIN)/python -m pytest -m slow

bench: $(VENV)/.installed-test  ## benchmarks; each prints JSON against a baseline measured in the same run
	$(BIN)/python benchmarks/round.py
	$(BIN)/python benchmarks/secagg.py
	$(BIN)/python benchmarks/dp_overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache .hypothesis
