"""Stage entry points: what each DAG task (and the CLI) calls.

Every function takes the spec and the run id, returns JSON-able values (they
travel as XCom) and is safe to re-run. The Airflow layer only parses
arguments and calls these.
"""
from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import dataclass
from typing import Any, Iterator

import psycopg
from psycopg import sql

from . import capture, catalog, db, gate_reuse, ledger, preflight as pf, report, retrieval, target_schema
from .backfill import copy_range as _copy_range
from .cutover import watermark
from .ranges import KeyRange, plan
from .reconcile import reconcile_table
from .errors import DbguardError, PreflightError
from .spec import MigrationSpec


def _resolved(fn):
    """Stage entry points see the resolved spec: every table's columns completed from the source
    catalog (catalog.resolve: undeclared columns added, exclude_columns left out; cached per process)."""
    @functools.wraps(fn)
    def wrapper(spec: MigrationSpec, *args, **kw):
        return fn(catalog.resolve(spec), *args, **kw)
    return wrapper


def _event(spec: MigrationSpec, run_id: str, stage: str, detail: dict, **kw) -> None:
    with db.target(spec) as tgt:
        ledger.event(tgt, run_id, spec.name, stage, detail, **kw)


def preflight(spec: MigrationSpec, run_id: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Read-only checks (contract, privileges, headroom), then target creation + schema freeze.
    A refusal is recorded as event preflight_failed (when the target is reachable) before it is raised."""
    try:
        spec = catalog.resolve(spec, fresh=True)  # the source schema as it is now
        checks = pf.validate(spec)
    except PreflightError as e:
        with contextlib.suppress(DbguardError, psycopg.Error), db.target(spec) as tgt:
            ledger.ensure(tgt)  # the ledger may not exist yet: preflight is what creates it
            ledger.event(tgt, run_id, spec.name, "preflight_failed", {"message": str(e)})
        raise
    if dry_run:
        return {"dry_run": True, **checks}
    applied = pf.apply(spec, run_id)
    # the target as created, against the source (foreign keys, indexes, triggers, RLS and policies come after the backfill)
    out = {**checks, **applied, "schema_differences": target_schema.differences(
        spec, ignore=target_schema.POST_DATA)}
    with db.target(spec) as tgt:  # what is left out on purpose, and the resolved list itself, for the run report
        if applied.get("schema_created"):  # what rollback --drop-target takes away again (a re-run creates none)
            ledger.set_metric(tgt, run_id, spec.name, "schema_created", applied["schema_created"], commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "excluded_columns",
                          {t.ref: list(t.exclude_columns) for t in spec.tables if t.exclude_columns}, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "migrated_columns", migrated_columns(spec))
    _event(spec, run_id, "preflight", out)
    return out


def migrated_columns(spec: MigrationSpec) -> dict[str, list[str]]:
    """The resolved column contract per table, as the run report lists it: every column copy, checksum,
    capture and apply carry, in order, with a declared type change or a generated column marked."""
    def label(c) -> str:
        if c.generated:
            return f"{c.name} (generated)"
        return f"{c.name} ({c.type} -> {c.target_type})" if c.target_type and c.target_type != c.type else c.name
    return {t.ref: [label(c) for c in t.columns] for t in catalog.resolve(spec).tables}


def _capturing(spec: MigrationSpec) -> bool:
    return spec.capture.enabled and capture.is_on(spec)


@_resolved
def capture_on(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Dual writes on: source triggers write every change to the ledger from now on. The control row gets
    its write_target column ('source') here, so applications can follow the pointer from the start."""
    out = capture.capture_on(spec, run_id)
    from .cutover import pointer
    with db.source(spec) as src:
        pointer.prepare(src, spec)
        src.commit()
    return out


@_resolved
def drain_gate(spec: MigrationSpec, run_id: str) -> tuple[bool | None, str]:
    """Apply captured changes; pass when the lag is within gates.max_lag_ops, poke again while it is
    not, fail at once when an op could not be applied (dual_write_fail > 0)."""
    d = capture.drain(spec, run_id)
    if d["dual_write_fail"]:
        return False, _dual_write_failures(spec, run_id)
    msg = f"applied {d['applied']} change(s) at {d.get('rows_per_second') or 0:.0f}/s; lag {d['lag']} op(s)"
    return (True if d["lag"] <= spec.gates.max_lag_ops else None), msg


def _dual_write_failures(spec: MigrationSpec, run_id: str) -> str:
    n, op_ids = capture.dual_write_fail(spec, run_id)
    errors = "; ".join(f"op {f['op_id']} ({f.get('table_name')}): {f.get('error')}"
                       for f in capture.failures(spec, run_id)[:10])
    return f"dual_write_fail = {n}: op_ids {op_ids[:50]}; {errors}"


@_resolved
def plan_ranges(spec: MigrationSpec, run_id: str, table: str, *, batch_rows: int | None = None) -> list[dict]:
    """Key ranges for one table, read from the source only: [{"table", "range_id", "lo", "hi", "label", "planned"}]."""
    t = spec.table(table)
    with db.source(spec) as src:
        ranges = plan(src, t, batch_rows or spec.backfill.batch_rows)
    return [{**r.to_dict(), "planned": len(ranges)} for r in ranges]


@_resolved
def copy_range(spec: MigrationSpec, run_id: str, krange: dict) -> dict[str, Any]:
    """Copy one range (idempotent), verify count+checksum+orphans."""
    r = KeyRange.from_dict(krange)
    planned = int(krange["planned"]) if krange.get("planned") is not None else None
    return _copy_range(spec, run_id, r, rows_per_second=spec.backfill.max_rows_per_second,
                       planned=planned).to_dict()


def _record_tables(spec: MigrationSpec, run_id: str, metric: str, tables: dict[str, dict],
                   **detail) -> dict[str, Any]:
    """A whole-table verdict into the ledger: metric `metric` (per table), checksum_ok, migrated_rows, event."""
    ok = all(r["equal"] and r["orphans"] == 0 for r in tables.values())
    migrated = sum(r["target"]["count"] for r in tables.values())
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, metric, tables, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "checksum_ok", ok, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "migrated_rows", migrated, commit=False)
        ledger.event(tgt, run_id, spec.name, metric, {"checksum_ok": ok, "migrated_rows": migrated, **detail})
    return {"checksum_ok": ok, "migrated_rows": migrated, "tables": tables}


def _reconcile_all(spec: MigrationSpec, run_id: str, metric: str) -> dict[str, Any]:
    return _record_tables(spec, run_id, metric, {t.ref: reconcile_table(spec, run_id, t) for t in spec.table_order()})


@_resolved
def reconcile(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Whole-table count+checksum, bisection, repair, re-verify, table by table. With dual writes on, the
    tables are first compared at one source snapshot (_at_snapshot), so what the application writes meanwhile
    is never taken for a difference; only a table that differs there is bisected and repaired."""
    if not _capturing(spec):
        return _reconcile_all(spec, run_id, "reconcile")
    t0 = time.monotonic()
    # what the checksum gate needs to reuse this verdict (gate_reuse): the target's foreign-write counter armed
    # and the state about to be compared, both before the comparison
    observed = gate_reuse.observe(spec, watermark.arm(spec, spec.capture.ddl_lock_timeout_ms))
    with _at_snapshot(spec, run_id) as at:
        tables = _compare_tables(spec, at.src, at.tgt) if at else {}
        snapshot, applied = (at.snapshot, at.applied) if at else (None, None)
    equal = {n: r for n, r in tables.items() if r["equal"] and r["orphans"] == 0}
    if tables and len(equal) == len(tables):
        seconds = round(time.monotonic() - t0, 3)
        gate_reuse.record(spec, run_id, observed, tables, snapshot=snapshot, applied=applied)
        return {**_record_tables(spec, run_id, "reconcile", tables, mode="snapshot", seconds=seconds),
                "mode": "snapshot", "seconds": seconds}
    gate_reuse.record(spec, run_id, None, tables, why="reconcile found a difference, or could not compare at one "
                                                      "source snapshot, and repaired: the gate measures")
    capture.drain(spec, run_id)  # what the application wrote meanwhile is not a difference
    return _record_tables(spec, run_id, "reconcile", {
        t.ref: equal.get(t.ref) or reconcile_table(spec, run_id, t) for t in spec.table_order()}, mode="repair")


def _gate_verdict(spec: MigrationSpec, run_id: str, src, out: dict[str, Any], armed_at, snapshot: str) -> None:
    """Record what the gate's exact comparison found: the applier's count then (release verifies anything
    applied after it) and, when clean, the verified watermark at `snapshot`."""
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, "applied_at_gate", capture.cursor(spec, run_id).get("applied", 0))
    out["watermark"] = watermark.mark(src, spec, run_id, out, armed_at, snapshot)


@dataclass
class _Snapshots:
    src: psycopg.Connection  # REPEATABLE READ at snapshot `snapshot`
    tgt: psycopg.Connection  # REPEATABLE READ, holding the source as of `snapshot`
    snapshot: str
    drained: int
    applied: int  # the applier's count of applied ops when the target held the source as of `snapshot`


@contextlib.contextmanager
def _at_snapshot(spec: MigrationSpec, run_id: str) -> Iterator[_Snapshots | None]:
    """Both sides at one point of the source's history, without stopping writers: a REPEATABLE READ
    snapshot S of the source, the applier drained to exactly S (the target then holds the source as of S),
    and a target snapshot taken while the applier is held. None when the applier could not stop at S
    (a refused op, an earlier window already past S, another drain meanwhile)."""
    from .capture.applier import _fence_key

    with db.source(spec) as src, db.target(spec) as hold, db.target(spec) as tgt:
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        snapshot = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
        d = capture.drain(spec, run_id, until=snapshot)
        if d["dual_write_fail"] or not d.get("at_snapshot"):
            yield None
            return
        hold.execute(sql.SQL("SELECT pg_advisory_xact_lock({})").format(_fence_key(spec, "forward")))
        cur = capture.cursor(spec, run_id)
        if cur.get("prev_snapshot") != snapshot or cur.get("cur_snapshot") is not None:
            yield None  # another drain moved the target past S meanwhile
            return
        tgt.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        tgt.execute("SELECT 1")  # the target's snapshot: the applier is held until here
        hold.commit()
        yield _Snapshots(src, tgt, snapshot, d["applied"], cur.get("applied", 0))
        src.rollback()


def _compare_tables(spec: MigrationSpec, src: psycopg.Connection, tgt: psycopg.Connection) -> dict[str, dict]:
    """count + checksum + orphans of every table on both connections (each side hashing at once), in the
    shape reconcile_table reports."""
    from concurrent.futures import ThreadPoolExecutor

    from .backfill import orphan_count
    from .checksum import Hashing, checksum

    h = Hashing.between(spec, src, tgt)
    tables = {}
    with ThreadPoolExecutor(1) as pool:
        for t in spec.table_order():
            ts = time.monotonic()
            s_ck = pool.submit(checksum, src, t, "source", None, h)
            g_ck = checksum(tgt, t, "target", None, h)
            orphans = orphan_count(tgt, spec, t, None)
            s_ck = s_ck.result()
            tables[t.ref] = {"table": t.ref, "source": s_ck.to_dict(), "target": g_ck.to_dict(),
                             "equal": s_ck == g_ck, "orphans": orphans, "rounds": [], "repaired_rows": 0,
                             "seconds": round(time.monotonic() - ts, 3)}
    return tables


def _verify_at_snapshot(spec: MigrationSpec, run_id: str) -> dict[str, Any] | None:
    """The gate's exact comparison without stopping writers (_at_snapshot). Returns the verdict when every
    table is equal; None (use the frozen comparison, which repairs) otherwise."""
    t0 = time.monotonic()
    armed_at = watermark.arm(spec, spec.capture.ddl_lock_timeout_ms)
    with _at_snapshot(spec, run_id) as at:
        if at is None:
            return None
        tables = _compare_tables(spec, at.src, at.tgt)
        if not all(r["equal"] and r["orphans"] == 0 for r in tables.values()):
            return None
        seconds = round(time.monotonic() - t0, 3)
        out = {**_record_tables(spec, run_id, "final_verify", tables, mode="snapshot", seconds=seconds),
               "mode": "snapshot", "snapshot": at.snapshot, "seconds": seconds, "drained": at.drained}
        _gate_verdict(spec, run_id, at.src, out, armed_at, at.snapshot)
    return out


@_resolved
def final_verify(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """With dual writes on, the exact comparison that overrides the earlier reconcile verdict: first at a
    source snapshot without stopping writers (_verify_at_snapshot); when that finds a difference, under a
    brief write freeze with the ledger drained to zero, where differences are repaired."""
    out = _verify_at_snapshot(spec, run_id)
    if out is not None:
        return out
    with capture.quiesced(spec, run_id) as (src, info):
        armed_at = watermark.arm(spec, spec.capture.ddl_lock_timeout_ms)
        out = _reconcile_all(spec, run_id, "final_verify")
        snapshot = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]  # every change so far
        _gate_verdict(spec, run_id, src, out, armed_at, snapshot)
    _event(spec, run_id, "write_freeze", {"stage": "final_verify", **info})
    return {**out, **info, "mode": "freeze"}


@_resolved
def checksum_problems(spec: MigrationSpec, run_id: str, *, completeness_only: bool = False) -> list[str]:
    """Every reason the checksum gate must not pass; empty when it may."""
    with db.target(spec) as tgt:
        m = ledger.metrics(tgt, run_id)
        copied = dict(tgt.execute(
            "SELECT table_name, count(*) FROM dbguard.ranges WHERE run_id = %s AND status <> 'planned' "
            "GROUP BY table_name", (run_id,)).fetchall())
    problems = []
    rec = {**(m.get("reconcile") or {}), **(m.get("final_verify") or {})}
    if m.get("dual_write_fail"):
        problems.append(_dual_write_failures(spec, run_id))
    for t in spec.tables:
        planned = m.get(f"planned_ranges.{t.ref}")
        if planned is None or copied.get(t.ref, 0) < planned:
            problems.append(f"{t.ref}: backfill incomplete: {copied.get(t.ref, 0)} of "
                            f"{planned if planned is not None else '?'} planned ranges copied")
        if completeness_only:
            continue
        r = rec.get(t.ref)
        if r is None:
            problems.append(f"{t.ref}: not reconciled yet")
            continue
        if not r["equal"]:
            last = r["rounds"][-1] if r.get("rounds") else {}
            problems.append(
                f"{t.ref}: source {r['source']['count']} rows (sum {r['source']['sum']}) != target "
                f"{r['target']['count']} rows (sum {r['target']['sum']}); missing {last.get('missing')}, "
                f"extra {last.get('extra')}, changed {last.get('changed')} in ranges {last.get('ranges')}; "
                f"e.g. keys missing {last.get('missing_keys')}, extra {last.get('extra_keys')}, "
                f"changed {last.get('changed_keys')}"
                + (f"; repair failed: {last['repair_error']}" if last.get("repair_error") else ""))
        if r.get("orphans"):
            problems.append(f"{t.ref}: {r['orphans']} rows in the target reference a missing parent row")
    return problems


def record_gate_failure(spec: MigrationSpec, run_id: str, gate: str, message: str) -> None:
    """A failed gate's full message goes into the ledger (and so the incident report), not only the task log."""
    _event(spec, run_id, f"{gate}_failed", {"message": message})


def record_task_failure(spec: MigrationSpec, run_id: str, task: str, message: str) -> None:
    """A task's error as event '<task>_failed' (so the run's `reason`, ledger.failure_reasons), unless the
    stage already recorded its own message (gates, preflight)."""
    with db.target(spec) as tgt:
        ledger.ensure(tgt)
        if not tgt.execute("SELECT 1 FROM dbguard.events WHERE run_id = %s AND stage = %s LIMIT 1",
                           (run_id, f"{task}_failed")).fetchone():
            ledger.event(tgt, run_id, spec.name, f"{task}_failed", {"message": message})


@_resolved
def checksum_gate(spec: MigrationSpec, run_id: str) -> tuple[bool, str]:
    """(passed, message): passes only at 100 % completeness and equal checksums. With dual writes on, reconcile's
    verdict is reused when gate_reuse proves nothing changed since; else the tables are compared again
    (final_verify). Metrics checksum_gate_mode / checksum_gate_reason say which, and why."""
    mode = ""
    if not checksum_problems(spec, run_id, completeness_only=True):
        mode = _verify_or_reuse(spec, run_id) if _capturing(spec) else _gate_mode(
            spec, run_id, gate_reuse.REUSED, ["dual writes are off: the gate reads reconcile's verdict (no change "
                                              "ledger to prove or re-check it against)"])
    problems = checksum_problems(spec, run_id)
    if problems:
        return False, "checksum gate failed:\n" + "\n".join(f"  - {p}" for p in problems)
    return True, f"checksum gate passed: {len(spec.tables)} table(s) complete and equal{mode}"


def _gate_mode(spec: MigrationSpec, run_id: str, mode: str, reasons: list[str], **detail) -> str:
    """Metrics checksum_gate_mode and checksum_gate_reason, event checksum_gate_mode; returns them for the message."""
    reason = "; ".join(reasons)
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, "checksum_gate_mode", mode, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "checksum_gate_reason", reason, commit=False)
        ledger.event(tgt, run_id, spec.name, "checksum_gate_mode", {"mode": mode, "reason": reason, **detail})
    return f" ({mode}: {reason})"


def _verify_or_reuse(spec: MigrationSpec, run_id: str) -> str:
    """Reuse reconcile's verdict when gate_reuse.check proves it still holds: it becomes the gate's (metric
    final_verify, mode reused) and the verified watermark is reconcile's snapshot. Else final_verify measures."""
    t0 = time.monotonic()
    evidence, reasons = gate_reuse.check(spec, run_id)
    if reasons:
        out = final_verify(spec, run_id)
        return _gate_mode(spec, run_id, gate_reuse.MEASURED, reasons, seconds=out.get("seconds"),
                          verify_mode=out.get("mode"))
    with db.target(spec) as tgt:
        tables = ledger.metrics(tgt, run_id)["reconcile"]
    seconds = round(time.monotonic() - t0, 3)
    out = {**_record_tables(spec, run_id, "final_verify", tables, mode="reused", snapshot=evidence["snapshot"],
                            seconds=seconds), "mode": "reused", "snapshot": evidence["snapshot"]}
    with db.source(spec) as src:
        _gate_verdict(spec, run_id, src, out, evidence["foreign_writes"], evidence["snapshot"])
    why = (f"nothing applied, captured, repaired or written on the target since reconcile's snapshot; "
           f"checked in {seconds:.3f} s")
    return _gate_mode(spec, run_id, gate_reuse.REUSED, [why], seconds=seconds)


def _verify_tail(spec: MigrationSpec, run_id: str, src, out: dict, problems: list[str]) -> None:
    """Under release's freeze (`src` holds it): when the checksum gate passed and the applier applied ops since,
    verify again: the rows changed since the gate's watermark when it holds, else whole tables (count +
    checksum; metrics release_verify and checksum_ok)."""
    with db.target(spec) as tgt:
        m = ledger.metrics(tgt, run_id)
    applied = capture.cursor(spec, run_id).get("applied", 0)
    if m.get("checksum_ok") is not True or m.get("applied_at_gate") is None or applied == m["applied_at_gate"]:
        return
    changed = watermark.verify(spec, run_id, src)
    if changed is not None and all(r["equal"] for r in changed.values()):
        out["release_verify"] = {"checksum_ok": True, "mode": "changed", "applied_after_gate":
                                 applied - m["applied_at_gate"], "tables": changed}
        with db.target(spec) as tgt:
            ledger.set_metric(tgt, run_id, spec.name, "release_verify", out["release_verify"], commit=False)
            ledger.event(tgt, run_id, spec.name, "release_verify", {"checksum_ok": True, "mode": "changed"})
        return
    v = _reconcile_all(spec, run_id, "release_verify")  # whole tables (and the repair of what differs)
    out["release_verify"] = {"checksum_ok": v["checksum_ok"], "applied_after_gate": applied - m["applied_at_gate"],
                             "tables": {n: {"equal": r["equal"], "repaired_rows": r.get("repaired_rows")}
                                        for n, r in v["tables"].items()}}
    if not v["checksum_ok"]:
        problems.append("tables differ after the changes applied since the checksum gate: " + "; ".join(
            f"{n}: source {r['source']} != target {r['target']}"
            for n, r in v["tables"].items() if not r["equal"] or r["orphans"]))


@_resolved
def release(spec: MigrationSpec, run_id: str, *, verify: bool = True) -> dict[str, Any]:
    """Undo run-scoped holds on the source: apply the last captured changes and drop capture under a
    brief write freeze (so no write falls between), then lift the schema freeze. Safe to call twice.

    Nothing unverified: when the checksum gate passed and ops were applied after it, the same freeze
    re-verifies whole tables (count + checksum; metric checksum_ok). An op the target refused, or tables
    that differ, raise CaptureError naming op ids / tables, after the holds are lifted. Rollback
    (an abort) passes verify=False."""
    out: dict[str, Any] = {}
    problems: list[str] = []
    try:
        if _capturing(spec):
            try:
                with capture.quiesced(spec, run_id) as (src, info):
                    if verify and not info.get("dual_write_fail"):
                        _verify_tail(spec, run_id, src, out, problems)
                    if verify and spec.has_stores:  # Qdrant collections: the writes since their copy
                        q = retrieval.sync_collections(spec, run_id)
                        if q["stores"]:
                            out["qdrant"] = q
                        if q["dual_write_fail"]:
                            problems.append(f"Qdrant refused {q['dual_write_fail']} dual write(s): {q['stores']}")
                    out["capture_off"] = capture.capture_off(spec, run_id, conn=src)
            except capture.CaptureError as e:
                if verify:
                    raise
                # An abort removes capture even when the last drain cannot run (e.g. a target table is gone).
                info = {"error": str(e)}
                out["capture_off"] = capture.capture_off(spec, run_id)
            out["final_drain"] = info
            _event(spec, run_id, "write_freeze", {"stage": "release", **info})
            if verify and info.get("dual_write_fail"):
                problems.insert(0, _dual_write_failures(spec, run_id))
    finally:
        out["unfrozen"] = pf.release_freeze(spec)
        with contextlib.suppress(DbguardError, psycopg.Error):
            watermark.disarm(spec)
    if problems:
        msg = "release: " + "\n  - ".join(problems)
        record_gate_failure(spec, run_id, "release", msg)
        raise capture.CaptureError(msg)
    return out


@_resolved
def finish_schema(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """After the backfill is reconciled: the source's foreign keys (NOT VALID, then VALIDATE) and its other
    indexes on the target (target_schema.finish), then every remaining schema difference is recorded
    (metric schema_differences; empty when the target could serve as primary)."""
    done = target_schema.finish(spec, run_id)
    diffs = target_schema.differences(spec)
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, "schema_differences", diffs, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "schema_objects", target_schema.objects_summary(spec), commit=False)
        ledger.event(tgt, run_id, spec.name, "finish_schema", {**done, "differences": diffs})
    return {**done, "differences": diffs}


@_resolved
def build_indexes(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """ANN and GIN indexes built offline on the verified target; INDEX_HASH into the manifest."""
    return retrieval.build_indexes(spec, run_id)


@_resolved
def shadow_reads(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Every gold query on source and target (A/A noise floor, two seeds): delta_s_diff, lambda_state."""
    return retrieval.shadow_reads(spec, run_id)


def latest_run(spec: MigrationSpec) -> str | None:
    with db.target(spec) as tgt:
        if tgt.execute("SELECT to_regclass('dbguard.runs')").fetchone()[0] is None:
            return None
        row = tgt.execute("SELECT run_id FROM dbguard.runs WHERE migration = %s ORDER BY started_at DESC LIMIT 1",
                          (spec.name,)).fetchone()
    return row[0] if row else None


@_resolved
def rollback(spec: MigrationSpec, run_id: str | None = None, *, drop_target: bool = False,
             repair_from: str | None = None) -> dict[str, Any]:
    """Abort a run and leave the source as it was: last drain + capture off, schema freeze lifted,
    the run marked rolled_back. With drop_target, the migrated target tables are dropped too (the
    ledger stays). The source is never written to, so nothing there needs undoing."""
    run_id = run_id or latest_run(spec) or "rollback"
    from . import cutover
    try:
        phase = cutover.state(spec, run_id)["phase"]
    except psycopg.Error:
        phase = "before"
    if phase in ("cutover", "rolling_back", "finished"):  # after a flip: flip back (resumable), or refuse
        return {"run_id": run_id, **cutover.rollback(spec, run_id, repair_from=repair_from)}
    out = release(spec, run_id, verify=False)
    if drop_target:  # the undo of preflight's target creation (target_schema.create)
        with db.target(spec) as tgt:
            ledger.ensure(tgt)
            created = ledger.metrics(tgt, run_id).get("schema_created") or []
        out.update(target_schema.drop(spec, created))
    with db.target(spec) as tgt:
        ledger.ensure(tgt)
        ledger.finish_run(tgt, run_id, spec.name, "rolled_back")
        ledger.event(tgt, run_id, spec.name, "rollback", out)
    return {"run_id": run_id, **out}


def finalize(spec: MigrationSpec, run_id: str, status: str) -> dict[str, Any]:
    """Write the report, close the run in the ledger, return the result dict (ledger.RESULT_KEYS).
    A dry run writes nothing: its result only says so."""
    if status == "dry_run":
        return {"migration": spec.name, "status": status, **{k: None for k in ledger.RESULT_KEYS[2:]}}
    with db.target(spec) as tgt:
        ledger.ensure(tgt)
        reason = ledger.failure_reasons(tgt, run_id) if status not in ("success", "dry_run") else None
        ledger.finish_run(tgt, run_id, spec.name, status, reason)
        m = ledger.metrics(tgt, run_id)
        values = {"migration": spec.name, "status": status, **{k: m.get(k) for k in ledger.RESULT_KEYS[2:]},
                  "reason": reason}
        values["report"] = str(report.write(spec, run_id, tgt, values))
    return values
