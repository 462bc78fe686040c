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
from dbguard.writer import Writer

from .server import PrivateServer
from .common import (ROOT, compare, drain_to_zero, first_line, lost_duplicated, say, scratch,
                     fault_writer, shop_spec, wait_for)


@contextlib.contextmanager
def shop_under_writer(tag: str, size: dict, spec: MigrationSpec, *, target_server: str | None = None,
                      gate: str = "pointer") -> Iterator[tuple[dict, Writer]]:
    """Scratch databases, the demo shop loaded on the source, the pointer row, a writer running."""
    with scratch(tag, target_server=target_server) as dsns:
        load_shop(dsns["source"], customers=size["customers"], orders=size["orders"])
        with db.source(spec) as src:
            pointer.prepare(src, spec)
            src.commit()
        w = fault_writer(dsns["source"], dsns["target"], spec.name, rate=size["rate"], gate=gate).start()
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


def settle_and_compare(spec: MigrationSpec, run: str, dsns: dict, w: Writer, *, primary: str = "source",
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


def _sigkill_if(proc, condition: bool) -> bool:
    """SIGKILL the worker process when `condition` holds and it still runs; wait for it. True if killed."""
    killed = condition and proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    return killed


def _reap(proc) -> None:
    """Never leave a worker behind, whatever happened."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


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
            killed = _sigkill_if(proc, seen is not None)
        finally:
            _reap(proc)
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


# ---- 2. target_restart -------------------------------------------------------------------------------

def _retrying(fn, attempts: int, delay_s: float) -> tuple[Any, int, list[str]]:
    """Airflow's task retries, in-process: up to `attempts` tries, exponential backoff; (result, tries, errors)."""
    errors: list[str] = []
    for i in range(1, attempts + 1):
        try:
            return fn(), i, errors
        except psycopg.OperationalError as e:
            errors.append(first_line(e))
            if i == attempts:
                raise
            time.sleep(delay_s * 2 ** (i - 1))
    raise AssertionError("unreachable")


def target_restart(size: dict) -> dict[str, Any]:
    """The target server crashes (immediate stop, WAL replay on start) while a range streams into it and comes
    back a second later; the range task fails and its retry (Airflow's backoff) succeeds. The target is a
    private server, so nobody else's server restarts."""
    spec, run = shop_spec(), "fault-target-restart"
    srv = PrivateServer().start()
    try:
        with shop_under_writer("restart", size, spec, target_server=srv.uri()) as (dsns, w):
            stages.preflight(spec, run)
            stages.capture_on(spec, run)
            for r in stages.plan_ranges(spec, run, "customers"):
                stages.copy_range(spec, run, r)
            ranges = stages.plan_ranges(spec, run, "orders", batch_rows=size["batch_rows"])
            victim = ranges[0]
            slow = shop_spec(backfill={"max_rows_per_second": max(500, size["batch_rows"] // 6)})
            failure: list[BaseException] = []

            def task():
                try:
                    stages.copy_range(slow, run, victim)
                except BaseException as e:  # noqa: BLE001
                    failure.append(e)

            th = threading.Thread(target=task)
            th.start()
            with psycopg.connect(dsns["target"], autocommit=True) as mon:
                seen = wait_for(lambda: (lambda r: r if r and r[2] > 0 else None)(mon.execute(COPY_IN_PROGRESS)
                                                                                 .fetchone()), 20)
            t_crash = time.monotonic()
            srv.crash_stop()
            threading.Timer(1.0, srv.start).start()  # back after a second
            th.join(60)
            task_error = first_line(failure[0]) if failure else None
            say(f"target_restart: crashed the target mid-COPY at {seen}; the range task failed: {task_error}")
            res, tries, retry_errors = _retrying(lambda: stages.copy_range(spec, run, victim),
                                                 spec.backfill.retries, 0.5)
            down_s = round(time.monotonic() - t_crash, 2)
            copy_all(spec, run, size["batch_rows"], skip={(victim["table"], victim["range_id"])} |
                     {("customers", r["range_id"]) for r in stages.plan_ranges(spec, run, "customers")})
            stages.reconcile(spec, run)
            gate_ok, gate_msg = stages.checksum_gate(spec, run)
            out = settle_and_compare(spec, run, dsns, w)
    finally:
        srv.stop()
    injected = seen is not None and bool(failure)
    recovered = bool(injected and res["ok"] and gate_ok)
    return {"recovered": recovered, **out, "outcome": "retried", "injected": injected,
            "crashed_at": {"target_bytes": seen[1], "target_tuples": seen[2]} if seen else None,
            "task_error": task_error, "retry_tries": tries, "retry_errors": retry_errors, "until_verified_s": down_s,
            "checksum_gate": gate_ok if gate_ok else gate_msg[:300]}


# ---- applier faults ------------------------------------------------------------------------------------

APPLIER_LOCK = """
SELECT l.pid FROM pg_locks l
WHERE l.locktype = 'advisory' AND l.mode = 'ExclusiveLock' AND l.granted AND l.objsubid = 1
  AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
  AND l.classid::bigint = ((%(k)s::bigint >> 32) & 4294967295) AND l.objid::bigint = (%(k)s::bigint & 4294967295)
  AND l.pid <> pg_backend_pid()
"""


class ApplierKiller(threading.Thread):
    """Watches the destination database for dbguard's applier inside a batch (it holds the batch's exclusive
    advisory lock `dbguard.apply:<migration>` until the batch commits) and pg_terminate_backend()s it, once."""

    def __init__(self, dsn: str, spec: MigrationSpec, direction: str = "forward", timeout_s: float = 60):
        super().__init__(daemon=True)
        self.dsn, self.timeout_s = dsn, timeout_s
        self.tag = "dbguard.apply:" + spec.name + ("" if direction == "forward" else ":reverse")
        self.killed: int | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self.dsn, autocommit=True) as c:
            k = c.execute("SELECT hashtextextended(%s, 0)", (self.tag,)).fetchone()[0]
            t0 = time.monotonic()
            while not self.stop_event.is_set() and time.monotonic() - t0 < self.timeout_s:
                row = c.execute(APPLIER_LOCK, {"k": k}).fetchone()
                if row and c.execute("SELECT pg_terminate_backend(%s)", (row[0],)).fetchone()[0]:
                    self.killed = row[0]
                    return
                time.sleep(0.001)

    def stop(self) -> None:
        self.stop_event.set()
        self.join(10)


def _ops_accounting(spec: MigrationSpec, run: str, dsns: dict, direction: str = "forward") -> dict[str, int]:
    """Every ledger op belongs to exactly one committed batch: ops in the ledger vs ops in committed batches."""
    origin, dest = (dsns["source"], dsns["target"]) if direction == "forward" else (dsns["target"], dsns["source"])
    with psycopg.connect(origin) as o, psycopg.connect(dest) as d:
        n = o.execute("SELECT count(*) FROM dbguard.change_ledger WHERE migration = %s AND direction = %s",
                      (spec.name, direction)).fetchone()[0]
        s, fails = d.execute(
            "SELECT coalesce(sum(ops), 0), (SELECT count(*) FROM dbguard.apply_failures WHERE migration = %(m)s "
            "AND direction = %(d)s AND run_id = %(r)s) FROM dbguard.apply_batches WHERE migration = %(m)s "
            "AND direction = %(d)s AND run_id = %(r)s", {"m": spec.name, "d": direction, "r": run}).fetchone()
    return {"ledger_ops": int(n), "ops_in_committed_batches": int(s), "apply_failures": int(fails)}


def applier_terminated_drain(size: dict) -> dict[str, Any]:
    """pg_terminate_backend on the applier's connection in the middle of a drain batch; the next drain
    applies every captured change exactly once."""
    from dbguard.round_trip import migrate

    spec, run = shop_spec(capture={"batch_ops": 20}), "fault-applier-drain"
    with shop_under_writer("applier", size, spec) as (dsns, w):
        migrate(spec, run)
        time.sleep(3)  # a backlog of the writer's changes
        lag_before = capture.lag(spec, run)
        killer = ApplierKiller(dsns["target"], spec)
        killer.start()
        drain_error = None
        try:
            capture.drain(spec, run)
        except psycopg.Error as e:
            drain_error = first_line(e)
        killer.stop()
        say(f"applier_terminated_drain: lag {lag_before}, terminated pid {killer.killed}: {drain_error}")
        again = capture.drain(spec, run)  # the retry (drain_changes is a retried, poking task)
        gate_ok, gate_msg = stages.checksum_gate(spec, run)
        out = settle_and_compare(spec, run, dsns, w)
        acct = _ops_accounting(spec, run, dsns)
    injected = killer.killed is not None and drain_error is not None
    exactly_once = acct["ledger_ops"] == acct["ops_in_committed_batches"] and acct["apply_failures"] == 0
    recovered = bool(injected and again["dual_write_fail"] == 0 and gate_ok and exactly_once)
    return {"recovered": recovered, **out, "outcome": "retried", "injected": injected, "lag_at_fault": lag_before,
            "drain_error": drain_error, "next_drain_applied": again["applied"], **acct,
            "checksum_gate": gate_ok if gate_ok else gate_msg[:300]}


def _writable(dsn: str) -> bool | str:
    """True when a write to shop.customers is accepted there (rolled back, so nothing is left)."""
    with psycopg.connect(dsn) as c:
        try:
            c.execute("UPDATE shop.customers SET full_name = full_name WHERE id = (SELECT min(id) FROM shop.customers)")
            return True
        except psycopg.errors.ReadOnlySqlTransaction:
            return False
        finally:
            c.rollback()


def one_primary(spec: MigrationSpec, run: str, dsns: dict) -> dict[str, Any]:
    """Exactly one side is the primary, the pointer and the recorded state name it, and once a cutover has
    happened the other side refuses writes (fence)."""
    s = cutover.state(spec, run)
    side = s["primary"]
    other = "target" if side == "source" else "source"
    w_primary = _writable(dsns[side])
    w_other = _writable(dsns[other])
    flipped = s["phase"] != "before"
    ok = s["pointer_says"] == side and w_primary is True and (w_other is False if flipped else True)
    return {"ok": ok, "phase": s["phase"], "primary": side, "pointer": s["pointer_says"],
            "other_side_fenced": w_other is False}


def _writes_on(w: Writer, side: str, seconds: float) -> int:
    n0 = w.sides[side]
    time.sleep(seconds)
    return w.sides[side] - n0


def applier_terminated_cutover(size: dict) -> dict[str, Any]:
    """pg_terminate_backend on the applier's connection while the cutover's freeze drains the ledger: the
    cutover undoes itself (source primary, forward capture on) or completes; it is retried; then the target is
    primary and nothing the writer committed is lost."""
    from dbguard.round_trip import migrate

    spec, run = shop_spec(capture={"batch_ops": 20}), "fault-applier-cutover"
    with shop_under_writer("applcut", size, spec) as (dsns, w):
        migrate(spec, run)
        time.sleep(3)  # a backlog for the freeze's drain
        killer = ApplierKiller(dsns["target"], spec)
        killer.start()
        first, error = "completed", None
        try:
            cutover.cutover(spec, run)
        except cutover.CutoverError as e:
            first, error = "undone", first_line(e)
        killer.stop()
        after_fault = one_primary(spec, run, dsns)
        still_capturing = capture.is_on(spec) if first == "undone" else None
        kept_writing = _writes_on(w, after_fault["primary"], 1.0)
        say(f"applier_terminated_cutover: terminated pid {killer.killed}; cutover {first}: {error}; {after_fault}")
        second = None
        if first == "undone":
            second = cutover.cutover(spec, run)
        on_target = _writes_on(w, "target", 1.5)
        final = one_primary(spec, run, dsns)
        out = settle_and_compare(spec, run, dsns, w, primary="target", direction="reverse")
    injected = killer.killed is not None
    recovered = bool(injected and after_fault["ok"] and kept_writing > 0 and (first == "completed" or still_capturing)
                     and final["ok"] and final["primary"] == "target" and on_target > 0)
    return {"recovered": recovered, **out, "outcome": "undone_then_cutover" if first == "undone" else "completed",
            "injected": injected, "first_cutover_error": error, "after_fault": after_fault,
            "writes_right_after_fault": kept_writing, "cutover_ms": (second or {}).get("cutover_ms"),
            "final": final, "writes_on_target_after_cutover": on_target}


# ---- 5. freeze_lock_timeout ------------------------------------------------------------------------------

def freeze_lock_timeout(size: dict) -> dict[str, Any]:
    """A long transaction holds a row of shop.customers: the cutover's freeze lock times out (bounded
    lock_timeout, retries) and the cutover refuses cleanly, the source staying primary; once the blocker ends,
    the cutover succeeds."""
    from dbguard.round_trip import migrate

    spec, run = shop_spec(cutover={"lock_timeout_ms": 300, "retries": 2}), "fault-freeze-lock"
    with shop_under_writer("freeze", size, spec) as (dsns, w):
        migrate(spec, run)
        blocker = psycopg.connect(dsns["source"])
        try:
            blocker.execute("UPDATE shop.customers SET full_name = full_name || '' "
                            "WHERE id = (SELECT max(id) FROM shop.customers)")  # and stays open
            t0 = time.monotonic()
            refused, error = False, None
            try:
                cutover.cutover(spec, run)
            except cutover.CutoverError as e:
                refused, error = True, first_line(e)
            refused_after_s = round(time.monotonic() - t0, 2)
            during = one_primary(spec, run, dsns)
            capturing = capture.is_on(spec) and not capture.is_on(spec, direction="reverse")
            kept_writing = _writes_on(w, "source", 1.0)
            blocker.commit()  # the long transaction ends
        finally:
            blocker.close()
        say(f"freeze_lock_timeout: refused={refused} after {refused_after_s}s: {error}")
        done = cutover.cutover(spec, run)
        on_target = _writes_on(w, "target", 1.5)
        final = one_primary(spec, run, dsns)
        out = settle_and_compare(spec, run, dsns, w, primary="target", direction="reverse")
    clean = refused and "could not freeze" in (error or "") and during["ok"] and during["primary"] == "source" \
        and capturing and kept_writing > 0
    recovered = bool(clean and final["ok"] and final["primary"] == "target" and on_target > 0)
    return {"recovered": recovered, **out, "outcome": "refused_then_cutover", "injected": refused,
            "refused_after_s": refused_after_s, "refusal": error, "during": during,
            "writes_while_refused": kept_writing, "cutover_ms": done["cutover_ms"],
            "freeze_attempts": done["freeze"]["attempts"], "final": final}


# ---- 6. batch_applied_twice ------------------------------------------------------------------------------

CURSOR_COLS = "window_no, prev_snapshot, cur_snapshot, op_cursor, high_water, applied, batches"


def batch_applied_twice(size: dict) -> dict[str, Any]:
    """Ledger batches applied a second time: (a) the replay entry point over already applied op_ids,
    (b) the applier's cursor reset to an earlier state (as a restore of that row would), so the next drain
    applies those batches again. Full row images + in-order replay: nothing doubles, nothing regresses."""
    from dbguard.round_trip import migrate

    spec, run = shop_spec(capture={"batch_ops": 50}), "fault-batch-twice"
    with shop_under_writer("twice", size, spec) as (dsns, w):
        migrate(spec, run)
        capture.drain(spec, run)
        with psycopg.connect(dsns["target"]) as t:
            saved = t.execute(f"SELECT {CURSOR_COLS} FROM dbguard.apply_cursor WHERE migration = %s AND "
                              "direction = 'forward' AND run_id = %s", (spec.name, run)).fetchone()
        time.sleep(2)
        d2 = capture.drain(spec, run)
        with psycopg.connect(dsns["target"]) as t:
            first_op, last_op, nb = t.execute(
                "SELECT min(first_op), max(last_op), count(*) FROM dbguard.apply_batches WHERE migration = %s "
                "AND direction = 'forward' AND run_id = %s AND batch_no > %s", (spec.name, run, saved[6])).fetchone()
        ops = capture.read_ops(spec, first_op, last_op) if first_op is not None else []
        # (a) replay through apply_ops: every op is covered by the cursor, so it is skipped
        replay_error = None
        try:
            replay = capture.apply_ops(spec, run, ops)
        except Exception as e:  # noqa: BLE001
            replay, replay_error = {"skipped": 0}, first_line(e)
        # (b) reset the cursor to its state before those batches: the next drain applies them again
        with psycopg.connect(dsns["target"]) as t:
            t.execute("UPDATE dbguard.apply_cursor SET (" + CURSOR_COLS + ") = (%s, %s, %s, %s, %s, %s, %s) "
                      "WHERE migration = %s AND direction = 'forward' AND run_id = %s", (*saved, spec.name, run))
        rewind_error, d3 = None, {"applied": 0}
        try:
            d3 = capture.drain(spec, run)
        except psycopg.Error as e:
            rewind_error = first_line(e)
        say(f"batch_applied_twice: {nb} batches / {len(ops)} ops replayed: apply_ops {replay} {replay_error}; "
            f"after the cursor reset the drain applied {d3['applied']} ({rewind_error})")
        gate_ok, gate_msg = stages.checksum_gate(spec, run) if rewind_error is None else (False, rewind_error)
        out = settle_and_compare(spec, run, dsns, w)
    injected = nb >= 1 and len(ops) > 0
    recovered = bool(injected and replay_error is None and replay["skipped"] == len(ops) and rewind_error is None
                     and d3["applied"] >= len(ops) and gate_ok)
    return {"recovered": recovered, **out, "outcome": "replayed_idempotently", "injected": injected,
            "batches_replayed": nb, "ops_replayed": len(ops), "apply_ops": replay, "apply_ops_error": replay_error,
            "drain_after_cursor_reset": {"applied": d3["applied"], "error": rewind_error},
            "batches_before_reset_drain": d2["batches"], "checksum_gate": gate_ok if gate_ok else gate_msg[:300]}


# ---- 7. target_rejects_change -----------------------------------------------------------------------------

def target_rejects_change(size: dict) -> dict[str, Any]:
    """The target refuses a captured change (a CHECK constraint the source lacks): the drain gate fails naming
    the op id, the checksum gate too (the row differs, the repair is refused as well); nothing passes silently.
    The run is aborted (source primary), the constraint fixed, and a new run onto the same target resumes the
    migration and verifies."""
    from dbguard.round_trip import migrate

    spec, run, run2 = shop_spec(), "fault-rejects-1", "fault-rejects-2"
    with shop_under_writer("rejects", size, spec) as (dsns, w):
        stages.preflight(spec, run)
        with psycopg.connect(dsns["target"]) as t:
            t.execute("ALTER TABLE shop.orders ADD CONSTRAINT fault_amount_cap CHECK (amount < 1000000)")
        stages.capture_on(spec, run)
        copy_all(spec, run, size["batch_rows"])
        with psycopg.connect(dsns["source"], autocommit=True) as app:
            key = app.execute("UPDATE shop.orders SET amount = 5000000 WHERE id = (SELECT min(id) FROM shop.orders) "
                              "RETURNING id").fetchone()[0]
        verdict, msg = stages.drain_gate(spec, run)
        n_fail, op_ids = capture.dual_write_fail(spec, run)
        named = bool(op_ids) and f"op_ids [{op_ids[0]}" in msg and "fault_amount_cap" in msg
        stages.reconcile(spec, run)
        gate_ok, gate_msg = stages.checksum_gate(spec, run)
        gate_names_it = bool(op_ids) and str(op_ids[0]) in gate_msg
        say(f"target_rejects_change: drain gate {verdict}: {msg[:160]}")
        aborted = stages.rollback(spec, run)  # abort: last drain, capture off, freeze lifted
        with psycopg.connect(dsns["target"]) as t:  # the fix
            t.execute("ALTER TABLE shop.orders DROP CONSTRAINT fault_amount_cap")
        migrate(spec, run2)  # the migration again, onto the same target
        gate2_ok, gate2_msg = stages.checksum_gate(spec, run2)
        out = settle_and_compare(spec, run2, dsns, w)
        with psycopg.connect(dsns["target"]) as t:
            amount = t.execute("SELECT amount FROM shop.orders WHERE id = %s", (key,)).fetchone()
    failed_loudly = verdict is False and n_fail >= 1 and named and not gate_ok and gate_names_it
    recovered = bool(failed_loudly and gate2_ok and amount and int(amount[0]) == 5000000)
    return {"recovered": recovered, **out, "outcome": "failed_naming_op_then_rerun", "injected": n_fail >= 1,
            "refused_op_ids": op_ids[:5], "drain_gate_message": msg[:200], "checksum_gate_failed_naming_op": gate_names_it,
            "aborted": "capture_off" in aborted or "final_drain" in aborted,
            "rerun_checksum_gate": gate2_ok if gate2_ok else gate2_msg[:300],
            "refused_row_on_target_after_rerun": float(amount[0]) if amount else None}


# ---- 9. rollback_interrupted ---------------------------------------------------------------------------

ROLLBACK_FREEZE = """
SELECT l.pid FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.relation = 'dbguard.control'::regclass AND l.mode = 'ExclusiveLock' AND l.granted
  AND a.application_name = 'dbguard' AND a.datname = current_database()
"""


def _dbguard_backends_gone(dsn: str, timeout_s: float = 15) -> bool:
    with psycopg.connect(dsn, autocommit=True) as c:
        return bool(wait_for(lambda: c.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = "
            "'dbguard' AND pid <> pg_backend_pid()").fetchone()[0] == 0, timeout_s, 0.05))


def rollback_interrupted(size: dict) -> dict[str, Any]:
    """After a cutover and writes on the target: the rollback's process is SIGKILLed while it holds the
    rollback freeze; run again, it fails at an injected step after the flip back; run a third time, it
    completes. At every point one primary; at the end every write the application made after the cutover is
    on the source."""
    from dbguard.round_trip import migrate

    spec, run = shop_spec(), "fault-rollback"
    with shop_under_writer("rollback", size, spec) as (dsns, w):
        migrate(spec, run)
        cutover.cutover(spec, run)
        on_target = _writes_on(w, "target", 1.5)
        doc = {"op": "rollback", "spec": json.loads(json.dumps(spec.model_dump(mode="json", by_alias=True))),
               "run": run}
        proc = subprocess.Popen([sys.executable, "-m", "faults.worker"], cwd=ROOT, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            proc.stdin.write(json.dumps(doc))
            proc.stdin.close()
            with psycopg.connect(dsns["source"], autocommit=True) as mon:
                held = wait_for(lambda: mon.execute(ROLLBACK_FREEZE).fetchone(), 30, 0.002)
            killed = _sigkill_if(proc, held is not None)
        finally:
            _reap(proc)
        gone = _dbguard_backends_gone(dsns["source"]) and _dbguard_backends_gone(dsns["target"])
        after_kill = one_primary(spec, run, dsns)
        writes_after_kill = _writes_on(w, after_kill["primary"], 1.0)
        say(f"rollback_interrupted: killed={killed} (exit {proc.returncode}); {after_kill}")
        injected_error = None
        try:
            cutover.rollback(spec, run, fail_at="reverse_capture_off")
        except cutover.CutoverError as e:
            injected_error = first_line(e)
        after_flip_back = one_primary(spec, run, dsns)
        writes_after_flip_back = _writes_on(w, "source", 1.0)
        rb = cutover.rollback(spec, run)
        time.sleep(0.3)
        final = one_primary(spec, run, dsns)
        ws = w.stop()
        wr = w.check(dsns["source"])  # every write the application committed is on the source
        back = w.after_back
        cmp = compare(spec, dsns["source"], dsns["target"],
                      ignore=lambda table, k: table == "orders" and int(k[0]) in back)
        lost, dup = lost_duplicated(cmp, wr)
    recovered = bool(killed and gone and after_kill["ok"] and after_kill["primary"] == "target"
                     and writes_after_kill > 0 and injected_error and after_flip_back["ok"]
                     and after_flip_back["primary"] == "source" and writes_after_flip_back > 0
                     and rb["status"] == "rolled_back" and final["ok"] and final["primary"] == "source")
    return {"recovered": recovered, "lost": lost, "duplicated": dup, "outcome": "rolled_back",
            "injected": killed, "compare": _short(cmp), "writer": {**ws, **wr}, "writes_on_target": on_target,
            "after_kill": after_kill, "writes_after_kill": writes_after_kill, "second_attempt": injected_error,
            "after_flip_back": after_flip_back, "resumed_after": rb.get("resumed_after"),
            "writes_after_cutover": rb.get("writes_after_cutover"), "final": final,
            "rows_only_on_source_after_flip_back": len(back)}


# ---- 8. dag_cleared_rerun --------------------------------------------------------------------------------

def dag_cleared_rerun(size: dict) -> dict[str, Any]:
    """A real DAG run (dag.test() of dbguard_demo_shop from dags/) under a live writer; then the DAG run again
    from the middle onto the same, already filled target: same logical date, preflight marked success
    (mark_success_pattern), capture_on, every copy range, the drain, reconcile, the gate and release run again.
    (dag.test() gives the re-run a new run_id: it names runs by run_after.) The writer is an application on
    dbguard's switch: it writes while dual_write is on, so it pauses at each release. Exact result expected."""
    import datetime as dt
    import tempfile

    from dbguard.airflow import env as afenv

    afenv.airflow_defaults()
    afenv.ensure_metadata_db()
    from airflow.dag_processing.dagbag import DagBag

    spec = shop_spec()
    with tempfile.TemporaryDirectory(prefix="dbguard-fault-reports-") as reports, \
            shop_under_writer("dag", size, spec, gate="dual_write") as (dsns, w):
        old = os.environ.get("DBGUARD_REPORT_DIR")
        os.environ["DBGUARD_REPORT_DIR"] = reports
        try:
            dag = DagBag(str(afenv.DAGS_FOLDER)).dags["dbguard_demo_shop"]
            when = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
            conf = {"batch_rows": size["batch_rows"]}
            first = dag.test(logical_date=when, run_conf=conf)
            r1 = afenv.run_result(first) or {}
            mid = compare(spec, dsns["source"], dsns["target"])  # the writer paused at release: equal now
            writes_before = w.ops
            again = dag.test(logical_date=when, run_conf=conf, mark_success_pattern=r"preflight")
            r2 = afenv.run_result(again) or {}
        finally:
            if old is None:
                os.environ.pop("DBGUARD_REPORT_DIR", None)
            else:
                os.environ["DBGUARD_REPORT_DIR"] = old
        writes_during_rerun = w.ops - writes_before
        ws = w.stop()
        cmp = compare(spec, dsns["source"], dsns["target"])
        wr = w.check(dsns["target"])
        with psycopg.connect(dsns["target"]) as t:
            attempts = t.execute("SELECT min(attempts), max(attempts), count(*) FROM dbguard.ranges WHERE run_id = %s "
                                 "AND status <> 'planned'", (again.run_id,)).fetchone()
        lost, dup = lost_duplicated(cmp, wr)
    injected = mid["rows"] > 0 and writes_during_rerun > 0  # onto a filled target, under writes
    recovered = bool(first.state == "success" and again.state == "success" and r2.get("checksum_ok") is True
                     and r2.get("dual_write_fail") == 0 and attempts[2] > 0)
    return {"recovered": recovered, "lost": lost, "duplicated": dup, "outcome": "rerun_from_the_middle",
            "injected": injected, "run_ids": [first.run_id, again.run_id], "first_run": {"state": str(first.state),
            "status": r1.get("status"), "checksum_ok": r1.get("checksum_ok")},
            "after_first_run": _short(mid), "rerun": {"state": str(again.state), "status": r2.get("status"),
            "checksum_ok": r2.get("checksum_ok"), "dual_write_fail": r2.get("dual_write_fail")},
            "range_attempts": {"min": attempts[0], "max": attempts[1], "ranges": attempts[2]},
            "writer_ops_during_rerun": writes_during_rerun, "compare": _short(cmp), "writer": {**ws, **wr}}


ORDER = ["range_sigkill", "target_restart", "applier_terminated_drain", "applier_terminated_cutover",
         "freeze_lock_timeout", "batch_applied_twice", "target_rejects_change", "dag_cleared_rerun", "rollback_interrupted"]
