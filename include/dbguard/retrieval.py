"""Gold sets, shadow reads, ΔS, λ, latency and the retrieval gate (DESIGN.md: ΔS, λ).

ΔS = 1 − cos(I, G) for a retrieved item I and the anchor G (the gold answer's
embedding, else the query embedding); ΔS_side(q) is its mean over the side's
top-k. Per gold query and seed the post (target) top-k is compared with the pre
(source) top-k: overlap@k (distance-tolerant) and the ΔS drift give a λ class;
a seed is `convergent` when ≥ 80 % of queries are `→`, none `×`, ≤ 10 % `<>`.
Stage-shaped entry points: `check_target`, `scan_vectors`, `build_indexes`,
`shadow_reads`, `retrieval_gate`.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from . import db, ledger
from .db import qname
from .errors import DbguardError, PreflightError
from .spec import MigrationSpec, SearchStore, Table, VectorStore
from .stores import search as search_store
from .stores import vector as vector_store

CONVERGENT, SPLIT, DIVERGENT, CHAOTIC = "→", "<>", "←", "×"
STATES = ("convergent", "split", "divergent", "chaotic")  # best to worst


class GoldSetError(DbguardError):
    """A gold set line is malformed; the message names the file, line and field."""


# ---- the math (pure, vectorised) --------------------------------------------------------------

def delta_s(items: np.ndarray, anchor: np.ndarray) -> float:
    """Mean of 1 − cos(I, G) over the rows I of `items`; nan for no items. Zero vectors count as cos = 0."""
    items = np.asarray(items, dtype=np.float64).reshape(-1, np.asarray(anchor).shape[-1])
    if items.shape[0] == 0:
        return float("nan")
    g = np.asarray(anchor, dtype=np.float64)
    gn = np.linalg.norm(g)
    n = np.linalg.norm(items, axis=1)
    denom = n * gn
    cos = np.divide(items @ g, denom, out=np.zeros(items.shape[0]), where=denom > 0)
    return float(np.mean(1.0 - cos))


def overlap_at_k(pre_ids: list, pre_dist: Iterable[float] | None, post_ids: list, post_dist: Iterable[float] | None,
                 k: int, eps: float = 1e-3) -> float:
    """Share of the pre top-k that the post top-k reproduces, counting ties as ann-benchmarks does.

    A post item counts when its id is in the pre top-k, or when its distance is within
    `eps` of the pre top-k's largest distance (an equally close neighbour; distances must
    be comparable on both sides). Both empty: 1.0; pre non-empty, post empty: 0.0.
    """
    pre_ids, post_ids = list(pre_ids)[:k], list(post_ids)[:k]
    if not pre_ids:
        return 1.0 if not post_ids else 0.0
    pre_set = set(pre_ids)
    threshold = None
    if pre_dist is not None and post_dist is not None:
        pd = [d for d in list(pre_dist)[:k] if d is not None and not math.isnan(d)]
        threshold = max(pd) + eps if pd else None
    post_d = list(post_dist)[:k] if post_dist is not None else [None] * len(post_ids)
    hits = sum(1 for i, d in zip(post_ids, post_d)
               if i in pre_set or (threshold is not None and d is not None and d <= threshold))
    return min(hits, len(pre_ids)) / len(pre_ids)


def lambda_class(overlap: float, drift: float | None, post_ok: bool, threshold: float) -> str:
    """→ convergent, <> split, ← divergent (post returned nothing / errored / timed out), × chaotic."""
    if not post_ok:
        return DIVERGENT
    if overlap <= 0.0:
        return CHAOTIC
    if overlap >= 0.8 and (drift is None or math.isnan(drift) or abs(drift) <= threshold):
        return CONVERGENT
    return SPLIT


def lambda_state(classes: Iterable[str]) -> str:
    """`convergent` when ≥ 80 % are →, no ×, and ≤ 10 % are <>; else the worst state present."""
    cs = list(classes)
    if not cs:
        return "divergent"
    n = len(cs)
    if cs.count(CHAOTIC):
        return "chaotic"
    if cs.count(CONVERGENT) >= 0.8 * n and cs.count(SPLIT) <= 0.1 * n:
        return "convergent"
    return "divergent" if cs.count(DIVERGENT) > cs.count(SPLIT) else "split"


def worst_state(states: Iterable[str]) -> str:
    return max(states, key=STATES.index, default="divergent")


def p95(values: Iterable[float]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.percentile(v, 95)) if v else None


# ---- gold sets ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Paraphrase:
    text: str | None = None
    vector: tuple[float, ...] | None = None


@dataclass(frozen=True)
class GoldQuery:
    id: str
    line: int
    text: str | None = None
    vector: np.ndarray | None = field(default=None, compare=False)
    anchor: np.ndarray | None = field(default=None, compare=False)
    expected_ids: tuple[str, ...] = ()
    paraphrases: tuple[Paraphrase, ...] = ()


def _vec(path: str, line: int, name: str, value: Any, dim: int | None) -> np.ndarray:
    if not isinstance(value, list) or not value or not all(isinstance(x, (int, float)) and not isinstance(x, bool)
                                                            for x in value):
        raise GoldSetError(f"{path}:{line}: field {name!r} must be a non-empty list of numbers")
    a = np.asarray(value, dtype=np.float32)
    if not np.all(np.isfinite(a)):
        raise GoldSetError(f"{path}:{line}: field {name!r} holds NaN or infinite values")
    if dim is not None and a.shape[0] != dim:
        raise GoldSetError(f"{path}:{line}: field {name!r} has {a.shape[0]} dimensions, the store has {dim}")
    if not np.any(a):
        raise GoldSetError(f"{path}:{line}: field {name!r} is a zero vector (ΔS and cosine are undefined for it)")
    return a


def load_gold(path: str | Path, dim: int | None = None) -> list[GoldQuery]:
    """Read and validate a JSONL gold set; any error names the line number and the field."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise GoldSetError(f"{p}: no such gold set; set gold: in the spec to an existing .jsonl file") from None
    out: list[GoldQuery] = []
    seen: set[str] = set()
    allowed = {"id", "text", "vector", "anchor", "expected_ids", "paraphrases"}
    for no, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as e:
            raise GoldSetError(f"{p}:{no}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise GoldSetError(f"{p}:{no}: each line must be a JSON object")
        extra = sorted(set(obj) - allowed)
        if extra:
            raise GoldSetError(f"{p}:{no}: unknown field(s) {extra}; allowed: {sorted(allowed)}")
        qid = str(obj.get("id", f"line{no}"))
        if qid in seen:
            raise GoldSetError(f"{p}:{no}: field 'id' {qid!r} repeats an earlier query id")
        seen.add(qid)
        text = obj.get("text")
        if text is not None and (not isinstance(text, str) or not text.strip()):
            raise GoldSetError(f"{p}:{no}: field 'text' must be a non-empty string")
        vector = _vec(str(p), no, "vector", obj["vector"], dim) if obj.get("vector") is not None else None
        if text is None and vector is None:
            raise GoldSetError(f"{p}:{no}: give field 'text' or field 'vector' (or both)")
        anchor = _vec(str(p), no, "anchor", obj["anchor"], dim) if obj.get("anchor") is not None else None
        exp = obj.get("expected_ids", [])
        if not isinstance(exp, list) or not all(isinstance(x, (int, str)) for x in exp):
            raise GoldSetError(f"{p}:{no}: field 'expected_ids' must be a list of ids")
        paras = []
        for j, para in enumerate(obj.get("paraphrases") or []):
            if isinstance(para, str):
                para = {"text": para}
            if not isinstance(para, dict) or not (para.get("text") or para.get("vector")):
                raise GoldSetError(f"{p}:{no}: field 'paraphrases[{j}]' must be a string or an object with "
                                   "'text' and/or 'vector'")
            pv = _vec(str(p), no, f"paraphrases[{j}].vector", para["vector"], dim) if para.get("vector") else None
            paras.append(Paraphrase(para.get("text"), tuple(pv.tolist()) if pv is not None else None))
        out.append(GoldQuery(qid, no, text, vector, anchor, tuple(str(x) for x in exp), tuple(paras)))
    if not out:
        raise GoldSetError(f"{p}: the gold set has no queries")
    return out


def gold_path(spec: MigrationSpec) -> Path:
    if spec.gold is None:
        raise GoldSetError(f"spec {spec.name}: field 'gold' is not set; point it at include/gold/<name>.jsonl")
    p = Path(spec.gold)
    if p.is_absolute() or p.exists():
        return p
    return Path(__file__).resolve().parents[2] / p


# ---- preflight: version pins, target checks, source scan ------------------------------------------

def manifest(spec: MigrationSpec) -> dict[str, Any]:
    """EMBED_MODEL_VER, EMBED_DIM, NORM, metric, ANALYZER_CONF (keys qualified when a spec has several stores)."""
    pins: dict[str, Any] = {}
    vs, ss = list(vector_store.stores(spec)), list(search_store.stores(spec))
    for t, v in vs:
        for k, val in vector_store.manifest(t, v).items():
            pins[k if len(vs) == 1 else f"{k}[{vector_store.label(t, v)}]"] = val
    for t, s in ss:
        for k, val in search_store.manifest(t, s).items():
            pins[k if len(ss) == 1 else f"{k}[{search_store.label(t, s)}]"] = val
    return pins


def check_target(spec: MigrationSpec, conn: psycopg.Connection) -> list[str]:
    """Every disagreement between the target and the spec's stores (operator class, dim, NORM, analyzer)."""
    problems: list[str] = []
    for t, v in vector_store.stores(spec):
        problems += vector_store.check_target(conn, t, v, spec.gates.float_tolerance)
    for t, s in search_store.stores(spec):
        problems += search_store.check_target(conn, t, s)
    conn.rollback()
    return problems


def scan_vectors(spec: MigrationSpec, conn: psycopg.Connection) -> list[str]:
    """NaN / NULL-component / zero / wrong-dimension vectors in the SOURCE (server-side counts)."""
    problems: list[str] = []
    for t, v in vector_store.stores(spec):
        problems += vector_store.scan_source(conn, t, v)
    conn.rollback()
    return problems


def preflight(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Stage: scan the source, check the target, record the manifest; raises PreflightError listing all."""
    with db.source(spec) as src, db.target(spec) as tgt:
        problems = scan_vectors(spec, src) + check_target(spec, tgt)
        if problems:
            raise PreflightError(problems)
        ledger.ensure(tgt)
        pins = manifest(spec)
        ledger.set_manifest(tgt, spec.name, run_id, pins)
    return {"manifest": pins}


# ---- indexes -----------------------------------------------------------------------------------------

def build_indexes(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Stage: ANN + GIN indexes on the target (CONCURRENTLY, swap on rebuild), INDEX_HASH into the manifest."""
    out: dict[str, Any] = {"indexes": [], "index_hash": {}}
    with db.target(spec, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        vs = list(vector_store.stores(spec))
        for t, v in vs:
            t0 = time.perf_counter()
            r = vector_store.build_index(conn, t, v)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            out["indexes"].append(r)
            out["index_hash"][vector_store.label(t, v)] = vector_store.index_hash(conn, t, v)
        for t, s in search_store.stores(spec):
            t0 = time.perf_counter()
            r = search_store.build_index(conn, t, s)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            out["indexes"].append(r)
    with db.target(spec) as conn:
        ledger.ensure(conn)
        pins = manifest(spec)
        hashes = out["index_hash"]
        if len(hashes) == 1:
            pins["INDEX_HASH"] = next(iter(hashes.values()))
        else:
            pins.update({f"INDEX_HASH[{k}]": h for k, h in hashes.items()})
        ledger.set_manifest(conn, spec.name, run_id, pins)
        ledger.event(conn, run_id, spec.name, "build_indexes", out)
    return out


# ---- shadow reads ------------------------------------------------------------------------------------

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


# ---- the gate ------------------------------------------------------------------------------------------

_OVER_SINCE = "delta_s_over_escalate_since"


def _failing_queries(conn: psycopg.Connection, spec: MigrationSpec, run_id: str) -> list[str]:
    """Every (store, query) that is not → or drifted beyond delta_s_max in some seed, with its values."""
    rows = conn.execute(
        """SELECT store, query_id, seed, delta_s_pre, delta_s_post, drift, overlap, lambda, error
           FROM dbguard.shadow_reads
           WHERE run_id = %s AND seed <> 0 AND (lambda <> '→' OR abs(coalesce(drift, 0)) > %s)
           ORDER BY store, query_id, seed""",
        (run_id, spec.gates.delta_s_max)).fetchall()

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    grouped: dict[tuple[str, str], list[str]] = {}
    worst: dict[tuple[str, str], float] = {}
    for store, qid, seed, a, b, d, ov, lam, err in rows:
        grouped.setdefault((store, qid), []).append(
            f"seed {seed}: λ {lam}, overlap@{spec.retrieval.k} {ov:.2f}, ΔS pre {f(a)} post {f(b)} drift {f(d)}"
            + (f", error: {err}" if err else ""))
        worst[(store, qid)] = max(worst.get((store, qid), 0.0), abs(d or 0.0))
    order = sorted(grouped, key=lambda key: (key[0], -worst[key], key[1]))
    return [f"{store} {qid}: " + "; ".join(grouped[(store, qid)]) for store, qid in order]


def retrieval_gate(spec: MigrationSpec, run_id: str, *, first_seen_at: dt.datetime | None,
                   now: dt.datetime) -> tuple[str, str]:
    """("pass" | "wait" | "fail", message) from the last shadow reads in the target ledger.

    pass: delta_s_diff ≤ delta_s_max, λ convergent for every seed, latency p95 within bound.
    fail: any ×; a store without usable gold queries; drift > delta_s_escalate for longer than
    escalate_after_minutes (counted from the first gate call that saw it, kept in the ledger and
    cleared when drift drops); or no pass within retrieval.gate_timeout_minutes of
    `first_seen_at` (the sensor's first poke; None = now).
    wait: anything else (the sensor re-measures on its next poke).
    """
    g = spec.gates
    with db.target(spec) as conn:
        ensure_shadow_table(conn)
        m = ledger.metrics(conn, run_id)
        if m.get("delta_s_diff") is None and m.get("lambda_state") is None:
            return "wait", "no shadow reads measured yet for this run"
        drift, seeds = m.get("delta_s_diff"), list(spec.retrieval.seeds)
        seed_states = {s: m.get(f"lambda_state_seed_{s}") for s in seeds}
        chaotic = [s for s, st in seed_states.items() if st == "chaotic"]
        problems: list[str] = []
        if drift is not None and drift > g.delta_s_max:
            problems.append(f"delta_s_diff {drift:.4f} > delta_s_max {g.delta_s_max} "
                            f"(p95 {m.get('delta_s_diff_p95') or 0:.4f})")
        for s, st in seed_states.items():
            if st != "convergent":
                problems.append(f"lambda_state for seed {s} is {st}")
        for store, per_seed in sorted((m.get("stores") or {}).items()):
            for seed_key, v in sorted(per_seed.items()):
                d = v.get("delta_s_diff")
                if v.get("lambda_state") != "convergent" or (d is not None and d > g.delta_s_max):
                    c = v.get("lambda_counts") or {}
                    problems.append(f"{store} {seed_key.replace('_', ' ')}: lambda_state {v.get('lambda_state')} "
                                    f"(→ {c.get(CONVERGENT, 0)}, <> {c.get(SPLIT, 0)}, ← {c.get(DIVERGENT, 0)}, "
                                    f"× {c.get(CHAOTIC, 0)}), delta_s_diff {d if d is None else round(d, 4)}")
        change, pre_ms, post_ms = m.get("latency_p95_change"), m.get("latency_p95_pre_ms"), m.get("latency_p95_post_ms")
        if change is not None and change > g.latency_p95_change and \
                (post_ms - pre_ms) > spec.retrieval.latency_floor_ms:
            problems.append(f"latency p95 {pre_ms:.2f} ms -> {post_ms:.2f} ms ({change:+.0%}) exceeds "
                            f"+{g.latency_p95_change:.0%}")
        over = drift is not None and drift > g.delta_s_escalate
        since = m.get(_OVER_SINCE)
        if over and since is None:
            since = now.isoformat()
            ledger.set_metric(conn, run_id, spec.name, _OVER_SINCE, since)
        elif not over and since is not None:
            conn.execute("DELETE FROM dbguard.metrics WHERE run_id = %s AND name = %s", (run_id, _OVER_SINCE))
            conn.commit()
            since = None
        summary = (f"delta_s_diff {drift if drift is None else round(drift, 4)} (max {g.delta_s_max}, escalate "
                   f"{g.delta_s_escalate}), lambda_state {m.get('lambda_state')} "
                   f"({', '.join(f'seed {s}: {st}' for s, st in seed_states.items())}), noise floor "
                   f"{m.get('noise_floor')}")
        if m.get("unmeasured_stores"):
            return "fail", (f"retrieval gate failed: no usable gold query for store(s) {m['unmeasured_stores']}: "
                            "a vector store needs gold vectors of its dimension, a search store gold text; "
                            f"extend {spec.gold}")
        if not problems:
            return "pass", "retrieval gate passed: " + summary
        window = dt.timedelta(minutes=g.escalate_after_minutes)
        elapsed = now - dt.datetime.fromisoformat(since) if since else None
        failing = _failing_queries(conn, spec, run_id)
        detail = "\n".join(["  - " + p for p in problems] + ["failing queries:"] + ["  " + q for q in failing])
        if chaotic:
            return "fail", (f"retrieval gate failed: × (chaotic, no overlap at all) for seed(s) {chaotic}; "
                            f"{summary}\n{detail}")
        waited = now - first_seen_at if first_seen_at else dt.timedelta(0)
        timeout = dt.timedelta(minutes=spec.retrieval.gate_timeout_minutes)
        if elapsed is not None and elapsed >= window:
            return "fail", (f"retrieval gate failed: delta_s_diff {drift:.4f} has stayed above delta_s_escalate "
                            f"{g.delta_s_escalate} for {elapsed.total_seconds() / 60:.1f} min (window "
                            f"{g.escalate_after_minutes} min); {summary}\n{detail}")
        if waited >= timeout:
            return "fail", (f"retrieval gate failed: no pass within gate_timeout_minutes "
                            f"{spec.retrieval.gate_timeout_minutes} (waited {waited.total_seconds() / 60:.1f} min); "
                            f"{summary}\n{detail}")
        return "wait", f"retrieval gate waiting (re-measuring): {summary}\n{detail}"
