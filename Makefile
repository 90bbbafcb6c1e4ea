# Set-up and everyday commands. Everything runs inside .venv in the repository root.
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
PY          := $(VENV)/bin/python
STAMP       := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install test test-fast demo example lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,models]"
	touch $(STAMP)

test: install
	$(PY) -m pytest -m "not gpu" $(PYTEST_ARGS)

test-fast: install
	$(PY) -m pytest -m "not gpu and not slow" $(PYTEST_ARGS)

DEMO_CKPTS  := outputs/demo/checkpoints
demo: install
	$(PY) -m pipelines.train
	$(PY) -m pipelines.run -m checkpoint.path=$(DEMO_CKPTS)/epoch_000.pt,$(DEMO_CKPTS)/epoch_010.pt,$(DEMO_CKPTS)/epoch_030.pt
	@echo
	@$(PY) -m pipelines.summary --last-sweep
	@echo
	@echo "The addresses above open once the MLflow UI runs on the demo's store:"
	@echo "  $(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --port 5000"

example: install
	$(PY) examples/quickstart.py

lint: install
	$(PY) -m ruff check landscapes pipelines tests benchmarks examples

bench: install
	$(PY) -m pip install --quiet -e ".[bench]"
	$(PY) -m benchmarks

clean:
	rm -rf $(VENV) outputs multirun mlruns mlflow.db .pytest_cache examples/out
