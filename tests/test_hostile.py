"""The hostile-input catalogue (tests/hostile/): every malformed or hostile spec is refused with exit 2
and a message naming the field and the fix, before anything is written.

tests/hostile/EXPECT.yaml says, per file, which command must refuse it: `validate` when the spec alone
shows the problem, else `plan` (against real servers: unreachable host, missing privilege, data that
contradicts the spec). Source and target are compared before and after, a refused `run` included.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from dbguard import cli

HOSTILE = Path(__file__).parent / "hostile"
EXPECT = yaml.safe_load((HOSTILE / "EXPECT.yaml").read_text())
ROOT = HOSTILE.parent.parent

SOURCE_SQL = """
CREATE SCHEMA hostile;
CREATE TABLE hostile.items (id bigint PRIMARY KEY, name text);
INSERT INTO hostile.items SELECT g, 'item ' || g FROM generate_series(1, 50) g;
CREATE TABLE hostile.dupes (id bigint, name text);
INSERT INTO hostile.dupes VALUES (1, 'a'), (1, 'b');
CREATE TABLE hostile.victim (id int);
INSERT INTO hostile.victim VALUES (1);
CREATE TABLE hostile.vecs (id bigint PRIMARY KEY, emb real[]);
INSERT INTO hostile.vecs VALUES (1, '{1,0,0}'), (2, '{0,1,0}'), (3, '{0,0,1}');
CREATE TABLE hostile.nanvecs (id bigint PRIMARY KEY, emb real[]);
INSERT INTO hostile.nanvecs VALUES (1, '{1,0,0}'), (2, '{NaN,1,0}');
CREATE TABLE hostile.ragged (id bigint PRIMARY KEY, emb real[]);
INSERT INTO hostile.ragged VALUES (1, '{1,0,0}'), (2, '{1,0,0,0}');
CREATE ROLE hostile_noprivs LOGIN;
"""


def _snapshot(dsn: str) -> dict:
    """Every user table (outside dbguard's own schema) with its row count and an md5 of its rows."""
    with psycopg.connect(dsn) as c:
        rels = [r[0] for r in c.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'dbguard') ORDER BY 1")]
        return {r: c.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
                                     "FROM {} t").format(sql.SQL(r))).fetchone() for r in rels}


@pytest.fixture
def hostile_env(dbpair, monkeypatch):
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_roles WHERE rolname = 'hostile_noprivs'").fetchone():
            c.execute("DROP OWNED BY hostile_noprivs")
            c.execute("DROP ROLE hostile_noprivs")
        c.execute(SOURCE_SQL)
    noprivs = dbpair.src_dsn.replace("postgresql://postgres@", "postgresql://hostile_noprivs@")
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_NOPRIVS", noprivs)
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_DEAD", "postgresql://nobody:pw@127.0.0.1:1/nowhere")
    monkeypatch.chdir(ROOT)  # gold paths in the catalogue are relative to the project root
    yield dbpair
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        c.execute("DROP OWNED BY hostile_noprivs")
        c.execute("DROP ROLE hostile_noprivs")


def test_the_catalogue_is_big_and_every_file_is_listed():
    files = {p.name for p in HOSTILE.glob("*.yaml")} - {"EXPECT.yaml"}
    assert files == set(EXPECT), "each hostile spec needs an EXPECT.yaml entry (and vice versa)"
    assert len(files) >= 25
    assert {"validate", "plan"} == {c["command"] for c in EXPECT.values()}


@pytest.mark.parametrize("name", sorted(n for n, c in EXPECT.items() if c["command"] == "validate"))
def test_validate_refuses(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert cli.main(["validate", str(HOSTILE / name)]) == 2
    err = capsys.readouterr().err
    missing = [w for w in EXPECT[name]["expect"] if w not in err]
    assert not missing, f"{name}: message lacks {missing}:\n{err}"
    assert "Traceback" not in err


def test_plan_refuses_what_the_databases_contradict_and_nothing_changes(hostile_env, capsys):
    before = (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn))
    for name in sorted(n for n, c in EXPECT.items() if c["command"] == "plan"):
        path = str(HOSTILE / name)
        assert cli.main(["validate", path]) == 0, f"{name} should pass validate (only the databases refuse it)"
        capsys.readouterr()
        assert cli.main(["plan", path]) == 2, name
        err = capsys.readouterr().err
        missing = [w for w in EXPECT[name]["expect"] if w not in err]
        assert not missing, f"{name}: message lacks {missing}:\n{err}"
        assert "Traceback" not in err
    assert (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn)) == before
    assert ("hostile.victim" in before[0]), "the injection-shaped table name must not have dropped the victim"


def test_a_refused_run_returns_fast_records_why_and_writes_nothing(hostile_env, capsys):
    before = (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn))
    t0 = time.monotonic()
    assert cli.main(["run", str(HOSTILE / "unknown_column.yaml")]) == 2
    seconds = time.monotonic() - t0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["status"] == "failed" and "nmae" in result["reason"]
    assert seconds < 10, f"a refused run took {seconds:.1f} s"
    assert (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn)) == before
    with hostile_env.tgt() as c:
        status, reason = c.execute("SELECT status, reason FROM dbguard.runs ORDER BY started_at DESC LIMIT 1").fetchone()
    assert status == "refused" and "no such column" in reason
