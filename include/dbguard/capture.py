"""Dual writes: source triggers -> change ledger -> idempotent applier into the target.

Stages (each takes the spec and the run id, returns JSON-able values, is safe to re-run):
  capture_on   create the source ledger + control table, one AFTER ROW trigger per table
  drain        apply captured ops to the target in batches, exactly once
  capture_off  drop triggers and functions (the ledger stays, for the record)
Reads: lag, drift, dual_write_fail, flags.

Ordering and idempotency. A change's op_id comes from a sequence when the
trigger fires, not when its transaction commits, so a plain "op_id > high
water" cursor would skip an op whose transaction commits after a later op_id
was applied. The applier therefore reads the ledger in *windows* of source
snapshots: window k holds the ops whose transaction is visible in snapshot
S_k and was not visible in S_(k-1) (`pg_visible_in_snapshot`). Such a set is
final (every transaction in it had finished when S_k was taken), windows
follow commit order, and inside a window op_id order is the order in which
conflicting writes happened (a row lock serialises them). The target keeps
the cursor (window snapshots + the op_id high-water mark inside the window)
in `dbguard.apply_cursor` and moves it in the same transaction as the
applied rows, so a replayed batch is a no-op.

Convergence with the backfill: ops are full row images (upsert) or deletes by
key, so replaying every op captured since capture_on, in order, after the
range copies, ends at the source's final state whatever the copies saw. A
copy must not commit between a drain reading an op and applying it; copies
that may overlap a drain take `fence_copy(tgt)` first (shared advisory lock;
each drain batch holds it exclusively).
"""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import db, ledger
from .errors import DbguardError
from .spec import MigrationSpec, Table

SCHEMA = "dbguard"
STAGE_ON, STAGE_DRAIN, STAGE_OFF = "capture_on", "drain_changes", "capture_off"

# Source side: the change ledger and the flags applications read.
SOURCE_DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.change_ledger (
    op_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration   text NOT NULL,
    table_name  text NOT NULL,
    op          "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'K')),
    key         jsonb NOT NULL,
    old_key     jsonb,
    row_image   jsonb,
    source_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS change_ledger_xid_idx ON dbguard.change_ledger (migration, source_xid);
CREATE TABLE IF NOT EXISTS dbguard.control (
    migration        text PRIMARY KEY,
    run_id           text,
    dual_write       boolean NOT NULL DEFAULT false,
    read_source      boolean NOT NULL DEFAULT true,
    capture_snapshot text,
    capture_op_id    bigint,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp()
);
"""

# Target side, next to the run ledger (`dbguard.events`, `dbguard.metrics`).
TARGET_DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.apply_cursor (
    migration    text NOT NULL,
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
    PRIMARY KEY (migration, run_id)
);
CREATE TABLE IF NOT EXISTS dbguard.apply_batches (
    migration  text NOT NULL,
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
    PRIMARY KEY (migration, run_id, batch_no)
);
CREATE TABLE IF NOT EXISTS dbguard.apply_failures (
    migration  text NOT NULL,
    run_id     text NOT NULL,
    op_id      bigint NOT NULL,
    table_name text NOT NULL,
    op         text NOT NULL,
    key        jsonb,
    sqlstate   text,
    error      text,
    target_rev text,
    at         timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, run_id, op_id)
);
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

# Row images travel as jsonb *text* from source to target: parsing them in Python would turn
# numbers into floats (65.1800000000000000 -> 65.18 inside a jsonb column).
OP_COLUMNS = ("op_id, table_name, op, key, old_key, row_image::text, source_xid::text, key::text, old_key::text")

# Ops whose transaction finished between snapshots `prev` and `cur`, above the in-window cursor.
WINDOW_OPS = """
SELECT {OP_COLUMNS}
FROM dbguard.change_ledger
WHERE migration = %(m)s AND op_id > %(after)s
  AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot)
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
ORDER BY op_id
LIMIT %(n)s
""".replace("{OP_COLUMNS}", OP_COLUMNS)

WINDOW_FIRST_OP = """
SELECT min(op_id) FROM dbguard.change_ledger
WHERE migration = %(m)s
  AND (%(prev)s::pg_snapshot IS NULL OR source_xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot))
  AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot)
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
"""

# Committed ops not yet applied: after `prev`, minus the part of window `cur` at or below the cursor.
LAG = """
SELECT count(*) FROM dbguard.change_ledger
WHERE migration = %(m)s
  AND (%(prev)s::pg_snapshot IS NULL OR source_xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot))
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
  AND NOT (%(cur)s::pg_snapshot IS NOT NULL AND op_id <= %(after)s
           AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot))
"""


class CaptureError(DbguardError):
    """Change capture could not be switched on/off or applied; the message names the object and the fix."""


# ---- names ---------------------------------------------------------------------------------

def _name(*parts: str) -> str:
    """A PostgreSQL identifier from parts, hashed down to 63 bytes when too long."""
    full = "_".join(parts)
    if len(full.encode()) <= 63:
        return full
    return full[:50] + "_" + hashlib.md5(full.encode()).hexdigest()[:12]


def trigger_name(spec: MigrationSpec) -> str:
    return _name("dbguard_capture", spec.name)


def function_name(spec: MigrationSpec, table: Table) -> str:
    return _name("capture", spec.name, table.schema_, table.name)


def truncate_function_name(spec: MigrationSpec) -> str:
    return _name("capture", spec.name, "no_truncate")


def _source_rel(t: Table) -> sql.Composed:
    return db.qname(t.schema_, t.name)


def _target_rel(t: Table) -> sql.Composed:
    return db.qname(t.target_schema, t.target_name)


# ---- capture_on / capture_off --------------------------------------------------------------

def _json_object(cols: Iterable[str], record: str) -> sql.Composable:
    cols = list(cols)
    return sql.SQL("jsonb_build_object({})").format(sql.SQL(", ").join(
        sql.SQL("{}, {}.{}").format(sql.Literal(c), sql.SQL(record), sql.Identifier(c)) for c in cols))


def _image(t: Table, record: str) -> sql.Composable:
    # jsonb_build_object takes at most 100 arguments; wider tables ship the whole record
    # (jsonb_populate_record on the target ignores keys it has no column for).
    if len(t.columns) <= 50:
        return _json_object((c.name for c in t.columns), record)
    return sql.SQL("to_jsonb({})").format(sql.SQL(record))


def trigger_function_sql(spec: MigrationSpec, t: Table) -> sql.Composed:
    """The AFTER ROW trigger function for one table: writes one ledger row per changed row."""
    m, tn = sql.Literal(spec.name), sql.Literal(t.name)
    keys_changed = sql.SQL("ROW({}) IS DISTINCT FROM ROW({})").format(
        sql.SQL(", ").join(sql.SQL("OLD.{}").format(sql.Identifier(k)) for k in t.key),
        sql.SQL(", ").join(sql.SQL("NEW.{}").format(sql.Identifier(k)) for k in t.key))
    body = sql.SQL("""
BEGIN
  IF TG_OP = 'DELETE' THEN
    INSERT INTO dbguard.change_ledger (migration, table_name, op, key)
    VALUES ({m}, {tn}, 'D', {old_key});
  ELSIF TG_OP = 'UPDATE' AND {keys_changed} THEN
    INSERT INTO dbguard.change_ledger (migration, table_name, op, key, old_key, row_image)
    VALUES ({m}, {tn}, 'K', {new_key}, {old_key}, {new_row});
  ELSE
    INSERT INTO dbguard.change_ledger (migration, table_name, op, key, row_image)
    VALUES ({m}, {tn}, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END, {new_key}, {new_row});
  END IF;
  RETURN NULL;
END""").format(m=m, tn=tn, keys_changed=keys_changed, old_key=_json_object(t.key, "OLD"),
               new_key=_json_object(t.key, "NEW"), new_row=_image(t, "NEW"))
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql {settings} "
        "AS {body}").format(fn=db.qname(SCHEMA, function_name(spec, t)), settings=sql.SQL(_settings(t)),
                            body=sql.Literal(body.as_string()))


_FLOAT = re.compile(r"^(real|float4|float8|double precision|float)\b")
_GUC_FREE = re.compile(r"^(smallint|integer|int|int2|int4|int8|bigint|numeric|decimal|text|character varying|varchar"
                       r"|character|char|bpchar|boolean|bool|jsonb|json|uuid|bytea|date|timestamp|timestamptz)\b")


def _settings(t: Table) -> str:
    """SET clauses pinning how values print into the row image whatever the application's session uses:
    floats print shortest-exact, intervals unambiguously. Only the ones a table needs (each costs ~15 us
    per captured row); JSON prints dates and timestamps in ISO, and bytea input reads hex and escape."""
    floats = any(_FLOAT.match(c.type) for c in t.columns)
    other = any(not _GUC_FREE.match(c.type) and not _FLOAT.match(c.type) for c in t.columns)
    out = []
    if floats or other:
        out.append("SET extra_float_digits = 1")
    if other:
        out.append("SET \"IntervalStyle\" = 'iso_8601'")
    return " ".join(out)


def _check_tables(src: psycopg.Connection, spec: MigrationSpec) -> None:
    problems = []
    for t in spec.tables:
        cols = {r[0] for r in src.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped",
            (sql.SQL("{}").format(_source_rel(t)).as_string(src),)).fetchall()}
        if not cols:
            problems.append(f"tables[{t.name}]: source table {t.schema_}.{t.name} does not exist; "
                            "fix tables[].schema/name or create it")
            continue
        missing = [c.name for c in t.columns if c.name not in cols]
        if missing:
            problems.append(f"tables[{t.name}]: source columns {missing} do not exist; fix tables[].columns")
    if problems:
        raise CaptureError("capture_on: " + "; ".join(problems))


def _ddl_session(conn: psycopg.Connection, spec: MigrationSpec) -> None:
    conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
        sql.Literal(f"{spec.capture.ddl_lock_timeout_ms}ms")))
    # The schema freeze (preflight) lets dbguard's own DDL through when this is set.
    conn.execute("SELECT set_config('dbguard.allow_ddl', 'on', true)")


def capture_on(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Create the ledger, control flags and triggers on the source; idempotent (a retry keeps the start point)."""
    if not spec.capture.enabled:
        return {"enabled": False, "tables": []}
    with db.source(spec) as src:
        try:
            src.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.capture'))")
            src.execute(SOURCE_DDL)
            src.commit()
            _check_tables(src, spec)
            # Everything committed before this snapshot is in the backfill's later snapshot;
            # the applier starts after it. Taken before the triggers exist, so nothing falls between.
            before, first_op = src.execute(
                "SELECT pg_current_snapshot()::text, "
                "(SELECT coalesce(max(op_id), 0) FROM dbguard.change_ledger)").fetchone()
            src.commit()
            _ddl_session(src, spec)
            tfn = db.qname(SCHEMA, truncate_function_name(spec))
            src.execute(sql.SQL(
                "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql AS {body}").format(
                fn=tfn, body=sql.Literal(
                    "BEGIN RAISE EXCEPTION 'TRUNCATE of %.% is blocked while dbguard captures changes for "
                    "migration " + spec.name.replace("'", "") + "; delete rows instead or end the run "
                    "(capture_off)', TG_TABLE_SCHEMA, TG_TABLE_NAME; END")))
            for t in spec.tables:
                src.execute(trigger_function_sql(spec, t))
                rel, trg = _source_rel(t), sql.Identifier(trigger_name(spec))
                src.execute(sql.SQL("CREATE OR REPLACE TRIGGER {trg} AFTER INSERT OR UPDATE OR DELETE ON {rel} "
                                    "FOR EACH ROW EXECUTE FUNCTION {fn}()").format(
                    trg=trg, rel=rel, fn=db.qname(SCHEMA, function_name(spec, t))))
                src.execute(sql.SQL("CREATE OR REPLACE TRIGGER {trg} BEFORE TRUNCATE ON {rel} "
                                    "FOR EACH STATEMENT EXECUTE FUNCTION {fn}()").format(
                    trg=sql.Identifier(_name(trigger_name(spec), "truncate")), rel=rel, fn=tfn))
            src.execute(
                """INSERT INTO dbguard.control AS c (migration, run_id, dual_write, read_source,
                                                     capture_snapshot, capture_op_id)
                   VALUES (%(m)s, %(r)s, true, true, %(s)s, %(o)s)
                   ON CONFLICT (migration) DO UPDATE SET
                     dual_write = true,
                     capture_snapshot = CASE WHEN c.run_id = EXCLUDED.run_id AND c.capture_snapshot IS NOT NULL
                                             THEN c.capture_snapshot ELSE EXCLUDED.capture_snapshot END,
                     capture_op_id = CASE WHEN c.run_id = EXCLUDED.run_id AND c.capture_op_id IS NOT NULL
                                          THEN c.capture_op_id ELSE EXCLUDED.capture_op_id END,
                     run_id = EXCLUDED.run_id, updated_at = clock_timestamp()""",
                {"m": spec.name, "r": run_id, "s": before, "o": first_op})
            snap, op0 = src.execute("SELECT capture_snapshot, capture_op_id FROM dbguard.control "
                                    "WHERE migration = %s", (spec.name,)).fetchone()
            src.commit()
        except psycopg.errors.LockNotAvailable as e:
            raise CaptureError(f"capture_on: could not lock a source table within "
                               f"capture.ddl_lock_timeout_ms={spec.capture.ddl_lock_timeout_ms} "
                               f"(a long transaction holds it: {e.diag.message_primary}); retry, or raise "
                               "capture.ddl_lock_timeout_ms") from None
        except psycopg.errors.InsufficientPrivilege as e:
            raise CaptureError(f"capture_on: {e.diag.message_primary}; the source role needs CREATE on the "
                               "database (schema dbguard) and TRIGGER on every migrated table "
                               "(GRANT TRIGGER ON <table> TO <role>)") from None
    out = {"enabled": True, "tables": [t.name for t in spec.tables], "trigger": trigger_name(spec),
           "functions": [function_name(spec, t) for t in spec.tables], "capture_snapshot": snap,
           "capture_op_id": op0}
    with db.target(spec) as tgt:
        ensure_target(tgt)
        ledger.event(tgt, run_id, spec.name, STAGE_ON, out, op_id=op0, source_rev=snap)
    return out


def capture_off(spec: MigrationSpec, run_id: str, *, conn: psycopg.Connection | None = None) -> dict[str, Any]:
    """Drop triggers and functions (the ledger and control rows stay); idempotent, safe on abort.

    With `conn` (e.g. inside `quiesced`), works in the caller's transaction and leaves the commit to it."""
    dropped = []
    with nullcontext(conn) if conn is not None else db.source(spec) as src:
        try:
            _ddl_session(src, spec)
            # CASCADE removes the triggers that use each function, also on tables renamed since.
            fns = [function_name(spec, t) for t in spec.tables] + [truncate_function_name(spec)]
            for fn in fns:
                exists = src.execute("SELECT to_regprocedure(%s) IS NOT NULL",
                                     (f"{SCHEMA}.{fn}()",)).fetchone()[0]
                src.execute(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(db.qname(SCHEMA, fn)))
                if exists:
                    dropped.append(fn)
            if src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
                src.execute("UPDATE dbguard.control SET dual_write = false, updated_at = clock_timestamp() "
                            "WHERE migration = %s", (spec.name,))
            if conn is None:
                src.commit()
        except psycopg.errors.LockNotAvailable as e:
            raise CaptureError(f"capture_off: could not lock a source table within "
                               f"capture.ddl_lock_timeout_ms={spec.capture.ddl_lock_timeout_ms} "
                               f"({e.diag.message_primary}); retry capture_off") from None
    out = {"dropped_functions": dropped, "ledger_kept": True}
    with db.target(spec) as tgt:
        ensure_target(tgt)
        ledger.event(tgt, run_id, spec.name, STAGE_OFF, out)
    return out


def set_flags(spec: MigrationSpec, *, dual_write: bool | None = None, read_source: bool | None = None) -> dict:
    """Change the flags applications read (cutover flips read_source)."""
    with db.source(spec) as src:
        src.execute(SOURCE_DDL)
        src.execute(
            """INSERT INTO dbguard.control (migration, dual_write, read_source)
               VALUES (%(m)s, coalesce(%(d)s, false), coalesce(%(r)s, true))
               ON CONFLICT (migration) DO UPDATE SET
                 dual_write = coalesce(%(d)s, dbguard.control.dual_write),
                 read_source = coalesce(%(r)s, dbguard.control.read_source), updated_at = clock_timestamp()""",
            {"m": spec.name, "d": dual_write, "r": read_source})
        src.commit()
    return flags(spec)


def flags(spec: MigrationSpec) -> dict:
    with db.source(spec) as src:
        if not src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
            return {"dual_write": False, "read_source": True, "run_id": None}
        row = src.execute("SELECT dual_write, read_source, run_id FROM dbguard.control WHERE migration = %s",
                          (spec.name,)).fetchone()
    return dict(zip(("dual_write", "read_source", "run_id"), row)) if row else \
        {"dual_write": False, "read_source": True, "run_id": None}


# ---- applier ---------------------------------------------------------------------------------

def ensure_target(tgt: psycopg.Connection) -> None:
    ledger.ensure(tgt)
    tgt.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.capture'))")
    tgt.execute(TARGET_DDL)
    tgt.commit()


def _fence_key(spec: MigrationSpec) -> sql.Composable:
    return sql.SQL("hashtextextended({}, 0)").format(sql.Literal("dbguard.apply:" + spec.name))


def fence_copy(tgt: psycopg.Connection, spec: MigrationSpec) -> None:
    """Call first in a range copy's target transaction (before taking the source snapshot):
    no drain batch can commit between the copy's snapshot and its commit."""
    tgt.execute(sql.SQL("SELECT pg_advisory_xact_lock_shared({})").format(_fence_key(spec)))


class _Statements:
    """Per-table SQL for the applier: upsert full images, delete by key."""

    def __init__(self, t: Table):
        rel = _target_rel(t)
        cols = sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns)
        key = sql.SQL(", ").join(sql.Identifier(k) for k in t.key)
        rest = [c.name for c in t.columns if c.name not in t.key]
        action = sql.SQL("DO UPDATE SET {}").format(sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(c)) for c in rest)) if rest else \
            sql.SQL("DO NOTHING")
        self.upsert = sql.SQL("INSERT INTO {rel} ({cols}) SELECT {cols} FROM jsonb_populate_recordset(NULL::{rel}, %s::jsonb) "
                              "ON CONFLICT ({key}) {action}").format(rel=rel, cols=cols, key=key, action=action)
        match = sql.SQL(" AND ").join(sql.SQL("t.{0} = k.{0}").format(sql.Identifier(k)) for k in t.key)
        self.delete = sql.SQL("DELETE FROM {rel} t USING jsonb_populate_recordset(NULL::{rel}, %s::jsonb) k "
                              "WHERE {match}").format(rel=rel, match=match)


def _actions(ops: list[tuple]) -> list[tuple[int, str, str, Any]]:
    """Ledger ops -> (op_id, table, 'U' upsert | 'D' delete, json) in order; a key change is delete + upsert."""
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


def _statements(actions: list[tuple], stmts: dict[str, _Statements], spec: MigrationSpec):
    """Group consecutive actions of one kind on one table into one statement (a repeated key starts a new one,
    since one INSERT ... ON CONFLICT cannot touch a row twice): as few round trips as order allows."""
    groups: list[tuple[str, str, list]] = []
    seen: set = set()
    for op_id, table, kind, key, doc in actions:
        k = tuple(str(key.get(c)) for c in spec.table(table).key)
        if not groups or groups[-1][0] != table or groups[-1][1] != kind or k in seen:
            groups.append((table, kind, []))
            seen = set()
        groups[-1][2].append(doc)
        seen.add(k)
    for table, kind, docs in groups:
        st = stmts[table]
        yield (st.upsert if kind == "U" else st.delete), "[" + ",".join(docs) + "]"


def _apply_fast(tgt: psycopg.Connection, actions, stmts, spec) -> None:
    with tgt.pipeline():
        with tgt.cursor() as cur:
            for q, param in _statements(actions, stmts, spec):
                cur.execute(q, (param,))


def _apply_one_by_one(tgt: psycopg.Connection, actions, stmts, spec, ops_by_id) -> list[dict]:
    """Slow path after a failed batch: each op in its own savepoint; failing ops are recorded, the rest applied."""
    failures = []
    by_op: dict[int, list] = {}
    for a in actions:
        by_op.setdefault(a[0], []).append(a)
    for op_id, acts in by_op.items():
        try:
            with tgt.transaction():  # a savepoint inside the batch transaction
                for q, param in _statements(acts, stmts, spec):
                    tgt.execute(q, (param,))
        except psycopg.Error as e:
            op = ops_by_id[op_id]
            failures.append({"op_id": op_id, "table_name": op[1], "op": op[2], "key": op[3],
                             "sqlstate": e.sqlstate, "error": (e.diag.message_primary or str(e)).strip()})
    return failures


def _cursor_row(tgt: psycopg.Connection, src: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict:
    """Lock (and on first use create) this run's cursor; its start point comes from capture_on."""
    q = ("SELECT window_no, prev_snapshot, cur_snapshot, op_cursor, high_water, applied, batches "
         "FROM dbguard.apply_cursor WHERE migration = %s AND run_id = %s FOR UPDATE")
    row = tgt.execute(q, (spec.name, run_id)).fetchone()
    if row is None:
        ctl = _control(src, spec)
        if ctl is None or ctl[0] != run_id:
            raise CaptureError(f"drain: capture is not on for migration {spec.name!r} run {run_id!r} "
                               f"(control row: {ctl}); run the capture_on stage for this run first")
        tgt.execute("INSERT INTO dbguard.apply_cursor (migration, run_id, prev_snapshot, high_water) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING", (spec.name, run_id, ctl[1], ctl[2] or 0))
        row = tgt.execute(q, (spec.name, run_id)).fetchone()
    return dict(zip(("window_no", "prev", "cur", "op_cursor", "high_water", "applied", "batches"), row))


def _control(src: psycopg.Connection, spec: MigrationSpec):
    if not src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
        return None
    return src.execute("SELECT run_id, capture_snapshot, capture_op_id FROM dbguard.control WHERE migration = %s",
                       (spec.name,)).fetchone()


def drain(spec: MigrationSpec, run_id: str, *, max_batches: int | None = None, batch_ops: int | None = None,
          before_commit: Callable[[psycopg.Connection], None] | None = None) -> dict[str, Any]:
    """Apply every op committed before this call (and what arrives meanwhile, up to one new window).

    Each batch is one target transaction: rows, cursor, batch record and failures commit together.
    Apply errors are recorded in dbguard.apply_failures and counted as dual_write_fail; the batch's other
    ops still apply and the cursor moves past the failed op (policy: record and continue; with
    capture.stop_on_error the drain returns after such a batch). `before_commit` is a test hook.
    """
    if not spec.capture.enabled:
        return {"applied": 0, "batches": 0, "seconds": 0.0, "rows_per_second": None, "lag": 0, "high_water": 0,
                "dual_write_fail": 0, "failed_op_ids": [], "new_failed_op_ids": [], "stopped_on_error": False}
    n = batch_ops or spec.capture.batch_ops
    stmts = {t.name: _Statements(t) for t in spec.tables}
    applied = batches = 0
    failed_ids: list[int] = []
    opened = 0
    t0 = time.monotonic()
    stopped = False
    with db.source(spec, autocommit=True) as src, db.target(spec) as tgt:
        ensure_target(tgt)
        replica = _replica_role(tgt)
        while max_batches is None or batches < max_batches:
            tb = time.monotonic()
            tgt.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(_fence_key(spec)))
            cur = _cursor_row(tgt, src, spec, run_id)
            if cur["cur"] is None:  # open the next window: everything that finished by now
                if opened:
                    tgt.rollback()
                    break
                snap = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
                first = src.execute(WINDOW_FIRST_OP, {"m": spec.name, "prev": cur["prev"], "cur": snap}).fetchone()[0]
                cur.update(cur=snap, op_cursor=(first - 1) if first is not None else 0, window_no=cur["window_no"] + 1)
                opened += 1
            ops = src.execute(WINDOW_OPS, {"m": spec.name, "after": cur["op_cursor"], "cur": cur["cur"],
                                           "prev": cur["prev"], "n": n}).fetchall()
            failures: list[dict] = []
            if ops:
                actions = _actions(ops)
                tgt.execute("SAVEPOINT dbguard_batch")
                try:
                    _apply_fast(tgt, actions, stmts, spec)
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
                    """INSERT INTO dbguard.apply_batches (migration, run_id, batch_no, window_no, first_op, last_op,
                                                          ops, failed, source_rev, target_rev, seconds)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)""",
                    (spec.name, run_id, cur["batches"], cur["window_no"], ops[0][0], last, len(ops), len(failures),
                     ops[-1][6], target_rev, time.monotonic() - tb))
                for f in failures:
                    tgt.execute(
                        """INSERT INTO dbguard.apply_failures (migration, run_id, op_id, table_name, op, key,
                                                               sqlstate, error, target_rev)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING""",
                        (spec.name, run_id, f["op_id"], f["table_name"], f["op"], Jsonb(f["key"]), f["sqlstate"],
                         f["error"], target_rev))
            else:
                target_rev = None
            exhausted = len(ops) < n
            tgt.execute(
                """UPDATE dbguard.apply_cursor SET window_no = %(w)s, prev_snapshot = %(prev)s, cur_snapshot = %(cur)s,
                     op_cursor = %(oc)s, high_water = %(hw)s, applied = %(ap)s, batches = %(b)s,
                     target_rev = coalesce(%(tr)s, target_rev), updated_at = clock_timestamp()
                   WHERE migration = %(m)s AND run_id = %(r)s""",
                {"w": cur["window_no"], "prev": cur["cur"] if exhausted else cur["prev"],
                 "cur": None if exhausted else cur["cur"], "oc": 0 if exhausted else cur["op_cursor"],
                 "hw": cur["high_water"], "ap": cur["applied"], "b": cur["batches"], "tr": target_rev,
                 "m": spec.name, "r": run_id})
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
        hw = _cursor_state(tgt, spec, run_id).get("high_water", 0)
    fail_count, fail_ids = dual_write_fail(spec, run_id)
    out = {"applied": applied, "batches": batches, "seconds": round(seconds, 3),
           "rows_per_second": round(applied / seconds, 1) if seconds > 0 else None,
           "lag": lag(spec, run_id), "high_water": hw, "dual_write_fail": fail_count,
           "failed_op_ids": fail_ids, "new_failed_op_ids": failed_ids, "stopped_on_error": stopped,
           "replica_role": replica}
    with db.target(spec) as tgt:
        st = _cursor_state(tgt, spec, run_id)
        ledger.event(tgt, run_id, spec.name, STAGE_DRAIN, out, op_id=hw, source_rev=st.get("prev_snapshot"),
                     target_rev=st.get("target_rev"), commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "dual_write_fail", fail_count)
    return out


def _replica_role(tgt: psycopg.Connection) -> bool:
    """Apply like PostgreSQL's own logical replication worker: session_replication_role = replica, so target
    triggers and foreign-key checks do not fire on replayed ops (the replay passes through states that mix the
    copy's later snapshot with older ops; the final state is consistent). Needs superuser or
    GRANT SET ON PARAMETER session_replication_role; without it, constraints are checked per op."""
    try:
        tgt.execute("SET session_replication_role = replica")
        tgt.commit()
        return True
    except psycopg.errors.InsufficientPrivilege:
        tgt.rollback()
        return False


COVERED = """
SELECT u.op_id FROM unnest(%(ids)s::bigint[], %(xids)s::text[]) AS u(op_id, xid)
WHERE (%(prev)s::text IS NOT NULL AND pg_visible_in_snapshot(u.xid::xid8, %(prev)s::text::pg_snapshot))
   OR (%(cur)s::text IS NOT NULL AND u.op_id <= %(after)s AND pg_visible_in_snapshot(u.xid::xid8, %(cur)s::text::pg_snapshot))
"""


def apply_ops(spec: MigrationSpec, run_id: str, ops: list[tuple]) -> dict[str, Any]:
    """Replay entry point: re-applying ledger ops the cursor already covers is a no-op.

    `ops` are ledger rows as `read_ops` returns them (OP_COLUMNS; row images as jsonb text).
    Ops beyond the cursor are refused: only `drain` may move it, in order.
    """
    with db.target(spec) as tgt:
        ensure_target(tgt)
        row = tgt.execute("SELECT prev_snapshot, cur_snapshot, op_cursor FROM dbguard.apply_cursor "
                          "WHERE migration = %s AND run_id = %s FOR UPDATE", (spec.name, run_id)).fetchone()
        prev, cur, after = row if row else (None, None, 0)
        covered = {r[0] for r in tgt.execute(COVERED, {"ids": [o[0] for o in ops], "xids": [o[6] for o in ops],
                                                       "prev": prev, "cur": cur, "after": after}).fetchall()} \
            if row else set()
        tgt.rollback()
    ahead = [o[0] for o in ops if o[0] not in covered]
    if ahead:
        raise CaptureError(f"apply_ops: op_ids {ahead[:10]} are beyond the applied cursor of {spec.name!r} run "
                           f"{run_id!r}; run drain to apply new ops in order")
    return {"skipped": len(covered), "applied": 0}


def read_ops(spec: MigrationSpec, first_op: int, last_op: int) -> list[tuple]:
    """Ledger rows of this migration with first_op <= op_id <= last_op (for audits and replay tests)."""
    with db.source(spec) as src:
        return src.execute("SELECT " + OP_COLUMNS + " FROM dbguard.change_ledger WHERE migration = %s AND op_id BETWEEN %s AND %s "
                           "ORDER BY op_id", (spec.name, first_op, last_op)).fetchall()


def _cursor_state(tgt: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict:
    if not tgt.execute("SELECT to_regclass('dbguard.apply_cursor') IS NOT NULL").fetchone()[0]:
        return {}
    row = tgt.execute("SELECT prev_snapshot, cur_snapshot, op_cursor, high_water, applied, batches, target_rev "
                      "FROM dbguard.apply_cursor WHERE migration = %s AND run_id = %s", (spec.name, run_id)).fetchone()
    tgt.rollback()
    return dict(zip(("prev_snapshot", "cur_snapshot", "op_cursor", "high_water", "applied", "batches", "target_rev"),
                    row)) if row else {}


# ---- reads: lag, drift, failures ---------------------------------------------------------------

def lag(spec: MigrationSpec, run_id: str) -> int:
    """Committed source ops not yet applied to the target (the drain sensor compares it with gates.max_lag_ops)."""
    with db.target(spec) as tgt:
        st = _cursor_state(tgt, spec, run_id)
    with db.source(spec) as src:
        if st:
            prev, cur, after = st["prev_snapshot"], st["cur_snapshot"], st["op_cursor"]
        else:
            ctl = _control(src, spec)
            if ctl is None or ctl[0] != run_id:
                return 0
            prev, cur, after = ctl[1], None, 0
        return int(src.execute(LAG, {"m": spec.name, "prev": prev, "cur": cur, "after": after}).fetchone()[0])


def dual_write_fail(spec: MigrationSpec, run_id: str) -> tuple[int, list[int]]:
    """(count, op_ids) of ops the applier could not apply in this run; must be 0 before cutover."""
    with db.target(spec) as tgt:
        if not tgt.execute("SELECT to_regclass('dbguard.apply_failures') IS NOT NULL").fetchone()[0]:
            return 0, []
        ids = [r[0] for r in tgt.execute("SELECT op_id FROM dbguard.apply_failures WHERE migration = %s "
                                         "AND run_id = %s ORDER BY op_id", (spec.name, run_id)).fetchall()]
    return len(ids), ids


def failures(spec: MigrationSpec, run_id: str) -> list[dict]:
    """Every recorded apply failure with its error, for the gate message and the report."""
    with db.target(spec) as tgt:
        if not tgt.execute("SELECT to_regclass('dbguard.apply_failures') IS NOT NULL").fetchone()[0]:
            return []
        cur = tgt.execute("SELECT op_id, table_name, op, key, sqlstate, error FROM dbguard.apply_failures "
                          "WHERE migration = %s AND run_id = %s ORDER BY op_id", (spec.name, run_id))
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def drift(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Ledger high-water marks and per-table counts on both sides."""
    with db.source(spec) as src:
        has_ledger = src.execute("SELECT to_regclass('dbguard.change_ledger') IS NOT NULL").fetchone()[0]
        src_hw, per_table_ops = 0, {}
        if has_ledger:
            ctl = _control(src, spec)
            since = (ctl[2] or 0) if ctl and ctl[0] == run_id else 0
            src_hw = src.execute("SELECT coalesce(max(op_id), 0) FROM dbguard.change_ledger WHERE migration = %s",
                                 (spec.name,)).fetchone()[0]
            per_table_ops = dict(src.execute(
                "SELECT table_name, count(*) FROM dbguard.change_ledger WHERE migration = %s AND op_id > %s "
                "GROUP BY table_name", (spec.name, since)).fetchall())
        src_counts = {t.name: src.execute(sql.SQL("SELECT count(*) FROM {}").format(_source_rel(t))).fetchone()[0]
                      for t in spec.tables}
    with db.target(spec) as tgt:
        st = _cursor_state(tgt, spec, run_id)
        tgt_counts = {}
        for t in spec.tables:
            exists = tgt.execute("SELECT to_regclass(%s) IS NOT NULL",
                                 (_target_rel(t).as_string(tgt),)).fetchone()[0]
            tgt_counts[t.name] = tgt.execute(sql.SQL("SELECT count(*) FROM {}").format(_target_rel(t))).fetchone()[0] \
                if exists else None
    fail_count, fail_ids = dual_write_fail(spec, run_id)
    return {
        "source_high_water": src_hw, "target_high_water": st.get("high_water", 0),
        "applied": st.get("applied", 0), "lag": lag(spec, run_id),
        "dual_write_fail": fail_count, "failed_op_ids": fail_ids,
        "tables": {t.name: {"source_rows": src_counts[t.name], "target_rows": tgt_counts[t.name],
                            "row_diff": None if tgt_counts[t.name] is None else src_counts[t.name] - tgt_counts[t.name],
                            "captured_ops": per_table_ops.get(t.name, 0)} for t in spec.tables},
    }


def is_on(spec: MigrationSpec) -> bool:
    """Are this migration's capture triggers installed on the source?"""
    with db.source(spec) as src:
        return src.execute("SELECT to_regprocedure(%s) IS NOT NULL",
                           (f"{SCHEMA}.{function_name(spec, spec.tables[0])}()",)).fetchone()[0]


@contextmanager
def quiesced(spec: MigrationSpec, run_id: str, *, timeout_s: float = 60):
    """Briefly freeze source writes on the migrated tables and drain the ledger to zero lag.

    Holds SHARE locks on the migrated tables (writers wait, readers do not) and an EXCLUSIVE lock
    on the control table (applications that read the flags FOR SHARE wait too) until the block
    ends; then commits. Yields (source connection, info); info["freeze_ms"] is set on exit.
    """
    info: dict[str, Any] = {"drained": 0}
    with db.source(spec) as src:
        src.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{spec.capture.ddl_lock_timeout_ms}ms")))
        t0 = time.monotonic()
        try:
            if src.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is not None:
                src.execute("LOCK TABLE dbguard.control IN EXCLUSIVE MODE")
            for t in spec.tables:
                src.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(_source_rel(t)))
        except psycopg.errors.LockNotAvailable as e:
            raise CaptureError(f"could not freeze writes within capture.ddl_lock_timeout_ms="
                               f"{spec.capture.ddl_lock_timeout_ms} ({e.diag.message_primary}); a long "
                               "transaction holds a migrated table; retry") from None
        while True:
            d = drain(spec, run_id)
            info["drained"] += d["applied"]
            info["dual_write_fail"] = d["dual_write_fail"]
            if d["lag"] == 0:
                break
            if time.monotonic() - t0 > timeout_s:
                raise CaptureError(f"the change ledger did not drain to zero within {timeout_s:.0f} s of the "
                                   f"write freeze (lag {d['lag']}); an open transaction may hold changes")
        yield src, info
        src.commit()
        info["freeze_ms"] = round((time.monotonic() - t0) * 1000, 1)
