"""Incident note and postmortem draft for a run that aborted, rolled back or failed.

Written beside the run report (report.report_dir()/<dag_id>/<run>.incident.md and .postmortem.md),
everything from the ledger: what failed (each '<stage>_failed' event's message), the measured values
against their thresholds, a timeline of the run's events, and what was undone. Gold queries that did
not stay convergent are appended to the migration's regression gold set
(<dag_id>/regression_gold.jsonl, one line per query id, never twice).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from . import db, report
from .spec import MigrationSpec

INCIDENT_STATUSES = report.INCIDENT_STATUSES
UNDO_STAGES = ("release", "write_freeze", "capture_off", "rollback")


def _short(detail: Any, limit: int = 160) -> str:
    text = detail.get("message") if isinstance(detail, dict) and detail.get("message") else json.dumps(
        detail, default=str)
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def measured(spec: MigrationSpec, m: dict[str, Any]) -> list[tuple[str, Any, str]]:
    """(metric, measured value, threshold) rows for the note."""
    g = spec.gates
    rows = [("checksum_ok", m.get("checksum_ok"), "true"),
            ("migrated_rows", m.get("migrated_rows"), "= source rows"),
            ("dual_write_fail", m.get("dual_write_fail"), "0"),
            ("delta_s_diff", m.get("delta_s_diff"), f"<= {g.delta_s_max} (escalate > {g.delta_s_escalate} for "
                                                   f"{g.escalate_after_minutes:g} min)"),
            ("lambda_state", m.get("lambda_state"), "convergent (both seeds)"),
            ("cutover_ms", m.get("cutover_ms"), "write freeze of the flip"),
            ("rollback_ms", m.get("rollback_ms"), "write freeze of the way back"),
            ("writes_after_cutover", m.get("writes_after_cutover"), "all on the source after rollback"),
            ("soak_green_since", m.get("soak_green_since"), f"green for {spec.soak_minutes:g} min")]
    return [r for r in rows if r[1] is not None or r[0] in ("checksum_ok", "dual_write_fail")]


def _append_regression(spec: MigrationSpec, run_id: str, conn, out: Path) -> tuple[int, Path]:
    """Failing gold queries of this run appended to <dag dir>/regression_gold.jsonl (deduplicated by id)."""
    run_file = out / f"{report._safe(run_id)}.regression.jsonl"
    n = report.regression_gold(spec, run_id, conn, run_file)
    reg = out / "regression_gold.jsonl"
    if n:
        old = reg.read_text().splitlines() if reg.exists() else []
        have = {json.loads(ln).get("id") for ln in old if ln.strip()}
        new = [ln for ln in run_file.read_text().splitlines() if ln.strip() and json.loads(ln).get("id") not in have]
        with reg.open("a", encoding="utf-8") as f:
            f.writelines(ln + "\n" for ln in new)
    return n, reg


def write(spec: MigrationSpec, run_id: str, result: dict[str, Any]) -> dict[str, str] | None:
    """Write <run>.incident.md and <run>.postmortem.md for an aborted / rolled_back / failed run;
    None (nothing written) for any other status. Returns the paths."""
    status = result.get("status")
    if status not in INCIDENT_STATUSES:
        return None
    out = report.report_dir() / spec.dag_id
    out.mkdir(parents=True, exist_ok=True)
    base = out / report._safe(run_id)
    with db.target(spec) as conn:
        data = report.gather(conn, run_id)
        n_gold, reg = _append_regression(spec, run_id, conn, out)
    events, m = data["events"], data["metrics"]
    failed = [(e["stage"].removesuffix("_failed"), (e["detail"] or {}).get("message", "")) for e in events
              if e["stage"].endswith("_failed")]
    undone = [e for e in events if e["stage"] in UNDO_STAGES or e["stage"].startswith("rollback.")]
    flipped = any(e["stage"].startswith("cutover.") for e in events) or m.get("cutover_ms") is not None
    lines = [f"# Incident: {spec.name} run {run_id} — {status}", "",
             f"Source `{spec.source.conn_id}` -> target `{spec.target.conn_id}`; "
             + ("the application had been flipped to the target." if flipped else
                "nothing was flipped: the source stayed the primary."), "",
             "## What failed", ""]
    lines += [f"- **{stage}**: {' '.join(str(msg).split())}" for stage, msg in failed] or [
        f"- {result.get('reason') or 'no stage recorded a failure message (see the Airflow log)'}"]
    lines += ["", "## Measured against thresholds", "", "| metric | measured | threshold |", "|---|---|---|"]
    lines += [f"| {k} | {json.dumps(v, default=str)} | {t} |" for k, v, t in measured(spec, m)]
    lines += ["", "## Timeline (ledger events)", "", "| at | stage | detail |", "|---|---|---|"]
    lines += [f"| {e['at']} | {e['stage']} | {_short(e['detail']).replace('|', '/')} |" for e in events]
    lines += ["", "## What was undone", ""]
    lines += [f"- {e['at']} {e['stage']}: {_short(e['detail'])}" for e in undone] or ["- nothing recorded"]
    if n_gold:
        lines += ["", f"{n_gold} failing gold quer{'y' if n_gold == 1 else 'ies'} appended to `{reg}`."]
    inc = Path(f"{base}.incident.md")
    inc.write_text("\n".join(lines) + "\n", encoding="utf-8")
    first = failed[0][0] if failed else "unknown stage"
    pm = Path(f"{base}.postmortem.md")
    pm.write_text("\n".join([
        f"# Postmortem (draft): {spec.name} run {run_id}", "",
        f"Status: **{status}**. First failure: **{first}**. Incident note: `{inc.name}`.", "",
        "## Impact", "",
        ("- The target was primary for a while; rollback restored the source with the writes made meanwhile "
         f"(writes_after_cutover: {json.dumps(m.get('writes_after_cutover'))})." if flipped else
         "- No cutover: applications kept using the source; the target was not in use."), "",
        "## Root cause", "", "- TODO: spec field, data, index or analyzer? (see 'What failed')", "",
        "## What went well / badly", "", "- TODO", "",
        "## Actions", "",
        f"- Add the failing gold queries ({n_gold}) in `{reg.name}` to the migration's gold set." if n_gold else
        "- No gold query failed.",
        "- Fix the cause, then re-run the migration (the ledger keeps this run for comparison).", ""]),
        encoding="utf-8")
    return {"incident": str(inc), "postmortem": str(pm)}
