"""The run report: one JSON file and one self-contained HTML page per run (page.py, plots.py).

Written to $DBGUARD_REPORT_DIR (default <project>/reports)/<dag_id>/<run_id>.{json,html}.
Everything comes from the ledger, so a report can be rebuilt at any time. The page is drawn in a process of
its own (render.py): importing this package loads no pandas or matplotlib.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import psycopg

from ..spec import MigrationSpec


def report_dir() -> Path:
    """$DBGUARD_REPORT_DIR, else reports/ in the project root (where the UI plugin looks too)."""
    return Path(os.environ.get("DBGUARD_REPORT_DIR", Path(__file__).resolve().parents[3] / "reports"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def _rows(conn: psycopg.Connection, query: str, params: tuple) -> list[dict]:
    cur = conn.execute(query, params)
    return [dict(zip([d.name for d in cur.description], r)) for r in cur.fetchall()]


def gather(conn: psycopg.Connection, run_id: str) -> dict:
    """Every ledger record of the run the report draws on: ranges, events, metrics, the runs row,
    shadow reads (per query figures, no result ids) and change-apply batches."""
    ranges = _rows(conn, "SELECT table_name, range_id, status, rows, seconds, src_count, tgt_count, orphans, "
                         "attempts, updated_at FROM dbguard.ranges WHERE run_id = %s ORDER BY table_name, range_id",
                   (run_id,))
    events = [{"at": str(at), "stage": st, "op_id": op, "detail": d} for at, st, op, d in conn.execute(
        "SELECT at, stage, op_id, detail FROM dbguard.events WHERE run_id = %s ORDER BY id", (run_id,))]
    metrics = dict(conn.execute("SELECT name, value FROM dbguard.metrics WHERE run_id = %s ORDER BY name",
                                (run_id,)).fetchall())
    run = _rows(conn, "SELECT started_at, finished_at, extract(epoch FROM coalesce(finished_at, clock_timestamp()) "
                      "- started_at)::float8 AS seconds FROM dbguard.runs WHERE run_id = %s", (run_id,))
    out = {"run": run[0] if run else None, "ranges": ranges, "events": events, "metrics": metrics,
           "shadow_reads": [], "apply_batches": []}
    if conn.execute("SELECT to_regclass('dbguard.shadow_reads')").fetchone()[0] is not None:
        out["shadow_reads"] = _rows(conn, "SELECT store, query_id, seed, delta_s_pre, delta_s_post, lambda, "
                                          "latency_pre_ms, latency_post_ms, recall_pre, recall_post "
                                          "FROM dbguard.shadow_reads WHERE run_id = %s ORDER BY store, query_id, seed",
                                    (run_id,))
    if conn.execute("SELECT to_regclass('dbguard.apply_batches')").fetchone()[0] is not None:
        out["apply_batches"] = _rows(conn, "SELECT at, direction, ops, failed, seconds FROM dbguard.apply_batches "
                                           "WHERE run_id = %s ORDER BY at", (run_id,))
    return out


def regression_gold(spec: MigrationSpec, run_id: str, conn: psycopg.Connection, path: Path) -> int:
    """Postmortem input: the gold queries that did not stay convergent, copied verbatim from the gold
    set into `path` (JSONL), ready to join a regression gold set. Returns how many."""
    if spec.gold is None or conn.execute("SELECT to_regclass('dbguard.shadow_reads')").fetchone()[0] is None:
        return 0
    failing = {q for (q,) in conn.execute(
        "SELECT DISTINCT query_id FROM dbguard.shadow_reads WHERE run_id = %s AND seed > 0 AND lambda <> '→'",
        (run_id,))}
    if not failing:
        return 0
    from ..retrieval import gold_path

    lines = [ln for ln in gold_path(spec).read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln).get("id") in failing]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


INCIDENT_STATUSES = ("aborted", "rolled_back", "failed")  # a clean flip (`cutover`) is no incident (page.py too)


def incident(spec: MigrationSpec, run_id: str, conn: psycopg.Connection, data: dict, base: Path) -> dict | None:
    """For a run that aborted, rolled back or failed: what failed (every gate message), what was undone,
    and the failing gold queries for the postmortem's regression set. None for any other status."""
    if data["result"].get("status") not in INCIDENT_STATUSES:
        return None
    flipped = data["metrics"].get("cutover_ms") is not None
    failed = [{"gate": e["stage"].removesuffix("_failed"), "message": (e["detail"] or {}).get("message")}
              for e in data["events"] if e["stage"].endswith("_failed")]
    undone = [e["detail"] for e in data["events"] if e["stage"] in ("capture_off", "write_freeze", "rollback")]
    reg = Path(f"{base}.regression.jsonl")
    n = regression_gold(spec, run_id, conn, reg)
    return {"failed_gates": failed, "undone": undone,
            "regression_gold": str(reg) if n else None, "regression_queries": n,
            "postmortem": ["What failed and when (failed_gates above, events below)",
                           ("Impact: the target was primary for a while; rollback brought its writes back to the "
                            "source (writes_after_cutover)" if flipped else
                            "Impact: the source was never written; the target is not in use (no cutover)"),
                           "Root cause (spec field, data, index or analyzer)",
                           "Add regression_gold to the migration's gold set; re-run"]}


def write(spec: MigrationSpec, run_id: str, conn: psycopg.Connection, result: dict) -> Path:
    """Write <run>.json and <run>.html; the result's `report` is the HTML path (also inside the page). The page
    is drawn in a child process (render.py); its peak RSS is recorded (metric report_render)."""
    out = report_dir() / spec.dag_id
    out.mkdir(parents=True, exist_ok=True)
    base = out / _safe(run_id)
    path = Path(f"{base}.html")
    data = {"result": {**result, "report": str(path)}, **gather(conn, run_id)}
    data["incident"] = incident(spec, run_id, conn, data, base)
    Path(f"{base}.json").write_text(json.dumps(data, indent=2, default=str))
    from . import render
    from .. import ledger

    how, peak = render.in_child(spec, run_id, data, base)
    ledger.set_metric(conn, run_id, spec.name, "report_render", {"how": how, "peak_rss_mb": peak})
    return path
