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
