"""Abort mid-run: the rollback DAG (one click in the UI) drains the last captured
changes, turns capture off, lifts the schema freeze and marks the run; the
source keeps every write and accepts DDL again."""
import psycopg
import pytest

from dbguard import capture, demo, stages
from dbguard.airflow import env as afenv
from dbguard.spec import load_spec
from test_dag import dagbag


def test_rollback_dag_lifts_every_hold_and_loses_no_source_write(airflow_db, dbpair):
    demo.load_shop(dbpair.source, customers=400, orders=1500)
    spec = load_spec(afenv.SPECS_FOLDER / "demo_shop.yaml")
    stages.preflight(spec, "aborted")
    stages.capture_on(spec, "aborted")
    first = stages.plan_ranges(spec, "aborted", "customers")[0]
    stages.copy_range(spec, "aborted", first)  # half-way through the backfill
    with dbpair.src() as c:
        c.execute("UPDATE shop.customers SET full_name = 'written during the run' WHERE id = %s",
                  (int(first["hi"][0]) if first["hi"] else 1,))
        c.commit()
        with pytest.raises(psycopg.errors.ObjectInUse):
            c.execute("ALTER TABLE shop.customers ADD COLUMN x int")
        c.rollback()
        before = c.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM shop.customers t"
                           ).fetchone()

    dag_run = dagbag().dags["dbguard_demo_shop_rollback"].test(
        run_conf={"run_id": "aborted", "drop_target": True})

    assert dag_run.state == "success"
    assert not capture.is_on(spec)
    assert capture.flags(spec)["dual_write"] is False
    with dbpair.src() as c:
        after = c.execute("SELECT count(*), md5(string_agg(t::text, ',' ORDER BY id)) FROM shop.customers t"
                          ).fetchone()
        assert after == before  # the source is exactly as the application left it
        c.execute("ALTER TABLE shop.customers ADD COLUMN x int")  # freeze lifted
        c.commit()
    with dbpair.tgt() as c:
        assert c.execute("SELECT status FROM dbguard.runs WHERE run_id = 'aborted'").fetchone() == ("rolled_back",)
        assert c.execute("SELECT to_regclass('shop.customers')").fetchone() == (None,)
        assert c.execute("SELECT count(*) FROM dbguard.events WHERE run_id = 'aborted' AND stage = 'rollback'"
                         ).fetchone() == (1,)
