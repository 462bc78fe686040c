# dbguard: every target sets itself up on a fresh clone (no stdin, CI=true is fine).
#   make demo     migrate the demo shop between two embedded PostgreSQL servers
#   make test     the test suite (real PostgreSQL, real DAG runs)
#   make bench    benchmarks (JSON lines with speed ratios)
#   make airflow  Airflow UI (airflow standalone) wired to the embedded servers
#   make celery   the demo DAG on CeleryExecutor (Redis, two workers, localhost)
#   make faults   fault injection under a live writer (one JSON line per scenario)
#   make clean    stop the embedded servers, remove .pg/ .airflow/ and caches
#   make distclean  clean + remove .venv/

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
AIRFLOW_STAMP := .airflow/.migrated

# Exported to every recipe (and so to pytest, dbguard and airflow).
export AIRFLOW_HOME := $(CURDIR)/.airflow
export AIRFLOW__CORE__DAGS_FOLDER := $(CURDIR)/dags
export AIRFLOW__CORE__PLUGINS_FOLDER := $(CURDIR)/plugins
export AIRFLOW__CORE__LOAD_EXAMPLES := False
export PIP_DISABLE_PIP_VERSION_CHECK := 1
export PIP_NO_INPUT := 1

.PHONY: help demo test bench faults airflow clean distclean sysdeps celery

# Debian packages the tests and demos run for real: PgBouncer (cutover pointer), Redis (Celery
# broker), Chromium (browser test). Installed when missing and we are root (CI, fresh machines);
# otherwise say what is missing and go on (the tests that need them say so too).
SYSDEPS := pgbouncer:pgbouncer redis-server:redis-server chromium:chromium
sysdeps:
	@missing=""; for pair in $(SYSDEPS); do bin=$${pair%%:*}; pkg=$${pair##*:}; \
		command -v $$bin >/dev/null 2>&1 || [ -x /usr/sbin/$$bin ] || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
			echo "==> installing Debian packages:$$missing"; \
			DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null && \
			DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
		else echo "==> not root: please install$$missing (apt-get install$$missing)"; fi; \
	fi

help:
	@sed -n '2,9s/^#//p' $(firstword $(MAKEFILE_LIST))

# The virtualenv: pinned requirements, then the package itself (editable, no deps).
$(VENV_STAMP): requirements.txt pyproject.toml
	@echo "==> creating $(VENV) and installing requirements (about a minute on a fresh machine)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	@touch $@

# Airflow's metadata database (SQLite under .airflow/), needed by dag.test() and the UI.
$(AIRFLOW_STAMP): $(VENV_STAMP)
	@echo "==> airflow db migrate (AIRFLOW_HOME=$(AIRFLOW_HOME))"
	@mkdir -p $(AIRFLOW_HOME)
	@$(BIN)/airflow db migrate > $(AIRFLOW_HOME)/migrate.log 2>&1 \
		|| { cat $(AIRFLOW_HOME)/migrate.log; echo "airflow db migrate failed (log: $(AIRFLOW_HOME)/migrate.log)"; exit 1; }
	@touch $@

demo: $(VENV_STAMP) $(AIRFLOW_STAMP) sysdeps
	$(BIN)/dbguard demo

test: $(VENV_STAMP) $(AIRFLOW_STAMP) sysdeps
	$(BIN)/python -m pytest -q -W ignore::DeprecationWarning

bench: $(VENV_STAMP) $(AIRFLOW_STAMP)
	$(BIN)/python -m bench

# The demo DAG on CeleryExecutor: Redis broker, PostgreSQL metadata DB, two Celery workers; ends with one JSON line.
celery: $(VENV_STAMP) $(AIRFLOW_STAMP) sysdeps
	$(BIN)/python -m dbguard.airflow.celery_demo

# Fault injection under a live writer, one JSON line per scenario (docs/faults.md).
faults: $(VENV_STAMP) $(AIRFLOW_STAMP)
	$(BIN)/python -m faults

# `dbguard embedded` starts the two embedded servers and prints
# `export AIRFLOW_CONN_DBGUARD_SOURCE=...` lines for them.
# The UI listens on localhost only; `make airflow HOST=0.0.0.0` exposes it (then use a real auth manager).
# dbguard.airflow.standalone is `airflow standalone` without the task-log servers, which Airflow binds to
# every interface (:8793/:8794, not configurable); the UI reads the task logs from .airflow/logs instead.
HOST ?= 127.0.0.1
airflow: $(VENV_STAMP) $(AIRFLOW_STAMP)
	conns="$$($(BIN)/dbguard embedded)"; eval "$$conns"; \
	export PATH="$(CURDIR)/$(BIN):$$PATH" AIRFLOW__API__HOST="$(HOST)"; \
	exec $(BIN)/python -m dbguard.airflow.standalone

# The embedded servers keep running between commands; stop each one (fast
# shutdown of its own postmaster, found in postmaster.pid) before deleting its data.
clean:
	@for pid_file in .pg/*/postmaster.pid; do \
		[ -f "$$pid_file" ] || continue; \
		pid=$$(head -n 1 "$$pid_file"); \
		echo "stopping embedded server $${pid_file%/postmaster.pid} (pid $$pid)"; \
		kill -INT "$$pid" 2>/dev/null || true; \
		for _ in $$(seq 50); do [ -f "$$pid_file" ] || break; sleep 0.1; done; \
	done
	rm -rf .pg .airflow reports bench/out .pytest_cache
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) include/*.egg-info
