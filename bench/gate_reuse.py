"""Benchmark `gate_reuse`: the checksum gate taking reconcile's verdict vs comparing again, side by side.

demo_shop with `BENCH_GATE_ROWS` orders (default 1,000,000, plus 1/50 as many customers), copied with capture
on. Then three rounds of: reconcile (at a snapshot), the gate with nothing changed since (reused), one source
update, the gate again (measured: it compares both tables at a new snapshot). One JSON line:
{"bench": "gate_reuse", "rows", "reused_s", "measured_s", "reconcile_s", "speed_ratio", ...}
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
from dbguard import db, ledger, stages  # noqa: E402
from dbguard.demo import load_shop  # noqa: E402
from dbguard.spec import load_spec  # noqa: E402


def _gate(spec, run: str) -> tuple[float, str]:
    t0 = time.monotonic()
    ok, msg = stages.checksum_gate(spec, run)
    seconds = time.monotonic() - t0
    assert ok, msg
    with db.target(spec) as t:
        return seconds, ledger.metrics(t, run)["checksum_gate_mode"]


def main(rows: int = int(os.environ.get("BENCH_GATE_ROWS", "1000000")), rounds: int = 3) -> None:
    name = "bench_gate_" + uuid.uuid4().hex[:6]
    dsns = fresh_databases(name)
    try:
        load_shop(dsns["dbguard_source"], customers=max(100, rows // 50), orders=rows)
        spec = load_spec(ROOT / "include/migrations/demo_shop.yaml")
        run = "bench_gate"
        stages.preflight(spec, run)
        stages.capture_on(spec, run)
        for t in spec.table_order():
            for r in stages.plan_ranges(spec, run, t.ref, batch_rows=250_000):
                stages.copy_range(spec, run, r)
        stages.drain_gate(spec, run)
        reused, measured, rec = [], [], []
        for i in range(rounds):
            t0 = time.monotonic()
            assert stages.reconcile(spec, run)["checksum_ok"]
            rec.append(time.monotonic() - t0)
            seconds, mode = _gate(spec, run)
            assert mode == "reused reconcile verdict", mode
            reused.append(seconds)
            with db.source(spec) as src:
                src.execute("UPDATE shop.orders SET note = %s WHERE id = (SELECT min(id) FROM shop.orders)",
                            (f"bench {i}",))
                src.commit()
            seconds, mode = _gate(spec, run)
            assert mode == "measured", mode
            measured.append(seconds)
        with db.target(spec) as t:
            total = t.execute("SELECT (SELECT count(*) FROM shop.orders) + (SELECT count(*) FROM shop.customers)"
                              ).fetchone()[0]
        stages.release(spec, run)
        r3 = lambda xs: [round(x, 3) for x in xs]  # noqa: E731
        print(json.dumps({"bench": "gate_reuse", "rows": total, "reused_s": r3(reused), "measured_s": r3(measured),
                          "reconcile_s": r3(rec), "best_reused_s": round(min(reused), 3),
                          "best_measured_s": round(min(measured), 3),
                          "speed_ratio": round(min(measured) / min(reused), 1)}), flush=True)
    finally:
        drop_databases(name)


if __name__ == "__main__":
    main()
