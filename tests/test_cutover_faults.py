"""No window that loses a write: cutover and rollback with a fault at the exact step (a raise before or after the
step's work, a SIGKILL of the process right after it, a dropped connection), on real PostgreSQL."""
from __future__ import annotations

import json
import subprocess
import sys

import psycopg
import pytest

from dbguard import capture, cutover
from dbguard.demo import load_shop

from test_capture import ROOT, assert_identical
from test_cutover import RUN, _migrated_shop, migrate, shop_spec

MIN_CUSTOMER = "(SELECT min(id) FROM shop.customers)"


@pytest.fixture
def migrated(prepared):
    """The shop (100 customers, 300 orders) migrated up to the flip: a copy of one prepared per session."""
    prepared("cutover_faults.migrated", _migrated_shop(100, 300))
    return shop_spec()


def writable(dsn: str) -> bool:
    """True when an ordinary session may write a migrated table (no fence), checked without changing a row."""
    with psycopg.connect(dsn) as c:
        try:
            c.execute(f"UPDATE shop.customers SET full_name = full_name WHERE id = {MIN_CUSTOMER}")
            return True
        except psycopg.errors.ReadOnlySqlTransaction:
            return False
        finally:
            c.rollback()


def killed_at(spec, op: str, fail_at: str) -> int:
    """Run cutover/rollback in its own process that SIGKILLs itself right after step `fail_at`'s work."""
    doc = {"op": op, "spec": json.loads(json.dumps(spec.model_dump(mode="json", by_alias=True))), "run": RUN,
           "fail_at": fail_at}
    p = subprocess.run([sys.executable, "-m", "faults.worker"], cwd=ROOT, input=json.dumps(doc), text=True,
                       capture_output=True, timeout=120)
    assert p.returncode == -9, (p.returncode, p.stderr[-2000:])
    return p.returncode


def name_of(conn, key: int) -> str:
    return conn.execute("SELECT full_name FROM shop.customers WHERE id = %s", (key,)).fetchone()[0]


# ---- after the flip's commit: reported, never undone -------------------------------------------------------

@pytest.mark.parametrize("fail_at", ["unfreeze:after", "resume"])
def test_a_failure_after_the_flip_commits_is_reported_not_undone(dbpair, migrated, fail_at):
    """"unfreeze:after": the COMMIT of the freeze completed on the server but the client saw an error; "resume":
    the step after that commit fails. The flip stands: the target is the primary, the error is reported."""
    spec = migrated
    out = cutover.cutover(spec, RUN, fail_at=fail_at)
    s = cutover.state(spec, RUN)
    assert s["phase"] == "cutover" and s["primary"] == "target" and s["pointer_says"] == "target", s
    assert any(fail_at.split(":")[0] in e for e in out["errors_after_commit"]), out
    assert not writable(dbpair.src_dsn) and writable(dbpair.tgt_dsn)
    assert capture.is_on(spec, direction="reverse")
    with dbpair.tgt(autocommit=True) as app:  # the application's write on the new primary reaches the fallback
        key = app.execute(f"UPDATE shop.customers SET full_name = 'after the flip' WHERE id = {MIN_CUSTOMER} "
                          "RETURNING id").fetchone()[0]
    capture.drain(spec, RUN, direction="reverse")
    with dbpair.src() as s_:
        assert name_of(s_, key) == "after the flip"


# ---- rollback: never both sides writable -------------------------------------------------------------------

@pytest.mark.parametrize("kill_after", ["fence_target", "pointer"])
def test_a_rollback_killed_between_its_commits_never_leaves_both_sides_writable(dbpair, migrated, kill_after):
    spec = migrated
    cutover.cutover(spec, RUN)
    with dbpair.tgt(autocommit=True) as app:
        key = app.execute(f"UPDATE shop.customers SET full_name = 'on the target' WHERE id = {MIN_CUSTOMER} "
                          "RETURNING id").fetchone()[0]
    killed_at(spec, "rollback", f"{kill_after}:kill")
    src_w, tgt_w = writable(dbpair.src_dsn), writable(dbpair.tgt_dsn)
    assert not (src_w and tgt_w), "both sides writable after the crash"
    s = cutover.state(spec, RUN)
    if src_w:  # the application follows the pointer back and writes the source: never overwritten by the resume
        assert s["pointer_says"] == "source"
        with dbpair.src(autocommit=True) as app:
            app.execute("UPDATE shop.customers SET full_name = 'newer on the source' WHERE id = %s", (key,))
    out = cutover.rollback(spec, RUN)
    assert out["status"] == "rolled_back"
    with dbpair.src() as s_:
        assert name_of(s_, key) == ("newer on the source" if src_w else "on the target")
    assert writable(dbpair.src_dsn) and not writable(dbpair.tgt_dsn)
    if not src_w:  # both fenced after the crash: the rollback started over, verify included
        assert "verify" in [x["step"] for x in out["steps"]]
        assert_identical(dbpair, spec)


# ---- a retried cutover starts reverse capture afresh -------------------------------------------------------

def test_a_retried_cutover_does_not_replay_the_first_attempts_reverse_capture(dbpair, migrated):
    """The first attempt dies right after reverse capture went on; meanwhile something that is not the
    application writes the target (the source is still the primary), and the application then overwrites the
    same row on the source. The retry must not carry that stray write back onto the source."""
    spec = migrated
    killed_at(spec, "cutover", "reverse_capture:kill")
    assert cutover.state(spec, RUN)["primary"] == "source" and writable(dbpair.src_dsn)
    with dbpair.tgt(autocommit=True) as stray:
        key = stray.execute(f"UPDATE shop.customers SET full_name = 'stray' WHERE id = {MIN_CUSTOMER} "
                            "RETURNING id").fetchone()[0]
    with dbpair.src(autocommit=True) as app:
        app.execute("UPDATE shop.customers SET full_name = 'the application' WHERE id = %s", (key,))
    cutover.cutover(spec, RUN)
    capture.drain(spec, RUN, direction="reverse")
    with dbpair.src() as s_:
        assert name_of(s_, key) == "the application"
    assert_identical(dbpair, spec)


# ---- a way out of a stuck rollback -------------------------------------------------------------------------

def test_a_rollback_that_finds_rows_differing_names_them_and_repairs_from_the_target(dbpair, migrated):
    """Rows on the source changed behind the fence's back (a session claiming to be the applier), one deleted
    and one inserted: the rollback names every key that differs and refuses; `dbguard rollback --repair-from
    target` copies those rows from the target under the freeze and completes."""
    from dbguard import cli

    spec = migrated
    cutover.cutover(spec, RUN)
    with dbpair.tgt(autocommit=True) as app:
        app.execute(f"UPDATE shop.customers SET full_name = 'on the target' WHERE id = {MIN_CUSTOMER}")
    with dbpair.src(autocommit=True) as rogue:
        rogue.execute("SELECT set_config('dbguard.applying', 'on', false)")
        changed = rogue.execute("UPDATE shop.customers SET full_name = 'rogue' WHERE id = (SELECT max(id) FROM "
                                "shop.customers) RETURNING id").fetchone()[0]
        gone = rogue.execute("DELETE FROM shop.orders WHERE id = (SELECT max(id) FROM shop.orders) "
                             "RETURNING id").fetchone()[0]
        extra = rogue.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) SELECT "
                              "999000001, min(id), now(), 3, 'rogue' FROM shop.customers RETURNING id").fetchone()[0]
    with pytest.raises(cutover.CutoverError) as e:
        cutover.rollback(spec, RUN)
    msg = str(e.value)
    assert f"({changed})" in msg and f"({gone})" in msg and f"({extra})" in msg, msg
    assert "--repair-from target" in msg
    assert cutover.state(spec, RUN)["primary"] == "target" and writable(dbpair.tgt_dsn)
    assert cli.main(["rollback", str(ROOT / "include/migrations/demo_shop.yaml"), "--run-id", RUN,
                     "--repair-from", "target"]) == 0
    s = cutover.state(spec, RUN)
    assert s["phase"] == "rolled_back" and s["primary"] == "source"
    assert_identical(dbpair, spec)
    with dbpair.src() as s_:
        assert s_.execute(f"SELECT count(*) FROM shop.customers WHERE full_name = 'on the target'").fetchone()[0] == 1


# ---- PgBouncer ---------------------------------------------------------------------------------------------

from test_cutover import cutover_pgb, pgbouncer  # noqa: E402,F401  (the fixture)


def _pgb_spec(p, **cut):
    spec = shop_spec()
    return spec.model_copy(update={"cutover": spec.cutover.model_copy(update={
        "pointer": "pgbouncer", "pgbouncer": cutover_pgb(p), **cut})})


def _admin(p):
    return psycopg.connect(host="127.0.0.1", port=p["port"], user=p["user"], dbname="pgbouncer", autocommit=True)


def _paused(p) -> bool:
    with _admin(p) as a:
        cur = a.execute("SHOW DATABASES")
        col = [d.name for d in cur.description].index("paused")
        return any(r[0] == "shopdb" and int(r[col]) for r in cur.fetchall())


def _in_thread(fn, timeout_s: float):
    """fn() in a thread; (finished, result or exception)."""
    import threading

    box = {}

    def run():
        try:
            box["out"] = fn()
        except BaseException as e:  # noqa: BLE001
            box["out"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout_s)
    return not t.is_alive(), box.get("out"), t


def test_the_pgbouncer_alias_keeps_the_applications_own_user(dbpair, pgbouncer):
    """The alias logs in as the application's role; after the flip (and back) it still does."""
    from pathlib import Path

    load_shop(dbpair.src_dsn, customers=50, orders=100)
    dirs = {}
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("DO $$BEGIN CREATE ROLE dbguard_test_app LOGIN; EXCEPTION WHEN duplicate_object THEN "
                      "NULL; END$$")
            c.execute("GRANT pg_read_all_settings TO dbguard_test_app")
            dirs[dsn] = c.execute("SHOW data_directory").fetchone()[0]
    ini = Path(pgbouncer["ini"])
    ini.write_text(ini.read_text().replace(f"user={pgbouncer['user']}\n", "user=dbguard_test_app\n", 1))
    with _admin(pgbouncer) as a:
        a.execute("RELOAD")
    spec = _pgb_spec(pgbouncer)
    migrate(spec)
    app = psycopg.connect(pgbouncer["dsn"], autocommit=True, prepare_threshold=None)
    who = lambda: app.execute("SELECT current_user, current_setting('data_directory')").fetchone()  # noqa: E731
    assert who() == ("dbguard_test_app", dirs[dbpair.src_dsn])
    cutover.cutover(spec, RUN)
    assert who() == ("dbguard_test_app", dirs[dbpair.tgt_dsn]) and "user=dbguard_test_app" in ini.read_text()
    cutover.rollback(spec, RUN)
    assert who() == ("dbguard_test_app", dirs[dbpair.src_dsn]) and "user=dbguard_test_app" in ini.read_text()
    app.close()


def test_pause_is_bounded_and_withdrawn(dbpair, pgbouncer):
    """A client holds a transaction through the alias: PAUSE would wait for it forever. The cutover gives up
    within its bound, the alias is not left paused, the source stays the primary."""
    load_shop(dbpair.src_dsn, customers=50, orders=100)
    spec = _pgb_spec(pgbouncer, lock_timeout_ms=300, retries=1)
    migrate(spec)
    holder = psycopg.connect(pgbouncer["dsn"], prepare_threshold=None)
    holder.execute("SELECT 1")  # a transaction in progress holds a server connection
    try:
        finished, out, _ = _in_thread(lambda: cutover.cutover(spec, RUN), 30)
        assert finished, "the cutover waited on PAUSE past its bound"
        assert isinstance(out, cutover.CutoverError) and "PAUSE shopdb did not complete" in str(out), out
        assert not _paused(pgbouncer)
    finally:
        holder.commit()
        holder.close()
    assert cutover.state(spec, RUN)["primary"] == "source"
    assert cutover.cutover(spec, RUN)["primary"] == "target"  # with the transaction gone it goes through


def test_a_crash_that_left_the_alias_paused_is_resumed_by_the_next_cutover(dbpair, pgbouncer):
    load_shop(dbpair.src_dsn, customers=50, orders=100)
    spec = _pgb_spec(pgbouncer)
    migrate(spec)
    killed_at(spec, "cutover", "pointer:kill")  # the alias is paused, and rewritten to the target, uncommitted
    assert _paused(pgbouncer)
    finished, out, _ = _in_thread(lambda: cutover.cutover(spec, RUN, fail_at="resume"), 60)
    assert finished and isinstance(out, dict), out
    assert out["unpaused"] and any("resume" in e for e in out["errors_after_commit"]), out
    assert not _paused(pgbouncer)
    with psycopg.connect(dbpair.tgt_dsn) as t:
        tgt_dir = t.execute("SELECT current_setting('data_directory')").fetchone()[0]
    with psycopg.connect(pgbouncer["dsn"], autocommit=True, prepare_threshold=None) as app:
        assert app.execute("SELECT current_setting('data_directory')").fetchone()[0] == tgt_dir


def test_the_alias_is_not_resumed_when_it_cannot_be_pointed_at_the_primary(dbpair, pgbouncer):
    """After a failed re-point, RESUME would release the clients to the wrong side: it is not sent."""
    import os
    from pathlib import Path

    from dbguard.cutover import pointer

    load_shop(dbpair.src_dsn, customers=20, orders=20)
    spec = _pgb_spec(pgbouncer)
    ini = Path(pgbouncer["ini"])
    with _admin(pgbouncer) as a:
        a.execute("PAUSE shopdb")
    moved = ini.with_suffix(".moved")
    os.rename(ini, moved)  # the re-point cannot read or write the alias entry
    try:
        msg = pointer.release(spec, None, "target")
        assert "left PAUSED" in msg and _paused(pgbouncer), msg
    finally:
        os.rename(moved, ini)
    assert "resumed" in pointer.release(spec, None, "source") and not _paused(pgbouncer)
