"""`make bench`: every benchmark prints one JSON line with a baseline measured in the same run.

    python -m bench [backfill reconcile capture shadow_reads] [--rows N]

Not part of the tests' pass/fail. Uses the embedded servers (source and
target are separate server instances) in fresh databases named bench_*.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor

import psycopg

warnings.filterwarnings("ignore")

from dbguard.spec import parse_spec  # noqa: E402

from bench.common import fresh_databases  # noqa: E402

WIDE_COLUMNS = [{"name": "id", "type": "bigint"}, {"name": "title", "type": "text"}, {"name": "body", "type": "text"},
                {"name": "vec", "type": "real[]"}, {"name": "created_at", "type": "timestamptz"}]


def peak_rss_mb() -> dict:
    """Peak resident memory of this process and of the largest worker process, in MB."""
    mb = lambda who: round(resource.getrusage(who).ru_maxrss / 1024, 1)  # noqa: E731
    return {"peak_rss_mb": mb(resource.RUSAGE_SELF), "peak_worker_rss_mb": mb(resource.RUSAGE_CHILDREN)}


def line(bench: str, rows: int, seconds: float, baseline: str, baseline_seconds: float, **extra) -> dict:
    out = {"bench": bench, "rows": rows, "seconds": round(seconds, 3), "baseline": baseline,
           "baseline_seconds": round(baseline_seconds, 3), "speed_ratio": round(baseline_seconds / seconds, 3),
           **extra}
    print(json.dumps(out), flush=True)
    return out


def wide_spec(concurrency: int = 2, batch_rows: int = 250_000, verify: str = "stream"):
    return parse_spec({"name": "bench", "source": {"conn_id": "dbguard_source"},
                       "target": {"conn_id": "dbguard_target"}, "schema_freeze": False,
                       "tables": [{"name": "items", "schema": "bench", "key": ["id"], "columns": WIDE_COLUMNS}],
                       "backfill": {"batch_rows": batch_rows, "concurrency": concurrency, "verify": verify}})


def truncate_target(dsn: str, *checkpoint: str) -> None:
    """Empty the target; then CHECKPOINT `checkpoint` servers, so a timed run does not pay for flushing the
    previous run's pages (which one pays for that depended on the order, not on the tool)."""
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("TRUNCATE bench.items")
        c.execute("DELETE FROM dbguard.ranges")
    for d in checkpoint:
        with psycopg.connect(d, autocommit=True) as c:
            c.execute("CHECKPOINT")


def raw_pipe(src: str, tgt: str) -> float:
    """Baseline: COPY (FORMAT binary) TO STDOUT | COPY FROM STDIN, psql to psql."""
    t0 = time.monotonic()
    if shutil.which("psql"):
        out = subprocess.Popen(["psql", "-X", "-q", "-d", src, "-c",
                                "COPY bench.items TO STDOUT (FORMAT binary)"], stdout=subprocess.PIPE)
        subprocess.run(["psql", "-X", "-q", "-d", tgt, "-c", "COPY bench.items FROM STDIN (FORMAT binary)"],
                       stdin=out.stdout, check=True, stdout=subprocess.DEVNULL)
        out.wait()
    else:  # same pipe through psycopg
        with psycopg.connect(src) as s, psycopg.connect(tgt) as t:
            with s.cursor().copy("COPY bench.items TO STDOUT (FORMAT binary)") as o, \
                    t.cursor().copy("COPY bench.items FROM STDIN (FORMAT binary)") as i:
                for chunk in o:
                    i.write(chunk)
    return time.monotonic() - t0


def _copy_one(args: tuple) -> dict:
    from dbguard import stages
    raw, run_id, krange = args
    return stages.copy_range(parse_spec(raw), run_id, krange)


def run_backfill(spec, run_id: str) -> float:
    """Plan, then copy+verify every range with `concurrency` worker processes, as Airflow's pool would."""
    from dbguard import stages
    t0 = time.monotonic()
    ranges = stages.plan_ranges(spec, run_id, "items")
    raw = spec.model_dump(mode="json", by_alias=True)
    with ProcessPoolExecutor(spec.backfill.concurrency) as pool:
        results = list(pool.map(_copy_one, [(raw, run_id, r) for r in ranges]))
    assert all(r["ok"] for r in results), "a range did not verify"
    assert all(r["proof"] == spec.backfill.verify for r in results), "not the per-range proof asked for"
    return time.monotonic() - t0


def bench_backfill(rows: int) -> None:
    """Best of 3, interleaved, each from a checkpoint: the verified copy (per-range stream proof), the same copy
    proven by the SQL checksum on both servers (before issue 16), and the raw pipe; with the CPU-seconds per
    1M rows each server and the relay spent (mean of the 3), as wall time on a shared machine is noisy."""
    from bench.cpu import Meter, load
    from dbguard import demo, stages
    dsns = fresh_databases("bench_backfill")
    demo.load_wide(dsns["dbguard_source"], "bench.items", rows)
    spec, sql_spec = wide_spec(), wide_spec(verify="checksum")
    stages.preflight(spec, "bench")
    with psycopg.connect(dsns["dbguard_source"], autocommit=True) as c:
        c.execute("VACUUM bench.items")  # hint bits set now: the first timed read would pay for them
        mb = c.execute("SELECT pg_total_relation_size('bench.items') / 1e6").fetchone()[0]
    servers = dsns["dbguard_source"], dsns["dbguard_target"]
    meter, loads = Meter(*servers), [load()]
    runs: dict[str, list[float]] = {"stream": [], "checksum": [], "pipe": []}
    cpu: dict[str, list[dict]] = {k: [] for k in runs}
    for i in range(3):
        for kind in [*runs][i:] + [*runs][:i]:  # each goes first once
            truncate_target(dsns["dbguard_target"], *servers)
            with meter:
                runs[kind].append(raw_pipe(*servers) if kind == "pipe" else
                                  run_backfill(spec if kind == "stream" else sql_spec, f"bench{kind}{i}"))
            cpu[kind].append(meter.last)
        loads.append(load())
    per_m = {k: {side: round(sum(c[side] for c in v) / len(v) * 1e6 / rows, 2) for side in ("source", "target", "relay")}
             for k, v in cpu.items()}
    line("backfill", rows, min(runs["stream"]), "raw COPY binary pipe (psql | psql)", min(runs["pipe"]),
         source_mb=round(float(mb)), concurrency=spec.backfill.concurrency, verified_per_range=True,
         proof="stream", runs=[round(x, 2) for x in runs["stream"]],
         baseline_runs=[round(x, 2) for x in runs["pipe"]],
         sql_checksum_proof={"seconds": round(min(runs["checksum"]), 3),
                             "speed_ratio": round(min(runs["pipe"]) / min(runs["checksum"]), 3),
                             "runs": [round(x, 2) for x in runs["checksum"]]},
         cpu_s_per_1m_rows={"stream_proof": per_m["stream"], "sql_checksum_proof": per_m["checksum"],
                            "pipe": per_m["pipe"]},
         machine=loads, **peak_rss_mb())


def bench_reconcile(rows: int) -> None:
    from dbguard import demo, stages
    from dbguard.reconcile import reconcile_table
    dsns = fresh_databases("bench_reconcile")
    demo.load_wide(dsns["dbguard_source"], "bench.items", rows)
    spec = wide_spec()
    stages.preflight(spec, "bench")
    raw_pipe(dsns["dbguard_source"], dsns["dbguard_target"])
    q = "SELECT count(*), sum(('x' || left(md5(t::text), 16))::bit(64)::bigint) FROM bench.items t"

    def md5_scan(dsn):
        with psycopg.connect(dsn) as c:
            return c.execute(q).fetchone()

    def baseline() -> float:
        t0 = time.monotonic()
        with ThreadPoolExecutor(2) as pool:
            a, b = pool.map(md5_scan, [dsns["dbguard_source"], dsns["dbguard_target"]])
        assert a == b
        return time.monotonic() - t0

    def ours() -> float:
        t0 = time.monotonic()
        out = reconcile_table(spec, "bench", spec.tables[0])
        assert out["equal"] and out["source"]["count"] == rows
        return time.monotonic() - t0

    b1, o1, b2, o2 = baseline(), ours(), baseline(), ours()
    peer = reladiff_seconds(dsns, rows)
    line("reconcile", rows, min(o1, o2), "md5(t::text) scan of source and target at once", min(b1, b2),
         peer=peer and {"tool": "reladiff 0.6.0 (hashdiff, all columns, 2 threads)", "seconds": peer,
                        "times_faster": round(peer / min(o1, o2), 2)}, **peak_rss_mb())


def reladiff_seconds(dsns: dict[str, str], rows: int) -> float | None:
    """The peer tool on the same identical tables: reladiff's hashdiff (segment checksums on both servers,
    bisecting where they differ), every column compared, best of 2. None when reladiff is not installed
    (`make bench` installs bench/requirements.txt)."""
    try:
        import logging
        import reladiff
    except ModuleNotFoundError:
        return None

    def table(dsn: str):
        info = psycopg.conninfo.conninfo_to_dict(dsn)
        return reladiff.connect_to_table(
            {"driver": "postgresql", **{k: info[k] for k in ("host", "port", "user", "password") if info.get(k)},
             "dbname": info["dbname"]}, ("bench", "items"), "id", thread_count=2)

    cols = tuple(c["name"] for c in WIDE_COLUMNS if c["name"] != "id")
    best = None
    logging.disable(logging.WARNING)  # "no compatibility handling" for each text and array column, each run
    for _ in range(2):
        t0 = time.monotonic()
        a, b = (table(dsns[k]).new(extra_columns=cols) for k in ("dbguard_source", "dbguard_target"))
        diff = list(reladiff.diff_tables(a, b, max_threadpool_size=2))
        took = time.monotonic() - t0
        assert not diff, f"reladiff found {len(diff)} differences in identical tables"
        best = took if best is None else min(best, took)
    logging.disable(logging.NOTSET)
    return round(best, 3)


BENCHES = {"backfill": bench_backfill, "reconcile": bench_reconcile}
EXTERNAL = {"capture": "bench.capture", "shadow_reads": "bench.shadow_reads",
            "airflow_overhead": "bench.airflow_overhead", "scale": "bench.scale",
            "cutover": "bench.cutover", "qdrant": "bench.qdrant", "gate_reuse": "bench.gate_reuse"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench")
    ap.add_argument("names", nargs="*", default=[*BENCHES, *EXTERNAL])
    ap.add_argument("--rows", type=int, default=int(os.environ.get("DBGUARD_BENCH_ROWS", 1_000_000)))
    args = ap.parse_args(argv)
    for name in args.names:
        if name in BENCHES:
            BENCHES[name](args.rows)
        elif name in EXTERNAL:
            try:
                mod = importlib.import_module(EXTERNAL[name])
            except ModuleNotFoundError:
                print(json.dumps({"bench": name, "error": "not built yet"}), flush=True)
                continue
            mod.main()
        else:
            ap.error(f"unknown bench {name!r}; choose from {[*BENCHES, *EXTERNAL]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
