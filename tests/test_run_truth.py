"""The result and the report say what happened: why a run failed, and what a good flip did."""
from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

from dbguard import cutover, flow, stages
from dbguard.airflow import env as afenv
from dbguard.demo import load_shop
from test_cutover import RUN, migrate, shop_spec
from test_cutover_dag import _cutover_spec, _open_window_now
from test_dag import dagbag, reports  # noqa: F401  (fixture)


def test_a_failed_step_puts_its_message_in_the_result_reason(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    """Before: the JSON line said "reason": null while only the Airflow log named the cutover's error."""
    _cutover_spec(tmp_path, monkeypatch, window=_open_window_now())
    load_shop(dbpair.source, customers=200, orders=600)
    dag_run = dagbag().dags["dbguard_shop_cut"].test(run_conf={"fail_at": "cutover.pointer"})
    result = afenv.run_result(dag_run)
    assert result["status"] == "aborted", result
    assert result["reason"] and "cutover: " in result["reason"], result
    assert "injected failure at cutover step 'pointer'" in result["reason"]
    assert "the source stays the writable primary" in result["reason"]  # the whole message, not a summary
    with dbpair.tgt() as conn:
        assert conn.execute("SELECT reason FROM dbguard.runs WHERE run_id = %s",
                            (dag_run.run_id,)).fetchone()[0] == result["reason"]


def test_a_cutover_report_shows_the_flip_and_no_incident(dbpair, reports):
    """Before: a clean flip's report opened an "Incident" listing the forward capture's dropped functions
    as undone, and a postmortem saying the target was not in use."""
    load_shop(dbpair.src_dsn, customers=300, orders=1200)
    spec = shop_spec()
    migrate(spec)
    out = cutover.cutover(spec, RUN)
    tail = flow.tail(spec, RUN)
    result = stages.finalize(spec, RUN, "cutover")
    path = Path(result["report"])
    page = path.read_text()
    data = json.loads(path.with_suffix(".json").read_text())
    assert data["incident"] is None
    assert "Incident" not in page and "Postmortem" not in page and "no cutover" not in page
    assert "<h2>Cutover</h2>" in page
    for s in out["steps"]:  # every step with its time
        assert f"<td>{s['step']}</td>" in page
    assert "control_table" in page  # the pointer
    until = dt.datetime.fromisoformat(tail["rollback_offered_until"])
    assert "rollback offered until" in page and until.strftime("%Y-%m-%d %H:%M") in page
    assert f"rollback_ttl_minutes {spec.rollback_ttl_minutes:g}" in page
