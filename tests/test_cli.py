"""`dbguard validate | plan | run` as a user types them."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from dbguard import cli, demo, ledger

DEMO_SPEC = cli.DEMO_SPEC
DBGUARD = Path(sys.executable).with_name("dbguard")


def spec_variant(tmp_path: Path, edit) -> Path:
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    edit(raw)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def test_validate_a_good_spec_exits_0_with_a_summary(capsys):
    assert cli.main(["validate", str(DEMO_SPEC)]) == 0
    out = capsys.readouterr().out
    assert "valid" in out and "dbguard_demo_shop" in out and "shop.customers, shop.orders" in out


def test_validate_a_bad_spec_exits_2_naming_every_field(tmp_path, capsys):
    def edit(raw):
        raw["backfill"]["concurrency"] = 0
        raw["tables"][1]["key"] = ["order_no"]

    assert cli.main(["validate", str(spec_variant(tmp_path, edit))]) == 2
    err = capsys.readouterr().err
    assert "backfill.concurrency" in err
    assert "tables[orders]" in err and "order_no" in err


def test_run_with_a_bad_spec_exits_2_before_starting_anything(tmp_path, capsys):
    spec = spec_variant(tmp_path, lambda raw: raw.update(name="Not An Identifier"))
    assert cli.main(["run", str(spec)]) == 2
    assert "name:" in capsys.readouterr().err


def test_plan_prints_ranges_and_writes_nothing(dbpair, capsys):
    demo.load_shop(dbpair.source, customers=2000, orders=8000)
    assert cli.main(["plan", str(DEMO_SPEC), "--batch-rows", "1000"]) == 0
    out = capsys.readouterr().out
    assert "table shop.customers -> shop.customers key (id): 2 range(s)" in out
    assert "table shop.orders -> shop.orders key (id): 8 range(s)" in out
    assert out.count("  range ") == 10
    assert "gates: checksum" in out and "window: 00:00-23:59 UTC" in out
    with dbpair.tgt() as conn:
        schemas = {r[0] for r in conn.execute("SELECT nspname FROM pg_namespace").fetchall()}
    assert not {"dbguard", "shop"} & schemas


def test_run_ends_with_one_json_line_and_exit_0(airflow_db, dbpair, tmp_path):
    demo.load_shop(dbpair.source, customers=2000, orders=8000)
    env = {**os.environ, "DBGUARD_REPORT_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([str(DBGUARD), "run", str(DEMO_SPEC), "--batch-rows", "4000"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]  # Airflow's logs went to stderr
    result = json.loads(lines[-1])
    assert list(result) == list(ledger.RESULT_KEYS)
    assert (result["migration"], result["status"], result["checksum_ok"], result["migrated_rows"]) == (
        "demo_shop", "success", True, 10_000)
    assert "ended success" in proc.stderr


def test_run_is_quiet_with_progress_and_airflow_log_in_a_file(airflow_db, dbpair, tmp_path):
    """stdout: the JSON line only; stderr: a few lines (stages, ranges done/total, rows/s); Airflow's ~230
    log lines go to a file beside the report, named on stderr."""
    demo.load_shop(dbpair.source, customers=2000, orders=8000)
    env = {**os.environ, "DBGUARD_REPORT_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([str(DBGUARD), "run", str(DEMO_SPEC), "--batch-rows", "2000"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out, err = proc.stdout.splitlines(), proc.stderr.splitlines()
    assert len(out) == 1 and json.loads(out[0])["status"] == "success"
    assert len(err) <= 40, proc.stderr
    assert any("ranges 5/5" in ln and "rows/s" in ln for ln in err), proc.stderr  # progress from the ledger
    assert not any("airflow" in ln.lower() and "INFO" in ln for ln in err), proc.stderr
    log = Path(next(ln for ln in err if ln.startswith("dbguard: airflow log: ")).split(": ", 2)[2])
    assert log.is_file() and log.parent == tmp_path / "reports" / "dbguard_demo_shop"
    assert log.name.endswith(".airflow.log") and len(log.read_text().splitlines()) > 50
    report = Path(json.loads(out[0])["report"])
    assert report.is_file() and f"dbguard: report: {report}" in err


def test_progress_line_reads_the_ledger():
    from dbguard import progress

    snap = progress.Snapshot("r", "backfill", planned=10, verified=4, rows=40_000, copy_seconds=2.0,
                             tables_planned=2, tables=2)
    text = progress.line(snap, 12.0)
    assert text == "[12s] backfill: ranges 4/10, 40,000 rows, 20,000 rows/s, ETA 3s", text
    early = progress.Snapshot("r", "backfill", planned=1, verified=1, rows=25_000, copy_seconds=1.0,
                              tables_planned=1, tables=2)
    assert progress.line(early, 5.0) == "[5s] backfill: ranges 1/1 (tables planned 1/2), 25,000 rows, 25,000 rows/s"


def test_a_failed_run_prints_the_gate_message_in_full_on_stderr(airflow_db, dbpair, tmp_path):
    """Quiet is not silent: the failing gate's whole message and the failed task reach the terminal."""
    from dbguard import corpus

    raw = yaml.safe_load((DEMO_SPEC.parent / "demo_docs_bad_analyzer.yaml").read_text())
    raw["name"] = "docs_bad_cli"
    raw["retrieval"].update(poke_seconds=1)
    spec = tmp_path / "docs_bad_cli.yaml"
    spec.write_text(yaml.safe_dump(raw))
    corpus.load_docs(dbpair.source)
    env = {**os.environ, "DBGUARD_REPORT_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([str(DBGUARD), "run", str(spec)], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result["status"] == "failed"
    err = proc.stderr
    assert "dbguard: retrieval_gate: retrieval gate failed" in err and "failing queries:" in err
    assert "docs.documents.tsv q" in err  # the per-query lines of the message, not only its first line
    assert 'failed tasks: ["retrieval_gate"]' in err
    assert "airflow log: " in err and "[DAG TEST]" not in err
    page = Path(result["report"]).read_text()  # the report links the incident notes and the Airflow log
    assert "incident note</a>" in page and "postmortem</a>" in page and "Airflow log</a>" in page
