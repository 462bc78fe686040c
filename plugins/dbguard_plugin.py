"""Airflow 3 UI plugin: the dbguard run reports, in Airflow's navigation and on each DAG run.

A small FastAPI app (mounted by the api-server under /dbguard) lists the report
files `finalize` writes (reports/<dag_id>/<run>.html, or $DBGUARD_REPORT_DIR)
and serves them; two external views link to it: "dbguard runs" in the nav bar,
and "dbguard report" on a DAG run ({DAG_ID}/{RUN_ID} are filled in by the UI).
"""
from __future__ import annotations

import html
import re
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse, HTMLResponse

from airflow.plugins_manager import AirflowPlugin

from dbguard.airflow.links import ReportLink
from dbguard.report import report_dir

REPORTS = report_dir()
_SAFE = re.compile(r"^[A-Za-z0-9_.:+-]+$")

app = FastAPI(title="dbguard reports")


def _reports(dag_id: str | None = None) -> list[Path]:
    if not REPORTS.is_dir():
        return []
    dirs = [REPORTS / dag_id] if dag_id else sorted(p for p in REPORTS.iterdir() if p.is_dir())
    return sorted((f for d in dirs if d.is_dir() for f in d.glob("*.html")),
                  key=lambda f: f.stat().st_mtime, reverse=True)


@app.get("/", response_class=HTMLResponse)
def index(dag_id: str | None = None, run_id: str | None = None) -> str:
    if dag_id and not _SAFE.match(dag_id):
        raise HTTPException(400, "bad dag_id")
    files = _reports(dag_id)
    if run_id:  # report files are named after the run id, unsafe characters replaced by '_'
        safe = re.sub(r"[^A-Za-z0-9_.+-]", "_", run_id)
        files = [f for f in files if f.name == f"{safe}.html"] or files
    rows = "".join(
        f'<li><a href="report/{html.escape(f.parent.name)}/{html.escape(f.name)}">'
        f"{html.escape(f.parent.name)} / {html.escape(f.stem)}</a></li>" for f in files)
    return (f"<html><body><h1>dbguard runs</h1><p>reports in {html.escape(str(REPORTS))}</p>"
            f"<ul>{rows or '<li>no reports yet: trigger a dbguard DAG</li>'}</ul></body></html>")


@app.get("/report/{dag_id}/{name}")
def report(dag_id: str, name: str) -> FileResponse:
    if not (_SAFE.match(dag_id) and _SAFE.match(name)) or not name.endswith(".html"):
        raise HTTPException(400, "bad report name")
    path = REPORTS / dag_id / name
    if not path.is_file():
        raise HTTPException(404, f"no report {dag_id}/{name}")
    return FileResponse(path)


class DbguardPlugin(AirflowPlugin):
    name = "dbguard"
    fastapi_apps = [{"app": app, "url_prefix": "/dbguard", "name": "dbguard reports"}]
    operator_extra_links = [ReportLink()]  # "dbguard report" on the finalize task (dbguard.airflow.links)
    external_views = [
        {"name": "dbguard runs", "href": "dbguard/", "destination": "nav", "url_route": "dbguard_runs"},
        {"name": "dbguard report", "href": "dbguard/?dag_id={DAG_ID}&run_id={RUN_ID}",
         "destination": "dag_run", "url_route": "dbguard_run_report"},
    ]
