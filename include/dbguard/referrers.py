"""Tables that are not migrated but reference migrated ones (foreign keys into them, on the source).

After the cutover such a table stays on the old side, alone: the application's deletes and key changes
on the target reach the source only through the reverse applier, which writes as the replica role (as
logical replication does), so the foreign key is not checked and the table's rows are orphaned; where the
applier cannot take the replica role, the key's ON DELETE / ON UPDATE action runs (CASCADE deletes its
rows, SET NULL clears them, NO ACTION / RESTRICT fail the applier). Preflight names each such table with
that consequence and refuses unless the spec acknowledges it (`acknowledge: ['referenced_by schema.table']`).
"""
from __future__ import annotations

import psycopg

from . import catalog
from .spec import MigrationSpec

_REFERRERS = """
SELECT cn.nspname, c.relname, con.conname, pg_get_constraintdef(con.oid), rn.nspname, r.relname,
       con.confdeltype, con.confupdtype
FROM pg_constraint con
JOIN pg_class c ON c.oid = con.conrelid JOIN pg_namespace cn ON cn.oid = c.relnamespace
JOIN pg_class r ON r.oid = con.confrelid JOIN pg_namespace rn ON rn.oid = r.relnamespace
WHERE con.contype = 'f' AND con.conparentid = 0
  AND con.confrelid = ANY(%(migrated)s) AND NOT con.conrelid = ANY(%(migrated)s)
ORDER BY 1, 2, 3
"""

_ACTION = {"c": "CASCADE deletes its rows", "n": "SET NULL clears its key columns",
           "d": "SET DEFAULT resets its key columns", "a": "NO ACTION fails the applier",
           "r": "RESTRICT fails the applier"}


def entry(schema: str, name: str) -> str:
    """The acknowledge entry that accepts this referencing table, exactly as preflight prints it."""
    return f"referenced_by {schema}.{name}"


def find(conn: psycopg.Connection, spec: MigrationSpec) -> dict[str, list[dict]]:
    """acknowledge entry -> the foreign keys of that non-migrated table into migrated tables."""
    migrated = [oid for t in spec.tables if (oid := catalog.regclass(conn, t.schema_, t.name)) is not None]
    out: dict[str, list[dict]] = {}
    if not migrated:
        return out
    for ns, rel, con, definition, rns, rrel, on_delete, on_update in conn.execute(
            _REFERRERS, {"migrated": migrated}):
        out.setdefault(entry(ns, rel), []).append(
            {"table": f"{ns}.{rel}", "constraint": con, "def": definition, "references": f"{rns}.{rrel}",
             "on_delete": on_delete, "on_update": on_update})
    return out


def problems(conn: psycopg.Connection, spec: MigrationSpec) -> tuple[list[str], list[str]]:
    """(refusals, acknowledged entries): one refusal per referencing table the spec does not acknowledge."""
    refusals, accepted = [], []
    for ack, fks in find(conn, spec).items():
        if spec.acknowledged(ack):
            accepted.append(ack)
            continue
        table = fks[0]["table"]
        keys = "; ".join(f"{f['constraint']} {f['def']} (on delete: {_ACTION.get(f['on_delete'], '?')}, on key "
                         f"change: {_ACTION.get(f['on_update'], '?')})" for f in fks)
        refusals.append(
            f"source: {table} is not migrated but references the migrated "
            f"{', '.join(sorted({f['references'] for f in fks}))} ({keys}). After the cutover it is left on the "
            f"source: deletes and key changes the reverse applier brings back from the target orphan its rows "
            f"(the replica role skips the foreign key check) or, without that role, run the action named above. "
            f"Migrate it too (add it to tables), or accept this: acknowledge: ['{ack}']")
    return refusals, accepted
