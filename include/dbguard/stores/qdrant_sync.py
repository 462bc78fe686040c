"""Dual writes into a Qdrant collection: changes captured in PostgreSQL (the change ledger that capture's
triggers fill) applied to the collection, idempotently, deletes included, throughout the run.

The collection is not a PostgreSQL table, so the applier's transactional cursor cannot live beside
the applied rows. Instead each pass applies a *window* of the ledger by snapshot, like the table
applier (capture/__init__.py): the ops whose transaction is visible in the current snapshot `cur` and
was not in the previous window's `prev`. In ONE repeatable-read transaction (so in `cur` itself) it
reads those ops and the rows of the keys they name (new and old key of a key change), upserts their
points and deletes the points of keys that do not exist in `cur`. The result is the origin's state as
of `cur`, not a replay: applying a window twice writes the same points (idempotent by key), and a
delete is applied in the one window that holds its op (the row was read in the same snapshot, so a
later delete cannot make an earlier window delete it too). Every later commit is in a later window, so
the last pass after the writers stop leaves the collection equal to the origin (reconcile proves it).

The idempotency key of a pass is its window: `source_rev` = the snapshot `cur` and the op_id range
it covered (event `qdrant_sync`); the next pass starts at `cur` (metric `qdrant_snapshot`). A point
the collection refuses (wrong dimension, NaN) is retried alone, and each refused key's ops are recorded
in dbguard.apply_failures, so `dual_write_fail` counts them and the window moves on; a store that does
not answer at all (connection, 5xx) is not a refusal: the window stays and the next pass retries it.

Two origins: `forward` reads the source's ledger and table (before the cutover); `reverse` reads the
target's ledger (reverse capture, after the cutover) and the target table, whose vectors already carry
the declared transform (cutover/readers.py runs that during the tail).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db, ledger
from ..spec import MigrationSpec, Table, VectorStore
from . import qdrant, qdrant_copy
from . import vector as vector_store

SNAPSHOT = {"forward": "qdrant_snapshot", "reverse": "qdrant_snapshot.reverse"}
FAILURE_DIRECTION = {"forward": "forward", "reverse": "qdrant.reverse"}  # dbguard.apply_failures.direction

_WINDOW = """
SELECT op_id, op, key, old_key FROM dbguard.change_ledger
WHERE migration = %(m)s AND direction = %(d)s AND table_name = %(t)s
  AND (%(prev)s::pg_snapshot IS NULL OR source_xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot))
  AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot)
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
ORDER BY op_id
"""


def origin_source(conn: psycopg.Connection, table: Table, store: VectorStore, side: str) -> qdrant_copy.Source:
    """The rows as points, read from the source table (transform applied) or the target table (already
    transformed: its column is read as it is)."""
    if side == "source":
        return qdrant_copy.Source(conn, table, store)
    tgt = table.model_copy(update={"schema_": table.target_schema, "name": table.target_name})
    return qdrant_copy.Source(conn, tgt, store.model_copy(update={"normalize": False}))


def _points(source: qdrant_copy.Source, rows: list[tuple]) -> list[qdrant.Point]:
    """Rows -> points with the dimension each vector carries (vector_send's header), so a vector of
    another dimension reaches the collection and is refused there, not misread here."""
    out = []
    for r in rows:
        dim = int.from_bytes(r[1][:2], "big")
        vec = np.frombuffer(r[1], dtype=">f4", offset=4, count=dim).astype(np.float32)
        out.append(qdrant.Point(r[0], {c: enc(v) for (c, enc), v in zip(source.encoders, r[2:])}, vec))
    return out


def refused(e: Exception) -> bool:
    """The store refused this write (a bad point: local mode's validation, 4xx), as opposed to not answering
    (connection, timeout, 429/5xx: `qdrant.transient`), which a later pass retries."""
    return not qdrant.transient(e)


def _error(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:500]


def apply_window(spec: MigrationSpec, table: Table, store: VectorStore, src: psycopg.Connection, c, name: str,
                 prev: str | None, *, direction: str = "forward", side: str = "source") -> dict[str, Any]:
    """One pass: the keys changed in the window (prev, cur] written as the origin holds them in `cur`.
    Returns the next window's start (`snapshot`), what was written and what the store refused."""
    source = origin_source(src, table, store, side)
    src.rollback()
    with src.transaction():
        src.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        cur = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # the transaction's snapshot
        ops = src.execute(_WINDOW, {"m": spec.name, "d": direction, "t": table.ref, "cur": cur,
                                    "prev": prev}).fetchall()
        by_key: dict[str, list[tuple[int, str]]] = {}
        for op_id, op, key, old in ops:
            for k in (key, old):
                if k is not None:
                    by_key.setdefault(str(k[0]), []).append((op_id, op))
        keys = sorted(by_key)
        rows = src.execute(source.select + sql.SQL(" AND {} = ANY(%s::{}[]) ORDER BY {}").format(
            source.key, source.cast, source.key), (keys,)).fetchall() if keys else []
    out: dict[str, Any] = {"snapshot": cur, "prev": prev, "ops": len(ops), "first_op": ops[0][0] if ops else None,
                           "last_op": ops[-1][0] if ops else None, "keys": len(keys), "upserted": 0, "deleted": 0,
                           "deleted_keys": [], "refused": [], "dual_write_fail": 0}
    if not keys:
        return out
    points = _points(source, rows)
    gone = sorted(set(keys) - {p.id for p in points})
    try:
        qdrant.write_batch(c, name, store, points)
        qdrant.delete_points(c, name, gone)
    except Exception as e:  # noqa: BLE001  one by one: which point, and is it a refusal or an outage
        if not refused(e):
            out.update(snapshot=prev, unavailable=_error(e))  # nothing recorded: the next pass retries
            return out
        bad = _one_by_one(c, name, store, points, gone)
        if bad is None:
            out.update(snapshot=prev, unavailable=_error(e))
            return out
        out["refused"] = [{"key": k, "ops": by_key[k], "error": err} for k, err in sorted(bad.items())]
        gone = [k for k in gone if k not in bad]
        points = [p for p in points if p.id not in bad]
    out.update(upserted=len(points), deleted=len(gone), deleted_keys=gone, dual_write_fail=len(out["refused"]))
    return out


def _one_by_one(c, name: str, store: VectorStore, points: list[qdrant.Point], gone: list[str]
                ) -> dict[str, str] | None:
    """key -> error of each write the store refused; None when it stopped answering meanwhile."""
    bad: dict[str, str] = {}
    for key, write in [(p.id, lambda p=p: qdrant.write_batch(c, name, store, [p], retries=1)) for p in points] + \
                      [(k, lambda k=k: qdrant.delete_points(c, name, [k])) for k in gone]:
        try:
            write()
        except Exception as e:  # noqa: BLE001
            if not refused(e):
                return None
            bad[key] = _error(e)
    return bad


def _reverse_start(spec: MigrationSpec) -> str | None:
    """Where the reverse window starts: the target snapshot reverse capture took before its triggers existed."""
    with db.target(spec) as tgt:
        if tgt.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is None:
            return None
        row = tgt.execute("SELECT capture_snapshot FROM dbguard.control WHERE migration = %s AND direction = "
                          "'reverse'", (spec.name,)).fetchone()
    return row[0] if row else None


def _record(tgt: psycopg.Connection, spec: MigrationSpec, run_id: str, direction: str, table: Table,
            store: VectorStore, r: dict[str, Any]) -> None:
    """Each refused key's ops into dbguard.apply_failures (the run ledger's database), so dual_write_fail
    counts them (forward: with the table applier's; reverse: as `qdrant.reverse`, which never blocks the
    rollback that moves readers off the collection)."""
    from ..capture import ensure_destination

    ensure_destination(tgt)
    where = f"{table.ref} -> qdrant {store.qdrant.collection}"
    for f in r["refused"]:
        for op_id, op in f["ops"]:
            tgt.execute("""INSERT INTO dbguard.apply_failures (migration, direction, run_id, op_id, table_name, op,
                                                               key, sqlstate, error)
                           VALUES (%s, %s, %s, %s, %s, %s, %s, NULL, %s) ON CONFLICT DO NOTHING""",
                        (spec.name, FAILURE_DIRECTION[direction], run_id, op_id, where, op, Jsonb([f["key"]]),
                         f["error"]))


def failures(tgt: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict[str, int]:
    """Refused Qdrant writes recorded in this run, per apply_failures direction."""
    if tgt.execute("SELECT to_regclass('dbguard.apply_failures')").fetchone()[0] is None:
        return {}
    rows = tgt.execute("SELECT direction, count(*) FROM dbguard.apply_failures WHERE migration = %s AND run_id = %s "
                       "AND table_name LIKE %s GROUP BY 1", (spec.name, run_id, "% -> qdrant %")).fetchall()
    return {d: int(n) for d, n in rows}


def sync(spec: MigrationSpec, run_id: str, direction: str = "forward") -> dict[str, Any]:
    """One pass over every Qdrant collection built in this run (build_indexes kept the snapshot its copy
    read): apply the window since the last pass and keep the new start in the ledger. Own connections:
    safe inside a write freeze another session holds. Returns per store what was applied and
    `dual_write_fail` (writes refused in this pass; they are recorded, see `_record`)."""
    assert direction in SNAPSHOT
    with db.target(spec) as tgt:
        ledger.ensure(tgt)
        m = ledger.metrics(tgt, run_id)
    built = m.get(SNAPSHOT["forward"]) or {}
    snaps = dict(m.get(SNAPSHOT[direction]) or {})
    out: dict[str, Any] = {"direction": direction, "dual_write_fail": 0, "stores": {}, "unavailable": []}
    todo = [(t, v) for t, v in vector_store.stores(spec) if v.qdrant is not None
            and vector_store.label(t, v) in built]
    if not todo:
        return out
    start = _reverse_start(spec) if direction == "reverse" else None
    results = []
    with (db.source(spec) if direction == "forward" else db.target(spec)) as origin:
        for t, v in todo:
            label = vector_store.label(t, v)
            prev = snaps.get(label, start) if direction == "reverse" else snaps[label]
            r = apply_window(spec, t, v, origin, qdrant.client(v.qdrant.conn_id), v.qdrant.collection, prev,
                             direction=direction, side="source" if direction == "forward" else "target")
            snaps[label] = r["snapshot"]
            out["stores"][label] = r
            out["dual_write_fail"] += r["dual_write_fail"]
            if r.get("unavailable"):
                out["unavailable"].append(f"{label}: {r['unavailable']}")
            results.append((t, v, r))
    with db.target(spec) as tgt:
        for t, v, r in results:
            if r["refused"]:
                _record(tgt, spec, run_id, direction, t, v, r)
            if r["ops"] or r["refused"]:
                ledger.event(tgt, run_id, spec.name, "qdrant_sync" if direction == "forward" else
                             "qdrant_sync.reverse", {"store": vector_store.label(t, v), **{
                                 k: r[k] for k in ("prev", "ops", "first_op", "last_op", "keys", "upserted",
                                                   "deleted", "dual_write_fail", "refused")},
                                 "deleted_keys": r["deleted_keys"][:1000]},
                             op_id=r["last_op"], source_rev=r["snapshot"], commit=False)
        ledger.set_metric(tgt, run_id, spec.name, SNAPSHOT[direction], snaps, commit=False)
        if any(r["refused"] for *_, r in results):
            _count(tgt, spec, run_id)
        tgt.commit()
    return out


def _count(tgt: psycopg.Connection, spec: MigrationSpec, run_id: str) -> None:
    """Metric dual_write_fail: every change not applied in this run, the table applier's and the collections'
    (the forward drain rewrites it from apply_failures, which holds the forward refusals too)."""
    table_and_forward = tgt.execute("SELECT count(*) FROM dbguard.apply_failures WHERE migration = %s AND run_id = %s "
                                    "AND direction = 'forward'", (spec.name, run_id)).fetchone()[0]
    q = failures(tgt, spec, run_id)
    ledger.set_metric(tgt, run_id, spec.name, "dual_write_fail",
                      int(table_and_forward) + q.get(FAILURE_DIRECTION["reverse"], 0), commit=False)
    ledger.set_metric(tgt, run_id, spec.name, "dual_write_fail.qdrant", sum(q.values()), commit=False)
