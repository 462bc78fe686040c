"""Exact top-k over a side's own vectors, for the recall probes (DESIGN.md "λ": judge the migration,
not the index's own noise).

One streaming pass per side and run answers every probe query at once: the vectors come through a
server-side cursor in chunks of `CHUNK_ROWS` (binary `vector_send`, parsed with one `frombuffer`
per chunk), each chunk is scored against the queries with one float32 matmul per block of queries,
and a running top-k per query is merged with the chunk's `argpartition` top-k. Nothing else is kept:
memory is bounded by the chunk (CHUNK_ROWS x dim x 4 bytes as float32, plus the same again as the
fetched bytes and CHUNK_ROWS short key strings: ~60 MB at 20,000 x 384) and by a score block of at
most SCORE_CELLS floats (64 MB), whatever the table size. This replaces one sequential-scan SQL
query per probe (~190 ms each at 100,000 x 384) with a shared pass (~1 s plus ~3 ms per query there).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from ..db import qname
from ..spec import Table, VectorStore
from ..stores import vector as vector_store

CHUNK_ROWS = 20_000
SCORE_CELLS = 16_000_000  # queries x chunk rows scored at once (float32): 64 MB


@dataclass
class ExactResult:
    ids: list[list[str]]    # per query: the exact top-k keys, nearest first
    dist: np.ndarray        # per query: their distances in the reference metric (queries x k, inf = none)
    rows: int               # vectors scanned
    error: str | None = None


def distances(vecs: np.ndarray, q: np.ndarray, metric: str) -> np.ndarray:
    """pgvector's distance of each row of `vecs` to `q`: <-> (l2), <=> (cosine), <#> (ip, negative)."""
    vecs = np.asarray(vecs, dtype=np.float64).reshape(-1, np.asarray(q).shape[-1])
    q = np.asarray(q, dtype=np.float64)
    dot = vecs @ q
    if metric == "ip":
        return -dot
    if metric == "cosine":
        n = np.linalg.norm(vecs, axis=1) * np.linalg.norm(q)
        return 1.0 - np.divide(dot, n, out=np.zeros_like(dot), where=n > 0)
    return np.sqrt(np.maximum(((vecs - q) ** 2).sum(axis=1), 0.0))


def _rank_scores(x: np.ndarray, xsq: np.ndarray, qs: np.ndarray, metric: str) -> np.ndarray:
    """Scores (queries x rows) in the same order as pgvector's distance, one pass over the matmul:
    l2: |x|² − 2 q·x (|q|² is constant per query); cosine: −q·x on unit rows; ip: −q·x."""
    dot = qs @ x.T
    if metric == "l2":
        dot *= -2.0
        dot += xsq[None, :]
        return dot
    np.negative(dot, out=dot)
    return dot


def _to_distance(score: np.ndarray, qs: np.ndarray, metric: str) -> np.ndarray:
    """The selected scores back to pgvector's distances."""
    score = score.astype(np.float64)
    if metric == "l2":
        qsq = (qs.astype(np.float64) ** 2).sum(axis=1, keepdims=True)
        return np.sqrt(np.maximum(score + qsq, 0.0))
    if metric == "cosine":
        qn = np.linalg.norm(qs.astype(np.float64), axis=1, keepdims=True)
        return 1.0 + np.divide(score, qn, out=np.zeros_like(score), where=qn > 0)
    return score


def _merge(best_s: np.ndarray, best_id: np.ndarray, score: np.ndarray, keys: np.ndarray, k: int) -> None:
    """Merge one chunk's scores (block x rows) into the running top-k (block x k), in place. Until every
    query has k candidates, argpartition picks each row's k best; after that only scores below the
    query's current k-th best can matter, and after the first chunk they are few (a comparison and
    a nonzero instead of a partial sort of every row)."""
    nb = len(best_s)
    thr = best_s[:, -1]
    if np.isinf(thr).any():
        kk = min(k, score.shape[1])
        r = np.repeat(np.arange(nb), kk)
        c = np.argpartition(score, kk - 1, axis=1)[:, :kk].ravel()
    else:
        r, c = np.nonzero(score < thr[:, None])
        if not len(r):
            return
    all_r = np.concatenate([np.repeat(np.arange(nb), k), r])
    all_v = np.concatenate([best_s.ravel(), score[r, c].astype(np.float64)])
    all_id = np.concatenate([best_id.ravel(), keys[c]])
    order = np.lexsort((all_v, all_r))                       # by query, then score (stable: kept first)
    take = order[np.searchsorted(all_r[order], np.arange(nb))[:, None] + np.arange(k)]
    best_s[:] = all_v[take]
    best_id[:] = all_id[take]


def _parse(blobs: list[bytes], dim: int) -> tuple[np.ndarray, np.ndarray]:
    """vector_send blobs (int16 dim, int16 unused, dim x float4 BE) -> (float32 rows, mask of well-formed rows)."""
    size = 4 + 4 * dim
    ok = np.fromiter((b is not None and len(b) == size for b in blobs), dtype=bool, count=len(blobs))
    if ok.all():
        a = np.frombuffer(b"".join(blobs), dtype=">f4").reshape(len(blobs), dim + 1)[:, 1:]
    else:
        a = np.zeros((len(blobs), dim), dtype=">f4")
        for i in np.flatnonzero(ok):
            a[i] = np.frombuffer(blobs[i], dtype=">f4", offset=4)
    return a.astype(np.float32), ok


def top_k(conn: psycopg.Connection, table: Table, store: VectorStore, side: str, queries: np.ndarray,
          metric: str, k: int, *, chunk_rows: int = CHUNK_ROWS) -> ExactResult:
    """Exact top-k of every query (rows of `queries`, as sent to the index) over `side`'s vectors, by `metric`.
    A vector store whose target is a Qdrant collection is scanned there (`qdrant.chunks`)."""
    if side == "target" and store.qdrant is not None:
        from ..stores import qdrant

        c = qdrant.client(store.qdrant.conn_id)
        try:
            return top_k_chunks(qdrant.chunks(c, store.qdrant.collection, store, chunk_rows), queries, metric, k,
                                chunk_rows=chunk_rows)
        except Exception as e:  # the collection is missing or the server does not answer
            return ExactResult([[] for _ in range(len(queries))], np.full((len(queries), k), np.inf), 0,
                               str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
    if side == "source":
        rel, col = qname(table.schema_, table.name), vector_store.as_vector(table, store)
    else:
        rel, col = qname(table.target_schema, table.target_name), sql.Identifier(store.column)
    q = sql.SQL("SELECT {key}, vector_send({col}) FROM {rel} WHERE {c} IS NOT NULL").format(
        key=vector_store._key_expr(table), col=col, rel=rel, c=sql.Identifier(store.column))

    def pages():
        with conn.transaction(), conn.cursor(name="dbguard_exact_probe", binary=True) as cur:
            cur.itersize = chunk_rows
            cur.execute(q)
            while True:
                fetched = cur.fetchmany(chunk_rows)
                if not fetched:
                    return
                x, ok = _parse([r[1] for r in fetched], store.dim)
                keys = np.array([r[0] for r in fetched], dtype=object)
                yield (keys[ok], x[ok]) if not ok.all() else (keys, x)

    try:
        return top_k_chunks(pages(), queries, metric, k, chunk_rows=chunk_rows)
    except psycopg.Error as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return ExactResult([[] for _ in range(len(queries))], np.full((len(queries), k), np.inf), 0, msg)


def top_k_chunks(pages, queries: np.ndarray, metric: str, k: int, *, chunk_rows: int = CHUNK_ROWS) -> ExactResult:
    """Exact top-k of every query over (keys, float32 rows) pages, whatever store they come from."""
    nq = len(queries)
    best_s = np.full((nq, k), np.inf, dtype=np.float64)   # rank scores (see _rank_scores), nearest first
    best_id = np.full((nq, k), None, dtype=object)
    if nq == 0:
        return ExactResult([], best_s, 0)
    qs = np.asarray(queries, dtype=np.float32)
    block = max(1, SCORE_CELLS // max(1, chunk_rows))
    rows = 0
    for keys, x in pages:
        rows += len(keys)
        if not len(keys):
            continue
        xsq = (x * x).sum(axis=1)
        if metric == "cosine":  # unit rows; zero vectors have no direction (pgvector: NaN), never near
            xn = np.sqrt(xsq)
            x = np.divide(x, xn[:, None], out=np.zeros_like(x), where=xn[:, None] > 0)
        for s in range(0, nq, block):
            _merge(best_s[s:s + block], best_id[s:s + block], _rank_scores(x, xsq, qs[s:s + block], metric),
                   keys, k)
    ids = [[i for i in row if i is not None] for row in best_id]
    return ExactResult(ids, _to_distance(best_s, qs, metric), rows)
