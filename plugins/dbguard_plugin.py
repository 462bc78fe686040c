"""Airflow 3 UI plugin: the dbguard run reports, in Airflow's navigation and on each DAG run.

A small FastAPI app (mounted by the api-server under /dbguard) lists the runs whose reports `finalize`
wrote (reports/<dag_id>/<run>.html + .json, or $DBGUARD_REPORT_DIR) with their status and gates, and
serves the report files; two external views link to it: "dbguard runs" in the nav bar, and "dbguard
report" on a DAG run ({DAG_ID}/{RUN_ID} are filled in by the UI).

Only a logged-in Airflow user gets anything: every route requires the same JWT the UI uses (its `_token`
cookie, or an `Authorization: Bearer` header), checked by Airflow's auth manager; a report also needs read
access to its DAG's runs; FastAPI's own /docs, /redoc and /openapi.json (which no dependency guards) are
off. A requested file is resolved and must lie inside the reports folder (no `..`, encoded or not, no
absolute path, no symlink out), and only report files are served; the index reads a run's JSON on the same
terms (a page or JSON reached through a symlink out of the folder is not listed).
"""
from __future__ import annotations

import html
import json
from pathlib import Path

from fastapi import Depends, FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from airflow.api_fastapi.auth.managers.models.resource_details import AccessView, DagAccessEntity, DagDetails
from airflow.api_fastapi.core_api.security import GetUserDep, requires_access_view
from airflow.plugins_manager import AirflowPlugin

from dbguard.airflow.links import ReportLink
from dbguard.files import FileRefused, read_capped
from dbguard.report import report_dir

SERVED = (".html", ".json", ".md", ".log", ".jsonl")  # the page and what it links to
GATES = ("status", "migrated_rows", "checksum_ok", "dual_write_fail", "delta_s_diff", "lambda_state", "cutover_ms")

MAX_RESULT_BYTES = 4 << 20  # a run's JSON is a few KB
# docs_url/redoc_url/openapi_url: FastAPI serves those routes outside `dependencies`, so to anyone: off.
app = FastAPI(title="dbguard reports", dependencies=[Depends(requires_access_view(AccessView.WEBSITE))],
              docs_url=None, redoc_url=None, openapi_url=None)


def reports_root() -> Path:
    return report_dir().resolve()


def inside(root: Path, *parts: str) -> Path:
    """root/parts resolved, or 404: never a file outside root (.., %2E%2E once decoded, absolute parts,
    symlinks pointing out)."""
    try:
        path = root.joinpath(*parts).resolve()
    except (OSError, ValueError):
        raise HTTPException(404, "no such report") from None
    if path == root or not path.is_relative_to(root) or not path.is_file():
        raise HTTPException(404, "no such report")
    return path


def _may_read_runs(user, dag_id: str) -> bool:
    from airflow.api_fastapi.app import get_auth_manager

    return get_auth_manager().is_authorized_dag(method="GET", access_entity=DagAccessEntity.RUN,
                                                details=DagDetails(id=dag_id), user=user)


def _within(root: Path, path: Path) -> bool:
    """path is a regular file that resolves inside root (a symlink out of the folder does not count)."""
    try:
        real = path.resolve()
    except (OSError, ValueError):
        return False
    return real.is_relative_to(root) and real != root and real.is_file()


def _runs(root: Path, dag_id: str | None) -> list[tuple[Path, dict]]:
    if not root.is_dir():
        return []
    pages = [p for p in root.glob("*/*.html") if dag_id in (None, p.parent.name) and _within(root, p)]
    out = []
    for page in sorted(pages, key=lambda f: f.stat().st_mtime, reverse=True):
        data = page.with_suffix(".json")
        try:
            result = json.loads(read_capped(data, MAX_RESULT_BYTES)) if _within(root, data) else {}
        except (OSError, ValueError, FileRefused):  # FileRefused: swapped for a FIFO or grown past the cap
            result = {}
        out.append((page, result.get("result", result) if isinstance(result, dict) else {}))
    return out


def _cell(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


@app.get("/", response_class=HTMLResponse)
def index(user: GetUserDep, dag_id: str | None = None, run_id: str | None = None) -> str:
    root = reports_root()
    runs = [(p, r) for p, r in _runs(root, dag_id) if _may_read_runs(user, p.parent.name)]
    if run_id:  # report files are named after the run id, unsafe characters replaced by '_'
        wanted = "".join(c if c.isalnum() or c in "_.+-" else "_" for c in run_id) + ".html"
        runs = [(p, r) for p, r in runs if p.name == wanted] or runs
    head = "".join(f"<th>{g}</th>" for g in ("DAG", "run", *GATES))
    rows = "".join(
        f'<tr><td>{html.escape(p.parent.name)}</td><td><a href="report/{html.escape(p.parent.name)}/'
        f'{html.escape(p.name)}">{html.escape(p.stem)}</a></td>'
        + "".join(f"<td>{_cell(r.get(g))}</td>" for g in GATES) + "</tr>" for p, r in runs)
    return (f"<html><head><title>dbguard runs</title></head><body><h1>dbguard runs</h1>"
            f"<table border=1 cellpadding=4><tr>{head}</tr>"
            f"{rows or '<tr><td colspan=9>no reports yet: trigger a dbguard DAG</td></tr>'}</table></body></html>")


@app.get("/report/{dag_id}/{name}")
def report(dag_id: str, name: str, user: GetUserDep) -> FileResponse:
    if not name.endswith(SERVED):
        raise HTTPException(404, "no such report")
    path = inside(reports_root(), dag_id, name)
    if not _may_read_runs(user, path.parent.name):
        raise HTTPException(403, "you may not read this DAG's runs")
    return FileResponse(path)


class DbguardPlugin(AirflowPlugin):
    name = "dbguard"
    fastapi_apps = [{"app": app, "url_prefix": "/dbguard", "name": "dbguard reports"}]
    operator_extra_links = [ReportLink()]
    external_views = [
        {"name": "dbguard runs", "href": "dbguard/", "destination": "nav", "url_route": "dbguard_runs"},
        {"name": "dbguard report", "href": "dbguard/?dag_id={DAG_ID}&run_id={RUN_ID}",
         "destination": "dag_run", "url_route": "dbguard_run_report"},
    ]
