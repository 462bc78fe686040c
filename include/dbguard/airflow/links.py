"""Task extra link "dbguard report" on finalize: the run's report page served by the UI plugin.

Airflow 3 computes the link when the task ends and stores it as an XCom (key `_link_ReportLink`);
the grid's task details show it as a button. The path is the plugin's
/dbguard/report/<dag_id>/<file>, where file is the report's name (the run id made file-safe).
"""
from __future__ import annotations

from airflow.sdk import BaseOperatorLink

from ..report import _safe


def report_url(dag_id: str, run_id: str) -> str:
    """The plugin URL of a run's report, under [api] base_url when set (Airflow behind a path)."""
    from airflow.configuration import conf

    base = (conf.get("api", "base_url", fallback="") or "").rstrip("/")
    if base.startswith("http"):  # keep only the path: the link is opened on the same server
        base = "/" + base.split("://", 1)[1].partition("/")[2].rstrip("/") if "/" in base.split("://", 1)[1] else ""
    return f"{base}/dbguard/report/{dag_id}/{_safe(run_id)}.html"


class ReportLink(BaseOperatorLink):
    name = "dbguard report"

    def get_link(self, operator, *, ti_key) -> str:
        return report_url(ti_key.dag_id, ti_key.run_id)
