"""Benchmark `airflow_overhead`: what Airflow costs per task, and the range size that keeps it under 10 %.

Runs a real DAG (built by dags/ from a bench spec, `dag.test()`) over the 1,000,000-row wide bench table
(the `backfill` bench's) at several `batch_rows` and, per run,
joins Airflow's task instances (start/end in the metadata DB) with the library's own time per range (the
ledger's `ranges.seconds`, measured inside `copy_range`):

  task_overhead_ms = mean(copy_range task duration - library seconds for that range)
  gap_ms           = mean idle time between one task's end and the next task's start
  overhead_share   = (task_overhead + gap) x tasks / wall time of the run

One JSON line per batch size, then a summary line with the smallest batch size whose overhead share is
under 10 %. Under `dag.test()` tasks run one at a time in this process; under a scheduler (LocalExecutor,
Celery) each task also pays a process start, measured by `make celery` / the browser test's standalone run.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import drop_databases, fresh_databases  # noqa: E402

NAME = "bench_overhead"
BATCHES = [int(x) for x in os.environ.get("BENCH_OVERHEAD_BATCHES", "50000,100000,250000").split(",")]
ROWS = int(os.environ.get("BENCH_OVERHEAD_ROWS", "1000000"))


def _reset_target(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("DROP SCHEMA IF EXISTS bench CASCADE")
        c.execute("DROP SCHEMA IF EXISTS dbguard CASCADE")


def _spec_file() -> Path:
    """The wide bench table as a spec file the dags/ folder picks up (DBGUARD_SPECS)."""
    import tempfile

    import yaml

    from bench.__main__ import wide_spec

    raw = wide_spec(concurrency=2).model_dump(mode="json", by_alias=True, exclude_defaults=True)
    raw["name"] = "bench_overhead"
    path = Path(tempfile.mkdtemp(prefix="dbguard-overhead-")) / "bench_overhead.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _one_run(dag, batch_rows: int, tgt_dsn: str) -> dict:
    from airflow import settings
    from airflow.models.taskinstance import TaskInstance

    _reset_target(tgt_dsn)
    t0 = time.monotonic()
    dag_run = dag.test(run_conf={"batch_rows": batch_rows})
    wall = time.monotonic() - t0
    with settings.Session() as s:
        tis = s.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                           TaskInstance.run_id == dag_run.run_id).all()
        spans = sorted((ti.start_date, ti.end_date, ti.task_id, ti.map_index) for ti in tis
                       if ti.start_date and ti.end_date)
    with psycopg.connect(tgt_dsn) as c:
        lib = {(t, r): secs for t, r, secs in c.execute(
            "SELECT table_name, range_id, seconds FROM dbguard.ranges WHERE run_id = %s AND seconds IS NOT NULL",
            (dag_run.run_id,))}
        ok = c.execute("SELECT value FROM dbguard.metrics WHERE run_id = %s AND name = 'checksum_ok'",
                       (dag_run.run_id,)).fetchone()
    copies = [(end - start).total_seconds() for start, end, task, _ in spans if task.endswith(".copy_range")]
    overhead = statistics.mean(d - s for d, s in zip(sorted(copies), sorted(lib.values()))) if copies else 0.0
    gaps = [max(0.0, (b[0] - a[1]).total_seconds()) for a, b in zip(spans, spans[1:])]
    gap = statistics.mean(gaps) if gaps else 0.0
    share = (overhead + gap) * len(spans) / wall
    return {"bench": "airflow_overhead", "executor": "dag.test", "batch_rows": batch_rows,
            "ranges": len(copies), "tasks": len(spans), "wall_seconds": round(wall, 2),
            "task_overhead_ms": round(overhead * 1000, 1), "gap_ms": round(gap * 1000, 1),
            "overhead_share": round(share, 3), "checksum_ok": ok[0] if ok else None,
            "state": str(dag_run.state)}


def main() -> None:
    from dbguard import demo
    from dbguard.airflow import env

    env.airflow_defaults()
    env.ensure_metadata_db()
    os.environ["DBGUARD_SPECS"] = str(_spec_file())
    dsns = fresh_databases(NAME)
    try:
        rows = demo.load_wide(dsns["dbguard_source"], "bench.items", ROWS)
        from airflow.dag_processing.dagbag import DagBag

        dag = DagBag(str(env.DAGS_FOLDER)).dags["dbguard_bench_overhead"]
        results = []
        for b in BATCHES:
            out = {**_one_run(dag, b, dsns["dbguard_target"]), "rows": rows}
            results.append(out)
            print(json.dumps(out), flush=True)
        if os.environ.get("BENCH_OVERHEAD_LOCAL", "1") == "1":
            results += local_executor(BATCHES, Path(os.environ["DBGUARD_SPECS"]), dsns["dbguard_target"], rows)
        for executor in ("dag.test", "LocalExecutor"):
            mine = [r for r in results if r["executor"] == executor]
            fine = [r["batch_rows"] for r in mine if r["overhead_share"] < 0.10]
            if mine:
                print(json.dumps({"bench": "airflow_overhead_summary", "executor": executor,
                                  "smallest_batch_rows_under_10pct": min(fine) if fine else None,
                                  "task_overhead_ms_median": statistics.median(r["task_overhead_ms"] for r in mine)}),
                      flush=True)
    finally:
        drop_databases(NAME)



# ---- under a real scheduler: airflow standalone (LocalExecutor) --------------------------------------

def local_executor(batches: list[int], spec_path: Path, tgt_dsn: str, rows: int) -> list[dict]:
    """The same DAG under what `airflow standalone` runs (scheduler + LocalExecutor + api-server +
    dag-processor + triggerer, SQLite) in a throwaway AIRFLOW_HOME on a free localhost port
    (dbguard.airflow.stack), triggered through the REST API; every process stopped after."""
    import sqlite3

    from dbguard.airflow.stack import Stack

    with Stack(extra_env={"DBGUARD_SPECS": str(spec_path)}) as stack:
        stack.airflow("db", "migrate")
        stack.airflow("pools", "set", "dbguard_bench_overhead", "2", "bench")
        stack.start_services()
        stack.wait_healthy(timeout=180)
        stack.wait_dag("dbguard_bench_overhead", timeout=180)  # and unpause it
        db_path = stack.home / "airflow.db"
        out = []
        for b in batches:
            _reset_target(tgt_dsn)
            run_id = stack.trigger("dbguard_bench_overhead", conf={"batch_rows": b},
                                   run_id=f"overhead_{b}_{int(time.time())}")
            state = stack.wait_run("dbguard_bench_overhead", run_id, timeout=900)
            with sqlite3.connect(db_path) as c:
                spans = c.execute(
                    "SELECT task_id, julianday(start_date), julianday(end_date), julianday(queued_dttm) "
                    "FROM task_instance WHERE run_id = ? AND start_date IS NOT NULL AND end_date IS NOT NULL",
                    (run_id,)).fetchall()
                start, end = c.execute("SELECT julianday(start_date), julianday(end_date) FROM dag_run "
                                       "WHERE run_id = ?", (run_id,)).fetchone()
            day = 86400.0
            with psycopg.connect(tgt_dsn) as c:
                lib = [r[0] for r in c.execute("SELECT seconds FROM dbguard.ranges WHERE run_id = %s "
                                               "AND seconds IS NOT NULL", (run_id,))]
            copies = sorted((e - s) * day for t, s, e, _ in spans if t.endswith(".copy_range"))
            overhead = statistics.mean(d - s for d, s in zip(copies, sorted(lib))) if copies else 0.0
            latency = statistics.mean((s - q) * day for _, s, _, q in spans if q) if spans else 0.0
            wall = (end - start) * day
            row = {"bench": "airflow_overhead", "executor": "LocalExecutor", "batch_rows": b, "rows": rows,
                   "ranges": len(copies), "tasks": len(spans), "wall_seconds": round(wall, 2),
                   "task_overhead_ms": round(overhead * 1000, 1), "queue_latency_ms": round(latency * 1000, 1),
                   "overhead_share": round((overhead + latency) * len(spans) / (wall * 2), 3),
                   "state": state}
            print(json.dumps(row), flush=True)
            out.append(row)
    return out


if __name__ == "__main__":
    main()
