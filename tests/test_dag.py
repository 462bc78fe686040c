"""The DAG a spec becomes: what the DagBag shows, and a real run through dag.test()."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dbguard import demo, ledger
from dbguard.airflow import env as afenv

DEMO_SPEC = afenv.SPECS_FOLDER / "demo_shop.yaml"
DEMO_TASKS = {
    "preflight", "capture_on",
    "customers.plan_ranges", "customers.copy_range",
    "orders.plan_ranges", "orders.copy_range",
    "drain_changes", "reconcile", "finish_schema", "checksum_gate", "release", "finalize",
}


def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(str(afenv.DAGS_FOLDER))


def spec_variant(tmp_path: Path, name: str, edit) -> Path:
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    edit(raw)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def reports(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("DBGUARD_REPORT_DIR", str(tmp_path / "reports"))
    return tmp_path / "reports"


def test_every_spec_becomes_a_dag_and_nothing_fails_to_import(airflow_db):
    bag = dagbag()
    assert bag.import_errors == {}
    dag = bag.dags["dbguard_demo_shop"]
    assert set(dag.task_dict) == DEMO_TASKS
    assert "dbguard" in dag.tags and dag.catchup is False and dag.schedule is None
    copy = dag.task_dict["customers.copy_range"]
    assert copy.pool == "dbguard_demo_shop"
    assert copy.retries == 3 and copy.retry_exponential_backoff == 2.0  # 3.3 stores True as the factor 2.0
    assert copy.max_retry_delay.total_seconds() == 300
    assert copy.map_index_template and "label" in copy.map_index_template
    # parents before children: orders' backfill waits for every customers range
    assert "orders.plan_ranges" in copy.downstream_task_ids
    assert dag.task_dict["release"].trigger_rule == "all_done"
    assert dag.task_dict["finalize"].trigger_rule == "all_done"
    assert dag.task_dict["finalize"].upstream_task_ids == {"release"}
    # (no skip_cutover Param until cutover exists: a switch that does nothing would mislead)
    assert dict(dag.params) == {"dry_run": False, "batch_rows": None}


def test_a_broken_spec_is_an_import_error_naming_file_and_field_while_others_load(airflow_db, tmp_path, monkeypatch):
    bad = spec_variant(tmp_path, "broken", lambda raw: raw["backfill"].update(concurrency=0))
    other = spec_variant(tmp_path, "other", lambda raw: raw.update(name="shop_copy"))
    monkeypatch.setenv("DBGUARD_SPECS", f"{bad}:{other}")
    bag = dagbag()
    [(path, message)] = bag.import_errors.items()
    assert path.endswith("dbguard_dags.py")
    assert str(bad) in message and "backfill.concurrency" in message
    assert {"dbguard_demo_shop", "dbguard_shop_copy"} <= set(bag.dags)


def test_run_status_fails_when_any_task_failed_or_could_not_run():
    from dbguard.airflow.operators import run_status

    assert run_status({"preflight": "success", "orders.copy_range_3": "success", "x": "skipped"}) == "success"
    assert run_status({"preflight": "success", "checksum_gate": "failed"}) == "failed"
    assert run_status({"preflight": "failed", "reconcile": "upstream_failed"}) == "failed"
    assert run_status({"preflight": "success", "customers.plan_ranges": "skipped"}, dry_run=True) == "dry_run"


def test_the_demo_dag_passes_end_to_end(airflow_db, dbpair, reports):
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    demo.load_shop(dbpair.source, customers=2000, orders=8000)
    dag = dagbag().dags["dbguard_demo_shop"]
    dag_run = dag.test(run_conf={"batch_rows": 2000})

    assert dag_run.state == "success"
    result = afenv.run_result(dag_run)
    assert list(result) == list(ledger.RESULT_KEYS)
    assert (result["status"], result["checksum_ok"], result["migrated_rows"]) == ("success", True, 10_000)
    assert Path(result["report"]).is_file() and Path(result["report"]).is_relative_to(reports)
    with dbpair.tgt() as conn:
        assert ledger.metrics(conn, dag_run.run_id)["checksum_ok"] is True
        assert conn.execute("SELECT status FROM dbguard.runs WHERE run_id = %s", (dag_run.run_id,)).fetchone() == (
            "success",)
        assert conn.execute("SELECT count(*) FROM shop.orders").fetchone() == (8000,)
    # the grid names mapped copies by key range: 1 customers range, 4 orders ranges at 2000 rows each
    with settings.Session() as session:
        labels = {(ti.task_id, ti.rendered_map_index) for ti in session.query(TaskInstance).filter(
            TaskInstance.run_id == dag_run.run_id, TaskInstance.task_id.like("%.copy_range"))}
    assert [t for t, _ in sorted(labels)].count("orders.copy_range") == 4
    assert all(label and not label.isdigit() for _, label in labels), labels


def test_a_failing_stage_fails_the_run_after_release_and_finalize(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    # The connections live only in Airflow's connection store this time (a secrets file),
    # so the tasks reach both databases through the resolver the Airflow layer installs.
    conns = tmp_path / "connections.json"
    conns.write_text(json.dumps({"dbguard_source": dbpair.src_dsn, "dbguard_target": dbpair.tgt_dsn}))
    monkeypatch.delenv("AIRFLOW_CONN_DBGUARD_SOURCE")
    monkeypatch.delenv("AIRFLOW_CONN_DBGUARD_TARGET")
    dag = dagbag().dags["dbguard_demo_shop"]
    dag_run = dag.test(conn_file_path=str(conns))  # the source has no shop tables: preflight fails

    assert dag_run.state == "failed"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["preflight"] == "failed"
    assert states["reconcile"] == "upstream_failed"
    assert states["release"] == "success"
    assert states["finalize"] == "failed"  # recorded, then failed the run
    assert afenv.run_result(dag_run)["status"] == "failed"
    with dbpair.tgt() as conn:  # preflight failed before the run was opened in the ledger: no row, never 'success'
        row = conn.execute("SELECT status FROM dbguard.runs WHERE run_id = %s", (dag_run.run_id,)).fetchone()
        assert row in (None, ("failed",))
