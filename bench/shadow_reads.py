"""Benchmark: shadow reads of 1,000 gold queries against 100,000 x 384 vectors on both sides.

Source: unit vectors, HNSW with vector_l2_ops; target: the same vectors, HNSW with
vector_cosine_ops (an L2 -> cosine migration that must keep its meaning). In 384
dimensions neighbour distances concentrate, so even ±2 % length noise reorders the
top-k between L2 and cosine: the bench uses unit vectors to time a migration that passes. The
timed part is `retrieval.shadow_reads` (A/A + two seeds, both sides, exact search for
the first 100 queries, ΔS/λ, ledger writes). The baseline is exact numpy search of the
same query executions (brute-force matmul top-k + the same ΔS math) in this process.
Prints one JSON line: {"bench": "shadow_reads", "rows", "seconds", "baseline",
"baseline_seconds", "speed_ratio", "queries_per_second", ...}.
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

ROWS, DIM, QUERIES, K = 100_000, 384, 1_000, 10


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


def setup(dsn: str, vecs: np.ndarray, opclass: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute(sql.SQL("CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({}))").format(sql.Literal(DIM)))
        copy_binary(c, "items", vecs)
        c.execute("SET maintenance_work_mem = '1GB'")
        c.execute(sql.SQL("CREATE INDEX ON items USING hnsw (embedding {}) WITH (m = 16, ef_construction = 64)")
                  .format(sql.Identifier(opclass)))
        c.execute("VACUUM ANALYZE items")


def numpy_baseline(data_pre: np.ndarray, data_post: np.ndarray, gold: list, executions: list[tuple[int, str]]) -> float:
    """Exact top-k by brute force for the same (query, side) executions, plus ΔS of each top-k."""
    pre_unit = data_pre / np.linalg.norm(data_pre, axis=1, keepdims=True)
    sq = (data_pre ** 2).sum(1)
    t0 = time.perf_counter()
    for side in ("pre", "post"):
        idx = [q for q, s in executions if s == side]
        for start in range(0, len(idx), 256):
            qs = np.stack([gold[i].vector for i in idx[start:start + 256]])
            if side == "pre":  # l2 on raw vectors
                score = sq[None, :] - 2 * qs @ data_pre.T
            else:              # cosine on unit vectors
                score = -(qs / np.linalg.norm(qs, axis=1, keepdims=True)) @ data_post.T
            top = np.argpartition(score, K, axis=1)[:, :K]
            for row, i in zip(top, idx[start:start + 256]):
                retrieval.delta_s(pre_unit[row], gold[i].anchor)
    return time.perf_counter() - t0


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
        raw = vectors(ROWS, 1)
        unit = raw / np.linalg.norm(raw, axis=1, keepdims=True)
        t_setup = time.perf_counter()
        setup(dsns["source"], raw, "vector_l2_ops")
        setup(dsns["target"], unit, "vector_cosine_ops")
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
            spec = parse_spec({
                "name": "bench_shadow_reads", "source": {"conn_id": "bench_sr_source"},
                "target": {"conn_id": "bench_sr_target"}, "gold": str(gold_path),
                "tables": [{"name": "items", "key": ["id"],
                            "columns": [{"name": "id", "type": "bigint"}, {"name": "embedding", "type": f"vector({DIM})"}],
                            "vector": [{"column": "embedding", "dim": DIM, "source_metric": "l2", "metric": "cosine",
                                        "source_normalized": True,
                                        "source_index": {"type": "hnsw", "ef_search": 100},
                                        "index": {"type": "hnsw", "ef_search": 100}}]}],
                "retrieval": {"k": K, "seeds": [1, 2]},
            })
            gold = retrieval.load_gold(gold_path, DIM)
            t0 = time.perf_counter()
            m = retrieval.shadow_reads(spec, "bench")
            seconds = time.perf_counter() - t0
            # The same without the exact-search recall probes (seq scans of 100k vectors, per side).
            no_recall = spec.model_copy(update={"retrieval": spec.retrieval.model_copy(update={"recall_queries": 0})})
            t0 = time.perf_counter()
            retrieval.shadow_reads(no_recall, "bench_no_recall")
            seconds_no_recall = time.perf_counter() - t0
        # The same executions shadow_reads made: per query A/A (2 pre) + per seed (pre + post).
        executions = [(i, s) for i in range(QUERIES) for s in ("pre", "pre", "pre", "post", "pre", "post")]
        baseline_s = numpy_baseline(raw, unit, gold, executions)
        n_exec = len(executions)
        print(json.dumps({
            "bench": "shadow_reads", "rows": ROWS, "dim": DIM, "queries": QUERIES,
            "seconds": round(seconds, 3), "baseline": "numpy exact search", "baseline_seconds": round(baseline_s, 3),
            "speed_ratio": round(baseline_s / seconds, 3),
            "queries_per_second": round(QUERIES / seconds, 1),
            "query_executions_per_second": round(n_exec / seconds, 1),
            "seconds_without_recall": round(seconds_no_recall, 3),
            "speed_ratio_without_recall": round(baseline_s / seconds_no_recall, 3),
            "recall_queries": spec.retrieval.recall_queries,
            "delta_s_diff": m["delta_s_diff"], "lambda_state": m["lambda_state"],
            "lambda_counts": {s: m[f"lambda_counts_seed_{s}"] for s in (1, 2)}, "recall_pre": m["recall_pre"], "recall_post": m["recall_post"],
            "setup_seconds": round(setup_s, 1), "cpus": os.cpu_count(),
        }))
    finally:
        for side, uri in servers.items():
            if os.environ.get("DBGUARD_BENCH_KEEP"):  # debugging: keep the databases
                print(f"kept {name} on {side}", file=sys.stderr)
                continue
            with psycopg.connect(uri, autocommit=True) as c:
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


if __name__ == "__main__":
    main()
