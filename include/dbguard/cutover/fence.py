"""The write fence: a statement trigger on every migrated table of the old primary that refuses writes
(INSERT/UPDATE/DELETE/TRUNCATE) unless the session is dbguard's applier (`dbguard.applying = on` in a session of the role that installed the
fence: any role can set the marker, so it alone lets nothing through).

A straggling client that did not follow the pointer gets an error naming the migration and the new
primary instead of silently splitting the data. ENABLE ALWAYS: it fires under
session_replication_role = replica too. On every member of a partitioned table's tree: a statement that
names a partition fires none of the parent's statement triggers (see dbguard.guards). Rollback moves it to the other side; `finish` keeps it on
the old primary for good (nobody should write there any more)."""
from __future__ import annotations

import psycopg
from psycopg import sql

from .. import db, guards
from ..capture.common import _name
from ..spec import MigrationSpec, Table

FUNCTION = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE OR REPLACE FUNCTION dbguard.dbguard_fence() RETURNS trigger LANGUAGE plpgsql AS $f$
BEGIN
  -- dbguard's applier, and only in a session of the role that put the fence up (any role can SET the marker)
  IF current_setting('dbguard.applying', true) = 'on' AND (TG_NARGS < 3 OR session_user = TG_ARGV[2]) THEN
    RETURN NULL;
  END IF;
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


def install(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> list[str]:
    """Fence `side` ('source' | 'target') in `conn`'s transaction (the caller commits). Idempotent.
    CREATE TRIGGER takes SHARE ROW EXCLUSIVE: under a write freeze that is an upgrade readers do not wait for."""
    other = "target" if side == "source" else "source"
    conn.execute(FUNCTION)
    guards.allow_ddl(conn)  # past the run's schema freeze
    name, done = trigger_name(spec), []
    role = conn.execute("SELECT session_user").fetchone()[0]  # the appliers connect as this role too
    for t in spec.tables:
        fn = sql.SQL("dbguard.dbguard_fence({m}, {p}, {u})").format(
            m=sql.Literal(spec.name), p=sql.Literal(f"{other} database"), u=sql.Literal(role))
        if guards.create_statement_trigger(conn, _rel(t, side), name, "BEFORE INSERT OR UPDATE OR DELETE OR TRUNCATE",
                                           fn):
            done.append(t.ref)
    return done


def remove(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> list[str]:
    """Lift the fence from `side` in `conn`'s transaction. Idempotent."""
    guards.allow_ddl(conn)
    name, done = trigger_name(spec), []
    for t in spec.tables:
        if guards.drop_trigger(conn, _rel(t, side), name):
            done.append(t.ref)
    return done


def fenced(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> bool:
    """Every member of every migrated table's partition tree has the fence, enabled ALWAYS."""
    return all(guards.has_trigger(conn, _rel(t, side), trigger_name(spec), always=True) for t in spec.tables)
