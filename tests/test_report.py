"""The run report of real runs: verdict first, every plot that applies (inline PNG), tables with
people's precision, values equal to the run's JSON line."""
from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from dbguard import corpus, db, demo, ledger, report
from dbguard.airflow import env as afenv
from dbguard.spec import load_spec
from test_dag import DEMO_SPEC, dagbag, reports  # noqa: F401  (fixture)
from test_retrieval import NO_LATENCY_FLOOR_MS

IMG = re.compile(r"<img src='data:image/png;base64,([A-Za-z0-9+/=]+)' alt='plot'>")
LONG_FLOAT = re.compile(r"(?<![\d:_])\d+\.0*[1-9]\d{4,}")  # 5+ significant decimals; not the run id's T03:53:39.978701


def text_of(page: str) -> str:
    """The page without its images (base64 is not text a person reads)."""
    return IMG.sub("", page)


def plot_titles(page: str) -> int:
    return len(IMG.findall(page))


def check_common(page: str, result: dict) -> str:
    text = text_of(page)
    assert text.index("Verdict") < text.index("Plots") < text.index("Key ranges")  # verdict first
    assert not LONG_FLOAT.search(text), LONG_FLOAT.search(text).group(0)
    assert "{&quot;" not in text and '{"' not in text  # no JSON blobs in cells
    assert "<td>None</td>" not in text and "report</th><td>None" not in text
    assert f"<th>report</th><td>{Path(result['report']).name}</td>" in text  # its own name (no server path), not null
    return text


def test_shop_run_report_has_verdict_plots_and_the_json_values(airflow_db, dbpair, reports):  # noqa: F811
    demo.load_shop(dbpair.source, customers=2000, orders=8000)
    dag_run = dagbag().dags["dbguard_demo_shop"].test(run_conf={"batch_rows": 2000})
    result = afenv.run_result(dag_run)
    assert result["status"] == "success", result
    path = Path(result["report"])
    assert path.is_file() and path.suffix == ".html" and path.with_suffix(".json").is_file()
    page = path.read_text()
    text = check_common(page, result)
    # rows/s per range, per-table verdicts, change-ledger lag (no retrieval, no cutover in this spec)
    assert plot_titles(page) == 3, text[:2000]
    for png in IMG.findall(page):
        assert len(png) > 5000  # a real rendered image, not an empty one
    assert "<td class='num'>10,000</td>" in text and result["migrated_rows"] == 10_000  # migrated rows
    assert re.search(r"checksum \(counts \+ sums, every table\)</td><td class='num'>equal</td>", text)
    assert result["checksum_ok"] is True
    # nothing wrote either side after reconcile: the gate took its verdict instead of comparing again, and says so
    assert result["checksum_gate_mode"] == "reused reconcile verdict", result
    assert re.search(r"checksum gate verdict</td><td class='num'>reused reconcile verdict: nothing applied", text)
    assert "<td class='num'>5 / 5</td>" in text  # completeness: verified vs planned ranges
    saved = json.loads(path.with_suffix(".json").read_text())
    assert saved["result"]["report"] == str(path) and len(saved["ranges"]) == 5
    # the finalize task's extra link "dbguard report" points at this file through the UI plugin
    from airflow import settings
    from airflow.models.xcom import XComModel

    with settings.Session() as session:
        row = session.scalars(XComModel.get_many(run_id=dag_run.run_id, dag_ids=dag_run.dag_id,
                                                 task_ids="finalize", key="_link_ReportLink")).first()
        link = XComModel.deserialize_value(row)
    assert link == f"/dbguard/report/dbguard_demo_shop/{path.name}", link
    assert (reports / "dbguard_demo_shop" / link.rsplit("/", 1)[1]) == path

    # Cutover records (interface 4) in the ledger add the timeline plot and the verdict row.
    spec = load_spec(str(DEMO_SPEC))
    steps = [{"step": "freeze", "ms": 12.5, "ok": True, "at": "2026-01-01T00:00:00Z"},
             {"step": "drain", "ms": 40.25, "ok": True, "at": "2026-01-01T00:00:00.0125Z"},
             {"step": "switch_pointer", "ms": 8.0, "ok": True, "at": "2026-01-01T00:00:00.05Z"}]
    # Excluded columns (SCHEMA) are listed; an incident note beside the report (CUTOVER-DAG) is linked.
    path.with_name(path.stem + ".incident.md").write_text("# incident\n")
    with db.target(spec) as conn:
        ledger.set_metric(conn, dag_run.run_id, spec.name, "cutover_steps", steps)
        ledger.set_metric(conn, dag_run.run_id, spec.name, "cutover_ms", 60.75)
        ledger.set_metric(conn, dag_run.run_id, spec.name, "excluded_columns", {"shop.customers": ["notes"]})
        page = report.write(spec, dag_run.run_id, conn, {**result, "cutover_ms": 60.75}).read_text()
        drawn = ledger.metrics(conn, dag_run.run_id)["report_render"]
    assert drawn["how"] == "child" and drawn["peak_rss_mb"] > 0, drawn  # the page was drawn in a process of its own
    assert plot_titles(page) == 4
    text = text_of(page)
    assert "cutover (writes paused)</td><td class='num'>60.8 ms</td>" in text
    assert "<li>shop.customers: notes</li>" in text
    assert f"<a href='{path.stem}.incident.md'>incident note</a>" in text and "postmortem</a>" not in text


def test_docs_run_report_draws_delta_s_lambda_and_latency(airflow_db, dbpair, reports, tmp_path, monkeypatch):  # noqa: F811
    raw = yaml.safe_load((afenv.SPECS_FOLDER / "demo_docs.yaml").read_text())
    raw["retrieval"]["latency_floor_ms"] = NO_LATENCY_FLOOR_MS
    spec_path = tmp_path / "demo_docs.yaml"
    spec_path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(spec_path))
    corpus.load_docs(dbpair.source)
    result = afenv.run_result(dagbag().dags["dbguard_demo_docs"].test())
    assert result["status"] == "success", result
    page = Path(result["report"]).read_text()
    text = check_common(page, result)
    # rows/s, tables, ΔS pre/post, λ per seed, latency pre/post, change lag
    assert plot_titles(page) == 6, text[:3000]
    assert "λ state, seed 1</td><td class='num'>convergent</td>" in text
    assert f"<td class='num'>{result['delta_s_diff']:.3g}</td>" in text  # ΔS diff shown as in the JSON, rounded
    assert "latency p95 change" in text and "Shadow reads per store" in text


def test_the_processes_that_run_tasks_load_no_plotting_libraries():
    """The page is drawn in a child process (report/render.py): importing what the tasks import loads neither
    pandas nor matplotlib (together ~70 MB of every task process's RSS, and of dag.test()'s one worker)."""
    import subprocess
    import sys

    code = ("import sys, dbguard.stages, dbguard.incident, dbguard.airflow.operators; "
            "print(sorted(m for m in ('pandas', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout[-500:]
