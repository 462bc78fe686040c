"""The new primary is the source's schema (issue 15 §2-3): the application's triggers, row-level security,
policies, views and materialized views, partitions with their bounds, and sequences a default draws from,
reproduced on the target by pg_dump; dbguard's own writes (copy, applier, reverse applier) do not fire the
application's triggers, the application's writes do.

Real PostgreSQL on both sides, the library stages a run goes through, no mocks."""
import uuid

import psycopg
import pytest

from dbguard import cutover, ledger, stages, target_schema
from dbguard.round_trip import migrate
from dbguard.errors import PreflightError
from conftest import DbPair, _create_db, _drop_db
from util import run, spec

RUN = "app-schema"
ROLE = "dbg_app_reader"

APP_DDL = [
    """CREATE TABLE items (id bigserial PRIMARY KEY, name text NOT NULL, owner text NOT NULL,
                          updated_at timestamptz NOT NULL DEFAULT now())""",
    "CREATE TABLE audit (id bigserial PRIMARY KEY, item_id bigint NOT NULL, op text NOT NULL)",
    """CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN NEW.updated_at := clock_timestamp(); RETURN NEW; END $$""",
    # a helper only the trigger function's body calls: PostgreSQL records no dependency on it
    "CREATE FUNCTION audit_op(op text) RETURNS text LANGUAGE plpgsql AS $$ BEGIN RETURN op; END $$",
    """CREATE FUNCTION write_audit() RETURNS trigger LANGUAGE plpgsql AS
       $$ BEGIN INSERT INTO public.audit (item_id, op) VALUES (NEW.id, audit_op(TG_OP)); RETURN NULL; END $$""",
    "CREATE TRIGGER items_touch BEFORE UPDATE ON items FOR EACH ROW EXECUTE FUNCTION touch()",
    "CREATE TRIGGER items_audit AFTER INSERT OR UPDATE ON items FOR EACH ROW EXECUTE FUNCTION write_audit()",
    "ALTER TABLE items ENABLE ROW LEVEL SECURITY",
    "ALTER TABLE items FORCE ROW LEVEL SECURITY",
    "CREATE POLICY own_rows ON items USING (owner = current_user)",
    "CREATE VIEW item_names AS SELECT id, name FROM items",
    "CREATE MATERIALIZED VIEW item_count AS SELECT count(*) AS n FROM items",
    f"GRANT SELECT, UPDATE ON items TO {ROLE}",
    f"INSERT INTO items (name, owner) SELECT 'i' || g, CASE WHEN g % 2 = 0 THEN '{ROLE}' ELSE 'someone' END "
    "FROM generate_series(1, 200) g",
    "REFRESH MATERIALIZED VIEW item_count",
]


def _role(*conns):
    for c in conns:
        c.execute(f"DO $$ BEGIN CREATE ROLE {ROLE}; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        c.commit()


def _catalog(conn):
    return {
        "triggers": conn.execute("SELECT tgname, tgenabled FROM pg_trigger WHERE tgrelid = 'items'::regclass "
                                 "AND NOT tgisinternal AND tgname NOT LIKE 'dbguard%' ORDER BY 1").fetchall(),
        "rls": conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
                            "WHERE oid = 'items'::regclass").fetchone(),
        "policies": conn.execute("SELECT polname, pg_get_expr(polqual, polrelid) FROM pg_policy "
                                 "WHERE polrelid = 'items'::regclass").fetchall(),
        "views": conn.execute("SELECT relname, relkind, relispopulated FROM pg_class WHERE relname IN "
                              "('item_names', 'item_count') ORDER BY 1").fetchall(),
        "grants": conn.execute("SELECT privilege_type FROM information_schema.role_table_grants WHERE "
                               f"table_name = 'items' AND grantee = '{ROLE}' ORDER BY 1").fetchall(),
    }


def test_triggers_rls_policies_and_views_on_the_new_primary_and_back(dbpair):
    _app_round_trip(dbpair)


def test_the_same_from_a_postgresql_15_source(pg15_server, servers, monkeypatch):
    """The issue's setting: a PostgreSQL 15 source (the machine's binaries), the embedded 18 target."""
    name = "app15_" + uuid.uuid4().hex[:8]
    src, tgt = _create_db(pg15_server, name), _create_db(servers["target"], name)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", src)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", tgt)
    try:
        with psycopg.connect(src) as c:
            assert c.info.server_version // 10000 == 15
        _app_round_trip(DbPair("dbguard_source", "dbguard_target", src, tgt))
    finally:
        _drop_db(pg15_server, name)
        _drop_db(servers["target"], name)


def _app_round_trip(dbpair):
    with dbpair.src() as s, dbpair.tgt() as t:
        _role(s, t)
        run(s, *APP_DDL)
        want = _catalog(s)
    sp = spec([{"name": "items", "key": ["id"]}, {"name": "audit", "key": ["id"]}])
    migrate(sp, RUN)
    cutover.cutover(sp, RUN)
    assert target_schema.differences(sp) == []
    with dbpair.tgt() as t:
        assert _catalog(t) == want  # triggers enabled, RLS on and forced, policy, view, matview, grants
        assert t.execute("SELECT n FROM item_count").fetchone() == (200,)
        objs = {o["kind"]: o for o in ledger.metrics(t, RUN)["schema_objects"]["items"]}  # for the run report
        assert objs["triggers"]["target"] == "items_touch, items_audit" or objs["triggers"]["equal"], objs
        assert all(o["equal"] for o in objs.values()), objs
        t.execute(f"SET ROLE {ROLE}")  # the policy filters on the target as it does on the source
        assert t.execute("SELECT count(*) FROM items").fetchone() == (100,)
        t.execute("RESET ROLE")
        audit_before = t.execute("SELECT count(*) FROM audit").fetchone()[0]
    assert audit_before == 200  # the source's audit rows, copied; the copy fired no trigger on the target
    with dbpair.tgt(autocommit=True) as app:  # the application, on the new primary
        old = app.execute("SELECT updated_at FROM items WHERE id = 1").fetchone()[0]
        app.execute("UPDATE items SET name = 'renamed on the target' WHERE id = 1")
        new_at = app.execute("SELECT updated_at FROM items WHERE id = 1").fetchone()[0]
        new_id = app.execute("INSERT INTO items (name, owner) VALUES ('born on the target', 'x') RETURNING id"
                             ).fetchone()[0]
        assert new_at > old  # the BEFORE UPDATE trigger keeps updated_at on the new primary
        assert app.execute("SELECT count(*) FROM audit").fetchone()[0] == audit_before + 2
        tgt_audit = app.execute("SELECT id, item_id, op FROM audit ORDER BY id").fetchall()
    rb = cutover.rollback(sp, RUN)
    assert rb["status"] == "rolled_back", rb
    with dbpair.src(autocommit=True) as c:
        # the audit rows the target wrote reach the source once: the source's trigger did not fire again
        assert c.execute("SELECT id, item_id, op FROM audit ORDER BY id").fetchall() == tgt_audit
        assert c.execute("SELECT count(*) FROM audit WHERE item_id = 1 AND op = 'UPDATE'").fetchone() == (1,)
        assert c.execute("SELECT count(*) FROM audit WHERE item_id = %s", (new_id,)).fetchone() == (1,)
        assert c.execute("SELECT updated_at FROM items WHERE id = 1").fetchone()[0] == new_at
        # back on the source, the application's triggers fire for the application again
        c.execute("UPDATE items SET name = 'back on the source' WHERE id = 2")
        assert c.execute("SELECT count(*) FROM audit WHERE item_id = 2 AND op = 'UPDATE'").fetchone() == (1,)


PARTITIONED = [
    "CREATE TABLE events (id bigint NOT NULL, at date NOT NULL, body text, PRIMARY KEY (id, at)) "
    "PARTITION BY RANGE (at)",
    "CREATE TABLE events_2023 PARTITION OF events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01')",
    "CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01')",
    "CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01')",
    "CREATE TABLE events_other PARTITION OF events DEFAULT",
    "CREATE INDEX events_body_idx ON events (body)",
    "INSERT INTO events SELECT g, date '2022-07-01' + (g * 3), 'e' || g FROM generate_series(1, 500) g",
]


def _partitions(conn):
    return conn.execute(
        "SELECT c.relname, c.relkind, pg_get_expr(c.relpartbound, c.oid), "
        "(SELECT count(*) FROM pg_index i WHERE i.indrelid = c.oid) FROM pg_inherits i JOIN pg_class c "
        "ON c.oid = i.inhrelid WHERE i.inhparent = 'events'::regclass ORDER BY 1").fetchall()


def test_a_range_partitioned_source_arrives_partitioned_with_the_same_bounds(dbpair):
    with dbpair.src() as c:
        run(c, *PARTITIONED)
        want = _partitions(c), c.execute("SELECT pg_get_partkeydef('events'::regclass)").fetchone()
        counts = c.execute("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1").fetchall()
    sp = spec([{"name": "events", "key": ["id", "at"]}])
    assert stages.preflight(sp, RUN)["schema_differences"] == []
    for r in stages.plan_ranges(sp, RUN, "events", batch_rows=200):
        assert stages.copy_range(sp, RUN, r)["ok"]
    assert stages.reconcile(sp, RUN)["checksum_ok"]
    assert stages.finish_schema(sp, RUN)["differences"] == []
    with dbpair.tgt() as c:
        assert c.execute("SELECT relkind FROM pg_class WHERE oid = 'events'::regclass").fetchone() == ("p",)
        assert (_partitions(c), c.execute("SELECT pg_get_partkeydef('events'::regclass)").fetchone()) == want
        assert c.execute("SELECT tableoid::regclass::text, count(*) FROM events GROUP BY 1 ORDER BY 1"
                         ).fetchall() == counts  # each row in the partition its bounds choose


def test_a_default_from_an_unowned_sequence_keeps_default_and_sequence(dbpair):
    with dbpair.src() as c:
        run(c, "CREATE SEQUENCE ticket_no START 500",
            "CREATE TABLE tickets (id int PRIMARY KEY, ref bigint NOT NULL DEFAULT nextval('ticket_no'), body text)",
            "INSERT INTO tickets (id, body) SELECT g, 't' || g FROM generate_series(1, 50) g")
    sp = spec([{"name": "tickets", "key": ["id"]}])
    migrate(sp, RUN)
    out = cutover.cutover(sp, RUN)  # refused today: "column 'ref' default: source 'nextval', target None"
    assert any(x["sequence"].endswith("ticket_no") for x in out["sequences"]), out["sequences"]
    with dbpair.tgt(autocommit=True) as app:
        assert app.execute("SELECT pg_get_expr(adbin, adrelid) FROM pg_attrdef WHERE adrelid = 'tickets'::regclass"
                           ).fetchone() == ("nextval('ticket_no'::regclass)",)
        assert app.execute("INSERT INTO tickets (id, body) VALUES (1000, 'new') RETURNING ref").fetchone()[0] > 549


def test_a_view_over_a_table_that_is_not_migrated_is_named_and_can_be_acknowledged(dbpair):
    with dbpair.src() as c:
        run(c, "CREATE TABLE kept (id int PRIMARY KEY)", "CREATE TABLE elsewhere (id int PRIMARY KEY)",
            "CREATE VIEW both_ids AS SELECT k.id FROM kept k JOIN elsewhere e USING (id)")
    with pytest.raises(PreflightError) as e:
        stages.preflight(spec([{"name": "kept", "key": ["id"]}]), RUN)
    assert 'acknowledge: ["not_reproduced view public.both_ids"]' in str(e.value)
    assert "public.elsewhere" in str(e.value)
    with dbpair.tgt() as c:
        assert c.execute("SELECT to_regclass('public.kept')").fetchone() == (None,)  # nothing written
    sp = spec([{"name": "kept", "key": ["id"]}], acknowledge=["not_reproduced view public.both_ids"])
    assert stages.preflight(sp, RUN)["schema_differences"] == []
    with dbpair.tgt() as c:
        assert c.execute("SELECT to_regclass('public.both_ids')").fetchone() == (None,)


def test_init_on_such_a_source_writes_a_spec_that_migrates_and_cuts_over_with_equal_catalogs(dbpair, tmp_path):
    from dbguard import init_spec
    from dbguard.spec import load_spec

    with dbpair.src() as s, dbpair.tgt() as t:
        _role(s, t)
        run(s, *APP_DDL, *PARTITIONED, "CREATE TABLE elsewhere (id int PRIMARY KEY)",
            "CREATE VIEW joined AS SELECT i.id FROM items i JOIN elsewhere e USING (id)")
    path = tmp_path / "app.yaml"
    path.write_text(init_spec.generate("app", "dbguard_source", "dbguard_target", tables=["items", "audit", "events"]))
    sp = load_spec(path)
    assert sp.acknowledge == ["not_reproduced view public.joined"]  # named by init, with the reason beside it
    migrate(sp, RUN)
    cutover.cutover(sp, RUN)
    assert target_schema.differences(sp) == []
    with dbpair.tgt() as t:
        assert _catalog(t)["triggers"] == [("items_audit", "O"), ("items_touch", "O")]
        assert t.execute("SELECT relkind FROM pg_class WHERE oid = 'events'::regclass").fetchone() == ("p",)


def test_a_foreign_key_to_a_table_left_out_and_a_role_missing_on_the_target_are_named(dbpair):
    with dbpair.src() as c:
        c.execute("DO $$ BEGIN CREATE ROLE dbg_src_only; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
        run(c, "CREATE TABLE parent (id int PRIMARY KEY)",
            "CREATE TABLE child (id int PRIMARY KEY, parent_id int REFERENCES parent)",
            "GRANT SELECT ON child TO dbg_src_only")
    with dbpair.tgt() as c:
        c.execute("DROP ROLE IF EXISTS dbg_src_only")
        c.commit()
    tables = [{"name": "child", "key": ["id"]}]
    with pytest.raises(PreflightError) as e:
        stages.preflight(spec(tables), RUN)
    assert 'acknowledge: ["not_reproduced foreign_key public.child.child_parent_id_fkey"]' in str(e.value)
    assert 'acknowledge: ["not_reproduced role dbg_src_only"]' in str(e.value)
    sp = spec(tables, acknowledge=["not_reproduced foreign_key public.child.child_parent_id_fkey",
                                   "not_reproduced role dbg_src_only"])
    assert stages.preflight(sp, RUN)["schema_differences"] == []
    with dbpair.tgt() as c:  # the table is there, without the grant to the role the target does not have
        assert c.execute("SELECT count(*) FROM information_schema.role_table_grants WHERE table_name = 'child' "
                         "AND grantee <> current_user").fetchone() == (0,)


def test_renamed_tables_keep_their_triggers_policies_and_views(dbpair):
    with dbpair.src() as s, dbpair.tgt() as t:
        _role(s, t)
        run(s, *APP_DDL)
    sp = spec([{"name": "items", "key": ["id"], "target": {"schema": "app", "name": "things"}},
               {"name": "audit", "key": ["id"], "target": {"schema": "app", "name": "audit_log"}}])
    stages.preflight(sp, RUN)
    for tb in sp.tables:
        for r in stages.plan_ranges(sp, RUN, tb.name):
            assert stages.copy_range(sp, RUN, r)["ok"]
    assert stages.reconcile(sp, RUN)["checksum_ok"]
    assert stages.finish_schema(sp, RUN)["differences"] == []
    with dbpair.tgt(autocommit=True) as app:
        assert app.execute("SELECT pg_get_viewdef('public.item_names'::regclass)").fetchone()[0].strip().endswith(
            "FROM app.things;")
        app.execute("SELECT setval(pg_get_serial_sequence('app.audit_log', 'id'), 1000)")  # as the cutover would
        app.execute("UPDATE app.things SET name = 'x' WHERE id = 3")  # the audit function names the new table
        assert app.execute("SELECT count(*) FROM app.audit_log WHERE item_id = 3").fetchone() == (2,)
        assert app.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class "
                           "WHERE oid = 'app.things'::regclass").fetchone() == (True, True)


def test_a_role_that_cannot_write_as_a_replica_is_refused_when_the_tables_have_triggers(dbpair, monkeypatch):
    with dbpair.src() as s, dbpair.tgt() as t:
        _role(s, t)
        run(s, *APP_DDL)
        for c in (s, t):
            c.execute("DO $$ BEGIN CREATE ROLE dbg_plain LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            c.execute("ALTER ROLE dbg_plain NOSUPERUSER BYPASSRLS")
            c.execute(f"GRANT CREATE ON DATABASE {c.info.dbname} TO dbg_plain")
            c.execute("GRANT ALL ON SCHEMA public TO dbg_plain")
            c.commit()
        run(s, "ALTER TABLE items OWNER TO dbg_plain", "ALTER TABLE audit OWNER TO dbg_plain")
    for var, dsn in (("AIRFLOW_CONN_DBGUARD_SOURCE", dbpair.src_dsn), ("AIRFLOW_CONN_DBGUARD_TARGET", dbpair.tgt_dsn)):
        monkeypatch.setenv(var, dsn.replace("postgresql://postgres@", "postgresql://dbg_plain@"))
    with pytest.raises(PreflightError) as e:
        stages.preflight(spec([{"name": "items", "key": ["id"]}, {"name": "audit", "key": ["id"]}],
                              schema_freeze=False), RUN, dry_run=True)
    assert "GRANT SET ON PARAMETER session_replication_role TO dbg_plain" in str(e.value)
    assert "public.items.items_audit" in str(e.value)
    assert "GRANT dbg_plain TO dbg_plain" not in str(e.value)  # it owns the tables itself ...
    assert "owned by postgres on the source" in str(e.value) and "GRANT postgres TO dbg_plain" in str(e.value)


def test_the_cutover_refuses_a_target_missing_a_policy_or_with_a_trigger_disabled(dbpair):
    with dbpair.src() as s, dbpair.tgt() as t:
        _role(s, t)
        run(s, *APP_DDL)
    sp = spec([{"name": "items", "key": ["id"]}, {"name": "audit", "key": ["id"]}])
    migrate(sp, RUN)
    with dbpair.tgt() as t:
        run(t, "DROP POLICY own_rows ON items", "ALTER TABLE items DISABLE TRIGGER items_touch",
            "ALTER TABLE items NO FORCE ROW LEVEL SECURITY", "DROP VIEW item_names")
    diffs = "\n".join(target_schema.differences(sp))
    for want in ("policy 'own_rows' missing on the target", "trigger 'items_touch': source ('enabled'",
                 "row level security force: source True, target False", "view 'public.item_names' missing"):
        assert want in diffs, diffs
    with pytest.raises(cutover.CutoverError, match="own_rows"):
        cutover.cutover(sp, RUN)


def test_a_policy_and_an_index_on_an_excluded_column(dbpair):
    with dbpair.src() as c:
        run(c, "CREATE TABLE notes (id int PRIMARY KEY, body text, secret text)",
            "CREATE INDEX notes_secret_idx ON notes (secret)", "ALTER TABLE notes ENABLE ROW LEVEL SECURITY",
            "CREATE POLICY no_secrets ON notes USING (secret IS NULL)")
    tables = [{"name": "notes", "key": ["id"], "exclude_columns": ["secret"]}]
    with pytest.raises(PreflightError) as e:
        stages.preflight(spec(tables), RUN)
    assert 'acknowledge: ["not_reproduced policy public.notes.no_secrets"]' in str(e.value)
    assert "exclude_columns" in str(e.value) and "notes_secret_idx" not in str(e.value)  # the index just goes
    sp = spec(tables, acknowledge=["not_reproduced policy public.notes.no_secrets"])
    stages.preflight(sp, RUN)
    assert stages.finish_schema(sp, RUN)["differences"] == []
    with dbpair.tgt() as c:
        assert c.execute("SELECT relrowsecurity, (SELECT count(*) FROM pg_policy WHERE polrelid = 'notes'::regclass), "
                         "(SELECT count(*) FROM pg_index WHERE indrelid = 'notes'::regclass) FROM pg_class "
                         "WHERE oid = 'notes'::regclass").fetchone() == (True, 0, 1)


def test_rollback_drop_target_takes_away_what_preflight_created(dbpair):
    with dbpair.src() as s, dbpair.tgt() as t:
        _role(s, t)
        run(s, "CREATE TYPE mood AS ENUM ('sad', 'ok')", *APP_DDL,
            "ALTER TABLE items ADD COLUMN feeling mood")
        run(t, "CREATE FUNCTION touch() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$")  # not ours
    sp = spec([{"name": "items", "key": ["id"]}, {"name": "audit", "key": ["id"]}])
    stages.preflight(sp, RUN)
    stages.finish_schema(sp, RUN)
    out = stages.rollback(sp, RUN, drop_target=True)
    assert not out.get("kept"), out
    with dbpair.tgt() as t:
        left = t.execute("SELECT to_regclass('items'), to_regclass('audit'), to_regclass('item_names'), "
                         "to_regclass('item_count'), to_regtype('mood'), to_regprocedure('write_audit()'), "
                         "to_regprocedure('touch()') IS NOT NULL").fetchone()
    assert left == (None, None, None, None, None, None, True)  # the target's own touch() stays


def test_a_table_the_migration_role_cannot_read_does_not_stop_pg_dump(dbpair, monkeypatch):
    with dbpair.src() as s, dbpair.tgt() as t:
        for c in (s, t):
            c.execute("DO $$ BEGIN CREATE ROLE dbg_plain LOGIN; EXCEPTION WHEN duplicate_object THEN NULL; END $$")
            c.execute(f"GRANT CREATE ON DATABASE {c.info.dbname} TO dbg_plain")
            c.execute("GRANT ALL ON SCHEMA public TO dbg_plain")
            c.commit()
        run(s, "CREATE TABLE payroll (id int PRIMARY KEY)",  # not migrated, and not readable by the role
            "CREATE TABLE kept (id int PRIMARY KEY, body text)", "ALTER TABLE kept OWNER TO dbg_plain")
    for var, dsn in (("AIRFLOW_CONN_DBGUARD_SOURCE", dbpair.src_dsn), ("AIRFLOW_CONN_DBGUARD_TARGET", dbpair.tgt_dsn)):
        monkeypatch.setenv(var, dsn.replace("postgresql://postgres@", "postgresql://dbg_plain@"))
    out = stages.preflight(spec([{"name": "kept", "key": ["id"]}], schema_freeze=False), RUN, dry_run=True)
    assert out["dry_run"] is True  # was: pg_dump: permission denied for table payroll
