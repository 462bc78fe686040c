"""Preflight: every bad input is reported with the field and the fix before
anything is written; the schema freeze blocks DDL and is released cleanly."""
import psycopg
import pytest

from dbguard import stages
from dbguard.errors import ConnectionFailed, PreflightError
from util import run, spec

COLS = [{"name": "id", "type": "bigint"}, {"name": "email", "type": "text"}, {"name": "paid", "type": "numeric(10,2)"}]
DDL = "CREATE TABLE acct (id bigint PRIMARY KEY, email text, paid numeric(10,2))"


def acct_spec(columns=COLS, **top):
    return spec([{"name": "acct", "key": ["id"], "columns": columns}], **top)


LEDGER_TABLES = {"runs", "events", "ranges", "metrics", "manifest"}


def assert_nothing_written(dbpair):
    """No migrated object anywhere; the target's ledger may hold the refusal itself (event preflight_failed)."""
    with dbpair.tgt() as c:
        ledger = {r[0] for r in c.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'dbguard'")}
        assert ledger <= LEDGER_TABLES
        if ledger:
            assert {r[0] for r in c.execute("SELECT DISTINCT stage FROM dbguard.events")} <= {"preflight_failed"}
            assert c.execute("SELECT count(*) FROM dbguard.runs").fetchone()[0] == 0
        assert c.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").fetchone()[0] == 0
    with dbpair.src() as c:
        assert c.execute("SELECT count(*) FROM pg_event_trigger").fetchone()[0] == 0


@pytest.mark.parametrize("columns,needle", [
    (COLS + [{"name": "phone", "type": "text"}], "tables[acct].columns[phone]: no such column"),
    ([COLS[0], {"name": "email", "type": "varchar(80)"}, COLS[2]],
     "tables[acct].columns[email].type: spec says 'character varying(80)' but the source column is 'text'"),
    ([COLS[0], COLS[1], {"name": "paid", "type": "numeric(12,2)"}], "source column is 'numeric(10,2)'"),
])
def test_contract_mismatch_names_the_field(dbpair, columns, needle):
    with dbpair.src() as c:
        run(c, DDL)
    with pytest.raises(PreflightError) as e:
        stages.preflight(acct_spec(columns), "r")
    assert needle in str(e.value)
    assert_nothing_written(dbpair)


def test_missing_table_and_non_unique_key(dbpair):
    with dbpair.src() as c:
        run(c, "CREATE TABLE acct (id bigint, email text, paid numeric(10,2))")
    s = spec([{"name": "acct", "key": ["id"], "columns": COLS},
              {"name": "gone", "key": ["id"], "columns": [{"name": "id", "type": "integer"}]}])
    with pytest.raises(PreflightError) as e:
        stages.preflight(s, "r")
    msg = str(e.value)
    assert "tables[gone]: source table public.gone does not exist" in msg
    assert "tables[acct].key: ['id'] is not unique on the source" in msg
    assert_nothing_written(dbpair)


def test_missing_privilege_names_the_exact_grant(dbpair):
    with dbpair.src() as c:
        run(c, DDL, "DROP ROLE IF EXISTS dbg_reader", "CREATE ROLE dbg_reader LOGIN",
            "GRANT USAGE ON SCHEMA public TO dbg_reader")
    src_as_reader = psycopg.conninfo.make_conninfo(dbpair.src_dsn, user="dbg_reader")
    import os
    os.environ["AIRFLOW_CONN_DBGUARD_SOURCE"] = src_as_reader  # dbpair's monkeypatch restores it
    try:
        with pytest.raises(PreflightError) as e:
            stages.preflight(acct_spec(), "r")
        msg = str(e.value)
        assert "GRANT SELECT ON TABLE public.acct TO dbg_reader" in msg
        assert "GRANT TRIGGER ON TABLE public.acct TO dbg_reader" in msg
        assert "schema_freeze needs an event trigger" in msg
        assert_nothing_written(dbpair)
    finally:
        with dbpair.src() as c:
            run(c, "REVOKE ALL ON SCHEMA public FROM dbg_reader")
        with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
            c.execute("DROP OWNED BY dbg_reader")
            c.execute("DROP ROLE dbg_reader")


def test_unreachable_database_names_the_conn_id_and_the_fix(dbpair, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", "postgresql://nobody@%2Ftmp%2Fno-such-dir/x")
    with dbpair.src() as c:
        run(c, DDL)
    with pytest.raises(ConnectionFailed) as e:
        stages.preflight(acct_spec(), "r")
    assert "cannot reach 'dbguard_target'" in str(e.value) and "AIRFLOW_CONN_DBGUARD_TARGET" in str(e.value)


def test_undefined_connection_says_how_to_define_it(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_DBGUARD_SOURCE", raising=False)
    with pytest.raises(ConnectionFailed) as e:
        stages.preflight(acct_spec(), "r")
    assert "AIRFLOW_CONN_DBGUARD_SOURCE=postgresql://" in str(e.value)


def test_target_collation_mismatch_is_refused(dbpair):
    with dbpair.src() as c:
        run(c, DDL)
    with pytest.raises(PreflightError) as e:
        stages.preflight(acct_spec(target={"collation": "en_US.UTF-8"}), "r")
    assert "target.collation: the target database has 'C' but the spec says 'en_US.UTF-8'" in str(e.value)
    assert_nothing_written(dbpair)


def test_existing_target_table_with_other_type_is_refused(dbpair):
    with dbpair.src() as c:
        run(c, DDL)
    with dbpair.tgt() as c:
        run(c, "CREATE TABLE acct (id bigint PRIMARY KEY, email text, paid real)")
    with pytest.raises(PreflightError) as e:
        stages.preflight(acct_spec(), "r")
    assert "tables[acct].columns[paid]: the existing target column is 'real'" in str(e.value)


def test_dry_run_writes_nothing(dbpair):
    with dbpair.src() as c:
        run(c, DDL)
    out = stages.preflight(acct_spec(), "r", dry_run=True)
    assert out["dry_run"] is True
    assert_nothing_written(dbpair)


def test_target_is_created_with_explicit_collation_and_types(dbpair):
    with dbpair.src() as c:
        run(c, DDL)
    cols = [COLS[0], {"name": "email", "type": "text", "collation": "POSIX"},
            {"name": "paid", "type": "numeric(10,2)", "target_type": "numeric(14,2)"}]
    stages.preflight(acct_spec(cols, schema_freeze=False), "r")
    with dbpair.tgt() as c:
        got = dict(c.execute(
            "SELECT a.attname, format_type(a.atttypid, a.atttypmod) || coalesce(' ' || co.collname, '') "
            "FROM pg_attribute a LEFT JOIN pg_collation co ON co.oid = a.attcollation AND a.attcollation <> 0 "
            "WHERE attrelid = 'public.acct'::regclass AND attnum > 0").fetchall())
    assert got == {"id": "bigint", "email": "text POSIX", "paid": "numeric(14,2)"}


def test_create_database_with_explicit_encoding(dbpair, servers):
    with dbpair.src() as c:
        run(c, DDL)
    name = dbpair.tgt_dsn.rsplit("/", 1)[1] + "_new"
    s = acct_spec(target={"database": name, "create_database": True, "collation": "C"}, schema_freeze=False)
    try:
        out = stages.preflight(s, "r")
        assert out["created_database"] is True
        with psycopg.connect(servers["target"]) as c:
            assert c.execute("SELECT pg_encoding_to_char(encoding), datcollate FROM pg_database WHERE datname = %s",
                             (name,)).fetchone() == ("UTF8", "C")
    finally:
        with psycopg.connect(servers["target"], autocommit=True) as c:
            c.execute(psycopg.sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psycopg.sql.Identifier(name)))


def test_schema_freeze_blocks_ddl_until_released(dbpair):
    with dbpair.src() as c:
        run(c, DDL, "CREATE TABLE other (id int)")
    s = acct_spec()
    assert stages.preflight(s, "r")["frozen"] == ["public.acct"]
    with dbpair.src() as c:
        with pytest.raises(psycopg.errors.ObjectInUse, match="public.acct is frozen by migration t"):
            c.execute("ALTER TABLE acct ADD COLUMN x int")
        c.rollback()
        with pytest.raises(psycopg.errors.ObjectInUse):
            c.execute("DROP TABLE acct")
        c.rollback()
        c.execute("ALTER TABLE other ADD COLUMN x int")  # unrelated tables stay free
        c.execute("INSERT INTO acct VALUES (1, 'a', 1)")  # writes are not blocked
        c.commit()
    assert stages.release(s, "r") == {"unfrozen": 1}
    assert stages.release(s, "r") == {"unfrozen": 0}  # twice is fine
    with dbpair.src() as c:
        c.execute("ALTER TABLE acct ADD COLUMN x int")
        assert c.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'dbguard%'").fetchone()[0] == 0
