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
MONITOR_PORT ?= 8000

# Where `make lock` finds the CPU torch wheel (torch==...+cpu is not on PyPI): pip's find-links when set, else
# the PyTorch CPU index page of torch alone, so no other package can come from there.
TORCH_FIND_LINKS ?= $(or $(PIP_FIND_LINKS),https://download.pytorch.org/whl/cpu/torch/)
# Extra pip arguments for `make install`, e.g. INSTALL_ARGS="--find-links https://download.pytorch.org/whl/cpu/torch/"
# where no local find-links provides the torch wheel. The hashes are checked whatever the source.
INSTALL_ARGS ?=

.PHONY: install run test test-fast serve airflow monitor lint audit-code audit typecheck constraints lock clean

# Every file pip installs must match a sha256 of requirements.lock (pip itself and setuptools included). The lock
# is the whole set, so --no-deps: pip would otherwise ask for extras (celery[redis]) the lock spells without them,
# and `pip check` proves the set complete. The project goes in last, built by the locked setuptools.
$(VENV)/.installed: pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --require-hashes --no-deps -r requirements.lock $(INSTALL_ARGS)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $@

install: $(VENV)/.installed

run: install  ## the whole pipeline on the embedded simulator, versioned by DVC
	dvc repro
	dvc push -q
	amaas where

test: install  ## the whole suite: unit + integration (dvc repro, airflow dags test, bentoml serve)
	pytest -q -rs --durations=40

test-fast: install  ## the quick tier (target: a minute on 2 idle cores; see README): unit and config tests on tiny data; skips `slow` (all of tests/integration/, heavy unit tests)
	pytest -q -m "not slow"

serve: install  ## serve the champion on localhost:3000
	amaas serve

airflow: install  ## Airflow UI with the project's DAGs on localhost:$(AIRFLOW_PORT); prints the login
	python -m pipelines.airflow_ui --root $(CURDIR) --port $(AIRFLOW_PORT)

monitor: install  ## Evidently UI on 127.0.0.1:$(MONITOR_PORT) with the project's workspace (reports/workspace); prints the dashboard's URL
	python -m pipelines.monitor_ui --root $(CURDIR) --port $(MONITOR_PORT)

lint: install
	ruff check pipelines dags bentos tests benchmarks

audit-code: install  ## bandit: fails on medium severity or worse; a safe finding carries `# nosec BXXX` and its reason
	bandit -q -c pyproject.toml -r pipelines dags bentos --severity-level medium

audit: install  ## pip-audit of the locked versions against the PyPI advisory database (needs the network; not in CI)
	pip-audit --strict --disable-pip --no-deps -r requirements.lock

typecheck: install  ## mypy on pipelines/ (settings in pyproject.toml; the stage modules strictly)
	mypy

constraints: install  ## regenerate the exact versions from the working venv (pip and setuptools included), then the lock
	$(BIN)/python -m pip freeze --all --exclude-editable > constraints.txt
	$(MAKE) lock

LOCK := uv pip compile --universal --python-version 3.11 --generate-hashes --no-header --no-annotate \
  --index-url https://pypi.org/simple --find-links $(TORCH_FIND_LINKS)

lock: install  ## the versions of constraints.txt with the sha256 of every file: requirements.lock, and the image's
	$(LOCK) constraints.txt -o requirements.lock
	$(LOCK) pyproject.toml infra/requirements-image.in -c constraints.txt -o infra/requirements-image.lock

clean:
	rm -rf data/raw data/validated data/quarantine data/features data/reference models reports .airflow .bentoml
