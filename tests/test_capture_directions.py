"""One capture, either direction: forward (source -> target) during the migration, reverse (target ->
source) after cutover. Real PostgreSQL; comparisons are independent (md5 over every row's text)."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from dbguard import capture
from dbguard.demo import load_shop

from test_capture import RUN, assert_identical, copy_tables, create_target, fingerprint, shop_spec
from util import spec as make_spec
from dbguard.writer import shop_writer


def _copied_and_drained(pair):
    load_shop(pair.src_dsn, customers=300, orders=1200)
    spec = shop_spec()
    create_target(pair.tgt_dsn, spec)
    capture.capture_on(spec, RUN)
    copy_tables(pair, spec)
    assert capture.drain(spec, RUN)["lag"] == 0


@pytest.fixture
def migrated(dbpair, prepared):
    """The shop copied to the target with forward capture on and drained: the state at cutover (a copy of one
    prepared per session)."""
    prepared("capture_directions.migrated", _copied_and_drained)
    spec = shop_spec()
    assert_identical(dbpair, spec)
    return spec


def test_reverse_capture_brings_every_target_write_back_to_the_source(dbpair, migrated):
    spec = migrated
    on = capture.capture_on(spec, RUN, direction="reverse")
    assert on["direction"] == "reverse" and capture.is_on(spec, direction="reverse")
    forward_ops_before = _ledger_count(dbpair.src_dsn, spec, "forward")
    # the application now writes to the target: inserts, updates, deletes and key changes
    stats = shop_writer(dbpair.tgt_dsn, seed=21, rate=None).run_for(1.0)
    assert stats["errors"] == 0, stats["first_error"]
    with dbpair.tgt(autocommit=True) as app:
        app.execute("UPDATE shop.orders SET id = id + 500000000 WHERE id = (SELECT min(id) FROM shop.orders)")
        app.execute("DELETE FROM shop.orders WHERE id = (SELECT max(id) FROM shop.orders WHERE id < 500000000)")
        # an ETL session with session_replication_role = replica is captured too (ENABLE ALWAYS)
        app.execute("SET session_replication_role = replica")
        app.execute("UPDATE shop.customers SET full_name = 'written as replica' "
                    "WHERE id = (SELECT min(id) FROM shop.customers)")
    assert stats["by_kind"].get("rekey_order", 0) > 0 and stats["by_kind"].get("delete_order", 0) > 0
    res = capture.drain(spec, RUN, direction="reverse")
    assert res["lag"] == 0 and res["dual_write_fail"] == 0 and res["applied"] > stats["ops"]
    assert_identical(dbpair, spec)
    with dbpair.src() as s:
        assert s.execute("SELECT count(*) FROM shop.customers WHERE full_name = 'written as replica'"
                         ).fetchone()[0] == 1
    # loop guard: forward capture is still on at the source, yet nothing the reverse applier wrote came back
    assert _ledger_count(dbpair.src_dsn, spec, "forward") == forward_ops_before
    assert capture.drain(spec, RUN)["applied"] == 0
    # each direction keeps its own cursor, ledger rows, control row and run-ledger stages
    assert capture.lag(spec, RUN, direction="reverse") == 0
    assert capture.flags(spec, direction="reverse")["dual_write"] is True
    assert capture.drift(spec, RUN, direction="reverse")["tables"]["orders"]["row_diff"] == 0
    off = capture.capture_off(spec, RUN, direction="reverse")
    assert len(off["dropped_functions"]) == 3
    assert not capture.is_on(spec, direction="reverse") and capture.is_on(spec)
    with dbpair.tgt() as t:
        stages = {r[0] for r in t.execute("SELECT stage FROM dbguard.events WHERE run_id = %s", (RUN,)).fetchall()}
    assert {"reverse_capture_on", "reverse_drain_changes", "reverse_capture_off", "capture_on"} <= stages


def _ledger_count(dsn, spec, direction) -> int:
    with psycopg.connect(dsn) as c:
        return c.execute("SELECT count(*) FROM dbguard.change_ledger WHERE migration = %s AND direction = %s",
                         (spec.name, direction)).fetchone()[0]


def test_write_as_replica_role_on_the_source_is_captured(dbpair, migrated):
    """pg_restore --disable-triggers, ETL tools and logical replication apply run with
    session_replication_role = replica; ordinary triggers do not fire there, ENABLE ALWAYS ones do."""
    spec = migrated
    with dbpair.src(autocommit=True) as etl:
        etl.execute("SET session_replication_role = replica")
        etl.execute("UPDATE shop.orders SET note = 'etl' WHERE id IN (SELECT id FROM shop.orders ORDER BY id LIMIT 5)")
    assert capture.drain(spec, RUN)["applied"] == 5
    assert_identical(dbpair, spec)


ITEMS = [{"name": "items", "schema": "public", "key": ["id"], "target": {"schema": "mirror"},
          "columns": [{"name": "id", "type": "integer"}, {"name": "v", "type": "text"},
                      {"name": "f", "type": "double precision"}]}]


def test_forward_and_reverse_in_one_database_never_mix(dbpair, monkeypatch):
    """Source and target are one database (two schemas): both directions on at once, each applier's writes
    are skipped by the other direction's triggers, cursors and ledgers stay apart."""
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", dbpair.src_dsn)
    spec = make_spec(ITEMS, name="samedb")
    with dbpair.src(autocommit=True) as c:
        c.execute("CREATE SCHEMA mirror")
        for rel in ("public.items", "mirror.items"):
            c.execute(f"CREATE TABLE {rel} (id integer PRIMARY KEY, v text, f double precision)")
    capture.capture_on(spec, RUN)
    capture.capture_on(spec, RUN, direction="reverse")
    with dbpair.src(autocommit=True) as c:
        c.execute("INSERT INTO public.items SELECT g, 'src ' || g, -0.0 FROM generate_series(1, 50) g")
        c.execute("INSERT INTO mirror.items SELECT g, 'tgt ' || g, 1e-310 FROM generate_series(1001, 1030) g")
    assert capture.drain(spec, RUN)["applied"] == 50
    assert capture.drain(spec, RUN, direction="reverse")["applied"] == 30
    # neither applier's writes were captured again: a second round moves nothing
    assert capture.drain(spec, RUN)["applied"] == 0
    assert capture.drain(spec, RUN, direction="reverse")["applied"] == 0
    with dbpair.src() as c:
        assert fingerprint(dbpair.src_dsn, "public", "items", ["id", "v", "f"]) == \
            fingerprint(dbpair.src_dsn, "mirror", "items", ["id", "v", "f"])
        assert c.execute("SELECT count(*) FROM public.items").fetchone()[0] == 80
        assert c.execute("SELECT count(*) FROM dbguard.control WHERE migration = 'samedb'").fetchone()[0] == 2
    for d in ("forward", "reverse"):
        capture.capture_off(spec, RUN, direction=d)


def test_quiesced_is_bounded_names_the_blocker_and_retries(dbpair, migrated):
    spec = migrated
    blocker = dbpair.src()
    blocker.execute("UPDATE shop.orders SET note = 'held' WHERE id = (SELECT min(id) FROM shop.orders)")
    t0 = time.monotonic()
    with pytest.raises(capture.CaptureError) as err:
        with capture.quiesced(spec, RUN, lock_timeout_ms=150, retries=2):
            pass
    assert time.monotonic() - t0 < 5
    msg = str(err.value)
    assert f"pid {blocker.info.backend_pid}" in msg and "idle in transaction" in msg
    assert "lock_timeout_ms=150" in msg and "3 attempt(s)" in msg
    # the blocker ends during the retries: the next attempt freezes, drains its write and succeeds
    threading.Timer(1.0, blocker.commit).start()
    with capture.quiesced(spec, RUN, lock_timeout_ms=150, retries=30) as (_, info):
        assert info["attempts"] > 1
    blocker.close()
    assert info["drained"] == 1 and info["freeze_ms"] >= 0
    assert_identical(dbpair, spec)


def test_a_bad_direction_is_refused_naming_the_choices(dbpair, migrated):
    with pytest.raises(capture.CaptureError, match="'forward'.*'reverse'"):
        capture.drain(migrated, RUN, direction="backward")


def test_freeze_gives_way_instead_of_deadlocking_with_the_application(dbpair, migrated):
    """An application transaction holds orders and then wants customers, while the freeze holds customers
    and wants orders. The freeze waits in steps shorter than deadlock_timeout and lets go in between (and
    retries when it is the deadlock victim), so the application commits and then the freeze succeeds."""
    spec = migrated
    app = dbpair.src()
    app.execute("UPDATE shop.orders SET note = 'app' WHERE id = (SELECT min(id) FROM shop.orders)")
    result: dict = {}

    def freeze():
        try:
            with capture.quiesced(spec, RUN, lock_timeout_ms=5000) as (_, info):
                result["info"] = info
        except Exception as e:  # noqa: BLE001 - asserted below
            result["error"] = e

    th = threading.Thread(target=freeze)
    th.start()
    time.sleep(0.2)  # the freeze now holds customers and waits for orders
    app.execute("UPDATE shop.customers SET full_name = 'app' WHERE id = (SELECT min(id) FROM shop.customers)")
    app.commit()
    app.close()
    th.join(15)
    assert "error" not in result, result.get("error")
    assert result["info"]["drained"] == 2
    assert_identical(dbpair, spec)


ORM = [{"name": "OrderItems", "schema": "Shop", "key": ["orderId", "lineNo"],
        "columns": [{"name": "orderId", "type": "bigint"}, {"name": "lineNo", "type": "integer"},
                    {"name": "createdAt", "type": "timestamp with time zone"},
                    {"name": "a'); DROP TABLE x; --", "type": "text"}]}]


def test_orm_style_and_injection_shaped_names_capture_both_ways(dbpair):
    spec = make_spec(ORM, name="orm")
    ddl = ('CREATE SCHEMA "Shop"; CREATE TABLE "Shop"."OrderItems" ("orderId" bigint, "lineNo" integer, '
           '"createdAt" timestamptz, "a\'); DROP TABLE x; --" text, PRIMARY KEY ("orderId", "lineNo"))')
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(ddl)
    capture.capture_on(spec, RUN)
    capture.capture_on(spec, RUN, direction="reverse")
    assert capture.is_on(spec) and capture.is_on(spec, direction="reverse")
    with dbpair.src(autocommit=True) as c:
        c.execute('INSERT INTO "Shop"."OrderItems" SELECT g, 1, now(), \'x\' FROM generate_series(1, 10) g')
        c.execute('UPDATE "Shop"."OrderItems" SET "lineNo" = 2 WHERE "orderId" = 3')
    with dbpair.tgt(autocommit=True) as c:
        c.execute('INSERT INTO "Shop"."OrderItems" VALUES (99, 1, now(), \'from target\')')
    assert capture.drain(spec, RUN)["applied"] == 11
    assert capture.drain(spec, RUN, direction="reverse")["applied"] == 1
    for d in ("forward", "reverse"):
        assert capture.drain(spec, RUN, direction=d)["applied"] == 0
    assert fingerprint(dbpair.src_dsn, "Shop", "OrderItems", ["orderId", "lineNo", "createdAt"], key="orderId") == \
        fingerprint(dbpair.tgt_dsn, "Shop", "OrderItems", ["orderId", "lineNo", "createdAt"], key="orderId")
    for d in ("forward", "reverse"):
        assert len(capture.capture_off(spec, RUN, direction=d)["dropped_functions"]) == 2
    # names stayed identifiers: the odd column carried the target's write back, nothing was executed
    with dbpair.src() as c:
        assert c.execute('SELECT count(*) FROM "Shop"."OrderItems" WHERE "a\'); DROP TABLE x; --" = \'from target\'')\
            .fetchone()[0] == 1
