"""Where readers search a vector store that moves to a Qdrant collection (pgvector -> Qdrant): the reader
pointer, its flip inside the cutover and the rollback, and the tail that keeps the collection current.

The pointer is one row per store in `dbguard.vector_readers` on the SOURCE, beside `dbguard.control`:
`reads` = 'pgvector' (search the vector column on the PostgreSQL primary, the side `control.write_target`
names) or 'qdrant' (search `collection` on connection `conn_id`); no row means 'pgvector'. Readers read it
per query or per request (no lock needed: both stores are kept current while either may be read).

Writes: the PostgreSQL table stays the system of record. The application writes rows (vector included) to
PostgreSQL only, where `write_target` says; dbguard carries them into the collection:
  before the flip   forward ledger (source) -> collection, each soak poke and release (qdrant_sync)
  at the flip       the last forward window under the cutover's freeze, then readers -> 'qdrant' in the
                    same source transaction as the write pointer (a refused write aborts the cutover)
  the tail          reverse ledger (target, the new primary) -> collection every few seconds until
                    rollback_ttl_minutes (flow.tail), and once more at finish
  rollback          the last reverse window with the target fenced, then readers -> 'pgvector' in the
                    transaction that flips the write pointer back; the source gets the same writes from
                    the reverse applier, so both stores hold every write made after the cutover
After `finish` dbguard no longer feeds the collection: the application's own indexing must upsert points
from then on (README, "pgvector -> Qdrant: readers").
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from .. import db, guards
from ..spec import MigrationSpec
from ..stores import qdrant, qdrant_sync
from ..stores import vector as vector_store
from .steps import CutoverError

DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.vector_readers (
    migration   text NOT NULL,
    store       text NOT NULL,
    reads       text NOT NULL DEFAULT 'pgvector' CHECK (reads IN ('pgvector', 'qdrant')),
    conn_id     text,
    collection  text,
    vector_name text,
    run_id      text,
    updated_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, store)
);
GRANT USAGE ON SCHEMA dbguard TO PUBLIC;
GRANT SELECT ON dbguard.vector_readers TO PUBLIC;
"""
READS = ("pgvector", "qdrant")
OPERATORS = {"l2": "<->", "cosine": "<=>", "ip": "<#>"}


def stores(spec: MigrationSpec) -> list:
    """(table, store) of every vector store whose target is a Qdrant collection."""
    return [(t, v) for t, v in vector_store.stores(spec) if v.qdrant is not None]


def point(conn: psycopg.Connection, spec: MigrationSpec, run_id: str, reads: str) -> dict[str, str]:
    """Send every Qdrant store's readers to `reads`, in `conn`'s transaction on the source (the caller
    commits it with the write pointer). Idempotent."""
    assert reads in READS
    guards.allow_ddl(conn)  # past the run's schema freeze
    conn.execute(DDL)
    out = {}
    for t, v in stores(spec):
        label = vector_store.label(t, v)
        conn.execute("""INSERT INTO dbguard.vector_readers AS r (migration, store, reads, conn_id, collection,
                                                                 vector_name, run_id)
                        VALUES (%s, %s, %s, %s, %s, %s, %s)
                        ON CONFLICT (migration, store) DO UPDATE SET reads = EXCLUDED.reads,
                          conn_id = EXCLUDED.conn_id, collection = EXCLUDED.collection,
                          vector_name = EXCLUDED.vector_name, run_id = EXCLUDED.run_id,
                          updated_at = clock_timestamp()""",
                     (spec.name, label, reads, v.qdrant.conn_id, v.qdrant.collection, v.qdrant.vector_name, run_id))
        out[label] = reads
    return out


def current(spec: MigrationSpec) -> dict[str, str]:
    """store label -> 'pgvector' | 'qdrant', as readers see it now."""
    with db.source(spec) as src:
        rows = dict(src.execute("SELECT store, reads FROM dbguard.vector_readers WHERE migration = %s",
                                (spec.name,)).fetchall()) \
            if src.execute("SELECT to_regclass('dbguard.vector_readers')").fetchone()[0] else {}
    return {vector_store.label(t, v): rows.get(vector_store.label(t, v), "pgvector") for t, v in stores(spec)}


def at_flip(src: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict[str, Any] | None:
    """The cutover's pointer step, under its freeze (`src` holds it: nothing commits on the source now):
    the last forward window into each collection, then readers to Qdrant in `src`'s transaction. A write the
    collection refused, or a collection not built in this run, raises: the freeze rolls back, nothing moves."""
    if not stores(spec):
        return None
    r = qdrant_sync.sync(spec, run_id, "forward")
    missing = [vector_store.label(t, v) for t, v in stores(spec) if vector_store.label(t, v) not in r["stores"]]
    if missing:
        raise CutoverError(f"readers cannot move to Qdrant: the collection of {missing} was not built in run "
                           f"{run_id} (build_indexes records where its dual writes start); run the migration first")
    if r["dual_write_fail"] or r["unavailable"]:
        raise CutoverError(f"readers cannot move to Qdrant: the collection refused {r['dual_write_fail']} write(s) "
                           f"{[f for s in r['stores'].values() for f in s['refused']][:5]} "
                           f"{'; unreachable: ' + '; '.join(r['unavailable']) if r['unavailable'] else ''}; see "
                           "dbguard.apply_failures, fix the rows on the source, then cut over again")
    return {"readers": point(src, spec, run_id, "qdrant"), "last_window": _brief(r)}


def at_flip_back(ptr: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict[str, Any] | None:
    """The rollback's pointer step (the target is fenced: nothing new commits there): the last reverse window
    into each collection, so it also holds every write made since the cutover, then readers back to pgvector
    in `ptr`'s transaction. A refused or failed write is recorded, never blocks the rollback: readers leave."""
    if not stores(spec):
        return None
    try:
        last = _brief(qdrant_sync.sync(spec, run_id, "reverse"))
    except Exception as e:  # noqa: BLE001  reported; the collection is no longer read
        last = {"error": (str(e).splitlines() or [type(e).__name__])[0]}
    return {"readers": point(ptr, spec, run_id, "pgvector"), "last_window": last}


def at_finish(spec: MigrationSpec, run_id: str) -> dict[str, Any] | None:
    """`finish`, before reverse capture goes off: the last reverse window into each collection (readers stay
    on it; from here on the application's own indexing feeds it)."""
    return _brief(qdrant_sync.sync(spec, run_id, "reverse")) if stores(spec) else None


def _brief(r: dict[str, Any]) -> dict[str, Any]:
    return {"dual_write_fail": r["dual_write_fail"], "unavailable": r["unavailable"],
            **{label: {k: s[k] for k in ("ops", "upserted", "deleted")} for label, s in r["stores"].items()}}


def keep_current(spec: MigrationSpec, run_id: str, until: float, *, every: float = 2.0) -> dict[str, Any]:
    """The tail: reverse windows into the collections readers search, every `every` seconds, until the
    monotonic time `until` or until the run leaves phase `cutover` (rolled back or finished)."""
    from .steps import state

    passes, applied, refused, errors = 0, 0, 0, []
    while True:
        try:  # a pass that fails is reported and retried: failing the tail task would roll the run back
            if state(spec, run_id)["phase"] != "cutover":
                break
            r = qdrant_sync.sync(spec, run_id, "reverse")
            passes += 1
            applied += sum(s["upserted"] + s["deleted"] for s in r["stores"].values())
            refused += r["dual_write_fail"]
            errors += r["unavailable"]
        except Exception as e:  # noqa: BLE001  the window stays where it was; the next pass retries it
            errors.append((str(e).strip().splitlines() or [type(e).__name__])[0])
        if time.monotonic() >= until:
            break
        time.sleep(min(every, max(0.0, until - time.monotonic())))
    return {"passes": passes, "applied": applied, "dual_write_fail": refused, "errors": errors[-5:],
            "failed_passes": len(errors)}


def search(spec: MigrationSpec, label: str, query, k: int) -> dict[str, Any]:
    """The reader protocol, as an application follows it: read the pointer, then search the store it names
    (Qdrant, or pgvector on the PostgreSQL primary). Returns {"store", "side", "ids"}."""
    tv = {vector_store.label(t, v): (t, v) for t, v in stores(spec)}
    if label not in tv:
        raise CutoverError(f"{label!r} is not a Qdrant vector store of {spec.name}; stores: {sorted(tv)}")
    t, v = tv[label]
    q = np.asarray(query, dtype=np.float32)
    with db.source(spec) as src:
        has = src.execute("SELECT to_regclass('dbguard.vector_readers')").fetchone()[0]
        row = src.execute("SELECT reads, conn_id, collection FROM dbguard.vector_readers WHERE migration = %s AND "
                          "store = %s", (spec.name, label)).fetchone() if has else None
        primary = src.execute("SELECT write_target FROM dbguard.control WHERE migration = %s AND direction = "
                              "'forward'", (spec.name,)).fetchone() \
            if src.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] else None
    if row and row[0] == "qdrant":
        ids, _ = qdrant.search(qdrant.client(row[1]), row[2], v, q, k)
        return {"store": "qdrant", "side": None, "ids": ids}
    side = primary[0] if primary and primary[0] in ("source", "target") else "source"
    rel = db.qname(t.schema_, t.name) if side == "source" else db.qname(t.target_schema, t.target_name)
    op = OPERATORS[v.source_metric if side == "source" else v.metric]
    vec = "[" + ",".join(repr(float(x)) for x in q) + "]"
    with (db.source(spec) if side == "source" else db.target(spec)) as conn:
        ids = [r[0] for r in conn.execute(sql.SQL("SELECT {k}::text FROM {rel} WHERE {c} IS NOT NULL ORDER BY {c} "
                                                  + op + " %s::vector LIMIT %s").format(
            k=sql.Identifier(t.key[0]), rel=rel, c=sql.Identifier(v.column)), (vec, k)).fetchall()]
    return {"store": "pgvector", "side": side, "ids": ids}
