"""pgvector -> Qdrant: copy a table's vector column (and payload columns) into a collection, verify
every batch, reconcile by id range with bisection, repair.

Per batch: the source rows are read in key order (one server-side cursor), sent as one upsert that
waits for the write, read back by id, and both sides reduced to (count, sum of point hashes) by the
same function (`qdrant.RangeSum`): id text, canonical payload JSON, float32 vector bytes. The source
side's vector is the one the collection stores (`qdrant.stored_vector`: a Cosine collection keeps
the unit vector). Where a store's float32 arithmetic differs from that by an ulp (Qdrant's update
path normalises in float64, a server in Rust), the point-level compare accepts a Cosine
collection's components within the float tolerance; everything else must be identical.

Reconcile: the whole id space in the copy's ranges ([first key of a batch, first key of the next),
the first and last unbounded so extras outside the source's keys are seen); a range whose sums
differ is bisected on its source keys down to `leaf` points, compared point by point and repaired
(upsert the source's point, delete extras), then summed again. Qdrant computes no checksums, so both
sides' sums are computed here: bisection bounds memory and names the points, it does not save reads.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterator

import numpy as np
import psycopg
from psycopg import sql

from .. import db
from ..db import qname
from ..errors import PreflightError
from ..spec import MigrationSpec, Table, VectorStore
from . import qdrant, qdrant_payload
from . import vector as vector_store

_KEY_CASTS = {"bigint": "bigint", "integer": "integer", "smallint": "smallint", "uuid": "uuid"}


def _catalog_types(conn: psycopg.Connection, table: Table, columns: list[str]) -> dict[str, str]:
    rows = conn.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
                        "WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped",
                        (f'{sql.Identifier(table.schema_).as_string(conn)}.'
                         f'{sql.Identifier(table.name).as_string(conn)}',)).fetchall()
    types = dict(rows)
    return {c: types.get(c, "") for c in columns}


def source_problems(conn: psycopg.Connection, table: Table, store: VectorStore) -> list[str]:
    """Preflight on the source: an integer (non-negative) or UUID key, payload types with an encoding."""
    where = f"{vector_store.label(table, store)} -> qdrant {store.qdrant.collection}"
    key = table.key[0]
    types = _catalog_types(conn, table, [key, *store.qdrant.payload])
    problems = []
    if types[key] not in _KEY_CASTS:
        problems.append(f"{where}: key {key!r} has type {types[key] or 'unknown'}; Qdrant point ids are unsigned "
                        "integers or UUIDs (key types bigint, integer, smallint, uuid)")
    elif types[key] != "uuid":
        neg = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE {} < 0").format(
            qname(table.schema_, table.name), sql.Identifier(key))).fetchone()[0]
        if neg:
            problems.append(f"{where}: {neg} row(s) have a negative key {key!r}; Qdrant point ids are unsigned")
    for col in store.qdrant.payload:
        if not qdrant_payload.supported(types[col]):
            problems.append(f"{where}: " + qdrant_payload.unsupported_message(col, types[col]))
    conn.rollback()
    return problems


class Source:
    """The source side of one store: rows of an id range as the points the collection must hold."""

    def __init__(self, conn: psycopg.Connection, table: Table, store: VectorStore):
        self.conn, self.table, self.store = conn, table, store
        key = table.key[0]
        types = _catalog_types(conn, table, [key, *store.qdrant.payload])
        conn.rollback()
        self.snapshot: str | None = None  # the snapshot `batches` read (dual writes start after it)
        self.cast = sql.SQL(_KEY_CASTS[types[key]])
        self.encoders = [(c, qdrant_payload.encoder(types[c])) for c in store.qdrant.payload]
        self.key = sql.Identifier(key)
        # aliased: ORDER BY "id" would otherwise sort by the text output column, not the key
        cols = [sql.SQL("{}::text AS dbguard_point_id").format(self.key), sql.SQL("vector_send({})").format(
            vector_store.source_expr(table, store))] + [sql.Identifier(c) for c in store.qdrant.payload]
        self.select = sql.SQL("SELECT {cols} FROM {t} WHERE {v} IS NOT NULL").format(
            cols=sql.SQL(", ").join(cols), t=qname(table.schema_, table.name), v=sql.Identifier(store.column))

    def _points(self, rows: list[tuple]) -> list[qdrant.Point]:
        dim = self.store.dim
        vecs = None
        raw = b"".join(r[1] for r in rows)
        if len(raw) == len(rows) * 4 * (dim + 1):  # vector_send: int16 dim, int16 unused, dim x float4 (BE)
            vecs = np.frombuffer(raw, dtype=">f4").reshape(len(rows), dim + 1)[:, 1:].astype(np.float32)
        out = []
        for i, r in enumerate(rows):
            vec = vecs[i] if vecs is not None else np.frombuffer(r[1], dtype=">f4", offset=4,
                                                                 count=dim).astype(np.float32)
            out.append(qdrant.Point(r[0], {c: enc(v) for (c, enc), v in zip(self.encoders, r[2:])}, vec))
        return out

    def _where(self, lo: str | None, hi: str | None) -> tuple[sql.Composable, list]:
        parts, params = [], []
        if lo is not None:
            parts.append(sql.SQL("{} >= %s::{}").format(self.key, self.cast))
            params.append(lo)
        if hi is not None:
            parts.append(sql.SQL("{} < %s::{}").format(self.key, self.cast))
            params.append(hi)
        return sql.SQL("").join(sql.SQL(" AND ") + p for p in parts), params

    def batches(self, rows: int) -> Iterator[list[qdrant.Point]]:
        """The whole table in key order, `rows` points at a time (one snapshot, kept in `self.snapshot`)."""
        q = self.select + sql.SQL(" ORDER BY {}").format(self.key)
        self.conn.rollback()
        with self.conn.transaction(), self.conn.cursor(name="dbguard_qdrant_copy", binary=False) as cur:
            self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            self.snapshot = self.conn.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
            cur.itersize = rows
            cur.execute(q)
            while True:
                got = cur.fetchmany(rows)
                if not got:
                    return
                yield self._points(got)

    def range(self, lo: str | None, hi: str | None) -> list[qdrant.Point]:
        cond, params = self._where(lo, hi)
        q = self.select + cond + sql.SQL(" ORDER BY {}").format(self.key)
        rows = self.conn.execute(q, params).fetchall()
        self.conn.rollback()
        return self._points(rows)


def expected(store: VectorStore, points: list[qdrant.Point]) -> list[qdrant.Point]:
    """The source's points as the collection stores them (see qdrant.stored_vector)."""
    return [qdrant.Point(p.id, p.payload, qdrant.stored_vector(store, p.vector)) for p in points]


def diff(store: VectorStore, want: list[qdrant.Point], have: list[qdrant.Point],
         tolerance: float) -> dict[str, list[str]]:
    """Point by point: missing on the target, extra on the target, differing (id, payload or vector)."""
    cosine = qdrant.distance(store) == "Cosine"

    def same(a: qdrant.Point, b: qdrant.Point) -> bool:
        # or the store's own (re)normalisation: the same unit vector within the tolerance
        return a.digest() == b.digest() or bool(
            cosine and qdrant_payload.canonical(a.payload) == qdrant_payload.canonical(b.payload)
            and _same_direction(a.vector, b.vector, tolerance))

    return qdrant.diff_points(want, have, same)


def _same_direction(a: np.ndarray, b: np.ndarray, tolerance: float) -> bool:
    """A Cosine collection's vector compared as a direction: an ulp of renormalisation, or local mode's
    raw vector after a reload (qdrant-client 1.20 reloads what was sent, not the unit vector it
    searched before), is the same point."""
    if a.shape != b.shape:
        return False
    na, nb = np.linalg.norm(a.astype(np.float64)), np.linalg.norm(b.astype(np.float64))
    if na == 0 or nb == 0:
        return na == nb
    return bool(np.allclose(a / na, b / nb, rtol=0, atol=tolerance))


def repair(c, name: str, store: VectorStore, source_points: list[qdrant.Point], d: dict[str, list[str]]) -> int:
    fix = set(d["missing"]) | set(d["differing"])
    qdrant.write_batch(c, name, store, [p for p in source_points if p.id in fix])
    qdrant.delete_points(c, name, d["extra"])
    return len(fix) + len(d["extra"])


def _tolerance(spec: MigrationSpec) -> float:
    return max(spec.gates.float_tolerance, 1e-6)


def _verify_batch(c, name: str, store: VectorStore, pts: list[qdrant.Point], tol: float, call,
                  out: dict[str, Any]) -> None:
    """Read the batch back by id; count + checksum on both sides; a mismatch compared point by point,
    repaired once, compared again (never retried: a mismatch is data, not a transient error)."""
    keys = [p.id for p in pts]
    want_vecs = qdrant.stored_vectors(store, np.stack([p.vector for p in pts]))
    have = call(lambda: qdrant.retrieve(c, name, store, keys))
    if qdrant.RangeSum.of_batch(pts, want_vecs) == qdrant.RangeSum.of_batch(have):
        return
    want = [qdrant.Point(p.id, p.payload, v) for p, v in zip(pts, want_vecs)]
    d = diff(store, want, have, tol)
    if not any(d.values()):
        return
    out["repaired"] += repair(c, name, store, pts, d)
    if any(diff(store, want, call(lambda: qdrant.retrieve(c, name, store, keys)), tol).values()):
        out["mismatched_batches"].append([pts[0].id, pts[-1].id])


def copy(spec: MigrationSpec, table: Table, store: VectorStore, src: psycopg.Connection, c, name: str, *,
         batch_rows: int | None = None, verify: bool = True, concurrency: int | None = None) -> dict[str, Any]:
    """Copy every row as a point, `qdrant.batch_points` per upsert (not backfill.batch_rows: a key range of
    250,000 rows is one Airflow task, not one request); verify each batch (count + checksum, repaired once
    on a mismatch).

    On a server, at most `concurrency` batches (default backfill.concurrency, the migration's pool
    size) are in flight, written and verified by worker threads while this thread reads the next batch
    from the source (cap + 1 batches in memory). Local mode copies one batch at a time in this thread:
    its client is in-process and not thread-safe, and measured, threads only added GIL hand-offs (11 %
    more CPU, no faster). Transient errors of the store (unreachable, timeouts, 429/5xx) are retried
    backfill.retries times with backfill.retry_delay_seconds doubling.
    Returns the ranges (for reconcile), counts and timings (verify_seconds summed over the workers)."""
    source = Source(src, table, store)
    n_rows = batch_rows or store.qdrant.batch_points
    cap = 1 if qdrant.is_local(c) else concurrency or spec.backfill.concurrency
    bf, tol = spec.backfill, _tolerance(spec)
    firsts: list[str] = []
    out: dict[str, Any] = {"points": 0, "batches": 0, "repaired": 0, "verify_seconds": 0.0,
                           "mismatched_batches": [], "retries": 0, "max_in_flight": 0, "concurrency": cap}
    lock, in_flight = threading.Lock(), [0]

    def retried(e: BaseException) -> None:
        with lock:
            out["retries"] += 1

    def call(fn):
        return qdrant.retrying(fn, retries=bf.retries, delay=bf.retry_delay_seconds,
                               max_delay=bf.max_retry_delay_seconds, on_retry=retried)

    def one(pts: list[qdrant.Point]) -> None:
        with lock:
            in_flight[0] += 1
            out["max_in_flight"] = max(out["max_in_flight"], in_flight[0])
        try:
            qdrant.write_batch(c, name, store, pts, retries=bf.retries, delay=bf.retry_delay_seconds,
                               max_delay=bf.max_retry_delay_seconds, on_retry=retried)
            if verify:
                tv = time.perf_counter()
                _verify_batch(c, name, store, pts, tol, call, out)
                with lock:
                    out["verify_seconds"] += time.perf_counter() - tv
        finally:
            with lock:
                in_flight[0] -= 1

    def batches() -> Iterator[list[qdrant.Point]]:
        for pts in source.batches(n_rows):
            firsts.append(pts[0].id)
            out["points"] += len(pts)
            out["batches"] += 1
            yield pts

    t0 = time.perf_counter()
    # closed on an error too: the source's snapshot transaction ends here, not when the traceback goes
    with contextlib.closing(batches()) as items:
        if cap == 1 and qdrant.is_local(c):
            for pts in items:
                one(pts)
        else:
            _pipeline(items, one, cap)
    out["seconds"] = time.perf_counter() - t0
    out["snapshot"] = source.snapshot
    out["ranges"] = [[None if i == 0 else f, firsts[i + 1] if i + 1 < len(firsts) else None]
                     for i, f in enumerate(firsts)] or [[None, None]]
    return out


def _pipeline(items: Iterator[Any], work: Callable[[Any], None], cap: int) -> None:
    """work(item) on `cap` threads while the next item is produced here; the first error stops it."""
    pending: set[Future] = set()
    with ThreadPoolExecutor(max_workers=cap, thread_name_prefix="dbguard-qdrant-copy") as pool:
        try:
            for item in items:
                while len(pending) >= cap:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for f in done:
                        f.result()
                pending.add(pool.submit(work, item))
            for f in pending:
                f.result()
        except BaseException:
            for f in pending:
                f.cancel()
            raise


def reconcile(spec: MigrationSpec, table: Table, store: VectorStore, src: psycopg.Connection, c, name: str,
              ranges: list[list[str | None]], *, leaf: int = 64,
              on_range: Callable[[str | None, str | None, str], None] | None = None) -> dict[str, Any]:
    """Sum each range on both sides; bisect a differing one down to `leaf` points; repair; sum again."""
    source, tol = Source(src, table, store), _tolerance(spec)
    found = {"missing": 0, "extra": 0, "differing": 0}
    out: dict[str, Any] = {"ranges": len(ranges), "bisected": 0, "repaired": 0, "unresolved": [], "points": 0,
                           "checksum": 0}

    def walk(lo: str | None, hi: str | None) -> qdrant.RangeSum:
        """The range's target sum after any repair (the top-level ranges partition the id space, so
        their sums add up to the collection's: no second pass over it)."""
        src_pts = source.range(lo, hi)
        want, have = expected(store, src_pts), list(qdrant.read_range(c, name, store, lo, hi))
        have_sum = qdrant.RangeSum.of(have)
        if qdrant.RangeSum.of(want) == have_sum:
            return have_sum
        keys = [p.id for p in src_pts]
        if len(keys) > leaf:
            out["bisected"] += 1
            mid = keys[len(keys) // 2]
            return walk(lo, mid) + walk(mid, hi)
        d = diff(store, want, have, tol)
        if not any(d.values()):
            return have_sum
        for k in found:
            found[k] += len(d[k])
        out["repaired"] += repair(c, name, store, src_pts, d)
        if on_range:
            on_range(lo, hi, json.dumps(d))
        after = list(qdrant.read_range(c, name, store, lo, hi))
        if any(diff(store, want, after, tol).values()):
            out["unresolved"].append([lo, hi])
        return qdrant.RangeSum.of(after)

    total = qdrant.RangeSum(0, 0)
    for lo, hi in ranges:
        total = total + walk(lo, hi)
    out.update(found, points=total.count, checksum=total.checksum)
    out["checksum_ok"] = not out["unresolved"]
    return out


def index_hash(store: VectorStore, count: int, checksum: int) -> str:
    payload = json.dumps({"collection": qdrant.collection_params(store), "count": count, "sum": str(checksum)},
                         sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def build(spec: MigrationSpec, table: Table, store: VectorStore) -> dict[str, Any]:
    """Stage body for one store: create the collection when missing, copy with per-batch verify,
    reconcile the whole id space, and return the verdict with the collection's index_hash."""
    c = qdrant.client(store.qdrant.conn_id)
    name = store.qdrant.collection
    label = vector_store.label(table, store)
    problems = qdrant.check(store, label)
    if problems:
        raise PreflightError(problems)
    created = not c.collection_exists(name)
    if created:
        qdrant.create_collection(c, name, store)
    with db.source(spec) as src:
        cp = copy(spec, table, store, src, c, name)
        rc = reconcile(spec, table, store, src, c, name, cp.pop("ranges"))
    return {"store": label, "target_store": "qdrant", "collection": name, "created": created,
            "points": rc["points"], "copied": cp["points"], "batches": cp["batches"],
            "repaired": cp["repaired"] + rc["repaired"], "reconcile": {k: rc[k] for k in (
                "ranges", "bisected", "missing", "extra", "differing", "unresolved")},
            "checksum_ok": rc["checksum_ok"] and not cp["mismatched_batches"],
            "seconds": round(cp["seconds"], 3), "verify_seconds": round(cp["verify_seconds"], 3),
            "points_per_s": round(cp["points"] / cp["seconds"], 1) if cp["seconds"] else None,
            "snapshot": cp["snapshot"],
            "index_hash": index_hash(store, rc["points"], rc["checksum"])}
