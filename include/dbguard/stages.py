"""Stage entry points: what each DAG task (and the CLI) calls.

Every function takes the spec and the run id, returns JSON-able values (they
travel as XCom) and is safe to re-run. The Airflow layer only parses
arguments and calls these.
"""
from __future__ import annotations

from typing import Any

from . import ledger, preflight as pf, report
from .backfill import copy_range as _copy_range, source_conn, target_conn
from .errors import GateFailed
from .ranges import KeyRange, plan
from .reconcile import reconcile_table
from .spec import MigrationSpec


def _event(spec: MigrationSpec, run_id: str, stage: str, detail: dict, **kw) -> None:
    with target_conn(spec) as tgt:
        ledger.event(tgt, run_id, spec.name, stage, detail, **kw)


def preflight(spec: MigrationSpec, run_id: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Read-only checks (contract, privileges, headroom), then target creation + schema freeze."""
    checks = pf.validate(spec)
    if dry_run:
        return {"dry_run": True, **checks}
    applied = pf.apply(spec, run_id)
    out = {**checks, **applied}
    _event(spec, run_id, "preflight", out)
    return out


def plan_ranges(spec: MigrationSpec, run_id: str, table: str, *, batch_rows: int | None = None) -> list[dict]:
    """Key ranges for one table, read from the source only: [{"table", "range_id", "lo", "hi", "label", "planned"}]."""
    t = spec.table(table)
    with source_conn(spec) as src:
        ranges = plan(src, t, batch_rows or spec.backfill.batch_rows)
    return [{**r.to_dict(), "planned": len(ranges)} for r in ranges]


def copy_range(spec: MigrationSpec, run_id: str, krange: dict) -> dict[str, Any]:
    """Copy one range (idempotent), verify count+checksum+orphans."""
    r = KeyRange.from_dict(krange)
    res = _copy_range(spec, run_id, r, rows_per_second=spec.backfill.max_rows_per_second)
    if "planned" in krange:
        with target_conn(spec) as tgt:
            ledger.set_metric(tgt, run_id, spec.name, f"planned_ranges.{r.table}", int(krange["planned"]))
    return res.to_dict()


def reconcile(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Whole-table count+checksum, bisection, repair, re-verify, table by table."""
    tables = {t.name: reconcile_table(spec, run_id, t) for t in spec.table_order()}
    ok = all(r["equal"] and r["orphans"] == 0 for r in tables.values())
    migrated = sum(r["target"]["count"] for r in tables.values())
    with target_conn(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, "reconcile", tables, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "checksum_ok", ok, commit=False)
        ledger.set_metric(tgt, run_id, spec.name, "migrated_rows", migrated, commit=False)
        ledger.event(tgt, run_id, spec.name, "reconcile", {"checksum_ok": ok, "migrated_rows": migrated})
    return {"checksum_ok": ok, "migrated_rows": migrated, "tables": tables}


def checksum_problems(spec: MigrationSpec, run_id: str) -> list[str]:
    """Every reason the checksum gate must not pass; empty when it may."""
    with target_conn(spec) as tgt:
        m = ledger.metrics(tgt, run_id)
        copied = dict(tgt.execute(
            "SELECT table_name, count(*) FROM dbguard.ranges WHERE run_id = %s AND status <> 'planned' "
            "GROUP BY table_name", (run_id,)).fetchall())
    problems = []
    rec = m.get("reconcile") or {}
    for t in spec.tables:
        planned = m.get(f"planned_ranges.{t.name}")
        if planned is None or copied.get(t.name, 0) < planned:
            problems.append(f"{t.name}: backfill incomplete: {copied.get(t.name, 0)} of "
                            f"{planned if planned is not None else '?'} planned ranges copied")
        r = rec.get(t.name)
        if r is None:
            problems.append(f"{t.name}: not reconciled yet")
            continue
        if not r["equal"]:
            last = r["rounds"][-1] if r["rounds"] else {}
            problems.append(
                f"{t.name}: source {r['source']['count']} rows (sum {r['source']['sum']}) != target "
                f"{r['target']['count']} rows (sum {r['target']['sum']}); missing {last.get('missing')}, "
                f"extra {last.get('extra')}, changed {last.get('changed')} in ranges {last.get('ranges')}; "
                f"e.g. keys missing {last.get('missing_keys')}, extra {last.get('extra_keys')}, "
                f"changed {last.get('changed_keys')}")
        if r["orphans"]:
            problems.append(f"{t.name}: {r['orphans']} rows in the target reference a missing parent row")
    return problems


def checksum_gate(spec: MigrationSpec, run_id: str) -> tuple[bool, str]:
    """(passed, message): passes only at 100 % completeness and equal checksums."""
    problems = checksum_problems(spec, run_id)
    if problems:
        return False, "checksum gate failed:\n" + "\n".join(f"  - {p}" for p in problems)
    return True, f"checksum gate passed: {len(spec.tables)} table(s) complete and equal"


def require_checksum_gate(spec: MigrationSpec, run_id: str) -> str:
    ok, msg = checksum_gate(spec, run_id)
    if not ok:
        raise GateFailed(msg)
    return msg


def release(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Undo run-scoped holds on the source (schema freeze); safe to call twice."""
    return {"unfrozen": pf.release_freeze(spec)}


def finalize(spec: MigrationSpec, run_id: str, status: str) -> dict[str, Any]:
    """Write the report, close the run in the ledger, return the result dict (ledger.RESULT_KEYS)."""
    with target_conn(spec) as tgt:
        ledger.ensure(tgt)
        ledger.finish_run(tgt, run_id, status)
        m = ledger.metrics(tgt, run_id)
        values = {"migration": spec.name, "status": status, **{k: m.get(k) for k in ledger.RESULT_KEYS[2:]}}
        values["report"] = str(report.write(spec, run_id, tgt, values))
    return values
