# dbguard: every target sets itself up on a fresh clone (no stdin, CI=true is fine).
#   make demo     migrate the demo shop between two embedded PostgreSQL servers
#   make check    the fast tier for the edit-run loop (no browser, Celery, faults, full DAG runs, big data)
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

.PHONY: help demo check test bench faults airflow clean distclean sysdeps celery

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
	@sed -n '2,10s/^#//p' $(firstword $(MAKEFILE_LIST))

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

# Two pytest-xdist workers (this machine's two cores; most of a test's time is PostgreSQL's, so two run side
# by side). A file's tests stay on one worker, in order (--dist loadfile): some share a role or a fixture.
# Both workers use the same two embedded servers (every test has its own databases) and each its own Airflow
# home (tests/conftest.py). PYTEST_WORKERS=0 runs everything in one process.
PYTEST_WORKERS ?= 2
PYTEST_PARALLEL := $(if $(filter 0,$(PYTEST_WORKERS)),,-n $(PYTEST_WORKERS) --dist loadfile)

test: $(VENV_STAMP) $(AIRFLOW_STAMP) sysdeps
	$(BIN)/python -m pytest -q -W ignore::DeprecationWarning $(PYTEST_PARALLEL)

# The fast tier: every test except what CHECK_SLOW names (a module is ignored, a test id deselected):
# the browser and Celery stacks, fault scenarios (kills, interrupted steps), full DAG runs (dag.test(),
# `dbguard run`), scenarios under a writer through cutover and rollback, other server versions, HNSW
# builds and the 250k-row demo data. Still real PostgreSQL: spec, hostile inputs, preflight, backfill,
# checksum, reconcile, capture, cutover steps, schema, retrieval maths. `make test` (CI) runs all of it;
# a new slow test belongs in this list (tests/test_makefile.py checks that each entry still exists).
CHECK_SLOW := \
	tests/test_browser.py tests/test_celery.py tests/test_faults.py tests/test_cutover_dag.py \
	tests/test_dual_writes_dag.py tests/test_retrieval_dag.py tests/test_rerun.py tests/test_rollback.py \
	tests/test_awkward_pg15.py tests/test_cross_version.py tests/test_demo_data.py \
	tests/test_report.py tests/test_retrieval_noise.py tests/test_cutover_faults.py \
	tests/test_cli.py::test_a_failed_run_prints_the_gate_message_in_full_on_stderr \
	tests/test_cli.py::test_run_is_quiet_with_progress_and_airflow_log_in_a_file \
	tests/test_cli.py::test_run_ends_with_one_json_line_and_exit_0 \
	tests/test_dag.py::test_the_demo_dag_passes_end_to_end \
	tests/test_dag.py::test_a_failing_stage_fails_the_run_after_release_and_finalize \
	tests/test_hostile.py::test_make_airflow_listens_on_localhost_only \
	tests/test_secrets.py::test_a_run_with_a_password_leaves_it_nowhere \
	tests/test_secrets.py::test_a_failing_run_with_a_password_leaves_it_nowhere \
	tests/test_identifiers.py::test_orm_identifiers_through_a_real_dag_run_with_a_live_writer \
	tests/test_init.py::test_init_shop_validates_and_migrates \
	tests/test_init.py::test_init_docs_emits_stores_with_dim_metric_and_config \
	tests/test_type_matrix.py::test_every_value_round_trips_from_a_postgresql_15_source \
	tests/test_capture_fidelity.py::test_every_value_round_trips_from_a_postgresql_15_source \
	tests/test_capture.py::test_applier_killed_mid_batch_loses_and_duplicates_nothing \
	tests/test_cutover.py::test_a_failed_cutover_step_leaves_the_source_primary \
	tests/test_cutover.py::test_an_interrupted_rollback_leaves_one_primary_and_resumes \
	tests/test_cutover.py::test_demo_round_trip_cli \
	tests/test_cutover.py::test_pgbouncer_pointer_moves_a_pooled_client_and_back \
	tests/test_retrieval.py::test_demo_migration_passes_the_gate \
	tests/test_retrieval.py::test_analyzer_mistake_english_to_simple_fails_the_gate_naming_queries \
	tests/test_retrieval.py::test_escalation_fails_on_the_poke_that_sees_the_window_run_out \
	tests/test_retrieval.py::test_demo_gold_set_loads_and_points_at_real_documents \
	tests/test_vector_store.py::test_metric_mistake_inner_product_on_unnormalised_vectors_is_caught \
	tests/test_vector_store.py::test_hnsw_results_that_differ_between_builds_still_pass \
	tests/test_qdrant.py::test_docs_into_qdrant_pass_every_gate_in_a_dag_run \
	tests/test_qdrant.py::test_dot_on_raw_lengths_fails_the_dag_run_naming_the_metric \
	tests/test_qdrant_cutover.py::test_readers_move_to_qdrant_at_cutover_and_back_at_rollback_losing_no_write \
	tests/test_qdrant_source.py::test_q2q_dag_copies_gates_and_moves_the_alias_and_its_rollback_dag_moves_it_back \
	tests/test_qdrant_source.py::test_q2pg_dag_copies_indexes_and_gates_and_a_failed_gate_fails_the_run_naming_the_metric \
	tests/test_qdrant_source.py::test_dbguard_run_migrates_a_persistent_local_collection_and_moves_the_alias \
	tests/test_run_truth.py::test_a_failed_step_puts_its_message_in_the_result_reason \
	tests/test_column_contract.py::test_column_shape_under_a_writer_through_cutover_and_rollback \
	tests/test_partitions.py::test_a_partitioned_table_through_cutover_and_rollback_under_a_writer \
	tests/test_app_schema.py::test_init_on_such_a_source_writes_a_spec_that_migrates_and_cuts_over_with_equal_catalogs
# -k: the tests and variants run against a PostgreSQL 15 source (a third server).
CHECK_ARGS := $(foreach t,$(CHECK_SLOW),$(if $(findstring ::,$(t)),--deselect=$(t),--ignore=$(t))) -k 'not pg15 and not postgresql_15'

check: $(VENV_STAMP) $(AIRFLOW_STAMP)
	$(BIN)/python -m pytest -q -W ignore::DeprecationWarning $(PYTEST_PARALLEL) $(CHECK_ARGS)

# Peer tools the benchmarks compare against (reladiff), kept out of requirements.txt: the tests do not use them.
BENCH_STAMP := $(VENV)/.bench-installed
$(BENCH_STAMP): bench/requirements.txt $(VENV_STAMP)
	$(BIN)/python -m pip install -q -r bench/requirements.txt
	@touch $@

bench: $(VENV_STAMP) $(AIRFLOW_STAMP) $(BENCH_STAMP)
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
