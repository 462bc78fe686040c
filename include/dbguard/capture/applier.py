"""Destination side: the applier (windows of origin snapshots, cursor, batches, failures) and fence_copy."""
from __future__ import annotations

import time
from typing import Any, Callable

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import ledger, transforms
from ..spec import MigrationSpec, Table
from . import values
from .common import STAGE_DRAIN, CaptureError, Route, _control, _cursor_state, route
from .reads import _failures, _lag

# Destination side. Every row is keyed by direction as well, so forward and reverse never mix.
TARGET_DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.apply_cursor (
    migration    text NOT NULL,
    direction    text NOT NULL DEFAULT 'forward',
    run_id       text NOT NULL,
    window_no    bigint NOT NULL DEFAULT 0,
    prev_snapshot text,
    cur_snapshot text,
    op_cursor    bigint NOT NULL DEFAULT 0,
    high_water   bigint NOT NULL DEFAULT 0,
    applied      bigint NOT NULL DEFAULT 0,
    batches      bigint NOT NULL DEFAULT 0,
    target_rev   text,
    updated_at   timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, direction, run_id)
);
CREATE TABLE IF NOT EXISTS dbguard.apply_batches (
    migration  text NOT NULL,
    direction  text NOT NULL DEFAULT 'forward',
    run_id     text NOT NULL,
    batch_no   bigint NOT NULL,
    window_no  bigint NOT NULL,
    first_op   bigint,
    last_op    bigint,
    ops        int NOT NULL,
    failed     int NOT NULL,
    source_rev text,
    target_rev text,
    seconds    double precision,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, direction, run_id, batch_no)
);
CREATE TABLE IF NOT EXISTS dbguard.apply_failures (
    migration  text NOT NULL,
    direction  text NOT NULL DEFAULT 'forward',
    run_id     text NOT NULL,
    op_id      bigint NOT NULL,
    table_name text NOT NULL,
    op         text NOT NULL,
    key        jsonb,
    sqlstate   text,
    error      text,
    target_rev text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, direction, run_id, op_id)
);
DO $$
DECLARE t text;
BEGIN
  FOREACH t IN ARRAY ARRAY['apply_cursor', 'apply_batches', 'apply_failures'] LOOP
    IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = ('dbguard.' || t)::regclass AND attname = 'direction') THEN
      EXECUTE format('ALTER TABLE dbguard.%I ADD COLUMN direction text NOT NULL DEFAULT ''forward''', t);
      EXECUTE format('ALTER TABLE dbguard.%I DROP CONSTRAINT IF EXISTS %I', t, t || '_pkey');
      EXECUTE format('ALTER TABLE dbguard.%I ADD PRIMARY KEY (migration, direction, run_id, %s)', t,
                     CASE t WHEN 'apply_batches' THEN 'batch_no' WHEN 'apply_failures' THEN 'op_id' ELSE 'migration' END);
    END IF;
  END LOOP;
END$$;
CREATE TABLE IF NOT EXISTS dbguard.idempotency_keys (
    migration  text NOT NULL,
    idem_key   text NOT NULL,
    target_rev text NOT NULL DEFAULT pg_current_xact_id()::text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, idem_key)
);
CREATE OR REPLACE FUNCTION dbguard.claim_idempotency_key(p_migration text, p_key text)
RETURNS boolean LANGUAGE sql AS $$
    WITH ins AS (
        INSERT INTO dbguard.idempotency_keys (migration, idem_key) VALUES (p_migration, p_key)
        ON CONFLICT DO NOTHING RETURNING 1)
    SELECT EXISTS (SELECT 1 FROM ins)
$$;
"""

# Row images (jsonb arrays of each column's text output) travel as jsonb *text*, never parsed in Python.
OP_COLUMNS = ("op_id, table_name, op, key, old_key, row_image::text, source_xid::text, key::text, old_key::text")

# Ops whose transaction finished between snapshots `prev` and `cur`, above the in-window cursor.
WINDOW_OPS = """
SELECT {OP_COLUMNS}
FROM dbguard.change_ledger
WHERE migration = %(m)s AND direction = %(d)s AND op_id > %(after)s
  AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot)
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
ORDER BY op_id
LIMIT %(n)s
""".replace("{OP_COLUMNS}", OP_COLUMNS)

WINDOW_FIRST_OP = """
SELECT min(op_id) FROM dbguard.change_ledger
WHERE migration = %(m)s AND direction = %(d)s
  AND (%(prev)s::pg_snapshot IS NULL OR source_xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot))
  AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot)
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
"""


def ensure_destination(dest: psycopg.Connection) -> None:
    dest.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.capture'))")
    dest.execute(TARGET_DDL)
    dest.commit()


def ensure_target(tgt: psycopg.Connection) -> None:
    """Run ledger + applier tables in the target database (the forward destination)."""
    ledger.ensure(tgt)
    ensure_destination(tgt)


def _fence_key(spec: MigrationSpec, direction: str = "forward") -> sql.Composable:
    tag = "dbguard.apply:" + spec.name + ("" if direction == "forward" else ":reverse")
    return sql.SQL("hashtextextended({}, 0)").format(sql.Literal(tag))


def fence_copy(tgt: psycopg.Connection, spec: MigrationSpec, direction: str = "forward") -> None:
    """Call first in a range copy's destination transaction (before taking the origin snapshot):
    no drain batch can commit between the copy's snapshot and its commit."""
    tgt.execute(sql.SQL("SELECT pg_advisory_xact_lock_shared({})").format(_fence_key(spec, direction)))


def image_columns(t: Table, who: str) -> list:
    """The columns a row image carries, in order: the resolved spec's copy columns (what the backfill copies;
    generated columns regenerate on each side). The trigger writes images in this order and the applier reads
    them in it, so both must see the resolved table (Route.tables); an empty list means it was not resolved."""
    if not t.columns:
        raise CaptureError(f"{who}: tables[{t.ref}] has no resolved column list (the source table is missing, or "
                           "the spec was not resolved with catalog.resolve); run preflight")
    return t.copy_columns


class _Statements:
    """Per-table SQL for the applier: upsert full images, delete by key. Images are jsonb arrays of text in
    image_columns order; each element is cast to the destination column's catalog type. Columns generated on
    the destination are not written (they regenerate); identity GENERATED ALWAYS columns get OVERRIDING SYSTEM
    VALUE."""

    def __init__(self, r: Route, t: Table, origin: dict[str, values.ColumnInfo], dest: dict[str, values.ColumnInfo]):
        rel = r.dest_rel(t)
        schema, name = r.dest_name(t)
        if not dest:
            raise CaptureError(f"drain ({r.direction}): destination table {schema}.{name} does not exist; "
                               "create it (preflight does) before draining")
        carried = image_columns(t, f"drain ({r.direction})")
        missing = [c.name for c in carried if c.name not in dest]
        if missing:
            raise CaptureError(f"drain ({r.direction}): destination table {schema}.{name} lacks columns {missing}; "
                               "fix tables[].columns or the destination table")
        idx = {c.name: i for i, c in enumerate(carried)}
        written = [c.name for c in carried if not dest[c.name].generated]

        def cast(c: str, doc: str = "dbguard_e") -> sql.Composable:
            return values.cast_expr(sql.SQL("({}->>{})").format(sql.SQL(doc), sql.Literal(idx[c])),
                                    origin.get(c), dest[c])

        cols = sql.SQL(", ").join(sql.Identifier(c) for c in written)
        key = sql.SQL(", ").join(sql.Identifier(k) for k in t.key)
        rest = [c for c in written if c not in t.key and dest[c].identity != "a"]
        action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest)) if rest else \
            sql.SQL("DO NOTHING")
        overriding = sql.SQL(" OVERRIDING SYSTEM VALUE" if any(dest[c].identity == "a" for c in written) else "")
        # Declared transforms (vector normalisation, a changed analyzer) apply forward, as in the backfill.
        tfs = {c.name: transforms.source_expr(t, c) for c in carried} if r.forward else {}
        changed = [c for c in written if c in tfs and tfs[c] != sql.Identifier(c)]
        if changed:
            def as_origin(c: str) -> sql.Composable:
                text = sql.SQL("(dbguard_e->>{})").format(sql.Literal(idx[c]))
                return sql.SQL("{} AS {}").format(values.origin_cast(text, origin.get(c), dest[c]), sql.Identifier(c))

            inner = sql.SQL("SELECT {} FROM jsonb_array_elements(%s::jsonb) dbguard_e").format(
                sql.SQL(", ").join(as_origin(c.name) for c in carried))
            vals = sql.SQL(", ").join(
                sql.SQL("({})::{}").format(tfs[c] if c in changed else sql.Identifier(c), sql.SQL(dest[c].type_sql))
                for c in written)
            source = sql.SQL("({}) dbguard_x").format(inner)
        else:
            vals = sql.SQL(", ").join(cast(c) for c in written)
            source = sql.SQL("jsonb_array_elements(%s::jsonb) dbguard_e")
        self.upsert = sql.SQL(
            "INSERT INTO {rel} ({cols}){ov} SELECT {vals} FROM {source} ON CONFLICT ({key}) {action}").format(
            rel=rel, cols=cols, ov=overriding, vals=vals, source=source, key=key, action=action)
        kidx = {k: i for i, k in enumerate(t.key)}
        match = sql.SQL(" AND ").join(
            sql.SQL("dbguard_t.{} = {}").format(sql.Identifier(k), values.cast_expr(
                sql.SQL("(dbguard_k->>{})").format(sql.Literal(kidx[k])), origin.get(k), dest[k])) for k in t.key)
        self.delete = sql.SQL("DELETE FROM {rel} dbguard_t USING jsonb_array_elements(%s::jsonb) dbguard_k "
                              "WHERE {match}").format(rel=rel, match=match)


def _statement_set(r: Route, origin: psycopg.Connection, dest: psycopg.Connection) -> dict[str, _Statements]:
    out = {}
    for t in r.tables:
        out[t.ref] = _Statements(r, t, values.columns(origin, *r.origin_name(t), leaves=False),
                                  values.columns(dest, *r.dest_name(t), leaves=False))
    origin.rollback()
    dest.rollback()
    return out


def _actions(ops: list[tuple]) -> list[tuple[int, str, str, Any, str]]:
    """Ledger ops -> (op_id, table, 'U' upsert | 'D' delete, key, json text) in order; a key change is
    delete + upsert."""
    out = []
    for op_id, table, op, key, old_key, row, _xid, key_text, old_key_text in ops:
        if op == "D":
            out.append((op_id, table, "D", key, key_text))
        elif op == "K":
            out.append((op_id, table, "D", old_key, old_key_text))
            out.append((op_id, table, "U", key, row))
        else:
            out.append((op_id, table, "U", key, row))
    return out


def _statements(actions: list[tuple], stmts: dict[str, _Statements]):
    """Group consecutive actions of one kind on one table into one statement (a repeated key starts a new one,
    since one INSERT ... ON CONFLICT cannot touch a row twice): as few round trips as order allows."""
    groups: list[tuple[str, str, list]] = []
    seen: set = set()
    for _op_id, table, kind, key, doc in actions:
        k = tuple(key) if isinstance(key, list) else tuple(sorted(key.items()))
        if not groups or groups[-1][0] != table or groups[-1][1] != kind or k in seen:
            groups.append((table, kind, []))
            seen = set()
        groups[-1][2].append(doc)
        seen.add(k)
    for table, kind, docs in groups:
        st = stmts[table]
        yield (st.upsert if kind == "U" else st.delete), "[" + ",".join(docs) + "]"


def _apply_fast(dest: psycopg.Connection, actions, stmts) -> None:
    with dest.pipeline():
        with dest.cursor() as cur:
            for q, param in _statements(actions, stmts):
                cur.execute(q, (param,))


def _apply_one_by_one(dest: psycopg.Connection, actions, stmts, spec, ops_by_id) -> list[dict]:
    """Slow path after a failed batch: each op in its own savepoint; failing ops are recorded, the rest applied."""
    failures = []
    by_op: dict[int, list] = {}
    for a in actions:
        by_op.setdefault(a[0], []).append(a)
    for op_id, acts in by_op.items():
        try:
            with dest.transaction():  # a savepoint inside the batch transaction
                for q, param in _statements(acts, stmts):
                    dest.execute(q, (param,))
        except psycopg.Error as e:
            op = ops_by_id[op_id]
            t = spec.table(op[1])
            key = dict(zip(t.key, op[3])) if isinstance(op[3], list) else op[3]
            failures.append({"op_id": op_id, "table_name": op[1], "op": op[2], "key": key,
                             "sqlstate": e.sqlstate, "error": (e.diag.message_primary or str(e)).strip()})
    return failures


def _cursor_row(dest: psycopg.Connection, origin: psycopg.Connection, r: Route, run_id: str) -> dict:
    """Lock (and on first use create) this run's cursor; its start point comes from capture_on."""
    spec = r.spec
    q = ("SELECT window_no, prev_snapshot, cur_snapshot, op_cursor, high_water, applied, batches "
         "FROM dbguard.apply_cursor WHERE migration = %s AND direction = %s AND run_id = %s FOR UPDATE")
    row = dest.execute(q, (spec.name, r.direction, run_id)).fetchone()
    if row is None:
        ctl = _control(origin, r)
        if ctl is None or ctl[0] != run_id:
            raise CaptureError(f"drain ({r.direction}): capture is not on for migration {spec.name!r} run "
                               f"{run_id!r} (control row: {ctl}); run capture_on(direction={r.direction!r}) "
                               "for this run first")
        dest.execute("INSERT INTO dbguard.apply_cursor (migration, direction, run_id, prev_snapshot, high_water) "
                     "VALUES (%s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
                     (spec.name, r.direction, run_id, ctl[1], ctl[2] or 0))
        row = dest.execute(q, (spec.name, r.direction, run_id)).fetchone()
    return dict(zip(("window_no", "prev", "cur", "op_cursor", "high_water", "applied", "batches"), row))


def _mark_applier(dest: psycopg.Connection) -> bool:
    """The destination session is the applier's: capture triggers skip its writes (loop guard, so reverse
    capture never re-captures what forward applied) and write fences let it through. Then, when allowed,
    apply like PostgreSQL's own logical replication worker: session_replication_role = replica, so
    destination user triggers and foreign-key checks do not fire on replayed ops (the replay passes through
    states that mix the copy's later snapshot with older ops; the final state is consistent). Needs superuser
    or GRANT SET ON PARAMETER session_replication_role; without it, constraints are checked per op."""
    dest.execute("SELECT set_config('dbguard.applying', 'on', false)")
    dest.commit()
    try:
        dest.execute("SET session_replication_role = replica")
        dest.commit()
        return True
    except psycopg.errors.InsufficientPrivilege:
        dest.rollback()
        return False


_EMPTY = {"applied": 0, "batches": 0, "seconds": 0.0, "rows_per_second": None, "lag": 0, "high_water": 0,
          "dual_write_fail": 0, "failed_op_ids": [], "new_failed_op_ids": [], "stopped_on_error": False}


PAST_SNAPSHOT = """
SELECT EXISTS (SELECT 1 FROM dbguard.change_ledger
               WHERE migration = %(m)s AND direction = %(d)s AND source_xid >= pg_snapshot_xmin(%(until)s::pg_snapshot)
                 AND pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot)
                 AND NOT pg_visible_in_snapshot(source_xid, %(until)s::pg_snapshot))
"""


def drain(spec: MigrationSpec, run_id: str, direction: str = "forward", *, max_batches: int | None = None,
          batch_ops: int | None = None, until: str | None = None,
          before_commit: Callable[[psycopg.Connection], None] | None = None) -> dict[str, Any]:
    """Apply every op committed before this call (and what arrives meanwhile, up to one new window).

    `until` (an origin pg_snapshot): apply exactly the ops visible in it and stop there, so the destination
    holds the origin's state as of that snapshot (out["at_snapshot"]); when the applier is already past it,
    nothing is applied and at_snapshot is False.

    Each batch is one destination transaction: rows, cursor, batch record and failures commit together.
    Apply errors are recorded in dbguard.apply_failures and counted as dual_write_fail; the batch's other
    ops still apply and the cursor moves past the failed op (with capture.stop_on_error the drain returns
    after such a batch). A failed op fails the run at the gates and at release. `before_commit` is a test hook.
    """
    r = route(spec, direction)
    if not spec.capture.enabled:
        return {**_EMPTY, "direction": direction}
    n = batch_ops or spec.capture.batch_ops
    applied = batches = 0
    failed_ids: list[int] = []
    opened = 0
    t0 = time.monotonic()
    stopped = False
    with r.origin(autocommit=True) as src, r.dest() as tgt:
        run_ledger = tgt if r.forward else src  # the run ledger lives in the target database
        ledger.ensure(run_ledger)
        ensure_destination(tgt)
        replica = _mark_applier(tgt)
        stmts = _statement_set(r, src, tgt)
        while max_batches is None or batches < max_batches:
            tb = time.monotonic()
            tgt.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(_fence_key(spec, direction)))
            cur = _cursor_row(tgt, src, r, run_id)
            if cur["cur"] is None:  # open the next window: everything that finished by now (or by `until`)
                if opened or (until is not None and cur["prev"] == until):
                    tgt.rollback()
                    break
                if until is not None and cur["prev"] is not None and src.execute(
                        PAST_SNAPSHOT, {"m": spec.name, "d": direction, "prev": cur["prev"], "until": until}).fetchone()[0]:
                    tgt.rollback()
                    break  # an earlier window already applied ops `until` does not see
                snap = until or src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
                first = src.execute(WINDOW_FIRST_OP, {"m": spec.name, "d": direction, "prev": cur["prev"],
                                                      "cur": snap}).fetchone()[0]
                cur.update(cur=snap, op_cursor=(first - 1) if first is not None else 0, window_no=cur["window_no"] + 1)
                opened += 1
            ops = src.execute(WINDOW_OPS, {"m": spec.name, "d": direction, "after": cur["op_cursor"],
                                           "cur": cur["cur"], "prev": cur["prev"], "n": n}).fetchall()
            failures: list[dict] = []
            if ops:
                actions = _actions(ops)
                tgt.execute("SAVEPOINT dbguard_batch")
                try:
                    _apply_fast(tgt, actions, stmts)
                except psycopg.Error:
                    tgt.execute("ROLLBACK TO SAVEPOINT dbguard_batch")
                    failures = _apply_one_by_one(tgt, actions, stmts, spec, {o[0]: o for o in ops})
                target_rev = str(tgt.execute("SELECT pg_current_xact_id()").fetchone()[0])
                last = ops[-1][0]
                cur["op_cursor"] = last
                cur["high_water"] = max(cur["high_water"], max(o[0] for o in ops))
                cur["applied"] += len(ops) - len(failures)
                cur["batches"] += 1
                tgt.execute(
                    """INSERT INTO dbguard.apply_batches (migration, direction, run_id, batch_no, window_no, first_op,
                                                          last_op, ops, failed, source_rev, target_rev, seconds)
                       VALUES (%s, %s, %s, (SELECT coalesce(max(b.batch_no), 0) + 1 FROM dbguard.apply_batches b
                                            WHERE b.migration = %s AND b.direction = %s AND b.run_id = %s),
                               %s, %s, %s, %s, %s, %s, %s, %s)""",
                    # the next free number, not the cursor's count: a cursor reset to an earlier state (a replay)
                    # would otherwise collide with the batches it re-applies and stop the applier for good
                    (spec.name, direction, run_id, spec.name, direction, run_id, cur["window_no"], ops[0][0], last,
                     len(ops),
                     len(failures), ops[-1][6], target_rev, time.monotonic() - tb))
                for f in failures:
                    tgt.execute(
                        """INSERT INTO dbguard.apply_failures (migration, direction, run_id, op_id, table_name, op,
                                                               key, sqlstate, error, target_rev)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                        (spec.name, direction, run_id, f["op_id"], f["table_name"], f["op"], Jsonb(f["key"]),
                         f["sqlstate"], f["error"], target_rev))
            else:
                target_rev = None
            exhausted = len(ops) < n
            tgt.execute(
                """UPDATE dbguard.apply_cursor SET window_no = %(w)s, prev_snapshot = %(prev)s, cur_snapshot = %(cur)s,
                     op_cursor = %(oc)s, high_water = %(hw)s, applied = %(ap)s, batches = %(b)s,
                     target_rev = coalesce(%(tr)s, target_rev), updated_at = clock_timestamp()
                   WHERE migration = %(m)s AND direction = %(d)s AND run_id = %(r)s""",
                {"w": cur["window_no"], "prev": cur["cur"] if exhausted else cur["prev"],
                 "cur": None if exhausted else cur["cur"], "oc": 0 if exhausted else cur["op_cursor"],
                 "hw": cur["high_water"], "ap": cur["applied"], "b": cur["batches"], "tr": target_rev,
                 "m": spec.name, "d": direction, "r": run_id})
            if before_commit is not None and ops:
                before_commit(tgt)
            tgt.commit()
            if ops:
                batches += 1
                applied += len(ops) - len(failures)
                failed_ids += [f["op_id"] for f in failures]
                if failures and spec.capture.stop_on_error:
                    stopped = True
                    break
        seconds = time.monotonic() - t0
        st = _cursor_state(tgt, r, run_id)
        fail_ids = [f["op_id"] for f in _failures(tgt, r, run_id)]
        tgt.rollback()
        hw = st.get("high_water", 0)
        out = {"direction": direction, "applied": applied, "batches": batches, "seconds": round(seconds, 3),
               "rows_per_second": round(applied / seconds, 1) if seconds > 0 else None,
               "lag": _lag(src, r, run_id, st), "high_water": hw, "dual_write_fail": len(fail_ids),
               "failed_op_ids": fail_ids, "new_failed_op_ids": failed_ids, "stopped_on_error": stopped,
               "replica_role": replica}
        if until is not None:
            out["at_snapshot"] = st.get("prev_snapshot") == until and st.get("cur_snapshot") is None
        ledger.event(run_ledger, run_id, spec.name, r.stage(STAGE_DRAIN), out, op_id=hw,
                     source_rev=st.get("prev_snapshot"), target_rev=st.get("target_rev"), commit=False)
        ledger.set_metric(run_ledger, run_id, spec.name, "dual_write_fail" if r.forward else "dual_write_fail.reverse",
                          len(fail_ids), commit=False)
        run_ledger.commit()
    return out


COVERED = """
SELECT u.op_id FROM unnest(%(ids)s::bigint[], %(xids)s::text[]) AS u(op_id, xid)
WHERE (%(prev)s::text IS NOT NULL AND pg_visible_in_snapshot(u.xid::xid8, %(prev)s::text::pg_snapshot))
   OR (%(cur)s::text IS NOT NULL AND u.op_id <= %(after)s AND pg_visible_in_snapshot(u.xid::xid8, %(cur)s::text::pg_snapshot))
"""


def apply_ops(spec: MigrationSpec, run_id: str, ops: list[tuple], direction: str = "forward") -> dict[str, Any]:
    """Replay entry point: re-applying ledger ops the cursor already covers is a no-op.

    `ops` are ledger rows as `read_ops` returns them (OP_COLUMNS; row images as jsonb text).
    Ops beyond the cursor are refused: only `drain` may move it, in order.
    """
    r = route(spec, direction)
    with r.dest() as tgt:
        ensure_destination(tgt)
        row = tgt.execute("SELECT prev_snapshot, cur_snapshot, op_cursor FROM dbguard.apply_cursor "
                          "WHERE migration = %s AND direction = %s AND run_id = %s FOR UPDATE",
                          (spec.name, direction, run_id)).fetchone()
        prev, cur, after = row if row else (None, None, 0)
        covered = {x[0] for x in tgt.execute(COVERED, {"ids": [o[0] for o in ops], "xids": [o[6] for o in ops],
                                                       "prev": prev, "cur": cur, "after": after}).fetchall()} \
            if row else set()
        tgt.rollback()
    ahead = [o[0] for o in ops if o[0] not in covered]
    if ahead:
        raise CaptureError(f"apply_ops: op_ids {ahead[:10]} are beyond the applied cursor of {spec.name!r} run "
                           f"{run_id!r} ({direction}); run drain to apply new ops in order")
    return {"skipped": len(covered), "applied": 0}


def read_ops(spec: MigrationSpec, first_op: int, last_op: int, direction: str = "forward") -> list[tuple]:
    """Ledger rows of this migration with first_op <= op_id <= last_op (for audits and replay tests)."""
    r = route(spec, direction)
    with r.origin() as src:
        return src.execute("SELECT " + OP_COLUMNS + " FROM dbguard.change_ledger WHERE migration = %s "
                           "AND direction = %s AND op_id BETWEEN %s AND %s ORDER BY op_id",
                           (spec.name, direction, first_op, last_op)).fetchall()
