"""Benchmark: pgvector -> Qdrant local mode (in memory), 100,000 x 384 float32 vectors with payload.

The source table (id bigint, title text, score double precision, embedding vector(384)) is on the
embedded source server. Copies of the same rows into fresh collections of one in-memory
qdrant-client (Cosine, title and score as payload), each reading the source the same way (one
server-side cursor, key order, `batch` rows at a time):

- `baseline`: qdrant-client's own bulk upload, `upload_points` of PointStructs (batch_size = batch);
- `unverified`: dbguard's copy without the per-batch verify (`qdrant_copy.copy(verify=False)`);
- `verified`: dbguard's copy as the migration runs it: every batch upserted with wait=True, read back
  by id, count + checksum compared on both sides (`qdrant_copy.copy`), backfill.concurrency batches
  in flight while the next is read.

Each variant runs twice, interleaved in mirrored order (baseline, unverified, verified, verified,
unverified, baseline) so a machine load that changes during the run weighs on all alike. Then a
reconcile pass over a verified collection (timed apart). One JSON line: points_per_s (of the
verified copy), verify_overhead (verified / unverified seconds), speed_ratio (baseline / verified
seconds; the goal is >= 0.8), the same ratio of process CPU seconds (less sensitive to other
processes' load; the PostgreSQL server's CPU is not in it, for either side), reconcile_seconds,
checksum_ok, the load average before and after each run. The persistent local mode (SQLite) is far
slower (~300 points/s) and not measured here. Smaller runs: DBGUARD_BENCH_QDRANT_ROWS.
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


def baseline(sp, src, c, name: str) -> tuple[float, float]:
    """qdrant-client's own bulk upload of the same rows, read the same way: (wall, CPU) seconds."""
    from qdrant_client import models as m

    t, v = sp.tables[0], sp.tables[0].vector[0]
    qdrant.create_collection(c, name, v)
    source = qdrant_copy.Source(src, t, v)
    t0, p0 = time.perf_counter(), time.process_time()
    points = (m.PointStruct(id=int(p.id), vector=p.vector.tolist(), payload=p.payload)
              for batch in source.batches(BATCH) for p in batch)
    c.upload_points(name, points=points, batch_size=BATCH, wait=True)
    return time.perf_counter() - t0, time.process_time() - p0


def ours(sp, src, c, name: str, verify: bool) -> tuple[float, float, dict]:
    t, v = sp.tables[0], sp.tables[0].vector[0]
    qdrant.create_collection(c, name, v)
    t0, p0 = time.perf_counter(), time.process_time()
    out = qdrant_copy.copy(sp, t, v, src, c, name, verify=verify)
    return time.perf_counter() - t0, time.process_time() - p0, out


# Each variant runs twice, in mirrored order, so a load that rises or falls during the run weighs on
# all three alike; each variant's time is the sum of its two runs.
ORDER = ["baseline", "unverified", "verified", "verified", "unverified", "baseline"]
KEEP = 3


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
        wall = {k: 0.0 for k in ORDER}
        cpu = dict(wall)
        load_avg = [os.getloadavg()[0]]
        with psycopg.connect(dsns["dbguard_source"]) as src:
            for i, kind in enumerate(ORDER):
                name = f"bench_{kind}_{i}"
                if kind == "baseline":
                    w, p = baseline(sp, src, c, name)
                else:
                    w, p, out = ours(sp, src, c, name, verify=kind == "verified")
                    if kind == "verified":
                        ver = out
                wall[kind] += w
                cpu[kind] += p
                load_avg.append(os.getloadavg()[0])
                if i != KEEP:
                    c.delete_collection(name)
            t1 = time.perf_counter()  # reconcile the last verified copy (timed apart)
            rc = qdrant_copy.reconcile(sp, t, v, src, c, f"bench_verified_{KEEP}", ver["ranges"])
            rec_s = time.perf_counter() - t1
        print(json.dumps({
            "bench": "qdrant", "rows": ROWS, "dim": DIM, "batch": BATCH, "mode": "local :memory:",
            "concurrency": ver["concurrency"], "runs_per_variant": 2, "order": ORDER,
            "seconds": round(wall["verified"] / 2, 3), "points_per_s": round(2 * ROWS / wall["verified"], 1),
            "unverified_seconds": round(wall["unverified"] / 2, 3),
            "verify_overhead": round(wall["verified"] / wall["unverified"], 3),
            "baseline": "qdrant-client upload_points (same rows, same source read)",
            "baseline_seconds": round(wall["baseline"] / 2, 3),
            "speed_ratio": round(wall["baseline"] / wall["verified"], 3),
            "cpu_seconds": {k: round(x / 2, 3) for k, x in cpu.items()},
            "cpu_speed_ratio": round(cpu["baseline"] / cpu["verified"], 3),
            "reconcile_seconds": round(rec_s, 3),
            "checksum_ok": rc["checksum_ok"] and not ver["mismatched_batches"], "points": rc["points"],
            "retries": ver["retries"], "load_seconds": round(load_s, 3),
            "load_average": [round(x, 2) for x in load_avg]}), flush=True)
    finally:
        qdrant.close_all()
        drop_databases("bench_qdrant")


if __name__ == "__main__":
    main()
