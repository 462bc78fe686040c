"""Fault injection (faults/, `make faults`): the scenarios that fit CI time, through the same code, on small
data; plus regression tests for the bugs the suite found."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from dbguard import capture, stages
from dbguard.cutover import pointer
from dbguard.demo import load_shop
from dbguard.spec import load_spec

from conftest import ROOT


def test_capture_on_takes_the_control_row_before_the_tables(dbpair):
    """An application following the pointer holds the control row FOR SHARE, then writes a table. capture_on
    used to lock the tables first and the control row last: the writer's next write waited for capture_on,
    capture_on for the writer's row lock, until capture_on's lock step timed out (found by faults: capture_on
    under a pointer-following writer at 150 ops/s failed about every other time). Now it takes the row first,
    so the application's write is never queued behind it."""
    load_shop(dbpair.src_dsn, customers=20, orders=50)
    spec = load_spec(ROOT / "include/migrations/demo_shop.yaml")
    stages.preflight(spec, "r")
    with dbpair.src() as src:
        pointer.prepare(src, spec)
        src.commit()
    app_ptr, app = dbpair.src(), dbpair.src(autocommit=True)
    try:
        app_ptr.execute("SELECT write_target FROM dbguard.control WHERE migration = 'demo_shop' FOR SHARE")
        errors: list[BaseException] = []

        def on():
            try:
                stages.capture_on(spec, "r")
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        th = threading.Thread(target=on)
        th.start()
        time.sleep(0.5)  # capture_on is waiting now (for the control row)
        app.execute("SET statement_timeout = '5s'")
        waits = []
        for i in range(5):  # the application's other connection keeps writing meanwhile
            t0 = time.monotonic()
            app.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) "
                        "SELECT %s, min(id), now(), 1, 'placed' FROM shop.customers", (990000001 + i,))
            waits.append((time.monotonic() - t0) * 1000)
            time.sleep(0.1)
        waited_ms = max(waits)
        app_ptr.commit()
        th.join(30)
        assert not th.is_alive() and not errors, errors
        assert waited_ms < 150, f"the application's write waited {waited_ms:.0f} ms behind capture_on"
        assert capture.is_on(spec)
    finally:
        app_ptr.close()
        app.close()


def test_drain_after_the_cursor_is_reset_replays_instead_of_failing(dbpair):
    """The applier's cursor set back to an earlier state (a restore of that row, an operator replaying): the
    next drain applies those batches again (idempotent full images, in order). It used to number its batch
    from the cursor's count, collide with the batches already recorded (apply_batches_pkey) and fail on every
    drain from then on (found by faults batch_applied_twice)."""
    from util import fingerprint

    load_shop(dbpair.src_dsn, customers=50, orders=200)
    spec = load_spec(ROOT / "include/migrations/demo_shop.yaml")
    stages.preflight(spec, "r")
    stages.capture_on(spec, "r")
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, "r", t.name):
            stages.copy_range(spec, "r", r)
    capture.drain(spec, "r")
    cols = "window_no, prev_snapshot, cur_snapshot, op_cursor, high_water, applied, batches"
    with dbpair.tgt() as t:
        saved = t.execute(f"SELECT {cols} FROM dbguard.apply_cursor WHERE run_id = 'r'").fetchone()
    with dbpair.src(autocommit=True) as app:
        for i in range(35):
            app.execute("UPDATE shop.orders SET amount = %s WHERE id = (SELECT id FROM shop.orders ORDER BY id "
                        "OFFSET %s LIMIT 1)",
                        (i + 1, i % 7))
    assert capture.drain(spec, "r", batch_ops=10)["batches"] >= 3
    with dbpair.tgt() as t:
        t.execute(f"UPDATE dbguard.apply_cursor SET ({cols}) = (%s, %s, %s, %s, %s, %s, %s) WHERE run_id = 'r'", saved)
    again = capture.drain(spec, "r", batch_ops=10)
    assert again["applied"] == 35 and again["dual_write_fail"] == 0
    with dbpair.src() as a, dbpair.tgt() as b:
        for rel in ("shop.customers", "shop.orders"):
            assert fingerprint(a, rel) == fingerprint(b, rel), rel


# The scenarios themselves (faults/scenarios.py), small data. dag_cleared_rerun (a real DAG run twice, ~55 s)
# is left to `make faults`: tests/test_dual_writes_dag.py already runs the DAG under a writer.
CI_SCENARIOS = ["range_sigkill", "target_restart", "applier_terminated_drain", "applier_terminated_cutover",
                "freeze_lock_timeout", "batch_applied_twice", "target_rejects_change", "rollback_interrupted"]


@pytest.mark.parametrize("name", CI_SCENARIOS)
def test_fault_scenario_recovers_without_loss(servers, name, monkeypatch):
    import json
    import sys

    sys.path.insert(0, str(ROOT))
    from faults.__main__ import run_one
    from faults import scenarios
    from faults.common import SIZES

    monkeypatch.setenv("DBGUARD_FAULTS_QUIET", "1")
    line = run_one(name, getattr(scenarios, name), SIZES["small"])
    print(json.dumps(line, default=str))
    assert line["outcome"] != "scenario_error", line
    assert line["injected"] is True, line  # the fault really happened
    assert line["recovered"] and line["lost"] == 0 and line["duplicated"] == 0, line
