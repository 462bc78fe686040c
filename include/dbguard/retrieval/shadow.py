"""Shadow reads: every gold query on both sides (A/A first, then per seed), ΔS, overlap, recall, λ;
rows into dbguard.shadow_reads, metrics into the ledger."""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db, ledger
from ..db import qname
from ..spec import MigrationSpec, SearchStore, Table, VectorStore
from ..stores import search as search_store
from ..stores import vector as vector_store
from .gold import GoldQuery, gold_path, load_gold
from .scores import CHAOTIC, CONVERGENT, DIVERGENT, SPLIT, delta_s, lambda_class, lambda_state, overlap_at_k, p95, \
    worst_state

SHADOW_DDL = """
CREATE TABLE IF NOT EXISTS dbguard.shadow_reads (
    run_id text NOT NULL,
    migration text NOT NULL,
    store text NOT NULL,
    query_id text NOT NULL,
    seed int NOT NULL,               -- 0 = the A/A noise-floor run (pre against itself)
    pre_ids jsonb,
    post_ids jsonb,
    delta_s_pre double precision,
    delta_s_post double precision,
    drift double precision,
    overlap double precision,
    recall_pre double precision,
    recall_post double precision,
    lambda text,
    latency_pre_ms double precision,
    latency_post_ms double precision,
    error text,
    measured_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, store, query_id, seed)
)
"""


def ensure_shadow_table(conn: psycopg.Connection) -> None:
    ledger.ensure(conn)
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.shadow_reads'))")
    conn.execute(SHADOW_DDL)
    conn.commit()


@dataclass
class Hits:
    ids: list[str]
    dist: list[float]          # comparable across sides: cosine distance to the query (vectors) or −ts_rank
    vectors: np.ndarray | None  # item embeddings for ΔS
    ms: float
    error: str | None = None


def _parse_vectors(blobs: list[bytes | None], dim: int) -> np.ndarray:
    """pgvector's binary send form (int16 dim, int16 unused, float4 big-endian) -> float32 rows."""
    out = np.zeros((len(blobs), dim), dtype=np.float32)
    for i, b in enumerate(blobs):
        if b is not None and len(b) == 4 + 4 * dim:
            out[i] = np.frombuffer(b, dtype=">f4", offset=4)
    return out


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 0 else v


class _Side:
    """One database side's session for shadow reads (autocommit; exact search in its own transaction)."""

    def __init__(self, conn: psycopg.Connection, side: str, timeout_ms: int):
        self.conn, self.side = conn, side
        conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(timeout_ms))))

    def run(self, query: sql.Composable, params: tuple, *, exact: bool = False) -> tuple[list[tuple], float, str | None]:
        t0 = time.perf_counter()
        try:
            if exact:
                # prepare=False: a statement prepared earlier keeps its index-scan plan whatever
                # enable_indexscan says now, and "exact" would silently be the ANN result again.
                with self.conn.transaction():
                    self.conn.execute("SET LOCAL enable_indexscan = off")
                    rows = self.conn.execute(query, params, binary=True, prepare=False).fetchall()
            else:
                rows = self.conn.execute(query, params, binary=True).fetchall()
            return rows, (time.perf_counter() - t0) * 1000, None
        except psycopg.Error as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return [], (time.perf_counter() - t0) * 1000, msg


class _VectorProbe:
    def __init__(self, table: Table, store: VectorStore, k: int):
        self.table, self.store, self.k = table, store, k
        self.label = vector_store.label(table, store)

    def setup(self, side: _Side) -> None:
        ix = self.store.index if side.side == "target" else self.store.source_index
        if ix is None:
            return
        name, val = ("hnsw.ef_search", max(ix.ef_search_, self.k)) if ix.type == "hnsw" else ("ivfflat.probes", ix.probes_)
        side.conn.execute("SELECT set_config(%s, %s, false)", (name, str(val)))

    def sql_for(self, side: str) -> sql.Composed:
        t, v = self.table, self.store
        if side == "source":
            metric, rel, col = v.source_metric, qname(t.schema_, t.name), vector_store.as_vector(t, v)
        else:
            metric, rel, col = v.metric, qname(t.target_schema, t.target_name), sql.Identifier(v.column)
        key = vector_store._key_expr(t)
        return sql.SQL("SELECT {key}, vector_send({col}) FROM {rel} WHERE {c} IS NOT NULL "
                       "ORDER BY {col} {op} %s::vector LIMIT {k}").format(
            key=key, col=col, rel=rel, c=sql.Identifier(v.column), op=sql.SQL(vector_store.OPERATOR[metric]),
            k=sql.Literal(self.k))

    def query(self, side: _Side, qvec: np.ndarray, *, exact: bool = False) -> Hits:
        normalized = self.store.source_normalized if side.side == "source" else self.store.target_normalized
        q = _unit(qvec) if normalized else qvec
        rows, ms, err = side.run(self.sql_for(side.side), (_vtext(q),), exact=exact)
        vecs = _parse_vectors([r[1] for r in rows], self.store.dim)
        dist = _cos_dist(vecs, qvec)
        return Hits([r[0] for r in rows], dist, vecs, ms, err)


class _SearchProbe:
    def __init__(self, table: Table, store: SearchStore, k: int):
        self.table, self.store, self.k = table, store, k
        self.label = search_store.label(table, store)
        emb = store.embedding_column or (table.vector[0].column if table.vector else None)
        self.vstore = vector_store.store_for(table, emb) if emb else None

    def setup(self, side: _Side) -> None:
        pass

    def query(self, side: _Side, text: str, *, exact: bool = False) -> Hits:
        emb = None
        if self.vstore is not None:
            emb = (vector_store.as_vector(self.table, self.vstore) if side.side == "source"
                   else sql.Identifier(self.vstore.column))
            emb = sql.SQL("vector_send({})").format(emb)
        rows, ms, err = side.run(search_store.query_sql(self.table, self.store, side.side, self.k, emb), (text,),
                                 exact=exact)
        vecs = _parse_vectors([r[2] for r in rows], self.vstore.dim) if self.vstore is not None else None
        return Hits([r[0] for r in rows], [-float(r[1]) for r in rows], vecs, ms, err)


def _vtext(v: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in np.asarray(v, dtype=np.float32)) + "]"


def _cos_dist(vecs: np.ndarray, q: np.ndarray) -> list[float]:
    if vecs.shape[0] == 0:
        return []
    n = np.linalg.norm(vecs, axis=1) * np.linalg.norm(q)
    cos = np.divide(vecs @ q, n, out=np.zeros(vecs.shape[0], dtype=np.float64), where=n > 0)
    return (1.0 - cos).tolist()


def _perturbed(q: GoldQuery, seed: int, seeds: list[int], sigma: float, qindex: int, kind: str):
    """The seed's variant of a query: a paraphrase when the gold set has one, else seeded jitter."""
    slot = seeds.index(seed) if seed in seeds else 0
    if kind == "search":
        texts = [p.text for p in q.paraphrases if p.text]
        return texts[slot % len(texts)] if texts else q.text
    vecs = [np.asarray(p.vector, dtype=np.float32) for p in q.paraphrases if p.vector is not None]
    if vecs:
        return vecs[slot % len(vecs)]
    v = q.vector.astype(np.float64)
    if sigma == 0:
        return v.astype(np.float32)
    rng = np.random.default_rng([seed, qindex])
    noise = rng.normal(size=v.shape) * sigma * np.linalg.norm(v) / math.sqrt(v.shape[0])
    return (v + noise).astype(np.float32)


def _anchor(q: GoldQuery) -> np.ndarray | None:
    return q.anchor if q.anchor is not None else q.vector


def _ds(h: Hits, anchor: np.ndarray | None) -> float | None:
    if anchor is None or h.vectors is None or h.error:
        return None
    v = delta_s(h.vectors, anchor)
    return None if math.isnan(v) else v


def _recall(h: Hits, exact: Hits, k: int, eps: float) -> float | None:
    if exact.error or h.error:
        return None
    return overlap_at_k(exact.ids, exact.dist, h.ids, h.dist, k, eps)


def _found(q: GoldQuery, ids: list[str]) -> bool | None:
    """Did the top-k contain every expected id of the gold query (None: the query names none)?"""
    return set(q.expected_ids) <= set(map(str, ids)) if q.expected_ids else None


def _probes(spec: MigrationSpec) -> list[tuple[str, Any]]:
    k = spec.retrieval.k
    return ([("vector", _VectorProbe(t, v, k)) for t, v in vector_store.stores(spec)]
            + [("search", _SearchProbe(t, s, k)) for t, s in search_store.stores(spec)])


def measure(spec: MigrationSpec, gold: list[GoldQuery], src: psycopg.Connection,
            tgt: psycopg.Connection) -> list[dict[str, Any]]:
    """Run every gold query: A/A on the source (seed 0), then pre vs post per seed. One dict per result."""
    rs = spec.retrieval
    k, seeds, eps, thr = rs.k, list(rs.seeds), rs.overlap_eps, spec.gates.delta_s_max
    pre, post = _Side(src, "source", rs.query_timeout_ms), _Side(tgt, "target", rs.query_timeout_ms)
    rows: list[dict[str, Any]] = []
    for kind, probe in _probes(spec):
        probe.setup(pre)
        probe.setup(post)
        usable = [q for q in gold if (q.vector is not None if kind == "vector" else q.text is not None)]
        if kind == "vector":
            usable = [q for q in usable if q.vector.shape[0] == probe.store.dim]
        for qi, q in enumerate(usable):
            anchor = _anchor(q)
            if kind == "search" and anchor is not None and probe.vstore is not None \
                    and anchor.shape[0] != probe.vstore.dim:
                anchor = None
            want_recall = kind == "vector" and (rs.recall_queries is None or qi < rs.recall_queries)
            for seed in [0, *seeds]:
                variant = _perturbed(q, seeds[0] if seed == 0 else seed, seeds, rs.jitter_sigma, qi, kind)
                a = probe.query(pre, variant)
                b = probe.query(pre if seed == 0 else post, variant)
                ds_a, ds_b = _ds(a, anchor), _ds(b, anchor)
                drift = None if ds_a is None or ds_b is None else ds_b - ds_a
                ov = overlap_at_k(a.ids, a.dist, b.ids, b.dist, k, eps)
                post_ok = b.error is None and (bool(b.ids) or not a.ids)
                rec_pre = rec_post = None
                if want_recall and seed != 0:
                    rec_pre = _recall(a, probe.query(pre, variant, exact=True), k, eps)
                    rec_post = _recall(b, probe.query(post, variant, exact=True), k, eps)
                rows.append({
                    "store": probe.label, "query_id": q.id, "seed": seed, "pre_ids": a.ids, "post_ids": b.ids,
                    "delta_s_pre": ds_a, "delta_s_post": ds_b, "drift": drift, "overlap": ov,
                    "recall_pre": rec_pre, "recall_post": rec_post,
                    "lambda": lambda_class(ov, drift, post_ok, thr),
                    "latency_pre_ms": a.ms, "latency_post_ms": b.ms, "error": b.error or a.error,
                    "expected_pre": _found(q, a.ids), "expected_post": _found(q, b.ids),
                })
    return rows


def _seed_stats(rows: list[dict[str, Any]], seed: int) -> tuple[float | None, float | None, str, dict[str, int]]:
    rs = [r for r in rows if r["seed"] == seed]
    d = [abs(r["drift"]) for r in rs if r["drift"] is not None]
    counts = {c: sum(1 for r in rs if r["lambda"] == c) for c in (CONVERGENT, SPLIT, DIVERGENT, CHAOTIC)}
    return (float(np.mean(d)) if d else None), p95(d), lambda_state(r["lambda"] for r in rs), counts


def summarize(spec: MigrationSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics. Each store and seed is judged on its own, and the headline is the worst:
    delta_s_diff = max over stores and seeds of mean |ΔS_post − ΔS_pre| (p95 likewise), so a
    broken store cannot hide behind a healthy one; lambda_state = convergent only when every
    store is convergent for every seed, else the worst state seen."""
    seeds = list(spec.retrieval.seeds)
    stores = sorted({r["store"] for r in rows})
    m: dict[str, Any] = {"stores": {}}
    means, p95s, states = [], [], []
    for s in seeds:
        seed_means, seed_states = [], []
        for st in stores:
            mean, q95, state, counts = _seed_stats([r for r in rows if r["store"] == st], s)
            m["stores"].setdefault(st, {})[f"seed_{s}"] = {"delta_s_diff": mean, "delta_s_diff_p95": q95,
                                                         "lambda_state": state, "lambda_counts": counts}
            seed_means.append(mean)
            p95s.append(q95)
            seed_states.append(state)
        mean_s = max((x for x in seed_means if x is not None), default=None)
        state_s = "convergent" if all(x == "convergent" for x in seed_states) else worst_state(seed_states)
        m[f"delta_s_diff_seed_{s}"], m[f"lambda_state_seed_{s}"] = mean_s, state_s
        m[f"lambda_counts_seed_{s}"] = {c: sum(1 for r in rows if r["seed"] == s and r["lambda"] == c)
                                        for c in (CONVERGENT, SPLIT, DIVERGENT, CHAOTIC)}
        means.append(mean_s)
        states.append(state_s)
    m["delta_s_diff"] = max((x for x in means if x is not None), default=None)
    m["delta_s_diff_p95"] = max((x for x in p95s if x is not None), default=None)
    m["lambda_state"] = "convergent" if all(s == "convergent" for s in states) else worst_state(states)
    measured = [r for r in rows if r["seed"] != 0]
    pre_p95, post_p95 = p95(r["latency_pre_ms"] for r in measured), p95(r["latency_post_ms"] for r in measured)
    m["latency_p95_pre_ms"], m["latency_p95_post_ms"] = pre_p95, post_p95
    m["latency_p95_change"] = (post_p95 - pre_p95) / pre_p95 if pre_p95 and post_p95 is not None else None
    rp = [r["recall_pre"] for r in measured if r["recall_pre"] is not None]
    rq = [r["recall_post"] for r in measured if r["recall_post"] is not None]
    m["recall_pre"] = float(np.mean(rp)) if rp else None
    m["recall_post"] = float(np.mean(rq)) if rq else None
    for side in ("pre", "post"):
        found = [r[f"expected_{side}"] for r in measured if r.get(f"expected_{side}") is not None]
        m[f"expected_hit_rate_{side}"] = float(np.mean(found)) if found else None
    aa = [r for r in rows if r["seed"] == 0]
    aa_d = [abs(r["drift"]) for r in aa if r["drift"] is not None]
    a_p95, b_p95 = p95(r["latency_pre_ms"] for r in aa), p95(r["latency_post_ms"] for r in aa)
    m["noise_floor"] = {
        "delta_s_diff": float(np.mean(aa_d)) if aa_d else None,
        "overlap": float(np.mean([r["overlap"] for r in aa])) if aa else None,
        "latency_p95_change": (b_p95 - a_p95) / a_p95 if a_p95 and b_p95 is not None else None,
    }
    m["retrieval_queries"] = len({(r["store"], r["query_id"]) for r in rows})
    return m


def shadow_reads(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Stage: (re-)measure every gold query on both sides; rows into dbguard.shadow_reads, metrics into the ledger."""
    dims = {v.dim for _, v in vector_store.stores(spec)}
    gold = load_gold(gold_path(spec), next(iter(dims)) if len(dims) == 1 else None)
    if spec.retrieval.max_queries:
        gold = gold[: spec.retrieval.max_queries]
    t0 = time.perf_counter()
    with db.source(spec, autocommit=True) as src, db.target(spec, autocommit=True) as tgt:
        rows = measure(spec, gold, src, tgt)
    seconds = time.perf_counter() - t0
    m = summarize(spec, rows)
    measured = {r["store"] for r in rows}
    m["unmeasured_stores"] = [p.label for _, p in _probes(spec) if p.label not in measured]
    m["shadow_reads_seconds"] = round(seconds, 3)
    with db.target(spec) as conn:
        ensure_shadow_table(conn)
        record(conn, spec, run_id, rows, m)
    return m


_INSERT = sql.SQL("""
INSERT INTO dbguard.shadow_reads (run_id, migration, store, query_id, seed, pre_ids, post_ids, delta_s_pre,
    delta_s_post, drift, overlap, recall_pre, recall_post, lambda, latency_pre_ms, latency_post_ms, error)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
ON CONFLICT (run_id, store, query_id, seed) DO UPDATE SET pre_ids = EXCLUDED.pre_ids, post_ids = EXCLUDED.post_ids,
    delta_s_pre = EXCLUDED.delta_s_pre, delta_s_post = EXCLUDED.delta_s_post, drift = EXCLUDED.drift,
    overlap = EXCLUDED.overlap, recall_pre = EXCLUDED.recall_pre, recall_post = EXCLUDED.recall_post,
    lambda = EXCLUDED.lambda, latency_pre_ms = EXCLUDED.latency_pre_ms, latency_post_ms = EXCLUDED.latency_post_ms,
    error = EXCLUDED.error, measured_at = clock_timestamp()
""")


def record(conn: psycopg.Connection, spec: MigrationSpec, run_id: str, rows: list[dict[str, Any]],
           metrics: dict[str, Any]) -> None:
    with conn.cursor() as cur:
        cur.executemany(_INSERT, [(run_id, spec.name, r["store"], r["query_id"], r["seed"], Jsonb(r["pre_ids"]),
                                   Jsonb(r["post_ids"]), r["delta_s_pre"], r["delta_s_post"], r["drift"],
                                   r["overlap"], r["recall_pre"], r["recall_post"], r["lambda"],
                                   r["latency_pre_ms"], r["latency_post_ms"], r["error"]) for r in rows])
    for name, value in metrics.items():
        ledger.set_metric(conn, run_id, spec.name, name, value, commit=False)
    conn.commit()
