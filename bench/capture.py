"""Benchmark `capture`: what change capture costs the application, and how fast the applier drains.

Line 1: the demo writer (dbguard.writer.shop_writer, one autocommit transaction per insert/update/delete) doing a fixed
number of operations with capture off (baseline) and on, alternating in short rounds; speed_ratio =
baseline time per op / time per op with capture (goal >= 0.7). Lines 2-3: the applier draining the captured ledger into the target (goal >= 2,000 changes/s).
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import drop_databases, fresh_databases  # noqa: E402
from dbguard import capture, stages  # noqa: E402
from dbguard.demo import load_shop  # noqa: E402
from dbguard.spec import load_spec  # noqa: E402
from dbguard.writer import shop_writer  # noqa: E402  (the application that writes)


ROUNDS = 3


def _total(runs: list[dict]) -> dict:
    ops, secs = sum(r["ops"] for r in runs), sum(r["seconds"] for r in runs)
    return {"ops": ops, "seconds": round(secs, 3), "ops_per_second": round(ops / secs, 1)}


def main(ops: int = int(os.environ.get("BENCH_CAPTURE_OPS", "4000"))) -> None:
    name = "bench_capture_" + uuid.uuid4().hex[:6]
    dsns = fresh_databases(name)
    src = dsns["dbguard_source"]
    try:
        load_shop(src, customers=20_000, orders=80_000)
        spec = load_spec(ROOT / "include/migrations/demo_shop.yaml")
        run_id = "bench-" + name
        stages.preflight(spec, run_id)
        sync_ops = max(ops // 4, 200)
        stages.capture_on(spec, run_id)
        for t in spec.table_order():  # the real backfill
            for r in stages.plan_ranges(spec, run_id, t.name):
                stages.copy_range(spec, run_id, r)
        # Off and on alternate in ROUNDS short runs each, so load from other work on a shared machine hits
        # both sides alike (one long run each made the ratio swing 0.67..1.23 on a busy machine).
        runs: dict[str, list[dict]] = {"off": [], "on": [], "off_sync": [], "on_sync": []}
        for rnd in range(ROUNDS):
            for side in ("off", "on"):
                if side == "off":
                    capture.capture_off(spec, run_id)
                else:
                    capture.capture_on(spec, run_id)
                seed = 10 * rnd + (1 if side == "off" else 2)
                runs[side].append(shop_writer(src, seed=seed, rate=None, max_ops=ops // ROUNDS).start().wait())
                runs[side + "_sync"].append(shop_writer(src, seed=seed + 4, rate=None, max_ops=sync_ops // ROUNDS,
                                                        synchronous_commit="on").start().wait())
        off, on, off_sync, on_sync = (_total(runs[k]) for k in ("off", "on", "off_sync", "on_sync"))
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
        stages.release(spec, run_id)
        print(json.dumps({"bench": "capture_apply_mixed", "rows": mixed["applied"], "seconds": mixed["seconds"],
                          "rows_per_second": mixed["rows_per_second"], "goal_rows_per_second": 2000}))
        print(json.dumps({"bench": "capture_apply", "rows": res["applied"], "seconds": round(secs, 3),
                          "rows_per_second": round(res["applied"] / secs, 1), "batches": res["batches"],
                          "lag": res["lag"], "dual_write_fail": res["dual_write_fail"], "goal_rows_per_second": 2000}))
    finally:
        drop_databases(name)


if __name__ == "__main__":
    main()
