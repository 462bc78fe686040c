"""The result and the report say what happened: why a run failed, and what a good flip did."""
from __future__ import annotations

from dbguard.airflow import env as afenv
from dbguard.demo import load_shop
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
