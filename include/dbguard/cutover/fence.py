"""The write fence: a statement trigger on every migrated table of the old primary that refuses writes
(INSERT/UPDATE/DELETE/TRUNCATE) unless the session is dbguard's applier (`dbguard.applying = on`).

A straggling client that did not follow the pointer gets an error naming the migration and the new
primary instead of silently splitting the data. ENABLE ALWAYS: it fires under
session_replication_role = replica too. Rollback moves it to the other side; `finish` keeps it on
the old primary for good (nobody should write there any more)."""
from __future__ import annotations

import psycopg
from psycopg import sql

from .. import db
from ..capture.common import _name
from ..spec import MigrationSpec, Table

FUNCTION = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE OR REPLACE FUNCTION dbguard.dbguard_fence() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  IF current_setting('dbguard.applying', true) = 'on' THEN RETURN NULL; END IF;
  RAISE EXCEPTION USING ERRCODE = 'read_only_sql_transaction',
    MESSAGE = format('dbguard: %I.%I is fenced: migration %s has moved the primary to the %s; '
                     'write there (this side is only the fallback, kept current by dbguard)',
                     TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_ARGV[0], TG_ARGV[1]),
    HINT = 'read dbguard.control.write_target (or reconnect through the pointer) before writing';
END $f$;
"""


def trigger_name(spec: MigrationSpec) -> str:
    return _name("dbguard_fence", spec.name)


def _rel(t: Table, side: str) -> sql.Composed:
    return db.qname(t.schema_, t.name) if side == "source" else db.qname(t.target_schema, t.target_name)


def _present(conn: psycopg.Connection, rel: sql.Composed, name: str) -> bool:
    return conn.execute("SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s)",
                        (rel.as_string(conn), name)).fetchone()[0]


def install(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> list[str]:
    """Fence `side` ('source' | 'target') in `conn`'s transaction (the caller commits). Idempotent.
    CREATE TRIGGER takes SHARE ROW EXCLUSIVE: under a write freeze that is an upgrade readers do not wait for."""
    other = "target" if side == "source" else "source"
    conn.execute(FUNCTION)
    conn.execute("SELECT set_config('dbguard.allow_ddl', 'on', true)")  # past the run's schema freeze
    name, done = trigger_name(spec), []
    for t in spec.tables:
        rel = _rel(t, side)
        if _present(conn, rel, name):
            continue
        conn.execute(sql.SQL("CREATE TRIGGER {n} BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE ON {r} "
                             "FOR EACH STATEMENT EXECUTE FUNCTION dbguard.dbguard_fence({m}, {p})").format(
            n=sql.Identifier(name), r=rel, m=sql.Literal(spec.name), p=sql.Literal(f"{other} database")))
        conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(rel, sql.Identifier(name)))
        done.append(t.ref)
    return done


def remove(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> list[str]:
    """Lift the fence from `side` in `conn`'s transaction. Idempotent."""
    conn.execute("SELECT set_config('dbguard.allow_ddl', 'on', true)")
    name, done = trigger_name(spec), []
    for t in spec.tables:
        rel = _rel(t, side)
        if conn.execute("SELECT to_regclass(%s)", (rel.as_string(conn),)).fetchone()[0] and _present(conn, rel, name):
            conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name), rel))
            done.append(t.ref)
    return done


def fenced(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> bool:
    name = trigger_name(spec)
    return all(conn.execute("SELECT to_regclass(%s)", (_rel(t, side).as_string(conn),)).fetchone()[0]
               and _present(conn, _rel(t, side), name) for t in spec.tables)
