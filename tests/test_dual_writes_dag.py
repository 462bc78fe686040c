"""Zero loss while the application keeps writing: a seeded writer doing inserts,
updates, deletes and key changes at >= 200 ops/s runs during the whole DAG;
at the end source and target are identical row for row (an independent md5
over every row's text, not dbguard's checksum)."""
from __future__ import annotations

import time

import pytest

from dbguard import capture, demo
from dbguard.airflow import env as afenv
from dbguard.spec import load_spec
from test_dag import dagbag, reports  # noqa: F401  (fixture)
from util import fingerprint
from dbguard.writer import shop_writer


def test_writer_during_the_whole_dag_loses_nothing(airflow_db, dbpair, reports):  # noqa: F811
    demo.load_shop(dbpair.source, customers=3000, orders=12000)
    writer = shop_writer(dbpair.src_dsn, seed=11, rate=250, honour_flag="demo_shop").start()
    try:
        time.sleep(0.5)  # writes before capture_on are in the backfill's snapshot
        dag_run = dagbag().dags["dbguard_demo_shop"].test(run_conf={"batch_rows": 3000})
    finally:
        stats = writer.stop()
    result = afenv.run_result(dag_run)
    assert dag_run.state == "success", result
    assert (result["checksum_ok"], result["dual_write_fail"]) == (True, 0)
    assert stats["errors"] == 0, stats["first_error"]
    # What the writer did is asserted (every op it made is on the target, below), not its speed: the
    # writer stops at release and shares two cores with the DAG, so ops/s depends on the machine.
    assert stats["ops"] > 500, stats
    # The writer honours the dual_write flag, as an application on dbguard's switch does: release
    # drained the last changes and turned capture off under one write freeze, then it stopped.
    assert capture.flags(load_spec(afenv.SPECS_FOLDER / "demo_shop.yaml"))["dual_write"] is False
    with dbpair.src() as a, dbpair.tgt() as b:
        for c in (a, b):
            c.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
        for rel in ("shop.customers", "shop.orders"):
            assert fingerprint(a, rel) == fingerprint(b, rel), rel
        changed = a.execute("SELECT count(*) FROM shop.orders WHERE id >= 900000000").fetchone()[0]
        assert changed > 0  # the writer's inserts and key changes are there
        with b.cursor() as cur:
            cur.execute("SELECT detail FROM dbguard.events WHERE run_id = %s AND stage = 'write_freeze'",
                        (dag_run.run_id,))
            freezes = [d["freeze_ms"] for (d,) in cur.fetchall()]
        # the gate compared at a source snapshot while the writer went on (no freeze); release froze once
        gate = b.execute("SELECT detail->>'mode' FROM dbguard.events WHERE run_id = %s AND stage = 'final_verify'",
                         (dag_run.run_id,)).fetchall()
        assert gate == [("snapshot",)], gate
        # it compared again because the writer kept writing after reconcile, and the result says so
        assert result["checksum_gate_mode"] == "measured", result
        # so did reconcile: the writer's in-flight changes were not taken for differences (nothing bisected)
        rec = b.execute("SELECT detail->>'mode' FROM dbguard.events WHERE run_id = %s AND stage = 'reconcile'",
                        (dag_run.run_id,)).fetchall()
        assert rec == [("snapshot",)], rec
        assert len(freezes) == 1 and max(freezes) < 10_000, freezes
        # the writer kept going after the checksum gate: release verified what was applied since, and passed
        verdicts = b.execute("SELECT detail->>'checksum_ok' FROM dbguard.events WHERE run_id = %s "
                             "AND stage = 'release_verify'", (dag_run.run_id,)).fetchall()
        assert verdicts == [("true",)], verdicts


def test_apply_failure_blocks_the_gate_naming_op_ids(airflow_db, dbpair, reports):  # noqa: F811
    """A change the target refuses (here a CHECK constraint the source lacks) makes dual_write_fail > 0,
    and the run fails naming the op_id instead of passing with a silent gap."""
    from dbguard import stages

    demo.load_shop(dbpair.source, customers=500, orders=2000)
    spec = load_spec(afenv.SPECS_FOLDER / "demo_shop.yaml")
    stages.preflight(spec, "r")
    with dbpair.tgt() as c:
        c.execute("ALTER TABLE shop.orders ADD CONSTRAINT no_huge CHECK (amount < 1000000)")
        c.commit()
    stages.capture_on(spec, "r")
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, "r", t.name):
            stages.copy_range(spec, "r", r)
    with dbpair.src() as c:
        c.execute("UPDATE shop.orders SET amount = 5000000 WHERE id = (SELECT min(id) FROM shop.orders)")
        c.commit()
    verdict, msg = stages.drain_gate(spec, "r")
    assert verdict is False and "dual_write_fail = 1" in msg and "no_huge" in msg
    op_id = capture.dual_write_fail(spec, "r")[1][0]
    assert f"op_ids [{op_id}]" in msg
    assert stages.reconcile(spec, "r")["checksum_ok"] is False
    ok, gate_msg = stages.checksum_gate(spec, "r")
    assert not ok and f"op_ids [{op_id}]" in gate_msg
    assert "repair failed: new row for relation \"orders\" violates check constraint \"no_huge\"" in gate_msg
    with pytest.raises(capture.CaptureError, match=rf"op_ids \[{op_id}\]"):
        stages.release(spec, "r")  # the failure fails release too; holds are lifted all the same
    assert not capture.is_on(spec)


def _verified_run(dbpair, spec, run):
    """Stages up to a passed checksum gate (capture on, copy, drain, reconcile, gate under the freeze)."""
    from dbguard import stages

    stages.preflight(spec, run)
    stages.capture_on(spec, run)
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, run, t.name):
            stages.copy_range(spec, run, r)
    assert stages.drain_gate(spec, run)[0] is True
    stages.reconcile(spec, run)
    ok, msg = stages.checksum_gate(spec, run)
    assert ok, msg


def test_a_refused_write_after_the_gate_fails_release_and_a_replica_write_arrives(dbpair, reports):  # noqa: F811
    """After the checksum gate capture stays on. A write the target refuses (a CHECK only the target has)
    fails the run naming its op id; a write made with session_replication_role = replica (ETL, pg_restore)
    is captured all the same and reaches the target."""
    from dbguard import stages

    demo.load_shop(dbpair.source, customers=300, orders=1000)
    spec = load_spec(afenv.SPECS_FOLDER / "demo_shop.yaml")
    _verified_run(dbpair, spec, "late")
    with dbpair.tgt() as c:
        c.execute("ALTER TABLE shop.orders ADD CONSTRAINT no_huge CHECK (amount < 1000000) NOT VALID")
        c.commit()
    with dbpair.src(autocommit=True) as c:
        c.execute("SET session_replication_role = replica")
        c.execute("UPDATE shop.customers SET full_name = 'via replica' WHERE id = (SELECT min(id) FROM shop.customers)")
        c.execute("RESET session_replication_role")
        c.execute("UPDATE shop.orders SET amount = 5000000 WHERE id = (SELECT max(id) FROM shop.orders)")
        bad = c.execute("SELECT max(op_id) FROM dbguard.change_ledger").fetchone()[0]
    with pytest.raises(capture.CaptureError) as err:
        stages.release(spec, "late")
    assert f"op_ids [{bad}]" in str(err.value) and "no_huge" in str(err.value)
    assert not capture.is_on(spec)  # the holds are lifted even though release failed
    with dbpair.tgt() as c:
        assert c.execute("SELECT full_name FROM shop.customers ORDER BY id LIMIT 1").fetchone()[0] == "via replica"
        assert c.execute("SELECT count(*) FROM dbguard.events WHERE run_id = 'late' AND stage = 'release_failed'"
                         ).fetchone()[0] == 1


def test_changes_applied_after_the_gate_are_verified_under_the_final_freeze(dbpair, reports):  # noqa: F811
    """Release re-verifies whole tables when ops were applied after the gate: a clean tail passes; a target
    that silently alters an applied value (an ALWAYS trigger only the target has) sets checksum_ok false and
    fails the run."""
    from dbguard import stages

    demo.load_shop(dbpair.source, customers=300, orders=1000)
    spec = load_spec(afenv.SPECS_FOLDER / "demo_shop.yaml")
    _verified_run(dbpair, spec, "tail")
    with dbpair.src(autocommit=True) as c:
        c.execute("UPDATE shop.orders SET note = 'after the gate' WHERE id IN (SELECT id FROM shop.orders LIMIT 3)")
    out = stages.release(spec, "tail")
    assert out["release_verify"]["checksum_ok"] is True and out["release_verify"]["applied_after_gate"] == 3

    _verified_run(dbpair, spec, "tail2")
    with dbpair.tgt(autocommit=True) as c:
        c.execute("CREATE FUNCTION public.shout() RETURNS trigger LANGUAGE plpgsql AS "
                  "$$BEGIN NEW.note := upper(NEW.note); RETURN NEW; END$$")
        c.execute("CREATE TRIGGER shout BEFORE INSERT OR UPDATE ON shop.orders FOR EACH ROW "
                  "EXECUTE FUNCTION public.shout()")
        c.execute("ALTER TABLE shop.orders ENABLE ALWAYS TRIGGER shout")
    with dbpair.src(autocommit=True) as c:
        c.execute("UPDATE shop.orders SET note = 'quiet' WHERE id = (SELECT min(id) FROM shop.orders)")
    with pytest.raises(capture.CaptureError, match="tables differ after the changes applied since the checksum gate"):
        stages.release(spec, "tail2")
    assert not capture.is_on(spec)
    with dbpair.tgt() as c:
        assert c.execute("SELECT value FROM dbguard.metrics WHERE run_id = 'tail2' AND name = 'checksum_ok'"
                         ).fetchone()[0] is False


def test_an_abort_removes_capture_even_when_the_last_drain_cannot_run(dbpair, reports):  # noqa: F811
    """Someone dropped a target table by hand, then aborts: rollback cannot apply the last changes there,
    but it still removes the triggers and lifts the schema freeze, and says why the drain was skipped."""
    from dbguard import stages

    demo.load_shop(dbpair.source, customers=200, orders=600)
    spec = load_spec(afenv.SPECS_FOLDER / "demo_shop.yaml")
    stages.preflight(spec, "gone")
    stages.capture_on(spec, "gone")
    with dbpair.src(autocommit=True) as c:
        c.execute("UPDATE shop.orders SET note = 'x' WHERE id = (SELECT min(id) FROM shop.orders)")
    with dbpair.tgt(autocommit=True) as c:
        c.execute("DROP TABLE shop.orders")
    with pytest.raises(capture.CaptureError, match="destination table shop.orders does not exist"):
        stages.release(spec, "gone")  # a normal release refuses: the change cannot be applied or verified
    assert capture.is_on(spec)
    out = stages.rollback(spec, "gone")
    assert "destination table shop.orders does not exist" in out["final_drain"]["error"]
    assert not capture.is_on(spec)
    with dbpair.src(autocommit=True) as c:
        c.execute("ALTER TABLE shop.orders ADD COLUMN after_abort int")  # the schema freeze is lifted
