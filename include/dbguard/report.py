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


def write(spec: MigrationSpec, run_id: str, conn: psycopg.Connection, result: dict) -> Path:
    data = {"result": result, **gather(conn, run_id)}
    out = report_dir() / spec.dag_id
    out.mkdir(parents=True, exist_ok=True)
    base = out / _safe(run_id)
    Path(f"{base}.json").write_text(json.dumps(data, indent=2, default=str))
    esc = lambda v: html.escape(json.dumps(v, default=str) if not isinstance(v, str) else v)  # noqa: E731
    rows = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in result.items())
    metric_rows = "".join(f"<tr><th>{esc(k)}</th><td><pre>{esc(v)}</pre></td></tr>"
                          for k, v in data["metrics"].items())
    range_rows = "".join("<tr>" + "".join(f"<td>{esc(r[c])}</td>" for c in r) + "</tr>" for r in data["ranges"])
    head = "".join(f"<th>{c}</th>" for c in (data["ranges"][0] if data["ranges"] else {}))
    events = "".join(f"<tr><td>{esc(e['at'])}</td><td>{esc(e['stage'])}</td><td>{esc(e['op_id'])}</td>"
                     f"<td><pre>{esc(e['detail'])}</pre></td></tr>" for e in data["events"])
    page = f"""<!doctype html><meta charset="utf-8"><title>dbguard {esc(spec.name)} {esc(run_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{border:1px solid #ccc;padding:2px 6px;text-align:left;
vertical-align:top}}table{{border-collapse:collapse;margin-bottom:1.5em}}pre{{margin:0;white-space:pre-wrap}}</style>
<h1>dbguard: {esc(spec.name)}</h1><p>run <code>{esc(run_id)}</code> — {esc(spec.description)}</p>
<h2>Result</h2><table>{rows}</table>
<h2>Backfill rows/s per range</h2>{_bar_svg(data["ranges"])}
<h2>Metrics</h2><table>{metric_rows}</table>
<h2>Ranges</h2><table><tr>{head}</tr>{range_rows}</table>
<h2>Events</h2><table>{events}</table>"""
    path = Path(f"{base}.html")
    path.write_text(page)
    return path
