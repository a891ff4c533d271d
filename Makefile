# The front door. `make demo` runs the migration end to end on an embedded PostgreSQL;
# `make test` runs the whole test suite. Both set everything up on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ROWS ?= 1000000
# `make airflow EXECUTOR=celery WORKERS=2`: the CeleryExecutor with a local broker and N workers.
EXECUTOR ?= local
WORKERS ?= 2

export AIRFLOW_HOME ?= $(CURDIR)/var/airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export PYTHONPATH := $(CURDIR)
export USER_MIGRATION_BACKUP_DIR ?= $(CURDIR)/var/backups

.PHONY: install browser demo test test-fast test-celery lint format bench pg-start pg-stop airflow airflow-stop lock clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is needed: make PYTHON=python3.11 ...")'
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -c constraints.txt
	touch $(STAMP)

demo: install
	$(PY) tools/demo.py

# Debian's Chromium for the web UI test (tests/test_stack_e2e.py); installed when missing and root.
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium >/dev/null; }; \
	  else echo "chromium is missing (install Debian's chromium package): the web UI test will be skipped"; fi; }

test: install browser
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not e2e"

# The stack with the CeleryExecutor, a local broker and two workers (not part of `make test`).
test-celery: install
	$(PY) -m pytest -m celery tests/test_celery_e2e.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench: install
	$(PY) tools/bench.py --rows $(ROWS)

airflow: install
	$(PY) tools/airflow_stack.py start --executor $(EXECUTOR) --workers $(WORKERS)

airflow-stop:
	@if [ -x $(PY) ]; then $(PY) tools/airflow_stack.py stop; fi

pg-start: install
	$(PY) tools/embedded_pg.py start

pg-stop: install
	$(PY) tools/embedded_pg.py stop

lock:
	$(PY) -m pip freeze --exclude-editable > constraints.txt.new && mv constraints.txt.new constraints.txt

clean: airflow-stop pg-stop
	rm -rf var test-artifacts
