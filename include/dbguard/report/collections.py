"""The run report of a migration whose source is a Qdrant collection: <run>.json and a small
self-contained <run>.html beside the other reports, built from the stages' results (no ledger):
per collection the two stores side by side (kind, points, checksum, index_hash), then the retrieval
numbers per side (ΔS, λ per seed, recall against exact search, latency p95)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from ..spec import MigrationSpec
from . import _safe, report_dir


def _e(v: Any) -> str:
    if isinstance(v, float):
        v = f"{v:.6g}"
    return html.escape("-" if v is None else str(v))


def write(spec: MigrationSpec, run_id: str, result: dict, reconcile: dict | None, shadow: dict | None) -> Path:
    out = report_dir() / spec.dag_id
    out.mkdir(parents=True, exist_ok=True)
    base = out / _safe(run_id)
    path = Path(f"{base}.html")
    result = {**result, "report": str(path)}
    Path(f"{base}.json").write_text(json.dumps({"result": result, "reconcile": reconcile, "shadow_reads": shadow},
                                               indent=2, default=str))
    rows = []
    for mv in spec.collections:
        r = (reconcile or {}).get(mv.label) or {}
        dest = mv.qdrant.collection if mv.qdrant else f"{mv.pgvector.schema_}.{mv.pgvector.table}"
        rows.append(
            f"<tr><td>{_e(mv.label)}</td><td>qdrant <b>{_e(mv.source.collection)}</b> ({_e(mv.source.metric)}, "
            f"{mv.source.dim})</td><td>{_e(mv.kind)} <b>{_e(dest)}</b> ({_e(mv.target_metric)})</td>"
            f"<td>{_e(r.get('source_points'))} / {_e(r.get('points'))}</td><td>{_e(r.get('checksum_ok'))}</td>"
            f"<td>{_e(r.get('repaired'))}</td><td><code>{_e(r.get('index_hash'))}</code></td></tr>")
    s = shadow or {}
    seeds = "".join(f"<tr><td>seed {x}</td><td>{_e(s.get(f'delta_s_diff_seed_{x}'))}</td>"
                    f"<td>{_e(s.get(f'lambda_state_seed_{x}'))}</td><td>{_e(s.get(f'lambda_counts_seed_{x}'))}</td></tr>"
                    for x in spec.retrieval.seeds)
    page = f"""<!doctype html><meta charset="utf-8"><title>dbguard {_e(spec.name)} {_e(run_id)}</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;
padding:4px 8px;text-align:left}}</style>
<h1>dbguard <code>{_e(spec.name)}</code>: {_e(result.get('status'))}</h1>
<p>run <code>{_e(run_id)}</code>; source store qdrant, target store {_e(result.get('target_store'))};
{_e(result.get('migrated_rows'))} points, checksum_ok {_e(result.get('checksum_ok'))},
{_e(result.get('points_per_s'))} points/s; aliases {_e(result.get('aliases'))}</p>
<h2>Stores side by side</h2><table><tr><th>move</th><th>source</th><th>target</th><th>points source / target</th>
<th>checksum_ok</th><th>repaired</th><th>index_hash</th></tr>{''.join(rows)}</table>
<h2>Retrieval</h2><table><tr><th></th><th>pre (source)</th><th>post (target)</th></tr>
<tr><td>recall@k vs exact (source metric)</td><td>{_e(s.get('recall_pre'))}</td><td>{_e(s.get('recall_post'))}</td></tr>
<tr><td>latency p95 ms</td><td>{_e(s.get('latency_p95_pre_ms'))}</td><td>{_e(s.get('latency_p95_post_ms'))}</td></tr>
</table><p>delta_s_diff {_e(s.get('delta_s_diff'))}, lambda_state {_e(s.get('lambda_state'))};
{_e(s.get('retrieval_gate'))}</p>
<table><tr><th></th><th>delta_s_diff</th><th>lambda_state</th><th>counts</th></tr>{seeds}</table>
{f"<h2>Reason</h2><pre>{_e(result.get('reason'))}</pre>" if result.get('reason') else ''}
"""
    path.write_text(page)
    return path
