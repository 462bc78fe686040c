"""Origin side: the change ledger + control DDL, trigger functions, capture_on / capture_off."""
from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import psycopg
from psycopg import sql

from .. import db, guards
from ..spec import MigrationSpec, Table
from . import values
from .applier import ensure_destination, image_columns
from .common import (LOCK_ERRORS, SCHEMA, STAGE_OFF, STAGE_ON, CaptureError, Route, _name, function_name,
                     lock_retrying, record, route, trigger_name, truncate_function_name)

# Origin side: the change ledger and the flags applications read. `direction` keeps forward and
# reverse capture apart when source and target are one database; the ALTERs upgrade older ledgers.
SOURCE_DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.change_ledger (
    op_id       bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    migration   text NOT NULL,
    direction   text NOT NULL DEFAULT 'forward',
    table_name  text NOT NULL,
    op          "char" NOT NULL CHECK (op IN ('I', 'U', 'D', 'K')),
    key         jsonb NOT NULL,
    old_key     jsonb,
    row_image   jsonb,
    source_xid  xid8 NOT NULL DEFAULT pg_current_xact_id(),
    captured_at timestamptz NOT NULL DEFAULT clock_timestamp()
);
ALTER TABLE dbguard.change_ledger ADD COLUMN IF NOT EXISTS direction text NOT NULL DEFAULT 'forward';
CREATE INDEX IF NOT EXISTS change_ledger_dir_xid_idx ON dbguard.change_ledger (migration, direction, source_xid);
CREATE TABLE IF NOT EXISTS dbguard.control (
    migration        text NOT NULL,
    direction        text NOT NULL DEFAULT 'forward',
    run_id           text,
    dual_write       boolean NOT NULL DEFAULT false,
    read_source      boolean NOT NULL DEFAULT true,
    capture_snapshot text,
    capture_op_id    bigint,
    updated_at       timestamptz NOT NULL DEFAULT clock_timestamp(),
    write_target     text NOT NULL DEFAULT 'source' CHECK (write_target IN ('source', 'target')),
    PRIMARY KEY (migration, direction)
);
DO $$BEGIN
  IF NOT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'dbguard.control'::regclass AND attname = 'direction') THEN
    ALTER TABLE dbguard.control ADD COLUMN direction text NOT NULL DEFAULT 'forward';
    ALTER TABLE dbguard.control DROP CONSTRAINT IF EXISTS control_pkey;
    ALTER TABLE dbguard.control ADD PRIMARY KEY (migration, direction);
  END IF;
END$$;
-- Applications of any role follow the pointer: read the row FOR SHARE, which needs UPDATE on one column.
GRANT USAGE ON SCHEMA dbguard TO PUBLIC;
GRANT SELECT, UPDATE (updated_at) ON dbguard.control TO PUBLIC;
"""
ORIGIN_DDL = SOURCE_DDL


# ---- trigger functions --------------------------------------------------------------------------

def _texts(cols: list[str], record: str, infos: dict[str, values.ColumnInfo]) -> sql.Composable:
    """A jsonb array of the columns' exact text outputs (NULL stays null): strings round-trip text byte for
    byte, so no value is reinterpreted on the way (jsonb *values* would turn -0 into 0, drop array bounds,
    rewrite json text and refuse numerics beyond jsonb's range)."""
    return sql.SQL("to_jsonb(ARRAY[{}]::text[])").format(
        sql.SQL(", ").join(values.text_expr(record, c, infos.get(c)) for c in cols))


# Capture's functions run as their owner (the migration role), so an application's role writes the migrated
# tables without any right on the ledger, and cannot forge ledger rows; a fixed search_path, as a SECURITY
# DEFINER function must have (the caller's could shadow pg_catalog's functions).
DEFINER = sql.SQL("SECURITY DEFINER SET search_path = pg_catalog, pg_temp")


def applier_exempt(role: str) -> sql.Composable:
    """The condition under which a capture trigger or TRUNCATE guard lets a write through unrecorded: dbguard's
    applier marker, and only in a session of the role that installed the trigger (the appliers connect as it).
    Any role can SET the marker; honoured from any role it would write past capture unseen."""
    return sql.SQL("current_setting('dbguard.applying', true) = 'on' AND session_user = {}").format(
        sql.Literal(role))


def trigger_function_sql(spec: MigrationSpec, t: Table, direction: str = "forward",
                         infos: dict[str, values.ColumnInfo] | None = None, *, role: str) -> sql.Composed:
    """The AFTER ROW trigger function for one table: writes one ledger row per changed row, except for rows
    the applier writes (loop guard: its session sets dbguard.applying = on, as `role`)."""
    infos = infos or {}
    m, d, tn = sql.Literal(spec.name), sql.Literal(direction), sql.Literal(t.ref)
    cols = [c.name for c in image_columns(t, f"capture_on ({direction})")]
    body = sql.SQL("""
DECLARE nk jsonb; ok jsonb;
BEGIN
  IF {exempt} THEN RETURN NULL; END IF;
  IF TG_OP = 'DELETE' THEN
    INSERT INTO dbguard.change_ledger (migration, direction, table_name, op, key)
    VALUES ({m}, {d}, {tn}, 'D', {old_key});
    RETURN NULL;
  END IF;
  nk := {new_key};
  IF TG_OP = 'UPDATE' THEN
    ok := {old_key};
    IF ok IS DISTINCT FROM nk THEN  -- compared as text: -0 -> 0 in a float key is a key change too
      INSERT INTO dbguard.change_ledger (migration, direction, table_name, op, key, old_key, row_image)
      VALUES ({m}, {d}, {tn}, 'K', nk, ok, {new_row});
      RETURN NULL;
    END IF;
  END IF;
  INSERT INTO dbguard.change_ledger (migration, direction, table_name, op, key, row_image)
  VALUES ({m}, {d}, {tn}, CASE TG_OP WHEN 'INSERT' THEN 'I' ELSE 'U' END, nk, {new_row});
  RETURN NULL;
END""").format(exempt=applier_exempt(role), m=m, d=d, tn=tn, old_key=_texts(t.key, "OLD", infos),
               new_key=_texts(t.key, "NEW", infos), new_row=_texts(cols, "NEW", infos))
    settings = values.settings_clause([infos[c] for c in cols if c in infos]) if infos else sql.SQL(
        "SET extra_float_digits = 1 SET \"DateStyle\" = 'ISO, YMD' SET \"IntervalStyle\" = 'postgres'")
    return sql.SQL(
        "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql {definer} {settings} "
        "AS {body}").format(definer=DEFINER,fn=db.qname(SCHEMA, function_name(spec, t, direction)), settings=settings,
                            body=sql.Literal(body.as_string()))


def _check_tables(conn: psycopg.Connection, r: Route) -> dict[str, dict[str, values.ColumnInfo]]:
    """Catalog facts of every origin table; refuses missing tables/columns naming the spec field."""
    problems, out = [], {}
    for t in r.tables:
        infos = values.columns(conn, *r.origin_name(t))
        schema, name = r.origin_name(t)
        if not infos:
            problems.append(f"tables[{t.name}]: {r.label} table {schema}.{name} does not exist; "
                            "fix tables[].schema/name (or target.schema/name) or create it")
            continue
        missing = [c.name for c in t.columns if c.name not in infos]
        if missing:
            problems.append(f"tables[{t.name}]: {r.label} columns {missing} do not exist in {schema}.{name}; "
                            "fix tables[].columns")
        out[t.ref] = infos
    if problems:
        raise CaptureError("capture_on: " + "; ".join(problems))
    return out


def _check_nested_money(origin: psycopg.Connection, r: Route, infos: dict[str, dict[str, values.ColumnInfo]]) -> None:
    """money inside an array, composite or range prints (and parses) through lc_monetary, which the text image
    cannot pin to numeric: refuse when origin and destination disagree on it, naming the columns."""
    nested = [f"{t.ref}.{c.name}" for t in r.tables for c in t.columns
              if values.MONEY in infos[t.ref][c.name].leaves and not infos[t.ref][c.name].money]
    if not nested:
        return
    with r.dest() as dest:
        d = dest.execute("SELECT current_setting('lc_monetary')").fetchone()[0]
    o = origin.execute("SELECT current_setting('lc_monetary')").fetchone()[0]
    origin.rollback()
    if o != d:
        raise CaptureError(f"capture_on ({r.direction}): columns {nested} hold money inside an array or composite, "
                           f"whose text depends on lc_monetary ({r.label} {o!r}, destination {d!r}); set the same "
                           "lc_monetary on both servers, or change those columns to numeric")


def _allow_ddl(conn: psycopg.Connection) -> None:
    # The schema freeze (preflight) lets dbguard's own DDL through with this transaction's pass.
    guards.allow_ddl(conn)


# ---- capture_on / capture_off --------------------------------------------------------------------

def capture_on(spec: MigrationSpec, run_id: str, direction: str = "forward") -> dict[str, Any]:
    """Create the ledger, control row and triggers on the origin; idempotent (a retry keeps the start point).

    Triggers are ENABLE ALWAYS: they also fire in sessions with session_replication_role = replica
    (ETL tools, pg_restore --disable-triggers, logical replication apply), whose writes would else be missed."""
    r = route(spec, direction)
    if not spec.capture.enabled:
        return {"enabled": False, "tables": [], "direction": direction}
    with r.origin() as src:
        try:
            src.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.capture'))")
            src.execute(SOURCE_DDL)
            src.commit()
            infos = _check_tables(src, r)
            _check_nested_money(src, r, infos)
            role = src.execute("SELECT session_user").fetchone()[0]  # the appliers connect as this role too
            # Everything committed before this snapshot is in the backfill's later snapshot;
            # the applier starts after it. Taken before the triggers exist, so nothing falls between.
            before, first_op = src.execute(
                "SELECT pg_current_snapshot()::text, "
                "(SELECT coalesce(max(op_id), 0) FROM dbguard.change_ledger)").fetchone()
            src.commit()

            def install() -> tuple:
                _allow_ddl(src)
                # The control row first: applications read it FOR SHARE and then write the tables, so taking
                # the tables' trigger locks first would wait for a writer that waits for us (lock order
                # control -> tables, as the freeze and the rollback take them).
                src.execute(
                    """INSERT INTO dbguard.control AS c (migration, direction, run_id, dual_write, read_source,
                                                         capture_snapshot, capture_op_id)
                       VALUES (%(m)s, %(d)s, %(r)s, true, true, %(s)s, %(o)s)
                       ON CONFLICT (migration, direction) DO UPDATE SET
                         dual_write = true,
                         capture_snapshot = CASE WHEN c.run_id = EXCLUDED.run_id AND c.capture_snapshot IS NOT NULL
                                                 THEN c.capture_snapshot ELSE EXCLUDED.capture_snapshot END,
                         capture_op_id = CASE WHEN c.run_id = EXCLUDED.run_id AND c.capture_op_id IS NOT NULL
                                              THEN c.capture_op_id ELSE EXCLUDED.capture_op_id END,
                         run_id = EXCLUDED.run_id, updated_at = clock_timestamp()""",
                    {"m": spec.name, "d": direction, "r": run_id, "s": before, "o": first_op})
                tfn = db.qname(SCHEMA, truncate_function_name(spec, direction))
                src.execute(sql.SQL(
                    "CREATE OR REPLACE FUNCTION {fn}() RETURNS trigger LANGUAGE plpgsql {definer} AS {body}").format(
                    definer=DEFINER, fn=tfn, body=sql.Literal(sql.SQL(
                        "BEGIN IF {exempt} THEN RETURN NULL; END IF; "
                        "RAISE EXCEPTION 'TRUNCATE of %.% is blocked while dbguard captures changes for "
                        "migration {m} ({d}); delete rows instead or end the run (capture_off)', "
                        "TG_TABLE_SCHEMA, TG_TABLE_NAME; END").format(
                        exempt=applier_exempt(role), m=sql.SQL(spec.name.replace("'", "")),
                        d=sql.SQL(direction)).as_string(src))))
                for t in r.tables:
                    src.execute(trigger_function_sql(spec, t, direction, infos[t.ref], role=role))
                    rel, trg = r.origin_rel(t), sql.Identifier(trigger_name(spec, direction))
                    ttrg = sql.Identifier(_name(trigger_name(spec, direction), "truncate"))
                    src.execute(sql.SQL("CREATE OR REPLACE TRIGGER {trg} AFTER INSERT OR UPDATE OR DELETE ON {rel} "
                                        "FOR EACH ROW EXECUTE FUNCTION {fn}()").format(
                        trg=trg, rel=rel, fn=db.qname(SCHEMA, function_name(spec, t, direction))))
                    # row triggers are cloned to partitions; the statement-level TRUNCATE guard goes on each one
                    # (TRUNCATE of a partition fires none of the parent's), and ENABLE ALWAYS on every member
                    for m in guards.members(src, rel):
                        src.execute(sql.SQL("CREATE OR REPLACE TRIGGER {trg} BEFORE TRUNCATE ON {rel} "
                                            "FOR EACH STATEMENT EXECUTE FUNCTION {fn}()").format(trg=ttrg, rel=m, fn=tfn))
                        src.execute(sql.SQL("ALTER TABLE {rel} ENABLE ALWAYS TRIGGER {trg}, ENABLE ALWAYS TRIGGER {ttrg}")
                                    .format(rel=m, trg=trg, ttrg=ttrg))
                return src.execute("SELECT capture_snapshot, capture_op_id FROM dbguard.control "
                                   "WHERE migration = %s AND direction = %s", (spec.name, direction)).fetchone()

            # Several tables are locked one after another: give way rather than deadlock with the application.
            snap, op0 = lock_retrying(src, spec.capture.ddl_lock_timeout_ms, install)
            src.commit()
        except LOCK_ERRORS as e:
            raise CaptureError(f"capture_on ({direction}): could not lock a {r.label} table within "
                               f"capture.ddl_lock_timeout_ms={spec.capture.ddl_lock_timeout_ms} "
                               f"(a long transaction holds it: {e.diag.message_primary}); retry, or raise "
                               "capture.ddl_lock_timeout_ms") from None
        except psycopg.errors.InsufficientPrivilege as e:
            raise CaptureError(f"capture_on ({direction}): {e.diag.message_primary}; the {r.label} role needs "
                               "CREATE on the database (schema dbguard) and must own every migrated table "
                               "(ENABLE ALWAYS TRIGGER is the owner's: ALTER TABLE <table> OWNER TO <role>, or "
                               "GRANT <owner> TO <role>, or run as the owner)") from None
    out = {"enabled": True, "direction": direction, "tables": [t.ref for t in spec.tables],
           "trigger": trigger_name(spec, direction),
           "functions": [function_name(spec, t, direction) for t in spec.tables], "capture_snapshot": snap,
           "capture_op_id": op0}
    with r.dest() as dest:
        ensure_destination(dest)
    record(spec, run_id, r.stage(STAGE_ON), out, op_id=op0, source_rev=snap)
    return out


def capture_off(spec: MigrationSpec, run_id: str, direction: str = "forward", *,
                conn: psycopg.Connection | None = None) -> dict[str, Any]:
    """Drop triggers and functions (the ledger and control rows stay); idempotent, safe on abort.

    With `conn` (an origin connection, e.g. inside `quiesced`), works in the caller's transaction and
    leaves the commit to it."""
    r = route(spec, direction)
    with nullcontext(conn) if conn is not None else r.origin() as src:
        def drop() -> list[str]:
            _allow_ddl(src)
            gone = []
            # CASCADE removes the triggers that use each function, also on tables renamed since.
            fns = [function_name(spec, t, direction) for t in spec.tables] + [truncate_function_name(spec, direction)]
            for fn in fns:
                exists = src.execute("SELECT to_regprocedure(%s) IS NOT NULL",
                                     (sql.SQL("{}()").format(db.qname(SCHEMA, fn)).as_string(src),)).fetchone()[0]
                src.execute(sql.SQL("DROP FUNCTION IF EXISTS {}() CASCADE").format(db.qname(SCHEMA, fn)))
                if exists:
                    gone.append(fn)
            if src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
                src.execute("UPDATE dbguard.control SET dual_write = false, updated_at = clock_timestamp() "
                            "WHERE migration = %s AND direction = %s", (spec.name, direction))
            return gone

        try:
            if conn is None:
                dropped = lock_retrying(src, spec.capture.ddl_lock_timeout_ms, drop)
                src.commit()
            else:  # the caller's transaction (a write freeze) already holds the tables: no rollback-and-retry here
                src.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                    sql.Literal(f"{spec.capture.ddl_lock_timeout_ms}ms")))
                dropped = drop()
        except LOCK_ERRORS as e:
            raise CaptureError(f"capture_off ({direction}): could not lock a {r.label} table within "
                               f"capture.ddl_lock_timeout_ms={spec.capture.ddl_lock_timeout_ms} "
                               f"({e.diag.message_primary}); retry capture_off, or raise "
                               "capture.ddl_lock_timeout_ms") from None
    out = {"dropped_functions": dropped, "ledger_kept": True, "direction": direction}
    record(spec, run_id, r.stage(STAGE_OFF), out)
    return out
