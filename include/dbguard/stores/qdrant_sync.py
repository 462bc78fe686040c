"""Dual writes into a Qdrant collection: changes captured on the PostgreSQL source (the change ledger
that capture_on's triggers fill) applied to the collection, idempotently, deletes included.

The collection is not a PostgreSQL table, so the applier's transactional cursor cannot live beside
the applied rows. Instead each pass applies a *window* of the ledger by source snapshot, like the
table applier (capture/__init__.py): the ops whose transaction is visible in the current snapshot
`cur` and was not in the previous window's `prev`. For the keys those ops name (new and old key of a
key change) it reads the rows as the source holds them now and upserts their points, and deletes the
points of keys that no longer exist. The result is the source's state, not a replay: applying a
window twice, or an op whose row changed again since, writes the same point (idempotent by key);
a deleted row's point is deleted once and stays deleted. Every later commit is in a later window, so
the last pass after the writers stop leaves the collection equal to the source (reconcile proves it).

`prev` starts as the snapshot the copy read (`copy(...)["snapshot"]`); the caller keeps the returned
`snapshot` for the next pass. A refused write (Qdrant error) is counted in `dual_write_fail` and the
window is not advanced, so the next pass retries it.
"""
from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg import sql

from ..spec import MigrationSpec, Table, VectorStore
from . import qdrant, qdrant_copy

_WINDOW_KEYS = """
SELECT DISTINCT v.k FROM (
    SELECT key, old_key FROM dbguard.change_ledger
    WHERE migration = %(m)s AND direction = 'forward' AND table_name = %(t)s
      AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot)
      AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
) o, LATERAL (VALUES (o.key), (o.old_key)) AS v(k)
WHERE v.k IS NOT NULL
"""


def apply_window(spec: MigrationSpec, table: Table, store: VectorStore, src: psycopg.Connection, c, name: str,
                 prev: str | None) -> dict[str, Any]:
    """One pass: the keys changed in the window (prev, cur] re-read and written; returns the new snapshot."""
    cur = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
    rows = src.execute(_WINDOW_KEYS, {"m": spec.name, "t": table.ref, "cur": cur, "prev": prev}).fetchall()
    src.rollback()
    keys = sorted({json.loads(k)[0] if isinstance(k, str) else k[0] for (k,) in rows})
    out = {"snapshot": cur, "keys": len(keys), "upserted": 0, "deleted": 0, "dual_write_fail": 0}
    if not keys:
        return out
    source = qdrant_copy.Source(src, table, store)
    q = source.select + sql.SQL(" AND {} = ANY(%s::{}[]) ORDER BY {}").format(source.key, source.cast, source.key)
    points = source._points(src.execute(q, (keys,)).fetchall())
    src.rollback()
    gone = sorted(set(keys) - {p.id for p in points})
    try:
        qdrant.write_batch(c, name, store, points)
        qdrant.delete_points(c, name, gone)
    except Exception as e:  # the store refused: count it, keep `prev` so the next pass retries the window
        out.update(snapshot=prev, dual_write_fail=1, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        return out
    out.update(upserted=len(points), deleted=len(gone))
    return out
