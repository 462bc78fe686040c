"""The run report: one JSON file and one self-contained HTML page per run.

Written to $DBGUARD_REPORT_DIR (default <project>/reports)/<dag_id>/<run_id>.{json,html}.
Everything comes from the ledger, so a report can be rebuilt at any time.
"""
from __future__ import annotations

import html
import json
import os
import re
from pathlib import Path

import psycopg

from .spec import MigrationSpec


def report_dir() -> Path:
    """$DBGUARD_REPORT_DIR, else reports/ in the project root (where the UI plugin looks too)."""
    return Path(os.environ.get("DBGUARD_REPORT_DIR", Path(__file__).resolve().parents[2] / "reports"))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def gather(conn: psycopg.Connection, run_id: str) -> dict:
    cur = conn.execute(
        "SELECT table_name, range_id, status, rows, seconds, src_count, tgt_count, orphans, attempts "
        "FROM dbguard.ranges WHERE run_id = %s ORDER BY table_name, range_id", (run_id,))
    cols = [d.name for d in cur.description]
    ranges = [dict(zip(cols, r)) for r in cur.fetchall()]
    events = [{"at": str(at), "stage": st, "op_id": op, "detail": d} for at, st, op, d in conn.execute(
        "SELECT at, stage, op_id, detail FROM dbguard.events WHERE run_id = %s ORDER BY id", (run_id,))]
    metrics = dict(conn.execute("SELECT name, value FROM dbguard.metrics WHERE run_id = %s ORDER BY name",
                                (run_id,)).fetchall())
    return {"ranges": ranges, "events": events, "metrics": metrics}


def _bar_svg(ranges: list[dict]) -> str:
    """Rows/second per range as a small inline bar chart."""
    rates = [(r["table_name"], r["range_id"], (r["rows"] or 0) / r["seconds"]) for r in ranges if r["seconds"]]
    if not rates:
        return ""
    top, w, h = max(x[2] for x in rates) or 1, 8, 120
    bars = "".join(
        f'<rect x="{i * (w + 2)}" y="{h - h * v / top:.1f}" width="{w}" height="{h * v / top:.1f}" fill="#4a7">'
        f"<title>{html.escape(t)} #{rid}: {v:,.0f} rows/s</title></rect>" for i, (t, rid, v) in enumerate(rates))
    return f'<svg width="{len(rates) * (w + 2)}" height="{h}">{bars}</svg>'


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
    from .retrieval import gold_path

    lines = [ln for ln in gold_path(spec).read_text(encoding="utf-8").splitlines()
             if ln.strip() and json.loads(ln).get("id") in failing]
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def incident(spec: MigrationSpec, run_id: str, conn: psycopg.Connection, data: dict, base: Path) -> dict | None:
    """For a run that did not succeed: what failed (every gate message), what was undone, and the
    failing gold queries for the postmortem's regression set."""
    if data["result"].get("status") in ("success", "dry_run"):
        return None
    failed = [{"gate": e["stage"].removesuffix("_failed"), "message": (e["detail"] or {}).get("message")}
              for e in data["events"] if e["stage"].endswith("_failed")]
    undone = [e["detail"] for e in data["events"] if e["stage"] in ("capture_off", "write_freeze", "rollback")]
    reg = Path(f"{base}.regression.jsonl")
    n = regression_gold(spec, run_id, conn, reg)
    return {"failed_gates": failed, "undone": undone,
            "regression_gold": str(reg) if n else None, "regression_queries": n,
            "postmortem": ["What failed and when (failed_gates above, events below)",
                           "Impact: the source was never written; the target is not in use (no cutover)",
                           "Root cause (spec field, data, index or analyzer)",
                           "Add regression_gold to the migration's gold set; re-run"]}


def write(spec: MigrationSpec, run_id: str, conn: psycopg.Connection, result: dict) -> Path:
    data = {"result": result, **gather(conn, run_id)}
    out = report_dir() / spec.dag_id
    out.mkdir(parents=True, exist_ok=True)
    base = out / _safe(run_id)
    data["incident"] = incident(spec, run_id, conn, data, base)
    Path(f"{base}.json").write_text(json.dumps(data, indent=2, default=str))
    esc = lambda v: html.escape(json.dumps(v, default=str) if not isinstance(v, str) else v)  # noqa: E731
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in result.items())
    metric_rows = "".join(f"<tr><th>{esc(k)}</th><td><pre>{esc(v)}</pre></td></tr>"
                          for k, v in data["metrics"].items())
    range_rows = "".join("<tr>" + "".join(f"<td>{esc(r[c])}</td>" for c in r) + "</tr>" for r in data["ranges"])
    head = "".join(f"<th>{c}</th>" for c in (data["ranges"][0] if data["ranges"] else {}))
    events = "".join(f"<tr><td>{esc(e['at'])}</td><td>{esc(e['stage'])}</td><td>{esc(e['op_id'])}</td>"
                     f"<td><pre>{esc(e['detail'])}</pre></td></tr>" for e in data["events"])
    inc = data["incident"]
    incident_html = "" if inc is None else (
        "<h2 style='color:#b00'>Incident</h2><ul>"
        + "".join(f"<li><b>{esc(f['gate'])}</b><pre>{esc(f['message'])}</pre></li>" for f in inc["failed_gates"])
        + f"</ul><p>Undone: <pre>{esc(inc['undone'])}</pre></p>"
        + (f"<p>Regression gold set ({inc['regression_queries']} queries): <code>{esc(inc['regression_gold'])}"
           "</code></p>" if inc["regression_gold"] else "")
        + "<h3>Postmortem</h3><ol>" + "".join(f"<li>{esc(p)}</li>" for p in inc["postmortem"]) + "</ol>")
    page = f"""<!doctype html><meta charset="utf-8"><title>dbguard {esc(spec.name)} {esc(run_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;
vertical-align:top}}table{{border-collapse:collapse;margin-bottom:1.5em}}pre{{margin:0;white-space:pre-wrap}}</style>
<h1>dbguard: {esc(spec.name)}</h1><p>run <code>{esc(run_id)}</code> — {esc(spec.description)}</p>
<h2>Result</h2><table>{rows}</table>{incident_html}
<h2>Backfill rows/s per range</h2>{_bar_svg(data["ranges"])}
<h2>Metrics</h2><table>{metric_rows}</table>
<h2>Ranges</h2><table><tr>{head}</tr>{range_rows}</table>
<h2>Events</h2><table>{events}</table>"""
    path = Path(f"{base}.html")
    path.write_text(page)
    return path
