"""Benchmark `cutover`: a 1,000,000-row shop.orders, a writer at ~200 ops/s following the control_table
pointer, then the cutover. One JSON line:
{"bench": "cutover", "rows", "cutover_ms", "writer_ops_per_s", "writer_max_stall_ms", "lost"}
(lost = the writer's rows whose last committed state is not on the new primary, plus rows differing between
the two sides once reverse capture has drained). Goal cutover_ms < 2000 (moonshot < 1000), lost 0.
Runs on the embedded servers in two scratch databases, dropped at the end.
"""
from __future__ import annotations

import json
import os
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import drop_databases, fresh_databases  # noqa: E402
from dbguard import capture, db, cutover  # noqa: E402
from dbguard.cutover import pointer  # noqa: E402
from dbguard.round_trip import differing_rows, migrate, pointer_writer, side_dsn  # noqa: E402
from dbguard.demo import load_shop  # noqa: E402
from dbguard.spec import load_spec  # noqa: E402


def main(rows: int = int(os.environ.get("BENCH_CUTOVER_ROWS", "1000000"))) -> None:
    name = "bench_cutover_" + uuid.uuid4().hex[:6]
    dsns = fresh_databases(name)
    try:
        load_shop(dsns["dbguard_source"], customers=max(100, rows // 50), orders=rows)
        spec = load_spec(ROOT / "include/migrations/demo_shop.yaml")
        with db.source(spec) as src:
            pointer.prepare(src, spec)
            src.commit()
        run = "bench_cutover"
        w = pointer_writer(spec, rate=200).start()
        migrate(spec, run)
        time.sleep(2)
        out = cutover.cutover(spec, run)
        time.sleep(2)
        ws = w.stop()
        capture.drain(spec, run, direction="reverse")
        mine = w.check(side_dsn(spec, "target"))  # the writer's last committed state of its rows
        lost = mine["lost"] + mine["resurrected"] + len(differing_rows(spec))
        total = sum(v["count"] for v in out["verify"].values())
        print(json.dumps({"bench": "cutover", "rows": total, "cutover_ms": out["cutover_ms"],
                          "writer_ops_per_s": ws["ops_per_s"], "writer_max_stall_ms": ws["max_stall_ms"],
                          "lost": lost, "writer_errors": ws["errors"],
                          "steps_ms": {s["step"]: s["ms"] for s in out["steps"]}}), flush=True)
    finally:
        drop_databases(name)


if __name__ == "__main__":
    main()
