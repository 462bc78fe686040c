"""What every guard dbguard installs on a migrated table shares: the tables it must cover, and the pass that
lets dbguard's own DDL through the schema freeze.

**Partitions.** PostgreSQL fires a table's statement triggers only for statements that name that table: an
`UPDATE events_2024 ...` fires none of the parent `events`'s, and a `TRUNCATE events_2024` none either. Row
triggers are cloned to partitions, statement triggers are not. So a statement-level guard (fence, TRUNCATE
guard, foreign-write counter) goes on every member of the partition tree (`members`: the table, its
intermediate partitions and its leaves), and ENABLE ALWAYS is set on each member, not only on the parent
(older minor releases did not recurse it to partitions).

**The DDL pass.** The schema freeze's event trigger lets a transaction's DDL through when
`dbguard.ddl_pass` holds that transaction's id. Only the migration role can write that table (no privilege
is granted to anyone else), unlike a setting, which any role can SET. Finished transactions' rows are pruned
on the next pass; an id is never reused (xid8), so a leftover row opens nothing.
"""
from __future__ import annotations

import psycopg
from psycopg import sql

from . import db

PASS_DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.ddl_pass (xid xid8 PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp());
REVOKE ALL ON dbguard.ddl_pass FROM PUBLIC;
"""


def allow_ddl(conn: psycopg.Connection) -> None:
    """Let the DDL of `conn`'s current transaction through the schema freeze (and only that transaction's)."""
    if conn.execute("SELECT to_regclass('dbguard.ddl_pass')").fetchone()[0] is None:
        conn.execute(PASS_DDL)
    conn.execute("DELETE FROM dbguard.ddl_pass WHERE xid IN (SELECT xid FROM dbguard.ddl_pass "
                 "WHERE xid < pg_snapshot_xmin(pg_current_snapshot()) FOR UPDATE SKIP LOCKED)")
    conn.execute("INSERT INTO dbguard.ddl_pass (xid) VALUES (pg_current_xact_id()) ON CONFLICT DO NOTHING")


def members(conn: psycopg.Connection, rel: sql.Composable) -> list[sql.Composed]:
    """`rel` and, when it is partitioned, every partition below it (intermediate and leaf), parent first.
    [] when `rel` does not exist."""
    name = rel.as_string(conn)
    if conn.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is None:
        return []
    rows = conn.execute(
        "SELECT n.nspname, c.relname FROM pg_partition_tree(%s::regclass) p JOIN pg_class c ON c.oid = p.relid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace ORDER BY p.level, c.relname", (name,)).fetchall()
    return [db.qname(s, n) for s, n in rows] or [sql.Composed([rel])]


def oids(conn: psycopg.Connection, rels: list[sql.Composable]) -> list[int]:
    """The oids of every member of every table in `rels` (missing tables are skipped)."""
    return [r[0] for r in conn.execute(
        "SELECT DISTINCT m.relid::oid::bigint FROM unnest(%s::text[]) t(name), LATERAL ("
        "SELECT to_regclass(t.name) AS relid UNION SELECT relid FROM pg_partition_tree(to_regclass(t.name))) m "
        "WHERE m.relid IS NOT NULL ORDER BY 1",  # pg_partition_tree is empty for a table that is not partitioned
        ([r.as_string(conn) for r in rels],))]


def has_trigger(conn: psycopg.Connection, rel: sql.Composable, name: str, *, always: bool = False) -> bool:
    """Every member of `rel`'s partition tree has trigger `name` (enabled ALWAYS, with `always`); False when
    `rel` does not exist."""
    ms = members(conn, rel)
    return bool(ms) and all(_enabled(conn, m, name) in (("A",) if always else ("A", "O", "R", "D")) for m in ms)


def _enabled(conn: psycopg.Connection, rel: sql.Composable, name: str) -> str | None:
    """pg_trigger.tgenabled of trigger `name` on `rel` ('A' = always), None when there is none."""
    row = conn.execute("SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s",
                       (rel.as_string(conn), name)).fetchone()
    return row[0] if row else None


def create_statement_trigger(conn: psycopg.Connection, rel: sql.Composable, name: str, timing: str,
                             function: sql.Composable) -> bool:
    """CREATE TRIGGER `name` `timing` ... FOR EACH STATEMENT EXECUTE FUNCTION `function` on every member of
    `rel`'s tree that lacks it, each ENABLE ALWAYS. `timing` is a constant of dbguard's ("BEFORE INSERT OR
    ..."), never a spec value. A member that has it enabled ALWAYS is not touched (no lock taken). Returns
    whether any member lacked it."""
    added = False
    for m in members(conn, rel):
        state = _enabled(conn, m, name)
        if state is None:
            conn.execute(sql.SQL("CREATE TRIGGER {n} " + timing + " ON {r} FOR EACH STATEMENT EXECUTE FUNCTION {f}")
                         .format(n=sql.Identifier(name), r=m, f=function))
            added = True
        if state != "A":
            conn.execute(sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(m, sql.Identifier(name)))
    return added


def enable_always(conn: psycopg.Connection, rel: sql.Composable, *names: str) -> None:
    """ENABLE ALWAYS every trigger in `names` on every member of `rel`'s tree (row triggers' clones too)."""
    for m in members(conn, rel):
        conn.execute(sql.SQL("ALTER TABLE {} {}").format(m, sql.SQL(", ").join(
            sql.SQL("ENABLE ALWAYS TRIGGER {}").format(sql.Identifier(n)) for n in names)))


def drop_trigger(conn: psycopg.Connection, rel: sql.Composable, name: str) -> bool:
    """DROP trigger `name` from every member of `rel`'s tree that has it. Returns whether any had it."""
    dropped = False
    for m in members(conn, rel):
        if _enabled(conn, m, name) is not None:
            conn.execute(sql.SQL("DROP TRIGGER {} ON {}").format(sql.Identifier(name), m))
            dropped = True
    return dropped
