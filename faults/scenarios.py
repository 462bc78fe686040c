"""The fault scenarios. Each takes a size (common.SIZES) and returns the measured outcome:
{"recovered": bool, "lost": int, "duplicated": int, "outcome": ..., **details}.

Every scenario: real servers, a live writer following the pointer, a real fault, dbguard's own recovery path
(retry / resume / clean abort / rollback), then the independent row-for-row compare (common.compare) and,
where the writer's primary moved, the writer's record against that primary. `recovered` is what dbguard's
recovery path reported (the retry verified, the abort left the source primary, ...) AND-ed with the fault
having really happened (`injected`); `lost` / `duplicated` come only from the compare.
"""
from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Iterator

import psycopg
from psycopg import sql

from dbguard import capture, catalog, cutover, db, stages
from dbguard.cutover import pointer
from dbguard.demo import load_shop
from dbguard.ranges import KeyRange, predicate
from dbguard.spec import MigrationSpec

from .common import (ROOT, FaultWriter, compare, drain_to_zero, first_line, lost_duplicated, say, scratch,
                     shop_spec, wait_for)


@contextlib.contextmanager
def shop_under_writer(tag: str, size: dict, spec: MigrationSpec, *, target_server: str | None = None,
                      gate: str = "pointer") -> Iterator[tuple[dict, FaultWriter]]:
    """Scratch databases, the demo shop loaded on the source, the pointer row, a writer running."""
    with scratch(tag, target_server=target_server) as dsns:
        load_shop(dsns["source"], customers=size["customers"], orders=size["orders"])
        with db.source(spec) as src:
            pointer.prepare(src, spec)
            src.commit()
        w = FaultWriter(dsns["source"], dsns["target"], spec.name, rate=size["rate"], gate=gate).start()
        try:
            yield dsns, w
        finally:
            w.stop()


def copy_all(spec: MigrationSpec, run: str, batch_rows: int | None = None, skip: set | None = None) -> int:
    n = 0
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, run, t.name, batch_rows=batch_rows):
            if skip and (r["table"], r["range_id"]) in skip:
                continue
            assert stages.copy_range(spec, run, r)["ok"], r["label"]
            n += 1
    return n


def settle_and_compare(spec: MigrationSpec, run: str, dsns: dict, w: FaultWriter, *, primary: str = "source",
                       direction: str = "forward") -> dict[str, Any]:
    """Stop the writer, drain to zero, compare both sides row for row and the writer's record on its primary
    (for a forward run the writer's rows must reach the target too: check it there)."""
    ws = w.stop()
    drain_to_zero(spec, run, direction)
    cmp = compare(spec, dsns["source"], dsns["target"])
    on = dsns["target"] if (direction == "forward" or primary == "target") else dsns["source"]
    wr = w.check(on)
    lost, dup = lost_duplicated(cmp, wr)
    return {"lost": lost, "duplicated": dup, "compare": _short(cmp), "writer": {**ws, **wr}}


def _short(cmp: dict) -> dict:
    return {k: cmp[k] for k in ("rows", "missing", "extra", "changed", "doubled")} | (
        {"examples": cmp["examples"][:5]} if cmp["examples"] else {})


def _range_count(dsn: str, spec: MigrationSpec, r: dict) -> int:
    t = catalog.resolve(spec).table(r["table"])
    with psycopg.connect(dsn) as c:
        return c.execute(sql.SQL("SELECT count(*) FROM {} WHERE {}").format(
            sql.Identifier(t.target_schema, t.target_name), predicate(t, KeyRange.from_dict(r)))).fetchone()[0]


COPY_IN_PROGRESS = """
SELECT a.pid, coalesce(p.bytes_processed, 0), coalesce(p.tuples_processed, 0)
FROM pg_stat_activity a LEFT JOIN pg_stat_progress_copy p ON p.pid = a.pid
WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND a.state = 'active'
  AND a.query LIKE 'COPY%%FROM STDIN%%'
"""


def _backend_gone(dsn: str, pid: int, timeout_s: float = 15) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        return bool(wait_for(lambda: c.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                               (pid,)).fetchone()[0] == 0, timeout_s, 0.05))


# ---- 1. range_sigkill --------------------------------------------------------------------------------

def range_sigkill(size: dict) -> dict[str, Any]:
    """A range copy runs in its own process (as an Airflow worker does); it is SIGKILLed while its COPY
    streams into the target, then the range is retried."""
    spec, run = shop_spec(), "fault-range-sigkill"
    with shop_under_writer("sigkill", size, spec) as (dsns, w):
        stages.preflight(spec, run)
        stages.capture_on(spec, run)
        for r in stages.plan_ranges(spec, run, "customers"):
            stages.copy_range(spec, run, r)
        ranges = stages.plan_ranges(spec, run, "orders", batch_rows=size["batch_rows"])
        victim = ranges[len(ranges) // 2]
        # an earlier attempt of this range left its rows (committed); the killed attempt deletes and re-copies
        stages.copy_range(spec, run, victim)
        before = _range_count(dsns["target"], spec, victim)
        rows = before or size["batch_rows"]
        slow = shop_spec(backfill={"max_rows_per_second": max(500, rows // 6)})  # ~6 s of streaming
        doc = {"op": "copy_range", "spec": json.loads(json.dumps(slow.model_dump(mode="json", by_alias=True))),
               "run": run, "range": victim}
        proc = subprocess.Popen([sys.executable, "-m", "faults.worker"], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.stdin.write(json.dumps(doc))
            proc.stdin.close()
            with psycopg.connect(dsns["target"], autocommit=True) as mon:
                seen = wait_for(lambda: mon.execute(COPY_IN_PROGRESS).fetchone(), 30)
                at_kill = seen
                if seen:  # let rows stream into the open COPY first (bounded)
                    at_kill = wait_for(lambda: next(iter([r for r in [mon.execute(COPY_IN_PROGRESS).fetchone()]
                                                          if r and r[2] > 0]), None), 5.0) or seen
            killed = proc.poll() is None and seen is not None
            if killed:
                os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        gone = _backend_gone(dsns["target"], seen[0]) if seen else False
        after_kill = _range_count(dsns["target"], spec, victim)
        say(f"range_sigkill: killed={killed} at {at_kill}, range rows before {before}, after the kill {after_kill}")
        res = stages.copy_range(spec, run, victim)  # the retry
        copy_all(spec, run, size["batch_rows"], skip={(victim["table"], victim["range_id"])} |
                 {("customers", r["range_id"]) for r in stages.plan_ranges(spec, run, "customers")})
        stages.reconcile(spec, run)
        gate_ok, gate_msg = stages.checksum_gate(spec, run)  # dbguard's verdict: verified under a write freeze
        out = settle_and_compare(spec, run, dsns, w)
        with psycopg.connect(dsns["target"]) as c:
            attempts = c.execute("SELECT attempts FROM dbguard.ranges WHERE run_id = %s AND table_name = %s "
                                 "AND range_id = %s", (run, victim["table"], victim["range_id"])).fetchone()[0]
    recovered = bool(killed and gone and after_kill == before and res["ok"] and gate_ok)
    return {"recovered": recovered, **out, "outcome": "retried", "injected": killed,
            "killed_at": {"target_bytes": at_kill[1], "target_tuples": at_kill[2]} if at_kill else None,
            "worker_exit": proc.returncode, "range": victim["label"], "range_rows_before_kill": before,
            "range_rows_after_kill": after_kill, "retry_rows": res["rows"], "retry_ok": res["ok"],
            "range_attempts": attempts, "checksum_gate": gate_ok if gate_ok else gate_msg[:300]}
ORDER = ["range_sigkill"]
