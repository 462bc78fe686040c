"""Cutover and rollback on real PostgreSQL (dbguard.cutover), with a live writer that follows the pointer."""
from __future__ import annotations

import threading
import time

import psycopg
import pytest

from dbguard import capture, cutover, ledger, stages
from dbguard.demo import load_shop
from dbguard.spec import load_spec
from dbguard.writer import Writer, orders_writer

from test_capture import ROOT, assert_identical

RUN = "cutover-run"


def shop_spec():
    return load_spec(ROOT / "include/migrations/demo_shop.yaml")


def migrate(spec, run_id=RUN):
    """The library stages a run goes through up to the flip (what the DAG's tasks call)."""
    stages.preflight(spec, run_id)
    stages.capture_on(spec, run_id)
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, run_id, t.name):
            stages.copy_range(spec, run_id, r)
    assert stages.reconcile(spec, run_id)["checksum_ok"]
    stages.finish_schema(spec, run_id)


def _migrated_shop(customers: int, orders: int):
    def build(pair):
        load_shop(pair.src_dsn, customers=customers, orders=orders)
        migrate(shop_spec())
    return build


@pytest.fixture
def migrated(prepared):
    """The shop (300 customers, 1,200 orders) migrated up to the flip: a copy of one prepared per session."""
    prepared("cutover.migrated", _migrated_shop(300, 1200))
    return shop_spec()


def pointer_writer(dbpair, spec) -> Writer:
    """An application that follows the control_table pointer: each transaction reads
    dbguard.control.write_target FOR SHARE on the source and inserts on that side before it commits. Every
    acknowledged insert is remembered (side_of: key -> side), so a lost or doubled write shows."""
    return orders_writer(dbpair.src_dsn, dbpair.tgt_dsn, spec.name, rate=200, weights={"insert": 1})


def _ids(dsn) -> set[int]:
    with psycopg.connect(dsn) as c:
        return {r[0] for r in c.execute("SELECT id FROM shop.orders")}


def test_check_ready_names_what_blocks(dbpair):
    load_shop(dbpair.src_dsn, customers=20, orders=50)
    spec = shop_spec()
    stages.preflight(spec, RUN)
    reasons = cutover.check_ready(spec, RUN)
    assert any("forward capture is not on" in r for r in reasons)
    with pytest.raises(cutover.CutoverError, match="refused before freezing"):
        cutover.cutover(spec, RUN)
    assert cutover.state(spec, RUN)["phase"] == "before"


def test_cutover_under_a_writer_then_rollback_loses_nothing(dbpair, migrated):
    spec = migrated
    assert cutover.check_ready(spec, RUN) == []
    w = pointer_writer(dbpair, spec).start()
    time.sleep(0.7)
    out = cutover.cutover(spec, RUN)
    time.sleep(0.7)
    s = cutover.state(spec, RUN)
    assert s["phase"] == "cutover" and s["primary"] == "target" and s["pointer_says"] == "target"
    assert not capture.is_on(spec) and capture.is_on(spec, direction="reverse")
    with pytest.raises(cutover.CutoverError, match="already past the cutover"):  # the flip happens once
        cutover.cutover(spec, RUN)
    # writes after cutover of every kind, on the new primary
    with dbpair.tgt(autocommit=True) as app:
        app.execute("UPDATE shop.customers SET full_name = 'after cutover' WHERE id = (SELECT min(id) FROM shop.customers)")
        app.execute("UPDATE shop.orders SET id = id + 100000000 WHERE id = (SELECT min(id) FROM shop.orders)")
        app.execute("DELETE FROM shop.orders WHERE id = (SELECT max(id) FROM shop.orders WHERE id < 800000000)")
    # a straggler on the old primary is refused, naming the migration and the new primary
    with dbpair.src(autocommit=True) as straggler, pytest.raises(psycopg.errors.ReadOnlySqlTransaction,
                                                                  match=r"fenced: migration demo_shop .*target"):
        straggler.execute("UPDATE shop.customers SET full_name = 'split brain' WHERE id = 1")
    rb = cutover.rollback(spec, RUN)
    time.sleep(0.5)
    w.stop()
    assert w.errors == [], w.errors[:3]
    sides = set(w.side_of.values())
    assert sides == {"source", "target"}, sides  # the writer followed the flip and the flip back
    assert set(w.side_of) <= _ids(dbpair.src_dsn)  # nothing lost
    # the writer's inserts into the source after the flip back are (rightly) only there; without them the
    # two sides are equal row for row (a doubled insert would have failed its primary key)
    last_on_target = max(k for k, side in w.side_of.items() if side == "target")
    after = [k for k, side in w.side_of.items() if side == "source" and k > last_on_target]
    assert after and _ids(dbpair.src_dsn) - _ids(dbpair.tgt_dsn) == set(after)
    with dbpair.src(autocommit=True) as s:
        s.execute("DELETE FROM shop.orders WHERE id = ANY(%s)", (after,))
    assert_identical(dbpair, spec)
    assert rb["status"] == "rolled_back" and cutover.state(spec, RUN)["primary"] == "source"
    with dbpair.src() as s:
        assert s.execute("SELECT count(*) FROM shop.customers WHERE full_name = 'after cutover'").fetchone()[0] == 1
    # the target is fenced now; the source writable
    with dbpair.tgt(autocommit=True) as t, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        t.execute("DELETE FROM shop.orders WHERE id = 1")
    with dbpair.src(autocommit=True) as s:
        s.execute("UPDATE shop.customers SET full_name = 'source again' WHERE id = (SELECT min(id) FROM shop.customers)")
    assert out["cutover_ms"] < 5000 and [x["step"] for x in out["steps"]][:4] == ["prepare", "count", "freeze", "verify"]
    print(f"cutover_ms={out['cutover_ms']} rollback_ms={rb['rollback_ms']} writer_max_stall_ms={w.max_stall_ms:.0f}")
    assert w.max_stall_ms < out["cutover_ms"] + 1000
    with dbpair.tgt() as t:
        m = ledger.metrics(t, RUN)
        stages_seen = {r[0] for r in t.execute("SELECT stage FROM dbguard.events WHERE run_id = %s", (RUN,))}
    assert m["cutover_ms"] == out["cutover_ms"] and m["rollback_ms"] == rb["rollback_ms"]
    assert m["writes_after_cutover"]["target"] >= 3
    assert {"cutover.freeze", "cutover.pointer", "rollback.pointer"} <= stages_seen
    # a second rollback is a no-op
    assert cutover.rollback(spec, RUN)["already"] is True


def _primary_is(dbpair, spec, side):
    """Exactly one writable primary, and the pointer and the recorded state agree with it."""
    other = "target" if side == "source" else "source"
    dsn = {"source": dbpair.src_dsn, "target": dbpair.tgt_dsn}
    s = cutover.state(spec, RUN)
    assert s["primary"] == side and s["pointer_says"] == side, s
    with psycopg.connect(dsn[side], autocommit=True) as c:  # writable
        c.execute("UPDATE shop.customers SET full_name = full_name WHERE id = (SELECT min(id) FROM shop.customers)")
    with psycopg.connect(dsn[other], autocommit=True) as c:
        if side == "source":
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction) if s["phase"] != "before" else _nothing():
                c.execute("UPDATE shop.customers SET full_name = full_name WHERE id = "
                          "(SELECT min(id) FROM shop.customers)")
        else:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
                c.execute("UPDATE shop.customers SET full_name = full_name WHERE id = "
                          "(SELECT min(id) FROM shop.customers)")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


@pytest.mark.parametrize("step", [s for s in cutover.CUTOVER_STEPS if s not in cutover.CUTOVER_COMMITTED])
def test_a_failed_cutover_step_leaves_the_source_primary(dbpair, migrated, step):
    spec = migrated
    with pytest.raises(cutover.CutoverError, match=rf"step '{step}'.*source stays the writable primary"):
        cutover.cutover(spec, RUN, fail_at=step)
    s = cutover.state(spec, RUN)
    assert s["phase"] == "before" and step in s["last_error"]
    _primary_is(dbpair, spec, "source")
    assert capture.is_on(spec) and not capture.is_on(spec, direction="reverse")
    # a write made now is not lost: the next cutover carries it over
    with dbpair.src(autocommit=True) as app:
        app.execute("UPDATE shop.customers SET full_name = 'between attempts' WHERE id = (SELECT min(id) FROM shop.customers)")
    cutover.cutover(spec, RUN)
    _primary_is(dbpair, spec, "target")
    with dbpair.tgt() as t:
        assert t.execute("SELECT count(*) FROM shop.customers WHERE full_name = 'between attempts'").fetchone()[0] == 1


@pytest.mark.parametrize("step", cutover.ROLLBACK_STEPS)
def test_an_interrupted_rollback_leaves_one_primary_and_resumes(dbpair, migrated, step):
    spec = migrated
    cutover.cutover(spec, RUN)
    with dbpair.tgt(autocommit=True) as app:
        app.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) "
                    "SELECT 777000001, min(id), now(), 5, 'after cutover' FROM shop.customers")
        app.execute("DELETE FROM shop.orders WHERE id = (SELECT min(id) FROM shop.orders)")
    with pytest.raises(cutover.CutoverError, match=rf"step '{step}'.*run rollback again"):
        cutover.rollback(spec, RUN, fail_at=step)
    s = cutover.state(spec, RUN)
    assert s["phase"] == "rolling_back"
    _primary_is(dbpair, spec, "source" if "pointer" in s["checkpoints"] else "target")
    out = cutover.rollback(spec, RUN)  # resumes
    assert out["status"] == "rolled_back"
    _primary_is(dbpair, spec, "source")
    assert cutover.state(spec, RUN)["phase"] == "rolled_back"
    assert not capture.is_on(spec, direction="reverse")
    assert_identical(dbpair, spec)
    assert 777000001 in _ids(dbpair.src_dsn)


def test_sequences_after_cutover_and_finish(dbpair):
    """An insert without a key on the new primary never collides with a source key; finish ends the offer."""
    load_shop(dbpair.src_dsn, customers=50, orders=100)
    with dbpair.src(autocommit=True) as c:
        c.execute("CREATE TABLE shop.notes (id bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, body text)")
        c.execute("INSERT INTO shop.notes (body) SELECT 'n' || g FROM generate_series(1, 40) g")
        c.execute("INSERT INTO shop.notes (id, body) VALUES (1000, 'explicit key above the sequence')")
    base = shop_spec()
    spec = base.model_copy(update={"tables": [*base.tables, base.tables[0].model_copy(update={
        "name": "notes", "key": ["id"], "columns": [], "foreign_keys": [], "target": None})]})
    from dbguard.spec import parse_spec
    spec = parse_spec(spec.model_dump(by_alias=True, exclude_none=True), "test")
    migrate(spec)
    with dbpair.tgt() as t:
        assert t.execute("SELECT pg_get_serial_sequence('shop.notes', 'id')").fetchone()[0], \
            "the target owns an identity sequence (SCHEMA's preflight)"
    out = cutover.cutover(spec, RUN)
    assert any(x["table"].endswith("notes") and x["set_to"] == 1000 for x in out["sequences"]), out["sequences"]
    with dbpair.tgt(autocommit=True) as app:
        new_id = app.execute("INSERT INTO shop.notes (body) VALUES ('on the new primary') RETURNING id").fetchone()[0]
    assert new_id > 1000
    with pytest.raises(cutover.CutoverError, match="rollback is offered until"):
        cutover.finish(spec, RUN)
    fin = cutover.finish(spec, RUN, force=True)
    assert fin["rollback_offered"] is False and not capture.is_on(spec, direction="reverse")
    with pytest.raises(cutover.CutoverError, match="rollback is no longer offered"):
        cutover.rollback(spec, RUN)
    with dbpair.src(autocommit=True) as c, pytest.raises(psycopg.errors.ReadOnlySqlTransaction):
        c.execute("INSERT INTO shop.notes (body) VALUES ('to the old primary')")


def test_demo_round_trip_cli(dbpair, capfd):
    """`dbguard demo round_trip`: live pointer-following writer, migrate, cut over, write, roll back, compare."""
    import json

    from dbguard import cli

    assert cli.main(["demo", "round_trip", "--customers", "200", "--orders", "800"]) == 0
    last = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert last["status"] == "rolled_back" and last["lost"] == 0
    assert last["cutover_ms"] > 0 and last["rollback_ms"] > 0 and last["writes_after_cutover"]["target"] > 50


# ---- pgbouncer pointer -----------------------------------------------------------------------------

PGBOUNCER = "/usr/sbin/pgbouncer"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def pgbouncer(dbpair):
    """A real PgBouncer (transaction pooling) on a free localhost port; alias `shopdb` -> the source."""
    import os
    import shutil
    import subprocess

    if not os.path.exists(PGBOUNCER):
        pytest.fail(f"{PGBOUNCER} is missing: apt-get install pgbouncer (the Makefile does as root)")
    src = psycopg.connect(dbpair.src_dsn)
    host, dbname, user = src.info.host, src.info.dbname, src.info.user
    port = src.info.port
    src.close()
    import tempfile
    from pathlib import Path

    d = Path(tempfile.mkdtemp(prefix="dbguard-pgbouncer-"))  # readable by the user PgBouncer runs as
    lport = _free_port()
    ini = d / "pgbouncer.ini"
    ini.write_text(f"""[databases]
shopdb = host={host} port={port} dbname={dbname} user={user}
[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {lport}
unix_socket_dir =
auth_type = trust
auth_file = {d}/users.txt
admin_users = {user}
pool_mode = transaction
server_reset_query =
logfile = {d}/pgbouncer.log
pidfile = {d}/pgbouncer.pid
""")
    (d / "users.txt").write_text(f'"{user}" ""\n')
    for p in (d, ini, d / "users.txt"):
        os.chmod(p, 0o777 if p.is_dir() else 0o666)
    # as root, PgBouncer must drop to a user that can reach the servers' socket directory (its owner)
    owner = None
    if os.geteuid() == 0:
        import pwd
        owner = pwd.getpwuid(os.stat(host).st_uid).pw_name if host.startswith("/") else "postgres"
    cmd = [PGBOUNCER, "-d", *(["-u", owner] if owner else []), str(ini)]
    subprocess.run(cmd, check=True)
    deadline = time.monotonic() + 10
    while not (d / "pgbouncer.pid").exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    pid = int((d / "pgbouncer.pid").read_text())
    yield {"ini": str(ini), "port": lport, "user": user, "dsn": f"host=127.0.0.1 port={lport} dbname=shopdb user={user}"}
    os.kill(pid, 15)
    shutil.rmtree(d, ignore_errors=True)


def test_pgbouncer_pointer_moves_a_pooled_client_and_back(dbpair, pgbouncer):
    load_shop(dbpair.src_dsn, customers=200, orders=500)
    spec = shop_spec()
    spec = spec.model_copy(update={"cutover": spec.cutover.model_copy(update={
        "pointer": "pgbouncer", "pgbouncer": cutover_pgb(pgbouncer)})})
    migrate(spec)
    with psycopg.connect(dbpair.src_dsn) as c:
        src_dir = c.execute("SELECT current_setting('data_directory')").fetchone()[0]
    with psycopg.connect(dbpair.tgt_dsn) as c:
        tgt_dir = c.execute("SELECT current_setting('data_directory')").fetchone()[0]
    app = psycopg.connect(pgbouncer["dsn"], autocommit=True, prepare_threshold=None)
    where = lambda: app.execute("SELECT current_setting('data_directory')").fetchone()[0]  # noqa: E731
    written, errors, stop = [], [], threading.Event()
    import itertools
    ids = itertools.count(600_000_001)

    def write():
        while not stop.is_set():
            i = next(ids)
            try:
                app.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) "
                            "SELECT %s, min(id), now(), 2, 'via pgbouncer' FROM shop.customers", (i,))
                written.append(i)
            except psycopg.Error as e:
                errors.append(str(e).splitlines()[0])
            time.sleep(0.01)

    assert where() == src_dir
    # a cutover failing after the alias was rewritten points it back and resumes it: the client is on the source
    with pytest.raises(cutover.CutoverError, match="step 'unfreeze'"):
        cutover.cutover(spec, RUN, fail_at="unfreeze")
    assert where() == src_dir and cutover.state(spec, RUN)["pointer_says"] == "source"
    th = threading.Thread(target=write, daemon=True)
    th.start()
    time.sleep(0.5)
    cutover.cutover(spec, RUN)
    time.sleep(0.5)
    s = cutover.state(spec, RUN)
    assert s["primary"] == "target" and s["pointer_says"] == "target"
    n_at_cutover = len(written)
    time.sleep(0.5)
    stop.set()
    th.join(10)
    assert where() == tgt_dir  # the same client connection, now on the target
    assert len(written) > n_at_cutover and errors == [], errors[:3]
    stop.clear()
    th = threading.Thread(target=write, daemon=True)
    th.start()
    time.sleep(0.3)
    cutover.rollback(spec, RUN)
    time.sleep(0.5)
    stop.set()
    th.join(10)
    assert where() == src_dir and cutover.state(spec, RUN)["pointer_says"] == "source"
    assert errors == [], errors[:3]
    assert set(written) <= _ids(dbpair.src_dsn)  # nothing lost across both flips
    app.close()


def cutover_pgb(p):
    from dbguard.spec import PgBouncer

    return PgBouncer(config=p["ini"], database="shopdb", host="127.0.0.1", port=p["port"], user=p["user"])


# ---- the verified watermark: the freeze checks what changed since the checksum gate ---------------------

def _gate(spec):
    passed, message = stages.checksum_gate(spec, RUN)
    assert passed, message


def test_after_the_gate_the_freeze_verifies_only_the_changed_rows(dbpair, migrated):
    spec = migrated
    _gate(spec)
    w = pointer_writer(dbpair, spec).start()
    with dbpair.src(autocommit=True) as app:  # updates, a key change and a delete of rows the gate verified
        app.execute("UPDATE shop.customers SET full_name = 'after the gate' WHERE id IN (SELECT id FROM shop.customers "
                    "ORDER BY id LIMIT 5)")
        app.execute("UPDATE shop.orders SET id = id + 100000000 WHERE id = (SELECT min(id) FROM shop.orders)")
        app.execute("DELETE FROM shop.orders WHERE id = (SELECT max(id) FROM shop.orders WHERE id < 800000000)")
    time.sleep(0.7)
    out = cutover.cutover(spec, RUN)
    time.sleep(0.3)
    w.stop()
    assert out["verify_mode"] == "changed", out
    assert out["verify"]["customers"]["changed_keys"] >= 5 and out["verify"]["orders"]["changed_keys"] >= 3
    assert out["verify"]["orders"]["count"] == out["verify"]["orders"]["target_count"] > 1000
    capture.drain(spec, RUN, direction="reverse")
    assert_identical(dbpair, spec)
    with dbpair.tgt() as t:  # the note-triggers are gone with the flip: the target is the application's now
        assert t.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'dbguard_writes%'").fetchone()[0] == 0


def test_a_foreign_write_to_the_target_after_the_gate_gets_the_whole_table_verify(dbpair, migrated):
    """A row the ledger never touched, changed on the target by someone else: the changed-rows verify could not
    see it, so the noted write sends the freeze back to whole tables, which refuse the flip."""
    spec = migrated
    _gate(spec)
    with dbpair.tgt(autocommit=True) as intruder:
        intruder.execute("SET session_replication_role = replica")  # noted all the same (ENABLE ALWAYS)
        intruder.execute("UPDATE shop.customers SET full_name = 'intruder' WHERE id = (SELECT max(id) FROM shop.customers)")
    with pytest.raises(cutover.CutoverError, match="count \\+ checksum differ under the freeze: customers: source "
                                                   "\\{'count'"):
        cutover.cutover(spec, RUN)
    assert cutover.state(spec, RUN)["primary"] == "source"


def test_an_applier_mistake_on_a_changed_row_is_caught_by_the_changed_rows_verify(dbpair, migrated):
    spec = migrated
    _gate(spec)
    with dbpair.src(autocommit=True) as app:
        app.execute("UPDATE shop.customers SET full_name = 'right' WHERE id = (SELECT min(id) FROM shop.customers)")
    capture.drain(spec, RUN)
    with dbpair.tgt(autocommit=True) as bad:  # what a wrong apply would leave: not noted (it is the applier)
        bad.execute("SELECT set_config('dbguard.applying', 'on', false)")
        bad.execute("UPDATE shop.customers SET full_name = 'wrong' WHERE id = (SELECT min(id) FROM shop.customers)")
    with pytest.raises(cutover.CutoverError, match="rows changed since the gate"):
        cutover.cutover(spec, RUN)
    assert cutover.state(spec, RUN)["primary"] == "source"


def test_finish_schema_leaves_the_target_with_a_visibility_map_and_statistics(dbpair, migrated):
    """finish_schema ends with VACUUM (ANALYZE) of the target tables: every page all-visible (count(*) can read
    the primary key's index alone) and statistics for the planner, where the copy left neither."""
    with dbpair.tgt() as t:
        rows = t.execute("SELECT c.relname, c.relpages, c.relallvisible, c.reltuples FROM pg_class c JOIN pg_namespace "
                         "n ON n.oid = c.relnamespace WHERE n.nspname = 'shop' AND c.relname IN ('customers', 'orders') "
                         "ORDER BY 1").fetchall()
    assert [r[0] for r in rows] == ["customers", "orders"]
    for name, pages, visible, tuples in rows:
        assert pages > 0 and visible == pages and tuples == {"customers": 300, "orders": 1200}[name], rows


def test_the_whole_table_counts_are_taken_before_the_freeze_and_brought_up_to_it(dbpair, migrated, monkeypatch):
    """The freeze counts no whole table: the counts come from snapshots taken before it (step 'count', writers
    going on), plus what changed between those snapshots and the freeze (here 3 inserts and 2 deletes made
    right after the counts): the verify reports the counts as they are under the freeze."""
    from dbguard.cutover import watermark

    spec = migrated
    _gate(spec)
    real = watermark.count_before

    def count_then_write(spec_, run_id):
        counted = real(spec_, run_id)
        with dbpair.src(autocommit=True) as app:
            app.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) SELECT 900000000 + g, "
                        "(SELECT min(id) FROM shop.customers), now(), 1, 'placed' FROM generate_series(1, 3) g")
            app.execute("DELETE FROM shop.orders WHERE id IN (SELECT id FROM shop.orders ORDER BY id LIMIT 2)")
        return counted

    monkeypatch.setattr(watermark, "count_before", count_then_write)
    with dbpair.src() as c:
        n = c.execute("SELECT count(*) FROM shop.orders").fetchone()[0]
    out = cutover.cutover(spec, RUN)
    names = [s["step"] for s in out["steps"]]
    assert names.index("count") < names.index("freeze"), names
    assert out["verify_mode"] == "changed", out
    orders = out["verify"]["orders"]
    assert orders["counted"] == "before the freeze" and orders["count"] == orders["target_count"] == n + 1, orders
    assert out["verify"]["customers"]["counted"] == "before the freeze"
    capture.drain(spec, RUN, direction="reverse")
    assert_identical(dbpair, spec)


def test_a_write_that_passes_for_the_applier_is_caught_by_the_counts_before_the_freeze(dbpair, migrated):
    """A session of dbguard's own role that sets the applier's marker passes the note-trigger unnoted; a row it
    inserts on the target is no changed key, so only the whole-table counts (taken before the freeze) see it."""
    spec = migrated
    _gate(spec)
    with dbpair.tgt(autocommit=True) as bad:
        bad.execute("SELECT set_config('dbguard.applying', 'on', false)")
        bad.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) VALUES "
                    "(900000001, (SELECT min(id) FROM shop.customers), now(), 1, 'placed')")
    with pytest.raises(cutover.CutoverError, match="orders: source 1200 rows, target 1201"):
        cutover.cutover(spec, RUN)
    assert cutover.state(spec, RUN)["primary"] == "source"


def test_capture_off_and_on_after_the_gate_gets_the_whole_table_verify(dbpair, migrated):
    """A change made while capture was off is in no ledger: new capture triggers void the watermark."""
    spec = migrated
    _gate(spec)
    capture.capture_off(spec, RUN)
    with dbpair.src(autocommit=True) as app:
        app.execute("UPDATE shop.customers SET full_name = 'uncaptured' WHERE id = (SELECT max(id) FROM shop.customers)")
    capture.capture_on(spec, RUN)
    with pytest.raises(cutover.CutoverError, match="count \\+ checksum differ under the freeze: customers: source "
                                                   "\\{'count'"):
        cutover.cutover(spec, RUN)


def test_dropping_the_note_triggers_gives_way_to_an_application_on_the_target(dbpair, migrated):
    """After the flip the application writes the target while the note-triggers go: a writer holding one table
    and then reading the other (a foreign-key check does that) must never be a deadlock victim."""
    from dbguard.cutover import watermark

    spec = migrated
    _gate(spec)
    errors = []
    with dbpair.tgt() as app:
        app.execute("LOCK TABLE shop.orders IN ROW EXCLUSIVE MODE")  # an INSERT into orders in progress
        t = threading.Thread(target=lambda: errors.extend([]) if watermark.disarm(spec) is None else None)
        t.start()
        time.sleep(0.6)
        app.execute("SELECT count(*) FROM shop.customers").fetchone()  # its foreign-key check on customers
        app.commit()
    t.join(30)
    assert not t.is_alive() and not errors
    with dbpair.tgt() as c:
        assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'dbguard_writes%'").fetchone()[0] == 0


def test_a_note_trigger_disabled_after_the_gate_gets_the_whole_table_verify(dbpair, migrated):
    """Writes made while someone had disabled the note-trigger on the target were never noted."""
    spec = migrated
    _gate(spec)
    with dbpair.tgt(autocommit=True) as owner:
        owner.execute("ALTER TABLE shop.customers DISABLE TRIGGER ALL")
        owner.execute("UPDATE shop.customers SET full_name = 'unnoted' WHERE id = (SELECT max(id) FROM shop.customers)")
    with pytest.raises(cutover.CutoverError, match="count \\+ checksum differ under the freeze: customers: source "
                                                   "\\{'count'"):
        cutover.cutover(spec, RUN)


def _while_writing(dbpair, spec, stage):
    """Run `stage(spec, RUN)` while a pointer-following writer writes; (writer, still running), result, and
    how many rows the writer inserted meanwhile."""
    w = pointer_writer(dbpair, spec).start()
    time.sleep(0.5)
    before = len(w.side_of)
    out = stage(spec, RUN)
    return w, out, len(w.side_of) - before


def test_the_gate_compares_at_a_snapshot_while_the_application_writes(dbpair, migrated):
    """No write freeze at the gate: the applier drains to a source snapshot, both sides are compared there."""
    spec = migrated
    w, out, during = _while_writing(dbpair, spec, stages.final_verify)
    time.sleep(0.3)
    c = cutover.cutover(spec, RUN)
    time.sleep(0.3)
    w.stop()
    assert (out["mode"], out["checksum_ok"]) == ("snapshot", True) and out["watermark"], out
    assert during > 0  # the application went on writing while the gate compared
    with dbpair.tgt() as t:
        stages_seen = [r[0] for r in t.execute("SELECT detail->>'stage' FROM dbguard.events WHERE run_id = %s "
                                              "AND stage = 'write_freeze'", (RUN,))]
    assert "final_verify" not in stages_seen, stages_seen
    assert c["verify_mode"] == "changed" and w.errors == [], (c["verify_mode"], w.errors[:3])
    capture.drain(spec, RUN, direction="reverse")
    assert_identical(dbpair, spec)


def test_reconcile_under_a_writer_compares_at_a_snapshot_and_repairs_nothing(dbpair, migrated):
    """In-flight application writes are not differences: no bisect, no repair, one comparison."""
    spec = migrated
    w, out, during = _while_writing(dbpair, spec, stages.reconcile)
    w.stop()
    assert (out["mode"], out["checksum_ok"]) == ("snapshot", True), out
    assert during > 0 and w.errors == [], (during, w.errors[:3])
    assert all(r["rounds"] == [] and r["repaired_rows"] == 0 for r in out["tables"].values()), out["tables"]


def _drift(dbpair, update: str) -> None:
    """A difference on the target that no note-trigger sees (the session poses as the applier)."""
    with dbpair.tgt(autocommit=True) as bad:
        bad.execute("SELECT set_config('dbguard.applying', 'on', false)")
        bad.execute(update)


def test_reconcile_repairs_a_real_difference_and_only_in_that_table(dbpair, migrated):
    spec = migrated
    _drift(dbpair, "UPDATE shop.orders SET amount = amount + 1 WHERE id = (SELECT min(id) FROM shop.orders)")
    out = stages.reconcile(spec, RUN)
    assert out["checksum_ok"] is True, out
    assert out["tables"]["orders"]["repaired_rows"] == 1 and out["tables"]["orders"]["rounds"]
    assert out["tables"]["customers"]["rounds"] == []  # equal at the snapshot: not bisected again
    with dbpair.tgt() as t:
        modes = t.execute("SELECT detail->>'mode' FROM dbguard.events WHERE run_id = %s AND stage = 'reconcile' "
                          "ORDER BY id", (RUN,)).fetchall()
    assert modes[-1] == ("repair",), modes
    assert_identical(dbpair, spec)


def test_a_difference_at_the_gate_is_repaired_under_the_freeze(dbpair, migrated):
    spec = migrated
    _drift(dbpair, "UPDATE shop.customers SET full_name = 'drifted' WHERE id = (SELECT min(id) FROM shop.customers)")
    out = stages.final_verify(spec, RUN)
    assert (out["mode"], out["checksum_ok"]) == ("freeze", True), out
    assert out["tables"]["customers"]["repaired_rows"] == 1 and out["watermark"] is None
    assert_identical(dbpair, spec)
