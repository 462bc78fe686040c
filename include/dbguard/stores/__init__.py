"""Store kinds beyond plain tables: vector (pgvector) and search (full-text)."""
from __future__ import annotations

from typing import Any, Callable

import psycopg
from psycopg import sql

from ..db import qname


def build_or_swap(conn: psycopg.Connection, schema: str, name: str, matches: bool | None,
                  ddl: Callable[[str], sql.Composed]) -> dict[str, Any]:
    """Keep a matching index, create a missing one, or rebuild a different one offline under
    `<name>_new` and swap it in one transaction (readers never see the table without an index).
    `conn` must be in autocommit mode: `ddl` builds CONCURRENTLY."""
    if matches is True:
        return {"index": name, "action": "kept"}
    tmp = name[:59] + "_new"
    conn.execute(sql.SQL("DROP INDEX CONCURRENTLY IF EXISTS {}").format(qname(schema, tmp)))
    if matches is None:
        conn.execute(ddl(name))
        return {"index": name, "action": "created"}
    conn.execute(ddl(tmp))
    with conn.transaction():
        conn.execute(sql.SQL("DROP INDEX {}").format(qname(schema, name)))
        conn.execute(sql.SQL("ALTER INDEX {} RENAME TO {}").format(qname(schema, tmp), sql.Identifier(name)))
    return {"index": name, "action": "rebuilt"}
