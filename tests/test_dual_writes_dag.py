"""Zero loss while the application keeps writing: a seeded writer doing inserts,
updates, deletes and key changes at >= 200 ops/s runs during the whole DAG;
at the end source and target are identical row for row (an independent md5
over every row's text, not dbguard's checksum)."""
from __future__ import annotations

import time

from dbguard import capture, demo
from dbguard.airflow import env as afenv
from dbguard.spec import load_spec
from test_dag import dagbag, reports  # noqa: F401  (fixture)
from util import fingerprint
from writer import BackgroundWriter


def test_writer_during_the_whole_dag_loses_nothing(airflow_db, dbpair, reports):  # noqa: F811
    demo.load_shop(dbpair.source, customers=3000, orders=12000)
    writer = BackgroundWriter(dbpair.src_dsn, seed=11, rate=250, honour_flag="demo_shop").start()
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
        assert len(freezes) == 2 and max(freezes) < 10_000, freezes  # final verify, then release


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
    stages.release(spec, "r")
    assert not capture.is_on(spec)
