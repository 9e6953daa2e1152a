# Two commands on a fresh machine: `make run` and `make test`. Everything generated stays in this folder.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
export PATH := $(BIN):$(PATH)
export AIRFLOW_HOME := $(CURDIR)/.airflow
export BENTOML_HOME := $(CURDIR)/.bentoml
export GX_ANALYTICS_ENABLED := False
export BENTOML_DO_NOT_TRACK := True
export DVC_NO_ANALYTICS := 1
AIRFLOW_PORT ?= 8080

.PHONY: install run test test-fast serve airflow lint typecheck constraints clean

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $@

install: $(VENV)/.installed

run: install  ## the whole pipeline on the embedded simulator, versioned by DVC
	dvc repro
	dvc push -q
	amaas where

test: install  ## the whole suite: unit + integration (dvc repro, airflow dags test, bentoml serve)
	pytest -q -rs

test-fast: install  ## the quick tier, under a minute on 2 cores: unit and config tests on tiny data; skips `slow` (all of tests/integration/, heavy unit tests)
	pytest -q -m "not slow"

serve: install  ## serve the champion on localhost:3000
	amaas serve

airflow: install  ## Airflow UI with the project's DAGs on localhost:$(AIRFLOW_PORT); prints the login
	python -m pipelines.airflow_ui --root $(CURDIR) --port $(AIRFLOW_PORT)

lint: install
	ruff check pipelines dags bentos tests benchmarks

typecheck: install  ## mypy on pipelines/ (settings in pyproject.toml; the stage modules strictly)
	mypy

constraints: install  ## regenerate the lock of exact versions from the working venv
	$(BIN)/python -m pip freeze --exclude-editable > constraints.txt

clean:
	rm -rf data/raw data/validated data/quarantine data/features data/reference models reports .airflow .bentoml
