"""Real identifiers (issue 9 §6): names the way ORMs write them, and injection-shaped ones, migrate
through a real DAG run with an application writing meanwhile; names are matched exactly and always
quoted, so a table named `x"; DROP TABLE y; --` is just a table and y survives."""
from __future__ import annotations

import psycopg
import pytest
import yaml

from dbguard import catalog, stages
from dbguard.airflow import env as afenv
from dbguard.airflow.dag_factory import group_id
from dbguard.errors import PreflightError, SpecError
from dbguard.writer import Op, Workload, Writer
from test_dag import dagbag, reports  # noqa: F401  (fixture)
from util import run, spec

EVIL = 'x"; DROP TABLE y; --'
SOURCE_DDL = [
    'CREATE SCHEMA "App Data"',
    'CREATE TABLE "App Data"."Orders" ("Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, '
    '"createdAt" timestamptz NOT NULL DEFAULT now(), "Total Amount" numeric(12,2))',
    'CREATE TABLE "App Data".order_items (id bigserial PRIMARY KEY, '
    '"orderId" bigint REFERENCES "App Data"."Orders"("Id"), "qty;--" integer CHECK ("qty;--" > 0))',
    'CREATE TABLE "App Data"."_prisma_migrations" (id varchar(36) PRIMARY KEY, checksum varchar(64) NOT NULL, '
    '"finished_at" timestamptz)',
    'CREATE TABLE "App Data".shop_customermodel (id serial PRIMARY KEY, "naïve ünïcode 名前" text)',
    f'CREATE TABLE "App Data".{psycopg.sql.Identifier(EVIL).as_string(None)} '
    '(id integer PRIMARY KEY, "it\'s" text)',
    'CREATE TABLE "App Data".y (id integer PRIMARY KEY)',
    'INSERT INTO "App Data"."Orders" ("Total Amount") SELECT g * 1.5 FROM generate_series(1, 400) g',
    'INSERT INTO "App Data".order_items ("orderId", "qty;--") SELECT 1 + g % 400, 1 + g % 7 FROM generate_series(1, 900) g',
    'INSERT INTO "App Data"."_prisma_migrations" SELECT md5(g::text), md5(g::text || \'c\'), now() '
    'FROM generate_series(1, 50) g',
    'INSERT INTO "App Data".shop_customermodel ("naïve ünïcode 名前") SELECT \'名\' || g FROM generate_series(1, 200) g',
    f'INSERT INTO "App Data".{psycopg.sql.Identifier(EVIL).as_string(None)} SELECT g, \'v\' || g '
    'FROM generate_series(1, 300) g',
    'INSERT INTO "App Data".y VALUES (1)',
]
TABLES = ["Orders", "order_items", "_prisma_migrations", "shop_customermodel", EVIL]


def spec_raw(name="orm_names"):
    return {"name": name, "source": {"conn_id": "dbguard_source"}, "target": {"conn_id": "dbguard_target"},
            "backfill": {"batch_rows": 100, "concurrency": 2},
            "tables": [{"name": n, "schema": "App Data", "key": ["Id" if n == "Orders" else "id"]} for n in TABLES]}


class OrmWorkload(Workload):
    """Each operation inserts an order and an item and updates the injection-named table."""

    weights = {"order": 1}
    n = 0

    def op_order(self, c, rng):
        q = psycopg.sql.Identifier
        self.n += 1
        oid = c.execute('INSERT INTO "App Data"."Orders" ("Total Amount") VALUES (%s) RETURNING "Id"',
                        (self.n % 97,)).fetchone()[0]
        c.execute('INSERT INTO "App Data".order_items ("orderId", "qty;--") VALUES (%s, 3)', (oid,))
        c.execute(psycopg.sql.SQL("UPDATE {}.{} SET {} = %s WHERE id = %s").format(q("App Data"), q(EVIL), q("it's")),
                  (f"w{self.n}", 1 + self.n % 300))
        return Op("order")


def rows(conn, schema, table, key):
    q = psycopg.sql.Identifier
    return conn.execute(psycopg.sql.SQL("SELECT t::text FROM {}.{} t ORDER BY {}").format(
        q(schema), q(table), q(key))).fetchall()


def test_orm_identifiers_through_a_real_dag_run_with_a_live_writer(airflow_db, dbpair, reports, tmp_path,  # noqa: F811
                                                                     monkeypatch):
    with dbpair.src() as c:
        run(c, *SOURCE_DDL)
    path = tmp_path / "orm_names.yaml"
    path.write_text(yaml.safe_dump(spec_raw(), allow_unicode=True))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    bag = dagbag()
    assert not {k: v for k, v in bag.import_errors.items() if "orm_names" in k}
    # an application on dbguard's switch: it stops once capture is switched off (release)
    writer = Writer(OrmWorkload(), dbpair.src_dsn, migration="orm_names", switch="stop", rate=50).start()
    try:
        dag_run = bag.dags["dbguard_orm_names"].test()
    finally:
        writer.stop()
    result = afenv.run_result(dag_run)
    assert writer.errors == [], writer.errors[:3]
    assert dag_run.state == "success", result
    assert result["checksum_ok"] is True and result["dual_write_fail"] == 0
    assert writer.ops > 0
    with dbpair.src() as a, dbpair.tgt() as b:
        for c in (a, b):
            c.execute("SET TimeZone = 'UTC'")
        for n in TABLES:
            key = "Id" if n == "Orders" else "id"
            assert rows(a, "App Data", n, key) == rows(b, "App Data", n, key), n
        # the writer's rows are there (every op it made), and y was never dropped on either side
        assert b.execute('SELECT count(*) FROM "App Data"."Orders"').fetchone()[0] == 400 + writer.ops
        assert a.execute("""SELECT to_regclass('"App Data".y')""").fetchone()[0] is not None
        assert b.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f' AND convalidated").fetchone()[0] == 1
        for rel, col in (('"App Data".order_items', "id"), ('"App Data"."Orders"', "Id")):  # serial, identity
            assert b.execute("SELECT pg_get_serial_sequence(%s, %s)", (rel, col)).fetchone()[0] is not None, rel
    assert group_id(EVIL) != EVIL and group_id("OrderItems") == "OrderItems"


def test_names_are_exact_and_missing_ones_get_did_you_mean(dbpair):
    with dbpair.src() as c:
        run(c, *SOURCE_DDL)
    s = spec([{"name": "orders", "schema": "App Data", "key": ["Id"]},
              {"name": "Orders", "schema": "App Data", "key": ["Id"], "columns": [
        {"name": "Id", "type": "bigint"}, {"name": "createdat", "type": "timestamptz"}]}])
    with pytest.raises(PreflightError) as e:
        stages.preflight(s, "r")
    msg = str(e.value)
    assert "source table App Data.orders does not exist" in msg and "did you mean 'Orders'?" in msg
    assert "columns[createdat]: no such column" in msg and "did you mean 'createdAt'?" in msg
    with pytest.raises(SpecError, match="63 bytes"):
        spec([{"name": "ö" * 40, "key": ["id"]}])
    resolved = catalog.resolve(spec([{"name": EVIL, "schema": "App Data", "key": ["id"]}]))
    assert [c.name for c in resolved.tables[0].columns] == ["id", "it's"]


def test_two_tables_of_the_same_name_in_different_schemas(dbpair):
    """Both `items` tables migrate, each under its ref "a.items" / "b.items" (ledger, ranges, capture),
    with changes made while capture is on reaching the right one."""
    from dbguard import capture

    with dbpair.src() as c:
        run(c, "CREATE SCHEMA a", "CREATE SCHEMA b",
            "CREATE TABLE a.items (id int PRIMARY KEY, v text)",
            "CREATE TABLE b.items (id int PRIMARY KEY, w numeric, a_id int REFERENCES a.items(id))",
            "INSERT INTO a.items SELECT g, 'a' || g FROM generate_series(1, 500) g",
            "INSERT INTO b.items SELECT g, g * 0.5, g FROM generate_series(1, 300) g")
    s = spec([{"name": "items", "schema": "b", "key": ["id"],
               "foreign_keys": [{"columns": ["a_id"], "references": "a.items", "ref_columns": ["id"]}]},
              {"name": "items", "schema": "a", "key": ["id"]}])
    assert [t.ref for t in s.table_order()] == ["a.items", "b.items"]
    stages.preflight(s, "r")
    stages.capture_on(s, "r")
    for t in s.table_order():
        for r in stages.plan_ranges(s, "r", t.ref, batch_rows=100):
            assert stages.copy_range(s, "r", r)["ok"], r["label"]
    with dbpair.src() as c:
        run(c, "INSERT INTO a.items VALUES (501, 'late')", "UPDATE b.items SET w = -1 WHERE id = 7",
            "INSERT INTO b.items VALUES (301, 1, 501)")
    assert stages.drain_gate(s, "r")[0] is True
    assert stages.reconcile(s, "r")["tables"].keys() == {"a.items", "b.items"}
    assert stages.finish_schema(s, "r")["differences"] == []
    ok, msg = stages.checksum_gate(s, "r")
    assert ok, msg
    stages.release(s, "r")
    assert not capture.is_on(s)
    with dbpair.src() as a, dbpair.tgt() as b:
        for rel, key in (("a", "id"), ("b", "id")):
            assert rows(a, rel, "items", key) == rows(b, rel, "items", key), rel
        assert b.execute("SELECT w FROM b.items WHERE id = 7").fetchone()[0] == -1
