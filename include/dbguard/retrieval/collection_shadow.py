"""Shadow reads for a Qdrant source (issue 17): the gold set searched on the source collection and on
the target (the new collection, or the pgvector table), measured by `shadow.measure` like every other
store (ΔS, overlap, λ per seed, recall against exact search in the source's metric, latency), and
judged by the same thresholds (`verdict`).

The numbers travel as the stage's return value (XCom) rather than a PostgreSQL ledger: Qdrant ->
Qdrant has no PostgreSQL.
"""
from __future__ import annotations

import time
from typing import Any

import numpy as np

from ..spec import QDRANT_DISTANCE, CollectionMove, MigrationSpec, QdrantCollection, QdrantHnsw, VectorStore
from ..stores import qdrant
from ..stores import qdrant_to_pg
from . import exact
from .gold import gold_path, load_gold
from .shadow import Hits, _cos_dist, _Side, _unit, _VectorProbe, measure, summarize


def _store(move: CollectionMove, conn_id: str, collection: str, vector_name: str | None, metric: str,
           ef: int | None) -> VectorStore:
    """A VectorStore naming a collection, as `qdrant.search` / `qdrant.chunks` take it."""
    return VectorStore(column="v", dim=move.source.dim, source_metric=move.source.metric, metric=metric,
                       qdrant=QdrantCollection(conn_id=conn_id, collection=collection, vector_name=vector_name,
                                               hnsw=QdrantHnsw(ef=ef)))


class CollectionProbe:
    """One collection move's probe for `shadow.measure`: pre = the source collection, post = the target."""

    def __init__(self, move: CollectionMove, k: int, target_conn=None):
        self.move, self.k, self.label = move, k, move.label
        s = move.source
        self.src_store = _store(move, s.conn_id, s.collection, s.vector_name, s.metric, None)
        self.store = self.src_store  # measure() reads dim and source_metric from it
        self.pg = None
        if move.qdrant is not None:
            t = move.qdrant
            self.tgt_store = _store(move, move.target_conn_id, t.collection, s.vector_name, move.target_metric,
                                    t.hnsw.ef if t.hnsw else None)
        else:
            table, store = qdrant_to_pg.table_spec(move)
            self.table, self.pg_store = table, store.model_copy(update={"qdrant": None})
            self.pg = _VectorProbe(table, self.pg_store, k)
            self.pg_side = _Side(target_conn, "target", 10_000) if target_conn is not None else None

    def setup(self, side: _Side) -> None:
        if self.pg is not None and side.side == "target":
            side.conn.execute("SELECT set_config('hnsw.ef_search', %s, false)",
                              (str(max(self.pg_store.index.ef_search_, self.k)),))

    def sent(self, side: str, qvec: np.ndarray) -> np.ndarray:
        normalized = self.move.source.normalized if side == "source" else self.move.target_normalized
        return _unit(qvec) if normalized else qvec

    def _qdrant(self, store: VectorStore, qvec: np.ndarray) -> Hits:
        t0 = time.perf_counter()
        try:
            ids, vecs = qdrant.search(qdrant.client(store.qdrant.conn_id), store.qdrant.collection, store, qvec, self.k)
        except Exception as e:  # noqa: BLE001  a missing collection or server: the side errored (←)
            return Hits([], [], np.zeros((0, store.dim), np.float32), (time.perf_counter() - t0) * 1000,
                        str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
        return Hits(ids, _cos_dist(vecs, qvec), vecs, (time.perf_counter() - t0) * 1000)

    def query(self, side: _Side, qvec: np.ndarray) -> Hits:
        if side.side == "source":
            return self._qdrant(self.src_store, self.sent("source", qvec))
        if self.pg is not None:
            return self.pg.query(side, qvec)  # sends the query as the table's (target) side receives it
        return self._qdrant(self.tgt_store, self.sent("target", qvec))

    def exact_top_k(self, side: str, queries: np.ndarray, metric: str, k: int) -> exact.ExactResult:
        if side == "target" and self.pg is not None:
            return exact.top_k(self.pg_side.conn, self.table, self.pg_store, "target", queries, metric, k)
        st = self.src_store if side == "source" else self.tgt_store
        try:
            pages = qdrant.chunks(qdrant.client(st.qdrant.conn_id), st.qdrant.collection, st)
            return exact.top_k_chunks(pages, queries, metric, k)
        except Exception as e:  # noqa: BLE001
            return exact.ExactResult([[] for _ in range(len(queries))], np.full((len(queries), k), np.inf), 0,
                                     str(e).strip().splitlines()[0] or type(e).__name__)


def shadow_reads(spec: MigrationSpec, target_conn=None) -> dict[str, Any]:
    """Every gold query on every collection move's two sides; the metrics `summarize` makes of them."""
    dims = {m.source.dim for m in spec.collections}
    gold = load_gold(gold_path(spec), next(iter(dims)) if len(dims) == 1 else None)
    if spec.retrieval.max_queries:
        gold = gold[: spec.retrieval.max_queries]
    probes = [("vector", CollectionProbe(m, spec.retrieval.k, target_conn)) for m in spec.collections]
    t0 = time.perf_counter()
    info: dict[str, Any] = {}
    rows = measure(spec, gold, None, target_conn, info, probes=probes)
    m = summarize(spec, rows)
    m["recall_probe"] = info
    m["unmeasured_stores"] = [p.label for _, p in probes if p.label not in {r["store"] for r in rows}]
    m["shadow_reads_seconds"] = round(time.perf_counter() - t0, 3)
    m["store_kinds"] = {mv.label: f"qdrant → {mv.kind}" for mv in spec.collections}
    return m


def verdict(spec: MigrationSpec, m: dict[str, Any]) -> tuple[bool, str]:
    """(passed, message): the retrieval gate's thresholds (delta_s_max, λ convergent for every seed, latency
    p95) on these metrics; a failure names the spec's change that explains it (metric, normalisation)."""
    g, problems = spec.gates, []
    drift = m.get("delta_s_diff")
    if m.get("unmeasured_stores"):
        problems.append(f"no usable gold query for {m['unmeasured_stores']} (gold vectors of the source's dim)")
    if drift is not None and drift > g.delta_s_max:
        problems.append(f"delta_s_diff {drift:.4f} > delta_s_max {g.delta_s_max}")
    for s in spec.retrieval.seeds:
        st = m.get(f"lambda_state_seed_{s}")
        if st != "convergent":
            problems.append(f"lambda_state for seed {s} is {st} ({m.get(f'lambda_counts_seed_{s}')})")
    change, pre, post = m.get("latency_p95_change"), m.get("latency_p95_pre_ms"), m.get("latency_p95_post_ms")
    if change is not None and change > g.latency_p95_change and (post - pre) > spec.retrieval.latency_floor_ms:
        problems.append(f"latency p95 {pre:.2f} ms -> {post:.2f} ms ({change:+.0%}) exceeds +{g.latency_p95_change:.0%}")
    summary = (f"delta_s_diff {drift if drift is None else round(drift, 6)}, lambda_state {m.get('lambda_state')}, "
               f"recall pre {m.get('recall_pre')} post {m.get('recall_post')}")
    if not problems:
        return True, "retrieval gate passed: " + summary
    causes = []
    for mv in spec.collections:
        ch = []
        if mv.target_metric != mv.source.metric:
            ch.append(f"metric {mv.source.metric} -> {mv.target_metric}"
                      + (f" (Qdrant distance {QDRANT_DISTANCE[mv.target_metric]})" if mv.kind == "qdrant" else ""))
        if mv.source.normalized != mv.target_normalized:
            ch.append(f"NORM {'l2' if mv.source.normalized else 'none'} -> {'l2' if mv.target_normalized else 'none'}")
        if ch:
            causes.append(f"{mv.label}: {', '.join(ch)}")
    return False, (f"retrieval gate failed: {'; '.join(problems)}; likely cause: "
                   f"{'; '.join(causes) or 'nothing the spec changes: compare the copied vectors and the index'}; "
                   + summary)
