"""The report page: verdict (every gate, measured vs threshold), plots, detail tables.

Built from `gather()`'s ledger records with pandas; numbers are rounded for people
(durations in ms/s, at most 3 decimals), never shown as JSON in a cell.
"""
from __future__ import annotations

import html
import json
import os
from pathlib import Path
from typing import Any

import pandas as pd

from ..spec import MigrationSpec
from . import plots

CSS = """body{font-family:system-ui,sans-serif;margin:1.5em 2em;color:#222;max-width:1100px}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1.2em}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;
vertical-align:top;font-size:14px}th{background:#f5f5f5}td.num,th.num{text-align:right}
.status{display:inline-block;padding:.3em .8em;border-radius:4px;color:#fff;font-weight:bold;font-size:20px}
.st-ok{background:#2e7d32}.st-bad{background:#c62828}
tr.ok td:first-child{border-left:6px solid #2e7d32}tr.bad td:first-child{border-left:6px solid #c62828}
tr.bad{background:#fdecea}tr.info td:first-child{border-left:6px solid #9e9e9e}
.plots img{width:49%;min-width:420px;border:1px solid #eee;margin:.3em 0;vertical-align:top}pre{white-space:pre-wrap;margin:0}
.muted{color:#666}"""


def esc(v: Any) -> str:
    return html.escape(str(v))


def num(v: Any, digits: int = 3) -> str:
    """People's precision: ints with thousands separators, floats to `digits` significant decimals."""
    if v is None or (isinstance(v, float) and pd.isna(v)):
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if v == 0:
            return "0"
        return f"{v:,.{digits}g}" if abs(v) < 1 else f"{v:,.{digits}f}".rstrip("0").rstrip(".")
    return str(v)


def dur_ms(ms: float | None) -> str:
    if ms is None:
        return "–"
    return f"{ms:.3g} ms" if ms < 1000 else f"{ms / 1000:.3g} s" if ms < 600_000 else f"{ms / 60000:.1f} min"


# ---- frames from the ledger ---------------------------------------------------------------

def frames(data: dict) -> dict[str, pd.DataFrame]:
    ranges = pd.DataFrame(data["ranges"])
    if len(ranges):
        ranges["updated_at"] = pd.to_datetime(ranges["updated_at"], utc=True)
    shadow = pd.DataFrame(data.get("shadow_reads") or [],
                          columns=["store", "query_id", "seed", "delta_s_pre", "delta_s_post", "lambda",
                                   "latency_pre_ms", "latency_post_ms", "recall_pre", "recall_post"])
    drains = pd.DataFrame([{"at": e["at"], "lag": (e["detail"] or {}).get("lag", 0),
                            "applied": (e["detail"] or {}).get("applied", 0)}
                           for e in data["events"] if e["stage"] == "drain_changes"], columns=["at", "lag", "applied"])
    if len(drains):
        drains["at"] = pd.to_datetime(drains["at"], utc=True, format="ISO8601")
    batches = pd.DataFrame(data.get("apply_batches") or [], columns=["at", "direction", "ops", "failed", "seconds"])
    if len(batches):
        batches["at"] = pd.to_datetime(batches["at"], utc=True)
    m = data["metrics"]
    verify = m.get("final_verify") or m.get("reconcile") or {}
    tables = pd.DataFrame([{"table": name, "source rows": (v.get("source") or {}).get("count"),
                            "target rows": (v.get("target") or {}).get("count"),
                            "checksum equal": bool(v.get("equal")), "orphans": v.get("orphans"),
                            "repaired rows": v.get("repaired_rows"), "seconds": v.get("seconds"),
                            "repair rounds": len(v.get("rounds") or [])}
                           for name, v in verify.items() if isinstance(v, dict)])
    steps = pd.DataFrame([{"kind": kind, "step": s.get("step"), "ms": float(s.get("ms") or 0), "ok": bool(s.get("ok")),
                           "at": s.get("at")}
                          for kind in ("cutover", "rollback") for s in (m.get(f"{kind}_steps") or [])
                          if isinstance(s, dict)], columns=["kind", "step", "ms", "ok", "at"])
    return {"ranges": ranges, "shadow": shadow, "drains": drains, "batches": batches, "tables": tables,
            "steps": steps}


# ---- verdict ---------------------------------------------------------------------------------

def gates(spec: MigrationSpec, data: dict, f: dict[str, pd.DataFrame]) -> list[tuple[str, str, str, bool | None]]:
    """(gate, measured, threshold, passed) for every gate this run has numbers for; passed None = info."""
    m, g, out = data["metrics"], spec.gates, []
    if "checksum_ok" in m:
        out.append(("checksum (counts + sums, every table)", "equal" if m["checksum_ok"] else "MISMATCH",
                    "equal", bool(m["checksum_ok"])))
    if m.get("checksum_gate_mode"):  # one proof or two: did the gate compare again, and why (gate_reuse)
        out.append(("checksum gate verdict", f"{m['checksum_gate_mode']}: {m.get('checksum_gate_reason') or ''}",
                    "", None))
    r = f["ranges"]
    if len(r):
        done = int((r["status"] == "verified").sum())
        out.append(("completeness (key ranges verified)", f"{done:,} / {len(r):,}", "all planned", done == len(r)))
    # orphans as the final verification counted them (a range's count at copy time can include children
    # whose parents arrive later through capture)
    t = f["tables"]
    if len(t) or len(r):
        orphans = int((t["orphans"] if len(t) else r["orphans"]).fillna(0).sum())
        out.append(("orphans (rows without parent, final check)", f"{orphans:,}", "0", orphans == 0))
    if "migrated_rows" in m:
        out.append(("migrated rows", num(m["migrated_rows"]), "", None))
    if m.get("target_store") == "qdrant":  # the stores the retrieval gate compared
        out.append(("vector store kinds (source → target)", "pgvector → qdrant", "", None))
    if "dual_write_fail" in m:
        out.append(("dual_write_fail (change ops not applied)", num(m["dual_write_fail"]), "0",
                    not m["dual_write_fail"]))
    if m.get("delta_s_diff") is not None:
        out.append(("ΔS diff (mean |ΔS post − ΔS pre|, worst seed)", num(float(m["delta_s_diff"])),
                    f"≤ {num(g.delta_s_max)}", float(m["delta_s_diff"]) <= g.delta_s_max))
    for k in sorted(k for k in m if k.startswith("lambda_state_seed_")):
        out.append((f"λ state, seed {k.rsplit('_', 1)[1]}", str(m[k]), "convergent", m[k] == "convergent"))
    if m.get("latency_p95_change") is not None:
        # as the retrieval gate judges it: a slow-down smaller than retrieval.latency_floor_ms is noise
        ch, pre, post = float(m["latency_p95_change"]), m.get("latency_p95_pre_ms"), m.get("latency_p95_post_ms")
        floor = spec.retrieval.latency_floor_ms if getattr(spec, "retrieval", None) else 0.0
        ok = ch <= g.latency_p95_change or (pre is not None and post is not None and post - pre <= floor)
        out.append(("latency p95 change (post vs pre)", f"{ch:+.1%} ({dur_ms(pre)} → {dur_ms(post)})",
                    f"≤ +{g.latency_p95_change:.0%} or ≤ +{num(float(floor))} ms", ok))
    if m.get("recall_post") is not None and m.get("recall_pre") is not None:
        tol = float(m.get("recall_tolerance") or 0)
        out.append(("recall post vs pre (exact search probe)", f"{num(m['recall_post'])} vs {num(m['recall_pre'])}",
                    f"≥ pre − {num(tol)}", float(m["recall_post"]) >= float(m["recall_pre"]) - tol))
    if m.get("cutover_ms") is not None:
        limit = getattr(getattr(spec, "cutover", None), "max_ms", None)
        out.append(("cutover (writes paused)", dur_ms(float(m["cutover_ms"])),
                    f"≤ {dur_ms(limit)}" if limit else f"window {spec.window.start}–{spec.window.end} "
                    f"{spec.window.timezone}" if spec.window else "", None if not limit else m["cutover_ms"] <= limit))
    if m.get("rollback_ms") is not None:
        out.append(("rollback", dur_ms(float(m["rollback_ms"])), "", None))
    if isinstance(m.get("writes_after_cutover"), dict):
        out.append(("writes after cutover", ", ".join(f"{k}: {num(v)}" for k, v in m["writes_after_cutover"].items()),
                    "", None))
    return out


def verdict_html(result: dict, rows: list[tuple[str, str, str, bool | None]]) -> str:
    status = result.get("status") or "unknown"
    cls = "st-ok" if status in ("success", "cutover", "dry_run") else "st-bad"
    body = "".join(f"<tr class='{'info' if ok is None else 'ok' if ok else 'bad'}'><td>{esc(n)}</td>"
                   f"<td class='num'>{esc(v)}</td><td>{esc(t)}</td>"
                   f"<td>{'' if ok is None else '✔ pass' if ok else '✘ FAIL'}</td></tr>" for n, v, t, ok in rows)
    reason = f"<div class='muted'>{_message(result['reason'])}</div>" if result.get("reason") else ""
    return (f"<h2>Verdict</h2><p><span class='status {cls}'>{esc(status)}</span></p>{reason}"
            f"<table><tr><th>gate</th><th class='num'>measured</th><th>threshold</th><th>result</th></tr>"
            f"{body}</table>")


# ---- detail tables -------------------------------------------------------------------------

def _fmt_frame(df: pd.DataFrame, units: dict[str, str] | None = None) -> str:
    if not len(df):
        return "<p class='muted'>none</p>"
    out = df.copy()
    for c in out.columns:
        out[c] = out[c].map(lambda v: num(v) if not isinstance(v, (list, dict)) else ", ".join(map(str, v)))
    out.columns = [f"{c} ({units[c]})" if units and c in units else c for c in out.columns]
    return out.to_html(index=False, escape=True, border=0)


def ranges_table(r: pd.DataFrame) -> str:
    if not len(r):
        return _fmt_frame(r)
    df = pd.DataFrame({"table": r["table_name"], "range": r["range_id"].astype(int), "status": r["status"],
                       "rows": r["rows"].map(lambda v: None if pd.isna(v) else int(v)),
                       "seconds": r["seconds"].round(3),
                       "rows/s": (r["rows"] / r["seconds"]).where(r["seconds"] > 0).round(0),
                       "attempts": r["attempts"].astype(int),
                       "orphans": r["orphans"].map(lambda v: None if pd.isna(v) else int(v))})
    return _fmt_frame(df, {"seconds": "s"})


def query_table(shadow: pd.DataFrame) -> str:
    df = shadow[shadow["seed"] > 0] if len(shadow) else shadow
    if not len(df):
        return _fmt_frame(df)
    agg = df.groupby("store").agg(queries=("query_id", "nunique"), seeds=("seed", "nunique"),
                                  delta_s_pre_mean=("delta_s_pre", "mean"), delta_s_post_mean=("delta_s_post", "mean"),
                                  latency_pre_p95=("latency_pre_ms", lambda s: s.quantile(.95)),
                                  latency_post_p95=("latency_post_ms", lambda s: s.quantile(.95)),
                                  convergent=("lambda", lambda s: f"{(s == '→').mean():.1%}")).reset_index()
    worst = df.assign(d=(df["delta_s_post"] - df["delta_s_pre"]).abs()).nlargest(10, "d")[
        ["store", "query_id", "seed", "delta_s_pre", "delta_s_post", "lambda", "latency_pre_ms", "latency_post_ms"]]
    return (_fmt_frame(agg, {"latency_pre_p95": "ms", "latency_post_p95": "ms"})
            + "<h3>Gold queries that moved most (|ΔS post − ΔS pre|)</h3>"
            + _fmt_frame(worst))


SKIP_METRICS = {"reconcile", "final_verify", "reconcile_evidence", "cutover_steps", "rollback_steps", "excluded_columns",
                "schema_objects", "migrated_columns", "schema_created"}


def metrics_table(m: dict) -> str:
    """Scalar metrics as name/value; nested ones flattened one level (a.b = value), never as JSON."""
    rows = []
    for k in sorted(m):
        v = m[k]
        if k in SKIP_METRICS:
            continue
        if isinstance(v, dict):
            for kk, vv in v.items():
                rows.append({"metric": f"{k}.{kk}", "value": _flat(vv)})
        else:
            rows.append({"metric": k, "value": _flat(v)})
    return _fmt_frame(pd.DataFrame(rows))


def _flat(v: Any) -> str:
    if isinstance(v, dict):
        return "; ".join(f"{k}={_flat(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_flat(x) for x in v) or "–"
    unit = ""
    return num(v) + unit


def excluded_html(m: dict) -> str:
    ex = m.get("excluded_columns")
    if not ex:
        return ""
    if isinstance(ex, dict):
        items = [f"{t}: {', '.join(map(str, c)) if isinstance(c, list) else c}" for t, c in ex.items()]
    else:
        items = [str(x) if not isinstance(x, dict) else ", ".join(f"{k}={v}" for k, v in x.items()) for x in ex]
    return ("<h2>Columns excluded from the migration</h2><ul>" + "".join(f"<li>{esc(i)}</li>" for i in items)
            + "</ul>")


def schema_html(m: dict) -> str:
    """The target's schema against the source's, object by object (metric schema_objects, finish_schema)."""
    objs = m.get("schema_objects")
    if not isinstance(objs, dict) or not objs:
        return ""
    rows = "".join(f"<tr><td>{esc(t)}</td><td>{esc(o.get('kind'))}</td><td>{esc(o.get('source'))}</td>"
                   f"<td>{esc(o.get('target'))}</td><td>{'=' if o.get('equal') else '≠'}</td></tr>"
                   for t, kinds in objs.items() for o in kinds)
    return ("<h2>Schema on the target</h2><table><tr><th>table</th><th>objects</th><th>source</th><th>target</th>"
            "<th></th></tr>" + rows + "</table>")


def migrated_html(m: dict) -> str:
    """The resolved column contract (metric migrated_columns): what every stage carried, per table."""
    cols = m.get("migrated_columns")
    if not isinstance(cols, dict) or not cols:
        return ""
    return ("<h2>Columns migrated</h2><ul>" + "".join(
        f"<li>{esc(t)}: {esc(', '.join(map(str, c)))}</li>" for t, c in cols.items()) + "</ul>")


def events_table(events: list[dict]) -> str:
    rows = [{"at": str(e["at"])[11:23], "stage": e["stage"], "op_id": e["op_id"],
             "detail": _flat({k: v for k, v in (e["detail"] or {}).items() if k != "message"})[:300]
             + (f" — {(e['detail'] or {})['message']}" if (e["detail"] or {}).get("message") else "")}
            for e in events]
    return _fmt_frame(pd.DataFrame(rows), {"at": "UTC"})


def cutover_html(spec: MigrationSpec, m: dict, f: dict[str, pd.DataFrame]) -> str:
    """The flip, for a run that cut over (and the way back, if it rolled back): each step with its start and
    time, the pointer, the write freeze, and until when rollback is offered (rollback_ttl_minutes)."""
    if m.get("cutover_ms") is None:
        return ""
    steps = f["steps"]
    started = steps.loc[steps["kind"] == "cutover", "at"].dropna()
    until = m.get("rollback_offered_until")  # flow.tail records it; a library-only cutover: from its start
    if until is None and len(started):
        until = (pd.Timestamp(started.iloc[0]) + pd.Timedelta(minutes=spec.rollback_ttl_minutes)).isoformat()
    until_text = pd.Timestamp(until).strftime("%Y-%m-%d %H:%M:%S UTC") if until else "–"
    back = m.get("rollback_ms") is not None
    rows = [("pointer", f"{spec.cutover.pointer}: points at the {'source again' if back else 'target'}"),
            ("writes paused (cutover_ms)", dur_ms(float(m["cutover_ms"]))),
            ("rollback offered until", f"{until_text} (rollback_ttl_minutes {spec.rollback_ttl_minutes:g}; "
                                       f"then dbguard_{spec.name}_finish ends the tail)")]
    if back:
        rows.append(("rolled back (rollback_ms)", dur_ms(float(m["rollback_ms"]))))
    head = "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in rows)
    table = steps.assign(at=steps["at"].map(lambda v: str(v)[11:23] if v else "–"),
                         ok=steps["ok"].map(lambda v: "ok" if v else "FAILED"))
    return (f"<h2>Cutover</h2><table>{head}</table>"
            + _fmt_frame(table[["kind", "step", "at", "ms", "ok"]].rename(columns={"ms": "time"}),
                         {"at": "UTC", "time": "ms"}))


def incident_html(inc: dict | None) -> str:
    if inc is None:
        return ""
    return ("<h2 style='color:#b00'>Incident</h2><ul>"
            + "".join(f"<li><b>{esc(f['gate'])}</b>{_message(f['message'])}</li>" for f in inc["failed_gates"])
            + "</ul><p>Undone:</p><ul>" + "".join(f"<li>{esc(_flat(u))}</li>" for u in inc["undone"]) + "</ul>"
            + (f"<p>Regression gold set ({inc['regression_queries']} queries): <code>{esc(inc['regression_gold'])}"
               "</code></p>" if inc["regression_gold"] else "")
            + "<h3>Postmortem</h3><ol>" + "".join(f"<li>{esc(p)}</li>" for p in inc["postmortem"]) + "</ol>")


def _message(msg: str | None, lines: int = 8) -> str:
    """A gate message: its first lines, the rest folded (a failing gold set can list 100+ queries)."""
    parts = (msg or "").splitlines()
    head = f"<pre>{esc(chr(10).join(parts[:lines]))}</pre>"
    if len(parts) <= lines:
        return head
    return head + (f"<details><summary>{len(parts) - lines} more lines</summary>"
                   f"<pre>{esc(chr(10).join(parts[lines:]))}</pre></details>")


from . import INCIDENT_STATUSES as NOTE_STATUSES  # noqa: E402  dbguard.incident writes its notes for these


def links_html(base: Path, status: str | None) -> str:
    """Files beside the report: the incident note and postmortem (dbguard.incident writes them for a
    run that did not succeed, right after this page, so they are linked by status as well as when
    present), the Airflow log of a CLI run, the JSON."""
    expected = status in NOTE_STATUSES
    links = [f"<a href='{esc(p.name)}'>{esc(label)}</a>" for label, p, always in
             (("incident note", Path(f"{base}.incident.md"), expected),
              ("postmortem", Path(f"{base}.postmortem.md"), expected),
              # `dbguard run` names its Airflow log after the run once dag.test() returns (env set by the CLI)
              ("Airflow log", Path(f"{base}.airflow.log"), bool(os.environ.get("DBGUARD_AIRFLOW_LOG_BESIDE_REPORT"))),
              ("report JSON", Path(f"{base}.json"), True))
             if always or p.is_file()]
    return f"<p>Files: {' · '.join(links)}</p>" if links else ""


def render(spec: MigrationSpec, run_id: str, data: dict, base: Path) -> str:
    f = frames(data)
    result, m = data["result"], data["metrics"]
    charts = [plots.rows_per_second(f["ranges"]), plots.table_verdicts(f["tables"]), plots.delta_s(f["shadow"]),
              plots.lambda_states(f["shadow"]), plots.latency(f["shadow"]),
              plots.change_lag(f["drains"], f["batches"]), plots.cutover_timeline(f["steps"])]
    imgs = "".join(f"<img src='{c}' alt='plot'>" for c in charts if c)
    shown = {**result, "report": Path(result["report"]).name if result.get("report") else None}  # no server path
    res = "".join(f"<tr><th>{esc(k)}</th><td>{esc(num(v) if not isinstance(v, str) else v)}</td></tr>"
                  for k, v in shown.items() if k != "reason")
    run = data.get("run") or {}
    when = (f" · started {esc(str(run.get('started_at'))[:19])} UTC, took {esc(num(run.get('seconds')))} s"
            if run.get("seconds") is not None else "")
    return f"""<!doctype html><meta charset="utf-8"><title>dbguard {esc(spec.name)} {esc(run_id)}</title>
<style>{CSS}</style>
<h1>dbguard: {esc(spec.name)}</h1><p class="muted">run <code>{esc(run_id)}</code>{when} — {esc(spec.description)}</p>
{links_html(base, result.get("status"))}{verdict_html(result, gates(spec, data, f))}
{cutover_html(spec, m, f)}
<h2>Plots</h2><div class="plots">{imgs or "<p class='muted'>nothing to plot</p>"}</div>
{incident_html(data.get("incident"))}
<h2>Tables</h2>{_fmt_frame(f["tables"], {"seconds": "s"})}{migrated_html(m)}{excluded_html(m)}{schema_html(m)}
<h2>Key ranges</h2>{ranges_table(f["ranges"])}
{"<h2>Shadow reads per store</h2>" + query_table(f["shadow"]) if len(f["shadow"]) else ""}
<h2>Result (JSON line)</h2><table>{res}</table>
<h2>Metrics</h2>{metrics_table(m)}
<h2>Events</h2>{events_table(data["events"])}"""


def dumps(data: dict) -> str:
    return json.dumps(data, indent=2, default=str)
