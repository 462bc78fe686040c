"""What the migration role must be able to do, checked by preflight before anything is written:
read every row (row-level security), install capture (own the tables), and what happens to tables
that are not migrated but reference migrated ones."""
from __future__ import annotations

import contextlib
import os
import uuid

import psycopg
import pytest
from psycopg import sql

from dbguard import db, stages
from dbguard.errors import PreflightError
from util import run, spec

ROWS = 2_000
RLS_DDL = ["CREATE TABLE acct (id bigint PRIMARY KEY, tenant int NOT NULL, email text)",
           f"INSERT INTO acct SELECT g, g % 10, 'u' || g FROM generate_series(1, {ROWS}) g",
           "ALTER TABLE acct ENABLE ROW LEVEL SECURITY", "ALTER TABLE acct FORCE ROW LEVEL SECURITY",
           "CREATE POLICY tenant0 ON acct USING (tenant = 0)"]


def acct_spec(**top):
    return spec([{"name": "acct", "key": ["id"]}], schema_freeze=False, **top)


@contextlib.contextmanager
def migration_role(dbpair, attrs: str = ""):
    """A LOGIN role on both servers (CREATE on both test databases), set as the conn ids' user; dropped after."""
    name = "dbg_mig_" + uuid.uuid4().hex[:8]
    dsns = {"source": dbpair.src_dsn, "target": dbpair.tgt_dsn}
    for dsn in dsns.values():
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {} LOGIN " + attrs).format(sql.Identifier(name)))
            c.execute(sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                sql.Identifier(c.info.dbname), sql.Identifier(name)))
            c.execute(sql.SQL("GRANT USAGE, CREATE ON SCHEMA public TO {}").format(sql.Identifier(name)))
    old = {k: os.environ[k] for k in ("AIRFLOW_CONN_DBGUARD_SOURCE", "AIRFLOW_CONN_DBGUARD_TARGET")}
    os.environ["AIRFLOW_CONN_DBGUARD_SOURCE"] = psycopg.conninfo.make_conninfo(dsns["source"], user=name)
    os.environ["AIRFLOW_CONN_DBGUARD_TARGET"] = psycopg.conninfo.make_conninfo(dsns["target"], user=name)
    try:
        yield name
    finally:
        os.environ.update(old)
        for dsn in dsns.values():
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(name)))
                c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(name)))


def _owned_by(dbpair, role: str, *statements: str) -> None:
    with dbpair.src() as c:
        run(c, *statements, f'ALTER TABLE acct OWNER TO "{role}"')


def _migrate(s, run_id="r"):
    stages.preflight(s, run_id)
    stages.capture_on(s, run_id)
    for t in s.table_order():
        for r in stages.plan_ranges(s, run_id, t.name):
            stages.copy_range(s, run_id, r)
    return stages.reconcile(s, run_id)


def test_a_role_that_owns_a_force_rls_table_is_refused_naming_bypassrls(dbpair):
    """Measured before: the owner under FORCE ROW LEVEL SECURITY copied only the rows its policy shows
    (1 in 10), and counts and checksums agreed on that subset, so the run passed with rows missing."""
    with migration_role(dbpair) as role:
        _owned_by(dbpair, role, *RLS_DDL)
        with pytest.raises(PreflightError) as e:
            stages.preflight(acct_spec(), "r")
        msg = str(e.value)
        assert "public.acct" in msg and "row-level security" in msg
        assert f'ALTER ROLE "{role}" BYPASSRLS' in msg or f"ALTER ROLE {role} BYPASSRLS" in msg
        with dbpair.tgt() as c:
            assert c.execute("SELECT to_regclass('public.acct')").fetchone()[0] is None  # nothing written


def test_with_bypassrls_the_same_role_migrates_every_row(dbpair):
    with migration_role(dbpair, "BYPASSRLS") as role:
        _owned_by(dbpair, role, *RLS_DDL)
        out = _migrate(acct_spec())
        assert out["checksum_ok"]
        with dbpair.tgt() as c:
            assert c.execute("SELECT count(*) FROM acct").fetchone()[0] == ROWS


def test_dbguard_sessions_turn_a_silent_policy_filter_into_an_error(dbpair):
    """row_security = off (as pg_dump sets it): a read a policy would filter raises instead of returning
    a subset. The same role in a plain session sees the subset silently."""
    with migration_role(dbpair) as role:
        _owned_by(dbpair, role, *RLS_DDL)
        with psycopg.connect(os.environ["AIRFLOW_CONN_DBGUARD_SOURCE"]) as plain:
            assert plain.execute("SELECT count(*) FROM acct").fetchone()[0] == ROWS // 10
        with db.source(acct_spec()) as conn:
            assert conn.execute("SHOW row_security").fetchone()[0] == "off"
            with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
                conn.execute("SELECT count(*) FROM acct")


def test_a_role_that_does_not_own_the_table_is_refused_naming_ownership(dbpair):
    """Capture enables its triggers with ALTER TABLE ... ENABLE ALWAYS TRIGGER, which needs ownership:
    GRANT TRIGGER is not enough. Preflight says so instead of capture_on failing half-way."""
    with migration_role(dbpair) as role:
        with dbpair.src() as c:
            run(c, "CREATE TABLE acct (id bigint PRIMARY KEY, email text)",
                f'GRANT SELECT, TRIGGER ON acct TO "{role}"')
        with pytest.raises(PreflightError) as e:
            stages.preflight(acct_spec(), "r")
        msg = str(e.value)
        assert "source: public.acct is owned by" in msg and "ENABLE ALWAYS" in msg
        assert f'ALTER TABLE "public"."acct" OWNER TO "{role}"' in msg and f'GRANT postgres TO "{role}"' in msg
        assert "GRANT TRIGGER ON" not in msg  # it has TRIGGER; that grant would not help


def test_a_target_table_the_role_does_not_own_is_refused_too(dbpair):
    """Reverse capture runs on the target after the flip: the same ownership holds there."""
    with migration_role(dbpair) as role:
        with dbpair.src() as c:
            run(c, "CREATE TABLE acct (id bigint PRIMARY KEY, email text)", f'ALTER TABLE acct OWNER TO "{role}"')
        with dbpair.tgt() as c:
            run(c, "CREATE TABLE acct (id bigint PRIMARY KEY, email text)",
                f'GRANT SELECT, INSERT, UPDATE, DELETE, TRIGGER ON acct TO "{role}"')
        with pytest.raises(PreflightError) as e:
            stages.preflight(acct_spec(), "r")
        msg = str(e.value)
        assert "target: public.acct is owned by" in msg and "source: public.acct" not in msg


REF_DDL = ["CREATE TABLE customers (id bigint PRIMARY KEY, name text)",
           "CREATE TABLE invoices (id bigint PRIMARY KEY, customer_id bigint REFERENCES customers ON DELETE CASCADE)",
           "INSERT INTO customers VALUES (1, 'a'), (2, 'b')", "INSERT INTO invoices VALUES (10, 1)"]


def test_a_table_that_references_a_migrated_one_is_refused_until_acknowledged(dbpair):
    with dbpair.src() as c:
        run(c, *REF_DDL)
    tables = [{"name": "customers", "key": ["id"]}]
    with pytest.raises(PreflightError) as e:
        stages.preflight(spec(tables), "r")
    msg = str(e.value)
    assert "public.invoices" in msg and "public.customers" in msg and "not migrated" in msg
    assert "ON DELETE CASCADE" in msg  # the consequence: reverse-applied deletes cascade its rows away
    assert "acknowledge:" in msg and "'referenced_by public.invoices'" in msg
    with dbpair.tgt() as c:
        assert c.execute("SELECT to_regclass('public.customers')").fetchone()[0] is None
    out = stages.preflight(spec(tables, acknowledge=["referenced_by public.invoices"]), "r")
    assert "public.invoices" in str(out.get("acknowledged"))
    # migrating the referencing table too needs no acknowledgement
    stages.release(spec(tables), "r")
    stages.preflight(spec(tables + [{"name": "invoices", "key": ["id"]}], name="t2"), "r2")


def test_init_of_a_referenced_table_alone_writes_the_acknowledgement_and_preflight_passes(dbpair):
    from dbguard import init_spec
    from dbguard.spec import parse_spec

    import yaml

    with dbpair.src() as c:
        run(c, *REF_DDL)
    text = init_spec.generate("refd", "dbguard_source", "dbguard_target", tables=["customers"])
    sp = parse_spec(yaml.safe_load(text))
    assert sp.acknowledge == ["referenced_by public.invoices"]
    assert "public.invoices is not migrated but references public.customers" in text  # the reason beside it
    stages.preflight(sp, "r")


def test_an_owner_the_role_is_a_member_of_only_on_the_source_is_refused_for_the_target(dbpair):
    """The target's table is created with the source's owner (pg_dump restores ownership): membership in that
    role on the source lets forward capture in, but reverse capture after the flip would fail on the target."""
    app = "dbg_app_" + uuid.uuid4().hex[:8]
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(sql.SQL("CREATE ROLE {}").format(sql.Identifier(app)))
            c.execute(sql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(sql.Identifier(app)))  # an owner's
    try:
        with migration_role(dbpair) as role:
            with dbpair.src() as c:
                run(c, "CREATE TABLE acct (id bigint PRIMARY KEY, email text)", f'ALTER TABLE acct OWNER TO "{app}"',
                    f'GRANT "{app}" TO "{role}"')
            with pytest.raises(PreflightError) as e:
                stages.preflight(acct_spec(), "r")
            msg = str(e.value)
            assert f"target: public.acct (to be created as on the source) is owned by {app}" in msg
            assert f'GRANT {app} TO "{role}"' in msg and "source: public.acct" not in msg
            with psycopg.connect(dbpair.tgt_dsn, autocommit=True) as c:
                c.execute(sql.SQL("GRANT {} TO {}").format(sql.Identifier(app), sql.Identifier(role)))
            stages.preflight(acct_spec(), "r")
            stages.capture_on(acct_spec(), "r")  # forward capture installs as a member of the owner
            for conn in (dbpair.src(), dbpair.tgt()):  # the app's tables go before the roles
                with conn:
                    run(conn, "DROP TABLE acct CASCADE")
    finally:
        for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(app)))
                c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(app)))
