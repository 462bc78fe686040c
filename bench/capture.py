"""Benchmark `capture`: what change capture costs the application, and how fast the applier drains.

Line 1: the demo writer (tests/writer.py, one autocommit transaction per insert/update/delete) doing a fixed
number of operations with capture off (baseline) and on; speed_ratio = baseline_seconds / seconds
(goal >= 0.7). Lines 2-3: the applier draining the captured ledger into the target (goal >= 2,000 changes/s).
Runs on the embedded servers in two scratch databases, dropped at the end.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

import psycopg
from psycopg import sql

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from dbguard import capture, embedded  # noqa: E402
from dbguard.demo import load_shop  # noqa: E402
from dbguard.spec import load_spec  # noqa: E402

from test_capture import copy_tables, create_target  # noqa: E402
from writer import BackgroundWriter  # noqa: E402


class _Pair:
    def __init__(self, src_dsn, tgt_dsn):
        self.src_dsn, self.tgt_dsn = src_dsn, tgt_dsn

    def src(self, **kw):
        return psycopg.connect(self.src_dsn, **kw)

    def tgt(self, **kw):
        return psycopg.connect(self.tgt_dsn, **kw)


def _db(server: str, name: str, drop: bool = False) -> str:
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        if not drop:
            c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE template0 ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C'")
                      .format(sql.Identifier(name)))
    return embedded.with_dbname(server, name)


def main(ops: int = int(os.environ.get("BENCH_CAPTURE_OPS", "4000"))) -> None:
    uris = embedded.ensure_default(ROOT / ".pg")
    name = "bench_capture_" + uuid.uuid4().hex[:6]
    src, tgt = _db(uris["dbguard_source"], name), _db(uris["dbguard_target"], name)
    os.environ["AIRFLOW_CONN_DBGUARD_SOURCE"], os.environ["AIRFLOW_CONN_DBGUARD_TARGET"] = src, tgt
    try:
        load_shop(src, customers=20_000, orders=80_000)
        spec = load_spec(ROOT / "include/migrations/demo_shop.yaml")
        create_target(tgt, spec)
        pair = _Pair(src, tgt)
        sync_ops = max(ops // 4, 200)
        off = BackgroundWriter(src, seed=1, rate=None, max_ops=ops).start().wait()
        off_sync = BackgroundWriter(src, seed=3, rate=None, max_ops=sync_ops, synchronous_commit="on").start().wait()
        run_id = "bench-" + name
        capture.capture_on(spec, run_id)
        copy_tables(pair, spec)
        on = BackgroundWriter(src, seed=2, rate=None, max_ops=ops).start().wait()
        on_sync = BackgroundWriter(src, seed=4, rate=None, max_ops=sync_ops, synchronous_commit="on").start().wait()
        print(json.dumps({"bench": "capture", "rows": on["ops"], "seconds": on["seconds"], "baseline": off["ops"],
                          "baseline_seconds": off["seconds"],
                          "speed_ratio": round((off["seconds"] / off["ops"]) / (on["seconds"] / on["ops"]), 3),
                          "ops_per_second_on": on["ops_per_second"], "ops_per_second_off": off["ops_per_second"],
                          "writer": "synchronous_commit=off",
                          "speed_ratio_sync_commit_on": round(on_sync["ops_per_second"] / off_sync["ops_per_second"], 3),
                          "ops_per_second_sync_on": on_sync["ops_per_second"],
                          "ops_per_second_sync_off": off_sync["ops_per_second"]}))
        # The applier: first the writer's mixed backlog (short single-table runs), then a bulk update.
        mixed = capture.drain(spec, run_id)
        with psycopg.connect(src, autocommit=True) as c:
            c.execute("UPDATE shop.orders SET note = coalesce(note, '') || '.' WHERE id IN "
                      "(SELECT id FROM shop.orders ORDER BY id LIMIT 20000)")
        t0 = time.monotonic()
        res = capture.drain(spec, run_id)
        secs = time.monotonic() - t0
        capture.capture_off(spec, run_id)
        print(json.dumps({"bench": "capture_apply_mixed", "rows": mixed["applied"], "seconds": mixed["seconds"],
                          "rows_per_second": mixed["rows_per_second"], "goal_rows_per_second": 2000}))
        print(json.dumps({"bench": "capture_apply", "rows": res["applied"], "seconds": round(secs, 3),
                          "rows_per_second": round(res["applied"] / secs, 1), "batches": res["batches"],
                          "lag": res["lag"], "dual_write_fail": res["dual_write_fail"], "goal_rows_per_second": 2000}))
    finally:
        _db(uris["dbguard_source"], name, drop=True)
        _db(uris["dbguard_target"], name, drop=True)


if __name__ == "__main__":
    main()
