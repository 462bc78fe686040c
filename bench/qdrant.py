"""Benchmark: pgvector -> Qdrant local mode (in memory), 100,000 x 384 float32 vectors with payload.

The source table (id bigint, title text, score double precision, embedding vector(384)) is on the
embedded source server. Three copies of the same rows into fresh collections of one in-memory
qdrant-client (Cosine, title and score as payload), each reading the source the same way (one
server-side cursor, key order, `batch` rows at a time):

- `baseline`: qdrant-client's own bulk upload, `upload_points` of PointStructs (batch_size = batch);
- `unverified`: dbguard's copy without the per-batch verify (`qdrant_copy.copy(verify=False)`);
- `verified`: dbguard's copy as the migration runs it: every batch upserted with wait=True, read back
  by id, count + checksum compared on both sides (`qdrant_copy.copy`).

Then a reconcile pass over the verified collection (timed apart). One JSON line: points_per_s (of the
verified copy), verify_overhead (verified / unverified seconds), speed_ratio (baseline / verified
seconds; the goal is >= 0.8), reconcile_seconds, checksum_ok. The persistent local mode (SQLite)
is far slower (~300 points/s) and not measured here. Smaller runs: DBGUARD_BENCH_QDRANT_ROWS.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "include"))

from dbguard.spec import parse_spec  # noqa: E402
from dbguard.stores import qdrant, qdrant_copy  # noqa: E402

from bench.common import drop_databases, fresh_databases  # noqa: E402
from bench.shadow_reads import copy_binary, vectors  # noqa: E402

ROWS = int(os.environ.get("DBGUARD_BENCH_QDRANT_ROWS", 100_000))
DIM, BATCH = 384, 1000


def spec():
    return parse_spec({
        "name": "bench_qdrant", "source": {"conn_id": "dbguard_source"}, "target": {"conn_id": "dbguard_target"},
        "tables": [{"name": "items", "schema": "public", "key": ["id"],
                    "columns": [{"name": "id", "type": "bigint", "nullable": False},
                                {"name": "title", "type": "text"}, {"name": "score", "type": "double precision"},
                                {"name": "embedding", "type": f"vector({DIM})"}],
                    "vector": [{"column": "embedding", "dim": DIM, "source_metric": "cosine", "metric": "cosine",
                                "qdrant": {"collection": "bench", "payload": ["title", "score"],
                                           "batch_points": BATCH}}]}],
        "gold": "unused.jsonl", "backfill": {"batch_rows": BATCH}})


def load(dsn: str, rows: int) -> None:
    raw = vectors(rows, 1) * np.random.default_rng(2).uniform(0.8, 1.2, size=(rows, 1)).astype(np.float32)
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute(f"CREATE TABLE items (id bigint PRIMARY KEY, embedding vector({DIM}), "
                  "title text GENERATED ALWAYS AS ('item ' || id) STORED, "
                  "score double precision GENERATED ALWAYS AS ((id % 1000) / 10.0) STORED)")
        copy_binary(c, "items", raw)
        c.execute("ANALYZE items")


def baseline(sp, src, c, name: str) -> float:
    from qdrant_client import models as m

    t, v = sp.tables[0], sp.tables[0].vector[0]
    qdrant.create_collection(c, name, v)
    source = qdrant_copy.Source(src, t, v)
    t0 = time.perf_counter()
    points = (m.PointStruct(id=int(p.id), vector=p.vector.tolist(), payload=p.payload)
              for batch in source.batches(BATCH) for p in batch)
    c.upload_points(name, points=points, batch_size=BATCH, wait=True)
    return time.perf_counter() - t0


def main() -> None:
    os.environ["AIRFLOW_CONN_QDRANT_DEFAULT"] = "qdrant://?location=%3Amemory%3A"
    dsns = fresh_databases("bench_qdrant")
    try:
        t0 = time.perf_counter()
        load(dsns["dbguard_source"], ROWS)
        load_s = time.perf_counter() - t0
        sp = spec()
        t, v = sp.tables[0], sp.tables[0].vector[0]
        c = qdrant.client("qdrant_default")
        with psycopg.connect(dsns["dbguard_source"]) as src:
            base_s = baseline(sp, src, c, "bench_baseline")
            c.delete_collection("bench_baseline")
            qdrant.create_collection(c, "bench_unverified", v)
            raw = qdrant_copy.copy(sp, t, v, src, c, "bench_unverified", verify=False)
            c.delete_collection("bench_unverified")
            qdrant.create_collection(c, "bench", v)
            ver = qdrant_copy.copy(sp, t, v, src, c, "bench")
            t1 = time.perf_counter()
            rc = qdrant_copy.reconcile(sp, t, v, src, c, "bench", ver["ranges"])
            rec_s = time.perf_counter() - t1
        print(json.dumps({
            "bench": "qdrant", "rows": ROWS, "dim": DIM, "batch": BATCH, "mode": "local :memory:",
            "seconds": round(ver["seconds"], 3), "points_per_s": round(ROWS / ver["seconds"], 1),
            "verify_seconds": round(ver["verify_seconds"], 3),
            "unverified_seconds": round(raw["seconds"], 3),
            "verify_overhead": round(ver["seconds"] / raw["seconds"], 3),
            "baseline": "qdrant-client upload_points (same rows, same source read)", "baseline_seconds": round(base_s, 3),
            "speed_ratio": round(base_s / ver["seconds"], 3), "reconcile_seconds": round(rec_s, 3),
            "checksum_ok": rc["checksum_ok"] and not ver["mismatched_batches"], "points": rc["points"],
            "load_seconds": round(load_s, 3)}), flush=True)
    finally:
        qdrant.close_all()
        drop_databases("bench_qdrant")


if __name__ == "__main__":
    main()
