"""Shadow reads: every gold query on both sides (A/A first, then per seed), ΔS, overlap, recall, λ;
rows into dbguard.shadow_reads, metrics into the ledger."""
from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db, ledger
from ..db import qname
from ..spec import MigrationSpec, SearchStore, Table, VectorStore
from ..stores import qdrant as qdrant_store
from ..stores import search as search_store
from ..stores import vector as vector_store
from .gold import GoldQuery, gold_path, load_gold
from . import exact
from .scores import CHAOTIC, CONVERGENT, DIVERGENT, NOISE, SPLIT, delta_s, lambda_class, lambda_state, overlap_at_k, \
    p95, worst_state

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
    """One database side's session for shadow reads (autocommit)."""

    def __init__(self, conn: psycopg.Connection | None, side: str, timeout_ms: int):
        self.conn, self.side = conn, side  # None: a side that is not PostgreSQL (a Qdrant source)
        if conn is not None:
            conn.execute(sql.SQL("SET statement_timeout = {}").format(sql.Literal(int(timeout_ms))))

    def run(self, query: sql.Composable, params: tuple) -> tuple[list[tuple], float, str | None]:
        t0 = time.perf_counter()
        try:
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
        if ix is None or (side.side == "target" and self.store.qdrant is not None):
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

    def sent(self, side: str, qvec: np.ndarray) -> np.ndarray:
        """The query vector as `side` receives it (unit length when that side's vectors are normalised)."""
        normalized = self.store.source_normalized if side == "source" else self.store.target_normalized
        return _unit(qvec) if normalized else qvec

    def query(self, side: _Side, qvec: np.ndarray) -> Hits:
        if side.side == "target" and self.store.qdrant is not None:
            return self._query_qdrant(qvec)
        rows, ms, err = side.run(self.sql_for(side.side), (_vtext(self.sent(side.side, qvec)),))
        vecs = _parse_vectors([r[1] for r in rows], self.store.dim)
        dist = _cos_dist(vecs, qvec)
        return Hits([r[0] for r in rows], dist, vecs, ms, err)


    def _query_qdrant(self, qvec: np.ndarray) -> Hits:
        """The target is a Qdrant collection: the same query (as the target receives it) through its search."""
        t0 = time.perf_counter()
        try:
            c = qdrant_store.client(self.store.qdrant.conn_id)
            ids, vecs = qdrant_store.search(c, self.store.qdrant.collection, self.store, self.sent("target", qvec),
                                            self.k)
        except Exception as e:  # an unreachable server or a missing collection: the post side errored (←)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            return Hits([], [], np.zeros((0, self.store.dim), np.float32), (time.perf_counter() - t0) * 1000, msg)
        return Hits(ids, _cos_dist(vecs, qvec), vecs, (time.perf_counter() - t0) * 1000)


class _SearchProbe:
    def __init__(self, table: Table, store: SearchStore, k: int):
        self.table, self.store, self.k = table, store, k
        self.label = search_store.label(table, store)
        emb = store.embedding_column or (table.vector[0].column if table.vector else None)
        self.vstore = vector_store.store_for(table, emb) if emb else None

    def setup(self, side: _Side) -> None:
        pass

    def query(self, side: _Side, text: str) -> Hits:
        emb = None
        if self.vstore is not None:
            emb = (vector_store.as_vector(self.table, self.vstore) if side.side == "source"
                   else sql.Identifier(self.vstore.column))
            emb = sql.SQL("vector_send({})").format(emb)
        rows, ms, err = side.run(search_store.query_sql(self.table, self.store, side.side, self.k, emb), (text,))
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


def _found(q: GoldQuery, ids: list[str]) -> bool | None:
    """Did the top-k contain every expected id of the gold query (None: the query names none)?"""
    return set(q.expected_ids) <= set(map(str, ids)) if q.expected_ids else None


def _probes(spec: MigrationSpec) -> list[tuple[str, Any]]:
    k = spec.retrieval.k
    return ([("vector", _VectorProbe(t, v, k)) for t, v in vector_store.stores(spec)]
            + [("search", _SearchProbe(t, s, k)) for t, s in search_store.stores(spec)])


def _reference(probe: _VectorProbe, variant: np.ndarray, h: Hits) -> tuple[list[str], list[float], str | None]:
    """A side's ANN top-k as the recall probe needs it: ids, distances in the reference metric (the
    source's, to the query as the source receives it), error. Kept instead of the hit vectors, so
    pending probes cost k floats per side, not k x dim."""
    q = probe.sent("source", variant)
    d = exact.distances(h.vectors, q, probe.store.source_metric).tolist() if h.ids and not h.error else []
    return h.ids, d, h.error


def _recall_probes(spec: MigrationSpec, probe: _VectorProbe, pending: list[tuple[dict, np.ndarray, tuple, tuple]],
                   src: psycopg.Connection, tgt: psycopg.Connection) -> dict[str, Any]:
    """Recall@k of each side's ANN top-k against exact search over that side's own vectors, then λ calibrated.

    The reference is the meaning the migration must keep: the SOURCE's metric, with the query as the
    source receives it, on both sides' data. A rebuilt index that misses different neighbours keeps
    its recall; a wrong metric or a lost normalisation on the target ranks by something else, and its
    recall against this reference drops. One streaming pass per side answers all probe queries
    (`exact.top_k`). Rows that get a probe: the first `recall_queries` queries (the reported mean
    recall) and every query whose post list is disjoint from its pre list (its λ depends on it)."""
    rs = spec.retrieval
    k, eps, tol, metric = rs.k, rs.overlap_eps, rs.recall_tolerance, probe.store.source_metric
    todo = [p for p in pending if p[0]["seed"] != 0 and (
        rs.recall_queries is None or p[0]["qindex"] < rs.recall_queries or p[0]["lambda"] == CHAOTIC)]
    info = {"probes": len(todo), "seconds": 0.0, "rows_scanned": {}}
    if not todo:
        return info
    t0 = time.perf_counter()
    queries = np.stack([probe.sent("source", v) for _, v, _, _ in todo])
    for side, conn, pick in (("source", src, 2), ("target", tgt, 3)):
        if hasattr(probe, "exact_top_k"):  # a store that scans itself (collection_shadow)
            ex = probe.exact_top_k(side, queries, metric, k)
        else:
            ex = exact.top_k(conn, probe.table, probe.store, side, queries, metric, k)
        info["rows_scanned"][side] = ex.rows
        for i, p in enumerate(todo):
            row, (ids, d, err) = p[0], p[pick]
            if ex.error or err:  # no recall: a disjoint list then stays ×
                if ex.error:
                    row["error"] = row["error"] or f"recall probe on the {side}: {ex.error}"
                continue
            row["recall_pre" if side == "source" else "recall_post"] = overlap_at_k(
                ex.ids[i], ex.dist[i][:len(ex.ids[i])].tolist(), ids, d, k, eps)
    # The index's recall per seed (mean over the sampled queries): a rebuilt HNSW graph misses
    # different queries than the source's at the same rate, so a disjoint query is held against the
    # migration (×) only when both its own recall and its index's recall fell by more than `tol`.
    for seed in sorted({p[0]["seed"] for p in todo}):
        rows = [p[0] for p in todo if p[0]["seed"] == seed]
        sample = [r for r in rows if rs.recall_queries is None or r["qindex"] < rs.recall_queries] or rows
        mean_pre = _mean(r["recall_pre"] for r in sample)
        mean_post = _mean(r["recall_post"] for r in sample)
        info[f"recall_seed_{seed}"] = {"pre": mean_pre, "post": mean_post, "queries": len(sample)}
        for row in rows:
            own = lambda_class(row["overlap"], row["drift"], row["post_ok"], spec.gates.delta_s_max,
                               recall_pre=row["recall_pre"], recall_post=row["recall_post"], tolerance=tol)
            index = lambda_class(row["overlap"], row["drift"], row["post_ok"], spec.gates.delta_s_max,
                                 recall_pre=mean_pre, recall_post=mean_post, tolerance=tol)
            row["lambda"] = NOISE if NOISE in (own, index) and row["recall_post"] is not None else own
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def measure(spec: MigrationSpec, gold: list[GoldQuery], src: psycopg.Connection | None,
            tgt: psycopg.Connection | None, probe_info: dict[str, Any] | None = None,
            probes: list[tuple[str, Any]] | None = None) -> list[dict[str, Any]]:
    """Run every gold query: A/A on the source (seed 0), then pre vs post per seed. One dict per result.
    Vector stores then get their recall probes (`_recall_probes`); `probe_info` collects their cost.
    `probes` (default: the spec's table stores) lets a collection's probes (collection_shadow) run here."""
    rs = spec.retrieval
    k, seeds, eps, thr = rs.k, list(rs.seeds), rs.overlap_eps, spec.gates.delta_s_max
    pre, post = _Side(src, "source", rs.query_timeout_ms), _Side(tgt, "target", rs.query_timeout_ms)
    rows: list[dict[str, Any]] = []
    for kind, probe in (probes if probes is not None else _probes(spec)):
        probe.setup(pre)
        probe.setup(post)
        usable = [q for q in gold if (q.vector is not None if kind == "vector" else q.text is not None)]
        if kind == "vector":
            usable = [q for q in usable if q.vector.shape[0] == probe.store.dim]
        pending: list[tuple[dict, np.ndarray, tuple, tuple]] = []
        for qi, q in enumerate(usable):
            anchor = _anchor(q)
            if kind == "search" and anchor is not None and probe.vstore is not None \
                    and anchor.shape[0] != probe.vstore.dim:
                anchor = None
            for seed in [0, *seeds]:
                variant = _perturbed(q, seeds[0] if seed == 0 else seed, seeds, rs.jitter_sigma, qi, kind)
                a = probe.query(pre, variant)
                b = probe.query(pre if seed == 0 else post, variant)
                ds_a, ds_b = _ds(a, anchor), _ds(b, anchor)
                drift = None if ds_a is None or ds_b is None else ds_b - ds_a
                ov = overlap_at_k(a.ids, a.dist, b.ids, b.dist, k, eps)
                post_ok = b.error is None and (bool(b.ids) or not a.ids)
                row = {
                    "store": probe.label, "query_id": q.id, "seed": seed, "qindex": qi, "pre_ids": a.ids,
                    "post_ids": b.ids, "delta_s_pre": ds_a, "delta_s_post": ds_b, "drift": drift, "overlap": ov,
                    "recall_pre": None, "recall_post": None, "post_ok": post_ok,
                    "lambda": lambda_class(ov, drift, post_ok, thr),
                    "latency_pre_ms": a.ms, "latency_post_ms": b.ms, "error": b.error or a.error,
                    "expected_pre": _found(q, a.ids), "expected_post": _found(q, b.ids),
                }
                rows.append(row)
                if kind == "vector" and seed != 0:
                    pending.append((row, variant, _reference(probe, variant, a), _reference(probe, variant, b)))
        if kind == "vector":
            info = _recall_probes(spec, probe, pending, src, tgt)
            if probe_info is not None:
                probe_info[probe.label] = info
    return rows


COUNTED = (CONVERGENT, SPLIT, DIVERGENT, CHAOTIC, NOISE)


def _seed_stats(rows: list[dict[str, Any]], seed: int) -> tuple[float | None, float | None, str, dict[str, int]]:
    rs = [r for r in rows if r["seed"] == seed]
    d = [abs(r["drift"]) for r in rs if r["drift"] is not None]
    counts = {c: sum(1 for r in rs if r["lambda"] == c) for c in COUNTED}
    return (float(np.mean(d)) if d else None), p95(d), lambda_state(r["lambda"] for r in rs), counts


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if v else None


def summarize(spec: MigrationSpec, rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics. Each store and seed is judged on its own, and the headline is the worst:
    delta_s_diff = max over stores and seeds of mean |ΔS_post − ΔS_pre| (p95 likewise), so a
    broken store cannot hide behind a healthy one; lambda_state = convergent only when every
    store is convergent for every seed, else the worst state seen. `~` (index noise) is counted
    in lambda_counts and lambda_noise, never held against the migration."""
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
                                        for c in COUNTED}
        means.append(mean_s)
        states.append(state_s)
    m["delta_s_diff"] = max((x for x in means if x is not None), default=None)
    m["delta_s_diff_p95"] = max((x for x in p95s if x is not None), default=None)
    m["lambda_state"] = "convergent" if all(s == "convergent" for s in states) else worst_state(states)
    measured = [r for r in rows if r["seed"] != 0]
    m["lambda_noise"] = sum(1 for r in measured if r["lambda"] == NOISE)
    m["recall_tolerance"] = spec.retrieval.recall_tolerance
    pre_p95, post_p95 = p95(r["latency_pre_ms"] for r in measured), p95(r["latency_post_ms"] for r in measured)
    m["latency_p95_pre_ms"], m["latency_p95_post_ms"] = pre_p95, post_p95
    m["latency_p95_change"] = (post_p95 - pre_p95) / pre_p95 if pre_p95 and post_p95 is not None else None
    # Mean recall over the sampled queries only (the first recall_queries): the disjoint ones that were
    # probed for their λ class would bias it low.
    sample = [r for r in measured if spec.retrieval.recall_queries is None
              or r.get("qindex", 0) < spec.retrieval.recall_queries]
    m["recall_pre"] = _mean(r["recall_pre"] for r in sample)
    m["recall_post"] = _mean(r["recall_post"] for r in sample)
    m["recall_probes"] = sum(1 for r in measured if r["recall_pre"] is not None or r["recall_post"] is not None)
    for side in ("pre", "post"):
        found = [r[f"expected_{side}"] for r in measured if r.get(f"expected_{side}") is not None]
        m[f"expected_hit_rate_{side}"] = float(np.mean(found)) if found else None
    aa = [r for r in rows if r["seed"] == 0]
    aa_d = [abs(r["drift"]) for r in aa if r["drift"] is not None]
    a_p95, b_p95 = p95(r["latency_pre_ms"] for r in aa), p95(r["latency_post_ms"] for r in aa)
    # The A/A floor: the source against itself (repeatability), and the source index against exact
    # search over its own data (how much it misses on its own: the noise a rebuilt index may show too).
    m["noise_floor"] = {
        "delta_s_diff": float(np.mean(aa_d)) if aa_d else None,
        "overlap": float(np.mean([r["overlap"] for r in aa])) if aa else None,
        "latency_p95_change": (b_p95 - a_p95) / a_p95 if a_p95 and b_p95 is not None else None,
        "recall": m["recall_pre"],
        "disjoint_from_exact": sum(1 for r in measured if r["recall_pre"] == 0.0),
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
        probe_info: dict[str, Any] = {}
        rows = measure(spec, gold, src, tgt, probe_info)
    seconds = time.perf_counter() - t0
    m = summarize(spec, rows)
    m["recall_probe"] = probe_info
    measured = {r["store"] for r in rows}
    m["unmeasured_stores"] = [p.label for _, p in _probes(spec) if p.label not in measured]
    m["shadow_reads_seconds"] = round(seconds, 3)
    m["shadow_reads_fingerprint"] = fingerprint(rows)
    with db.target(spec) as conn:
        ensure_shadow_table(conn)
        before = ledger.metrics(conn, run_id)
        m["shadow_reads_previous_fingerprint"] = before.get("shadow_reads_fingerprint")
        m["shadow_reads_measurements"] = int(before.get("shadow_reads_measurements") or 0) + 1
        record(conn, spec, run_id, rows, m)
    return m


def fingerprint(rows: list[dict[str, Any]]) -> str:
    """What a measurement decided, latency aside: every query's pre and post top-k, λ class and ΔS drift
    (to 1e-6). Two measurements with the same fingerprint are the same numbers: waiting cannot change
    a verdict that re-measuring reproduces exactly (a wrong analyzer or metric)."""
    items = sorted((r["store"], r["query_id"], r["seed"], r["lambda"], [str(i) for i in r["pre_ids"]],
                    [str(i) for i in r["post_ids"]], None if r["drift"] is None else round(r["drift"], 6))
                   for r in rows if r["seed"] != 0)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:24]


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
