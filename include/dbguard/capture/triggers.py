"""Origin side: the change ledger + control DDL, trigger functions, capture_on / capture_off."""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db, ledger
from ..errors import DbguardError
from ..spec import MigrationSpec, Table
from .common import *  # noqa: F401,F403
from .common import _name, _source_rel
from .applier import ensure_target

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

