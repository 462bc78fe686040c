"""Passwords in connection URIs never reach stdout, stderr, task logs, XComs, reports or the ledger."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote, urlparse

import psycopg
import pytest
from psycopg import sql

from dbguard import cli, db, demo
from dbguard.errors import ConnectionFailed

DBGUARD = Path(sys.executable).with_name("dbguard")
PASSWORD = "S3cretPW-quux7"
ROLE = "dbg_secret_role"


def _with_password(dsn: str, password: str) -> str:
    p = urlparse(dsn)
    netloc = f"{ROLE}:{quote(password, safe='')}@{p.netloc.split('@')[-1]}"
    return p._replace(netloc=netloc).geturl()


@pytest.fixture
def secret_role(dbpair):
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            if not c.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone():
                c.execute(sql.SQL("CREATE ROLE {} LOGIN SUPERUSER PASSWORD {}").format(
                    sql.Identifier(ROLE), sql.Literal(PASSWORD)))
    return _with_password(dbpair.src_dsn, PASSWORD), _with_password(dbpair.tgt_dsn, PASSWORD)


def _files_containing(root: Path, needle: bytes) -> list[str]:
    hits = []
    for f in root.rglob("*"):
        if f.is_file():
            with open(f, "rb") as fh:
                if needle in fh.read():
                    hits.append(str(f))
    return hits


def _ledger_text(dsn: str) -> str:
    with psycopg.connect(dsn) as c:
        if c.execute("SELECT to_regnamespace('dbguard')").fetchone()[0] is None:
            return ""
        rels = [r[0] for r in c.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables WHERE schemaname = 'dbguard'")]
        return "\n".join(c.execute(sql.SQL("SELECT coalesce(string_agg(t::text, E'\\n'), '') FROM {} t").format(
            sql.SQL(r))).fetchone()[0] for r in rels)


def test_a_malformed_uri_never_prints_its_password(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_LEAKY", "postgresql://app:S3cretPW%ZZ@localhost:5432/shop")
    with pytest.raises(ConnectionFailed) as e:
        db.connect("leaky")
    assert "S3cretPW" not in str(e.value)
    assert "malformed" in str(e.value) and "AIRFLOW_CONN_LEAKY" in str(e.value)


def test_plan_with_a_malformed_uri_reports_without_the_password(tmp_path):
    env = {**os.environ, "AIRFLOW_CONN_DBGUARD_SOURCE": "postgresql://app:S3cretPW%ZZ@localhost:5432/shop",
           "AIRFLOW_CONN_DBGUARD_TARGET": "postgresql://app:S3cretPW%ZZ@localhost:5433/shop"}
    proc = subprocess.run([str(DBGUARD), "plan", str(cli.DEMO_SPEC)], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode != 0
    assert "S3cretPW" not in proc.stdout + proc.stderr
    assert "dbguard_source" in proc.stderr


def test_a_run_with_a_password_leaves_it_nowhere(airflow_db, dbpair, secret_role, tmp_path):
    demo.load_shop(dbpair.source, customers=500, orders=2000)
    src, tgt = secret_role
    reports = tmp_path / "reports"
    env = {**os.environ, "AIRFLOW_CONN_DBGUARD_SOURCE": src, "AIRFLOW_CONN_DBGUARD_TARGET": tgt,
           "DBGUARD_REPORT_DIR": str(reports)}
    proc = subprocess.run([str(DBGUARD), "run", str(cli.DEMO_SPEC), "--batch-rows", "1000"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert '"checksum_ok": true' in proc.stdout
    assert PASSWORD not in proc.stdout
    assert PASSWORD not in proc.stderr
    assert not _files_containing(reports, PASSWORD.encode()), "a report holds the password"
    # Task logs and the metadata DB (XComs, rendered fields, run conf) under AIRFLOW_HOME.
    assert not _files_containing(Path(os.environ["AIRFLOW_HOME"]), PASSWORD.encode())
    for dsn in (src, tgt):
        assert PASSWORD not in _ledger_text(dsn)


def test_a_failing_run_with_a_password_leaves_it_nowhere(airflow_db, dbpair, secret_role, tmp_path):
    src, _ = secret_role
    dead = f"postgresql://{ROLE}:{quote(PASSWORD, safe='')}@127.0.0.1:1/nowhere"
    env = {**os.environ, "AIRFLOW_CONN_DBGUARD_SOURCE": src, "AIRFLOW_CONN_DBGUARD_TARGET": dead,
           "DBGUARD_REPORT_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([str(DBGUARD), "run", str(cli.DEMO_SPEC)], capture_output=True, text=True, env=env,
                          timeout=600)
    assert proc.returncode != 0
    assert "dbguard_target" in proc.stdout + proc.stderr
    assert PASSWORD not in proc.stdout + proc.stderr
    assert not _files_containing(Path(os.environ["AIRFLOW_HOME"]), PASSWORD.encode())
