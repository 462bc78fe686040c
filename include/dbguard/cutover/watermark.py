"""What the checksum gate proved, so that a later write freeze verifies only what changed since.

The gate compares whole tables under a write freeze with the change ledger drained to zero. Every change made
after that gets a larger op_id: the freeze's table locks waited for every transaction that had written a
migrated table (and so taken an op_id). Before the gate verifies, `arm()` puts a statement trigger on the
target tables that notes every write not made by dbguard's applier (a person, a cleared and re-run copy or
repair) by moving a counter, read while arm() holds the tables against writers: whatever the verify cannot see
moves it.
When the verify found the tables equal with nothing noted, `mark()` records the ledger's highest op_id: the
watermark.

At a later freeze (cutover, release), with the ledger drained again, `verify()` compares the count + checksum
of every key the ledger changed after the watermark (old and new keys of key changes), plus whole-table row
counts. When only the applier wrote the target and nothing bypassed capture on the source (DDL is refused by
the schema freeze, TRUNCATE by capture's trigger), the changed keys are the only rows that can differ, so the
freeze no longer grows with the table. `verify()` returns None — verify whole tables — when the run has no
watermark, a foreign write was noted, the source's capture triggers are not the ones the gate saw (capture was
off for a while, or disabled), the schema freeze is off, or more than `MAX_KEYS` keys changed.

The whole-table counts are the safety net for what the note-trigger and the capture triggers cannot see (a
session that passes for the applier, an applier that wrote a key no op named). Counted under the freeze they
were its whole cost at 10M rows (two full scans), so the cutover takes them before its freeze: `count_before()`
counts every table on both sides in a REPEATABLE READ snapshot each, while writers go on, and keeps both
snapshots open. Under the freeze, every change since those snapshots is an op on a changed key (the same nets
say so), so `verify()` derives each side's count now as count(snapshot) - changed keys present in the snapshot
+ changed keys present now: equal counts still mean equal rows outside the changed keys as of the snapshots.
A foreign insert or delete made before the cutover started shows as differing counts; one made in the seconds
between the snapshots and the freeze is caught only by the note-trigger and the capture triggers.

The note-triggers go on every member of a partitioned table's tree (a write that names a partition fires
none of the parent's statement triggers), and the capture triggers compared are those of every member.

Undo: `disarm()` drops the triggers (release, after the flip); the counter stays.
"""
from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import sql

from .. import db, guards, ledger
from ..capture.common import LOCK_ERRORS, _name, lock_retrying, trigger_name as capture_trigger_name
from ..checksum import Checksum, checksum, relation
from ..spec import MigrationSpec

MAX_KEYS = 200_000  # beyond this many changed keys the whole-table verify is as cheap
BATCH = 10_000
METRIC = "verified_watermark"

FUNCTION = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE SEQUENCE IF NOT EXISTS dbguard.foreign_writes;
CREATE OR REPLACE FUNCTION dbguard.dbguard_note_write() RETURNS trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog AS $f$
BEGIN
  -- the applier: the marker in a session of the role that armed the counter (any role can SET the marker)
  IF current_setting('dbguard.applying', true) = 'on' AND (TG_NARGS < 1 OR session_user = TG_ARGV[0]) THEN
    RETURN NULL;
  END IF;
  PERFORM nextval('dbguard.foreign_writes');  -- a sequence: no row lock for concurrent writers to queue on
  RETURN NULL;
END $f$;
"""


def trigger_name(spec: MigrationSpec) -> str:
    return _name("dbguard_writes", spec.name)


def _position(tgt: psycopg.Connection) -> list | None:
    """Where the foreign-writes counter stands (a write since then moves it); None when it does not exist."""
    if tgt.execute("SELECT to_regclass('dbguard.foreign_writes')").fetchone()[0] is None:
        return None
    return list(tgt.execute("SELECT last_value, is_called FROM dbguard.foreign_writes").fetchone())


def _armed(tgt: psycopg.Connection, spec: MigrationSpec) -> bool:
    """Every target table has its note-trigger, enabled ALWAYS (a disabled one would have missed writes)."""
    return all(guards.has_trigger(tgt, relation(t, "target"), trigger_name(spec), always=True) for t in spec.tables)


def arm(spec: MigrationSpec, lock_timeout_ms: int) -> list | None:
    """Before the gate's verify: note-triggers on every target table. Returns the counter's position, or None
    when a target writer held the tables past `lock_timeout_ms` (no watermark then: whole-table verifies)."""
    name = trigger_name(spec)

    def install() -> list | None:
        tgt.execute(FUNCTION)
        role = tgt.execute("SELECT session_user").fetchone()[0]  # the forward applier connects as this role
        for t in spec.tables:
            rel = relation(t, "target")
            guards.create_statement_trigger(tgt, rel, name, "AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE",
                                            sql.SQL("dbguard.dbguard_note_write({})").format(sql.Literal(role)))
            # wait for the target's writers in flight (the verify after us sees them) and read the counter
            # before any later writer can move it
            tgt.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(rel))
        return _position(tgt)

    with db.target(spec) as tgt:
        try:
            position = lock_retrying(tgt, lock_timeout_ms, install)
            tgt.commit()
        except LOCK_ERRORS:
            tgt.rollback()
            return None
        return position


def disarm(spec: MigrationSpec) -> None:
    """Undo of arm(): drop the note-triggers, one table per transaction in short lock steps (the application
    may be writing these tables already: a multi-table DROP would deadlock with its foreign-key checks).
    Idempotent; tables already gone are skipped."""
    name = trigger_name(spec)
    with db.target(spec) as tgt:
        for t in spec.tables:
            rel = relation(t, "target")

            def drop() -> None:
                guards.drop_trigger(tgt, rel, name)

            lock_retrying(tgt, spec.capture.ddl_lock_timeout_ms, drop)
            tgt.commit()


def _capture_triggers(src: psycopg.Connection, spec: MigrationSpec) -> list:
    """The forward capture triggers on the source tables and every partition of theirs as [oid, tgenabled]:
    capture turned off and on again (dropped and re-created triggers) or disabled since the gate, on any
    partition, shows as a change."""
    name = capture_trigger_name(spec, "forward")
    return [list(r) for r in src.execute(
        "SELECT t.oid::bigint, t.tgenabled::text FROM pg_trigger t WHERE t.tgname = %s AND t.tgrelid = ANY(%s::oid[]) "
        "ORDER BY 1", (name, guards.oids(src, [relation(t, "source") for t in spec.tables])))]


def mark(src: psycopg.Connection, spec: MigrationSpec, run_id: str, verified: dict[str, Any],
         armed_at: list | None, snapshot: str) -> dict[str, Any] | None:
    """After the gate's verify, which compared the source as of `snapshot` (a pg_snapshot) with the target:
    record the watermark when every table was equal, nothing was repaired and nothing else wrote the target
    since arm(); else clear it. Every change after the gate is an op `snapshot` does not see."""
    clean = verified.get("checksum_ok") and not any(r.get("repaired_rows") for r in verified["tables"].values())
    with db.target(spec) as tgt:
        mark_ = None
        if clean and armed_at is not None and _armed(tgt, spec) and _position(tgt) == armed_at:
            op_id = src.execute("SELECT coalesce(max(op_id), 0) FROM dbguard.change_ledger WHERE migration = %s "
                                "AND direction = 'forward'", (spec.name,)).fetchone()[0]
            mark_ = {"op_id": int(op_id), "snapshot": snapshot, "foreign_writes": armed_at,
                     "capture": _capture_triggers(src, spec)}
        ledger.set_metric(tgt, run_id, spec.name, METRIC, mark_)
    return mark_


def changed_keys(src: psycopg.Connection, spec: MigrationSpec, snapshot: str) -> dict[str, set[tuple[str, ...]]] | None:
    """table ref -> every key (old and new) of the forward ops `snapshot` does not see; None past MAX_KEYS."""
    out: dict[str, set[tuple[str, ...]]] = {t.ref: set() for t in spec.tables}
    n = 0
    with src.cursor(name="dbguard_changed_keys") as cur:
        cur.execute("SELECT table_name, key, old_key FROM dbguard.change_ledger WHERE migration = %s "
                    "AND direction = 'forward' AND source_xid >= pg_snapshot_xmin(%s::pg_snapshot) "
                    "AND NOT pg_visible_in_snapshot(source_xid, %s::pg_snapshot)", (spec.name, snapshot, snapshot))
        for table, key, old in cur:
            for k in (key, old):
                if k is not None and table in out:
                    out[table].add(tuple(k))
            n += 1
            if n > MAX_KEYS:
                return None
    return out


def _sum(conn: psycopg.Connection, table, side: str, keys: list[tuple[str, ...]], h) -> Checksum:
    from ..reconcile import keys_filter

    count, total = 0, 0
    for i in range(0, len(keys), BATCH):
        ck = checksum(conn, table, side, None, h, where=keys_filter(table, keys[i:i + BATCH]))
        count, total = count + ck.count, total + ck.total
    return Checksum(count, total)


def _mark(spec: MigrationSpec, run_id: str, src: psycopg.Connection,
          tgt: psycopg.Connection | None = None) -> dict[str, Any] | None:
    """The watermark when it still holds (see the module doc), else None. `tgt`: an open target connection
    (autocommit) to read it on, else one is opened."""
    if not spec.schema_freeze:
        return None
    with contextlib.nullcontext(tgt) if tgt is not None else db.target(spec) as tgt:
        mark_ = ledger.metrics(tgt, run_id).get(METRIC)
        if not mark_ or "snapshot" not in mark_ or not _armed(tgt, spec) or _position(tgt) != mark_["foreign_writes"]:
            return None
    if (_capture_triggers(src, spec) != mark_["capture"]
            or len(mark_["capture"]) != len(guards.oids(src, [relation(t, "source") for t in spec.tables]))):
        return None  # capture was off (or disabled) for a while: the ledger may not hold every change
    return mark_


class Counted:
    """Whole-table row counts of both sides, each in a REPEATABLE READ snapshot that stays open (count_before)
    until close(): verify() counts the changed keys in the same snapshots. Also the connections verify() reads
    the present on (`sides`), opened here so that the freeze does not wait for connection setups."""

    def __init__(self, spec: MigrationSpec):
        from ..reconcile import Sides

        self.src, self.tgt = db.source(spec), db.target(spec)
        self.sides = Sides(spec)
        self.counts: dict[str, tuple[int, int]] = {}

    def changed(self, t, keys: list[tuple[str, ...]], h) -> tuple[int, int]:
        """How many of `keys` each side held in its snapshot (both sides at once)."""
        s = self.sides.pool.submit(_sum, self.src, t, "source", keys, h)
        g = _sum(self.tgt, t, "target", keys, h)
        return s.result().count, g.count

    def close(self) -> None:
        for c in (self.src, self.tgt):
            c.close()  # read-only snapshots: nothing to commit
        self.sides.close()


def count_before(spec: MigrationSpec, run_id: str) -> Counted | None:
    """Before a freeze, while writers go on: every table's row count on both sides (both at once), each side in
    a REPEATABLE READ snapshot kept open for verify(). None when the watermark does not hold now (the freeze
    then verifies whole tables; verify() checks again under it)."""
    from concurrent.futures import ThreadPoolExecutor

    with db.source(spec) as src:
        if _mark(spec, run_id, src) is None:
            return None
    c = Counted(spec)
    try:
        for conn in (c.src, c.tgt):
            conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")

        def count(conn: psycopg.Connection, rel) -> int:
            return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(rel)).fetchone()[0]

        with ThreadPoolExecutor(1) as pool:
            for t in spec.tables:
                s = pool.submit(count, c.src, relation(t, "source"))
                g = count(c.tgt, relation(t, "target"))
                c.counts[t.ref] = (s.result(), g)
    except BaseException:
        c.close()
        raise
    return c


def verify(spec: MigrationSpec, run_id: str, src: psycopg.Connection,
           before: Counted | None = None) -> dict[str, Any] | None:
    """Under a freeze with the forward ledger drained to zero (`src` holds it): per table {count, target_count,
    equal, changed_keys, counted}, or None when the whole tables must be compared (see the module doc). With
    `before` (count_before, taken before the freeze) the counts are derived from its snapshots and the changed
    keys; without, both tables are counted here, under the freeze."""
    from ..reconcile import Sides

    mark_ = _mark(spec, run_id, src, before.sides.tgt if before is not None else None)
    if mark_ is None:
        return None
    keys = changed_keys(src, spec, mark_["snapshot"])
    if keys is None or (before is not None and set(before.counts) != {t.ref for t in spec.tables}):
        return None
    sides = before.sides if before is not None else Sides(spec)
    out = {}
    try:
        for t in spec.tables:
            ks = sorted(keys[t.ref])
            s_ck, g_ck = sides.both(_sum, (t, "source", ks, sides.hashing), (t, "target", ks, sides.hashing))
            if before is None:
                s_all, g_all = sides.both(lambda c, side: c.execute(sql.SQL("SELECT count(*) FROM {}").format(
                    relation(t, side))).fetchone()[0], ("source",), ("target",))
            else:  # count then, less the changed keys then, plus the changed keys now
                (s_then, g_then), (s_k, g_k) = before.counts[t.ref], before.changed(t, ks, sides.hashing)
                s_all, g_all = s_then - s_k + s_ck.count, g_then - g_k + g_ck.count
            out[t.ref] = {"count": s_all, "target_count": g_all, "changed_keys": len(ks),
                          "counted": "under the freeze" if before is None else "before the freeze",
                          "equal": s_all == g_all and s_ck == g_ck,
                          "source": s_ck.to_dict(), "target": g_ck.to_dict()}
    finally:
        if before is None:
            sides.close()  # before's are closed with it
    return out
