"""Benchmark: shadow reads of 1,000 gold queries against 100,000 x 384 vectors on both sides.

The source holds raw embeddings (lengths vary ±20 %, as mean-pooled sentence vectors do), queried
by cosine through an HNSW index. Two migrations of it, each with its own HNSW index on the target:

- `correct`: the copy L2-normalises and the target is queried by inner product (vector_ip_ops),
  which on unit vectors ranks exactly as cosine does: the meaning is kept. Two HNSW graphs built
  separately still miss different neighbours for a few queries (disjoint top-k: index noise, `~`).
  Must end `lambda_state: convergent`.
- `wrong_metric`: the same, but the normalisation is lost: inner product on the raw lengths
  favours long vectors. Must NOT be convergent.

The timed part is `retrieval.shadow_reads` (A/A + two seeds, both sides, ΔS/λ, ledger writes) with
recall probes (exact search over each side's vectors, streamed once per side) for every query; it is
also timed with the default sample (`recall_queries` 100 + every disjoint query). The baseline is
exact numpy search of the same query executions (brute-force matmul top-k + the same ΔS math) in
this process. Prints one JSON line per migration: {"bench": "shadow_reads", "variant", "rows",
"seconds", "baseline", "baseline_seconds", "speed_ratio", "lambda_state", "lambda_noise", ...}.
Smaller runs: DBGUARD_BENCH_SR_ROWS, DBGUARD_BENCH_SR_QUERIES.
"""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np
import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "include"))

from dbguard import embedded, retrieval  # noqa: E402
from dbguard.spec import parse_spec  # noqa: E402

ROWS = int(os.environ.get("DBGUARD_BENCH_SR_ROWS", 100_000))
QUERIES = int(os.environ.get("DBGUARD_BENCH_SR_QUERIES", 1_000))
DIM, K = 384, 10


def vectors(n: int, seed: int, latent: int = 32) -> np.ndarray:
    """Unit vectors near a low-dimensional manifold, as real embeddings are (a clustered 32-d
    latent space, randomly projected to 384-d, plus noise). Full-rank Gaussian blobs in 384-d
    are far harder for HNSW than any real embedding set."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(200, latent)).astype(np.float32)
    z = centers[rng.integers(0, 200, n)] + 0.5 * rng.normal(size=(n, latent)).astype(np.float32)
    proj = rng.normal(size=(latent, DIM)).astype(np.float32) / np.sqrt(latent)
    v = z @ proj + 0.05 * rng.normal(size=(n, DIM)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def copy_binary(conn: psycopg.Connection, table: str, vecs: np.ndarray, chunk: int = 10_000) -> None:
    """COPY ... (FORMAT binary): (id bigint, embedding vector) rows built with numpy, no per-value Python."""
    row = np.dtype([("nf", ">i2"), ("l1", ">i4"), ("id", ">i8"), ("l2", ">i4"), ("dim", ">i2"), ("unused", ">i2"),
                    ("v", ">f4", (DIM,))])
    with conn.cursor().copy(sql.SQL("COPY {} (id, embedding) FROM STDIN (FORMAT binary)").format(
            sql.Identifier(table))) as cp:
        cp.write(b"PGCOPY\n\xff\r\n\x00" + b"\x00\x00\x00\x00" + b"\x00\x00\x00\x00")
        for start in range(0, len(vecs), chunk):
            part = vecs[start:start + chunk]
            a = np.zeros(len(part), dtype=row)
            a["nf"], a["l1"], a["l2"], a["dim"] = 2, 8, 4 + 4 * DIM, DIM
            a["id"] = np.arange(start + 1, start + 1 + len(part))
            a["v"] = part
            cp.write(a.tobytes())
        cp.write(b"\xff\xff")


def setup(dsn: str, table: str, vecs: np.ndarray, opclass: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute(sql.SQL("CREATE TABLE {} (id bigint PRIMARY KEY, embedding vector({}))").format(
            sql.Identifier(table), sql.Literal(DIM)))
        copy_binary(c, table, vecs)
        c.execute("SET maintenance_work_mem = '1GB'")
        c.execute(sql.SQL("CREATE INDEX ON {} USING hnsw (embedding {}) WITH (m = 16, ef_construction = 64)")
                  .format(sql.Identifier(table), sql.Identifier(opclass)))
        c.execute(sql.SQL("VACUUM ANALYZE {}").format(sql.Identifier(table)))


def numpy_baseline(data_pre: np.ndarray, data_post: np.ndarray, gold: list, executions: list[tuple[int, str]]) -> float:
    """Exact top-k by brute force for the same (query, side) executions, plus ΔS of each top-k."""
    pre_unit = data_pre / np.linalg.norm(data_pre, axis=1, keepdims=True)
    t0 = time.perf_counter()
    for side in ("pre", "post"):
        idx = [q for q, s in executions if s == side]
        for start in range(0, len(idx), 256):
            qs = np.stack([gold[i].vector for i in idx[start:start + 256]])
            if side == "pre":  # cosine on raw vectors
                score = -(qs @ data_pre.T) / np.linalg.norm(data_pre, axis=1)[None, :]
            else:              # inner product on unit vectors
                score = -(qs / np.linalg.norm(qs, axis=1, keepdims=True)) @ data_post.T
            top = np.argpartition(score, K, axis=1)[:, :K]
            for row, i in zip(top, idx[start:start + 256]):
                retrieval.delta_s(pre_unit[row], gold[i].anchor)
    return time.perf_counter() - t0


def make_spec(gold_path: Path, target_table: str, normalize: bool, **retrieval_settings):
    return parse_spec({
        "name": "bench_shadow_reads", "source": {"conn_id": "bench_sr_source"},
        "target": {"conn_id": "bench_sr_target"}, "gold": str(gold_path),
        "tables": [{"name": "items", "key": ["id"], "target": {"name": target_table},
                    "columns": [{"name": "id", "type": "bigint"}, {"name": "embedding", "type": f"vector({DIM})"}],
                    "vector": [{"column": "embedding", "dim": DIM, "source_metric": "cosine", "metric": "ip",
                                "normalize": normalize,
                                "source_index": {"type": "hnsw", "ef_search": 100},
                                "index": {"type": "hnsw", "ef_search": 100}}]}],
        "retrieval": {"k": K, "seeds": [1, 2], **retrieval_settings},
    })


def timed(spec, run_id: str) -> tuple[dict, float]:
    t0 = time.perf_counter()
    m = retrieval.shadow_reads(spec, run_id)
    return m, time.perf_counter() - t0


def summary(m: dict) -> dict:
    return {"lambda_state": m["lambda_state"], "delta_s_diff": m["delta_s_diff"],
            "lambda_counts": {s: m[f"lambda_counts_seed_{s}"] for s in (1, 2)}, "lambda_noise": m["lambda_noise"],
            "recall_pre": m["recall_pre"], "recall_post": m["recall_post"], "recall_probes": m["recall_probes"],
            "noise_floor": m["noise_floor"]}


def main() -> None:
    uris = embedded.ensure_default(ROOT / ".pg")
    name = "bench_" + uuid.uuid4().hex[:8]
    servers = {"source": uris["dbguard_source"], "target": uris["dbguard_target"]}
    dsns = {}
    for side, uri in servers.items():
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        dsns[side] = embedded.with_dbname(uri, name)
        os.environ[f"AIRFLOW_CONN_BENCH_SR_{side.upper()}"] = dsns[side]
    try:
        unit = vectors(ROWS, 1)
        lengths = np.random.default_rng(3).uniform(0.8, 1.2, size=(ROWS, 1)).astype(np.float32)
        raw = unit * lengths
        t_setup = time.perf_counter()
        setup(dsns["source"], "items", raw, "vector_cosine_ops")
        setup(dsns["target"], "items", unit, "vector_ip_ops")        # normalised by the copy: correct
        setup(dsns["target"], "items_bad", raw, "vector_ip_ops")     # normalisation lost: wrong metric
        setup_s = time.perf_counter() - t_setup
        rng = np.random.default_rng(2)
        picks = rng.choice(ROWS, QUERIES, replace=False)
        qv = raw[picks] + 0.005 * rng.normal(size=(QUERIES, DIM)).astype(np.float32)  # |noise| ≈ 0.1 |q|
        with tempfile.TemporaryDirectory() as tmp:
            gold_path = Path(tmp) / "gold.jsonl"
            with gold_path.open("w") as f:
                for i, (q, p) in enumerate(zip(qv, picks)):
                    f.write(json.dumps({"id": f"q{i:04d}", "vector": np.round(q, 5).tolist(),
                                        "anchor": np.round(raw[p], 5).tolist(), "expected_ids": [int(p) + 1]}) + "\n")
            gold = retrieval.load_gold(gold_path, DIM)
            # Headline: recall probes for every query (exact search over both sides' 100k vectors).
            m, seconds = timed(make_spec(gold_path, "items", True, recall_queries=None), "bench")
            # The default: recall sampled on the first 100 queries, plus every disjoint query.
            _, seconds_default = timed(make_spec(gold_path, "items", True), "bench_default")
            bad, bad_seconds = timed(make_spec(gold_path, "items_bad", False, recall_queries=None), "bench_bad")
        # The same executions shadow_reads made: per query A/A (2 pre) + per seed (pre + post).
        executions = [(i, s) for i in range(QUERIES) for s in ("pre", "pre", "pre", "post", "pre", "post")]
        baseline_s = numpy_baseline(raw, unit, gold, executions)
        common = {"bench": "shadow_reads", "rows": ROWS, "dim": DIM, "queries": QUERIES,
                  "baseline": "numpy exact search", "baseline_seconds": round(baseline_s, 3)}
        print(json.dumps({
            **common, "variant": "correct", "seconds": round(seconds, 3),
            "speed_ratio": round(baseline_s / seconds, 3), "recall_queries": "all",
            "queries_per_second": round(QUERIES / seconds, 1),
            "seconds_default_recall_sample": round(seconds_default, 3),
            "speed_ratio_default_recall_sample": round(baseline_s / seconds_default, 3),
            "recall_probe": m["recall_probe"], **summary(m),
            "setup_seconds": round(setup_s, 1), "cpus": os.cpu_count(),
        }), flush=True)
        print(json.dumps({
            **common, "variant": "wrong_metric", "mistake": "normalisation lost: inner product on raw lengths",
            "seconds": round(bad_seconds, 3), "speed_ratio": round(baseline_s / bad_seconds, 3),
            "recall_queries": "all", **summary(bad),
        }), flush=True)
    finally:
        for side, uri in servers.items():
            if os.environ.get("DBGUARD_BENCH_KEEP"):  # debugging: keep the databases
                print(f"kept {name} on {side}", file=sys.stderr)
                continue
            with psycopg.connect(uri, autocommit=True) as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
