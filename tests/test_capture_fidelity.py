"""Capture fidelity: every value arrives byte for byte. For each type and value: insert, update to another
value, key change and delete through capture; after every phase each row's `t::text` on the target equals
the source's (independent of dbguard's checksum). The writing session uses hostile output settings, which
the trigger functions must pin. A few types also go through reverse capture (target -> source)."""
from __future__ import annotations

import re
import uuid

import psycopg
import pytest
from psycopg import sql

from dbguard import capture, db

from conftest import _create_db, _drop_db
from util import spec as make_spec

RUN = "fidelity"

SETUP = """
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS integer CHECK (VALUE > 0);
CREATE TYPE pair AS (a integer, b text);
"""

# type -> values (SQL literals). Each table gets rows k = 1..n; updates rotate values between rows.
VALUES: dict[str, list[str]] = {
    "real": ["'0'", "'-0'", "'NaN'", "'Infinity'", "'-Infinity'", "'1e-45'", "'1.17549435e-38'", "'3.4028235e38'",
             "'0.1'"],
    "double precision": ["'-0'", "'NaN'", "'Infinity'", "'-Infinity'", "'5e-324'", "'2.2250738585072014e-308'",
                         "'0.1'", "'1e308'", "'1.0000000000000002'"],
    "numeric": ["'1.10'", "'1.1'", "'NaN'", "'Infinity'", "'-Infinity'", "'-0.000'", "'1e131071'", "'1e-16383'",
                "'123456789012345678901234567890.000100'"],
    "numeric(10,2)": ["'1.10'", "'-0.00'", "'99999999.99'"],
    "timestamp": ["'2024-02-29 23:59:59.999999'", "'infinity'", "'-infinity'", "'0001-01-01 00:00:00 BC'",
                  "'294276-12-31 23:59:59.999999'", "'1999-12-31 23:59:59.5'"],
    "timestamptz": ["'2024-02-29 23:59:59.999999+05:45'", "'infinity'", "'-infinity'", "'1900-01-01 00:00:00+00'",
                    "'2000-01-01 00:00:00.000001-12:00'"],
    "date": ["'2024-02-29'", "'infinity'", "'-infinity'", "'4713-01-01 BC'", "'5874897-12-31'"],
    "time": ["'00:00:00'", "'23:59:59.999999'", "'24:00:00'"],
    "timetz": ["'12:34:56.789+05:45'", "'00:00:00-15:59'"],
    "interval": ["'1 year 2 mons -3 days 04:05:06.789'", "'-1 days +02:00'", "'0'", "'-178000000 years'",
                 "'P1Y2M3DT4H5M6.000001S'", "'infinity'"],
    "bytea": ["'\\x00ff5c27'", "''", "'\\x5c5c0a'"],
    "text": ["''", "E'a\\tb\\nc'", "'🚀 Zoë'", "E'back\\\\slash'", "'NULL'"],
    "character(3)": ["'ab'", "''"],
    "character varying(5)": ["'abcde'", "' '"],
    "json": ["'{\"b\":1,  \"a\":2}'", "'{\"a\":1,\"a\":2}'", "'  [1, 2.50 ,null]  '", "'\"\\u0000\"'",
             "'{\"n\": 1e1000000}'", "'{\"é\": \"\\u00e9\"}'"],
    "jsonb": ["'{\"b\":1,\"a\":[1,2.50,null]}'", "'null'", "'\"str\"'", "'1.10'", "'{\"n\": 1e100000}'"],
    "integer[]": ["'{1,NULL,3}'", "'[0:2]={1,2,3}'", "'{{1,2},{3,NULL}}'", "'[-2:-1][3:4]={{1,2},{3,4}}'", "'{}'"],
    "text[]": ["'{\"\",NULL,\"a,b\",\"\\\"q\\\"\",\"NULL\",\"back\\\\\\\\slash\"}'", "'{}'", "'[1:1]={x}'"],
    "double precision[]": ["'{-0,NaN,Infinity,5e-324}'", "'{{0.1,-0},{NULL,1e308}}'"],
    "numeric[]": ["'{1.10,NaN,-Infinity}'", "'[5:6]={1.1,1.10}'"],
    "mood": ["'sad'", "'happy'", "'ok'"],
    "mood[]": ["'{happy,NULL,sad}'"],
    "posint": ["1", "2147483647"],
    "pair": ["'(1,\"x,y\")'", "'(,)'", "'(2,\"\")'"],
    "pair[]": ["ARRAY['(1,a)'::pair, NULL, '(,)']"],
    "uuid": ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'", "'00000000-0000-0000-0000-000000000000'"],
    "inet": ["'192.168.0.1/24'", "'::1'", "'10.0.0.1'", "'2001:db8::1/64'"],
    "cidr": ["'10.0.0.0/8'", "'2001:db8::/32'"],
    "macaddr": ["'08:00:2b:01:02:03'"],
    "money": ["'12.34'", "'-0.01'", "'92233720368547758.07'"],
    "money[]": ["'{12.34,NULL,-0.01}'"],
    "bit(4)": ["B'1010'", "B'0000'"],
    "bit varying": ["B''", "B'101'"],
    "tsvector": ["'a fat cat:3A sat'", "''", "'''quoted'' x:1,2B'"],
    "vector(3)": ["'[1.5,-2.25,3.0000001]'", "'[0,-0,1e-38]'"],
    "boolean": ["true", "false"],
    "smallint": ["-32768", "32767"],
    "bigint": ["-9223372036854775808", "9223372036854775807"],
    "point": ["'(1.5,-0)'", "'(0.1,1e308)'"],
    "int4range": ["'[1,5)'", "'empty'", "'(,3]'"],
    "tstzrange": ["'[2024-01-01 00:00:00.000001+00,infinity)'"],
}
# Output settings an application session might use; capture must not print values through them.
HOSTILE = ("SET extra_float_digits = -15; SET bytea_output = 'escape'; SET IntervalStyle = 'sql_standard'; "
           "SET TimeZone = 'Asia/Kathmandu'; SET DateStyle = 'SQL, DMY'")


def table_name(t: str) -> str:
    return "v_" + re.sub(r"[^a-z0-9]+", "_", t.replace("[]", " arr")).strip("_")


def values_for(*dsns: str) -> dict[str, list[str]]:
    """The catalogue, less what one of the servers cannot hold (pgvector not installed; interval
    ±infinity before PostgreSQL 17)."""
    out = dict(VALUES)
    for dsn in dsns:
        with psycopg.connect(dsn) as c:
            if c.execute("SELECT count(*) FROM pg_available_extensions WHERE name = 'vector'").fetchone()[0] == 0:
                out.pop("vector(3)", None)
            if c.info.server_version < 170000:
                out["interval"] = [v for v in out["interval"] if "infinity" not in v]
    return out


def build_spec(values: dict[str, list[str]]):
    tables = [{"name": table_name(t), "schema": "public", "key": ["k"],
               "columns": [{"name": "k", "type": "integer"}, {"name": "v", "type": t}]} for t in values]
    return make_spec(tables, name="fidelity")


def create(dsn: str, values: dict[str, list[str]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        if "vector(3)" in values:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute(SETUP)
        for t in values:
            c.execute(sql.SQL("CREATE TABLE public.{} (k integer PRIMARY KEY, v {})").format(
                sql.Identifier(table_name(t)), sql.SQL(t)))


def rows(conn_id: str, values: dict[str, list[str]]) -> dict[str, list[tuple]]:
    """Every table's rows as (k, row text, value text) under dbguard's canonical session settings."""
    with db.connect(conn_id) as c:
        return {t: c.execute(sql.SQL("SELECT k, x::text, v::text FROM public.{} x ORDER BY k").format(
            sql.Identifier(table_name(t)))).fetchall() for t in values}


def assert_same(phase: str, values: dict[str, list[str]]) -> None:
    src, tgt = rows("dbguard_source", values), rows("dbguard_target", values)
    bad = {t: (src[t], tgt[t]) for t in values if src[t] != tgt[t]}
    assert not bad, f"{phase}: differs for {list(bad)}: " + "; ".join(
        f"{t}: source {s} target {g}" for t, (s, g) in list(bad.items())[:3])


def write(dsn: str, statements: list[sql.Composable]) -> int:
    """Run statements in a session with hostile output settings; returns the rows they changed."""
    n = 0
    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute(HOSTILE)
        for s in statements:
            n += c.execute(s).rowcount
    return n


def test_every_value_round_trips_through_capture_byte_for_byte(dbpair):
    run_matrix(dbpair.src_dsn, dbpair.tgt_dsn)


def run_matrix(src_dsn: str, tgt_dsn: str) -> None:
    """Insert, update, key change, delete of every catalogue value source -> target, then a few types
    target -> source; each phase compared row by row."""
    vals = values_for(src_dsn, tgt_dsn)  # the catalogue this pair of servers can hold
    create(src_dsn, vals)
    create(tgt_dsn, vals)
    spec = build_spec(vals)
    capture.capture_on(spec, RUN)

    def drain(direction="forward"):
        res = capture.drain(spec, RUN, direction=direction)
        errors = sorted({f["error"] for f in capture.failures(spec, RUN, direction)})
        assert res["dual_write_fail"] == 0 and res["lag"] == 0, errors
        return res

    rel = {t: sql.Identifier("public", table_name(t)) for t in vals}
    n_values = sum(len(v) for v in vals.values())
    # insert: row k holds value k (and one NULL row per type)
    write(src_dsn, [sql.SQL("INSERT INTO {} VALUES ({}, {})").format(rel[t], sql.Literal(i + 1), sql.SQL(v))
                           for t, vs in vals.items() for i, v in enumerate(vs)]
          + [sql.SQL("INSERT INTO {} VALUES (0, NULL)").format(rel[t]) for t in vals])
    assert drain()["applied"] == n_values + len(vals)
    assert_same("insert", vals)
    # update: every row to the next value (a one-value type goes to NULL and back), NULL row to a value
    ups = []
    for t, vs in vals.items():
        for i in range(len(vs)):
            nxt = vs[(i + 1) % len(vs)] if len(vs) > 1 else "NULL"
            ups.append(sql.SQL("UPDATE {} SET v = {} WHERE k = {}").format(rel[t], sql.SQL(nxt), sql.Literal(i + 1)))
        ups.append(sql.SQL("UPDATE {} SET v = {} WHERE k = 0").format(rel[t], sql.SQL(vs[0])))
    write(src_dsn, ups)
    drain()
    assert_same("update", vals)
    # key change: every row moves to k + 100 (its value travels with it)
    write(src_dsn, [sql.SQL("UPDATE {} SET k = k + 100").format(rel[t]) for t in vals])
    drain()
    assert_same("key change", vals)
    with db.connect("dbguard_target") as c:
        assert c.execute("SELECT count(*) FROM public.v_real WHERE k < 100").fetchone()[0] == 0
    # delete: every other row
    write(src_dsn, [sql.SQL("DELETE FROM {} WHERE k % 2 = 0").format(rel[t]) for t in vals])
    drain()
    assert_same("delete", vals)

    # reverse: the target is now the primary; a few types written there come back exactly
    capture.capture_on(spec, RUN, direction="reverse")
    few = [t for t in ("double precision", "numeric", "json", "integer[]", "interval", "timestamptz", "money",
                       "vector(3)", "pair", "bytea") if t in vals]
    stmts = []
    for t in few:
        stmts.append(sql.SQL("INSERT INTO {} VALUES (500, {})").format(rel[t], sql.SQL(vals[t][-1])))
        stmts.append(sql.SQL("UPDATE {} SET v = {} WHERE k = 101").format(rel[t], sql.SQL(vals[t][0])))
        stmts.append(sql.SQL("UPDATE {} SET k = 600 WHERE k = 500").format(rel[t]))
        stmts.append(sql.SQL("DELETE FROM {} WHERE k = 103").format(rel[t]))
    changed = write(tgt_dsn, stmts)
    assert changed >= 3 * len(few) and drain("reverse")["applied"] == changed
    assert_same("reverse", vals)
    # loop guard: the reverse applier's writes on the source were not captured forward
    assert capture.drain(spec, RUN)["applied"] == 0


def test_capture_never_rejects_a_write_the_source_accepts(dbpair):
    """json holding \\u0000 or a number beyond jsonb's numeric range, and numerics at the type's limits:
    the source accepts them, so the capture trigger must too (a jsonb row image refused them)."""
    t = make_spec([{"name": "odd", "schema": "public", "key": ["k"], "columns": [
        {"name": "k", "type": "integer"}, {"name": "j", "type": "json"}, {"name": "n", "type": "numeric"}]}],
        name="odd")
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE public.odd (k integer PRIMARY KEY, j json, n numeric)")
    capture.capture_on(t, RUN)
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        c.execute("""INSERT INTO public.odd VALUES (1, '"\\u0000"', '1e131071'), (2, '{"n": 1e1000000}', '-1e-16383'),
                     (3, '[{"a":1,"a":2}]', 'NaN')""")
    assert capture.drain(t, RUN)["applied"] == 3
    with db.connect("dbguard_source") as s, db.connect("dbguard_target") as g:
        q = "SELECT k, j::text, n::text FROM public.odd ORDER BY k"
        assert s.execute(q).fetchall() == g.execute(q).fetchall()


def test_wide_tables_generated_and_identity_always_columns(dbpair):
    """60 columns; a generated column regenerates on the destination; an identity GENERATED ALWAYS key is
    written with OVERRIDING SYSTEM VALUE."""
    cols = [{"name": "id", "type": "bigint"}] + [{"name": f"c{i}", "type": "double precision" if i % 2 else "text"}
                                                 for i in range(60)] + [{"name": "g", "type": "text"}]
    spec = make_spec([{"name": "wide", "schema": "public", "key": ["id"], "columns": cols}], name="wide")
    ddl = ("CREATE TABLE public.wide (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "
           + ", ".join(f"c{i} {'double precision' if i % 2 else 'text'}" for i in range(60))
           + ", g text GENERATED ALWAYS AS (c0 || '/' || c2) STORED)")
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute(ddl)
    capture.capture_on(spec, RUN)
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        c.execute(HOSTILE)
        c.execute("INSERT INTO public.wide (" + ", ".join(f"c{i}" for i in range(60)) + ") SELECT "
                  + ", ".join(f"'{i}-' || g" if i % 2 == 0 else f"g * 0.1 - {i}" for i in range(60))
                  + " FROM generate_series(1, 300) g")
        c.execute("UPDATE public.wide SET c0 = 'changed', c1 = '-0' WHERE id % 7 = 0")
        c.execute("DELETE FROM public.wide WHERE id % 11 = 0")
    res = capture.drain(spec, RUN)
    assert res["dual_write_fail"] == 0, capture.failures(spec, RUN)
    with db.connect("dbguard_source") as s, db.connect("dbguard_target") as g:
        q = "SELECT x::text FROM public.wide x ORDER BY id"
        src = s.execute(q).fetchall()
        assert len(src) == 273 and src == g.execute(q).fetchall()
        assert g.execute("SELECT g FROM public.wide WHERE id = 7").fetchone()[0] == "changed/2-7"


def test_money_inside_an_array_is_refused_when_lc_monetary_differs(dbpair):
    """money in an array prints through lc_monetary; if the two servers disagree, capture refuses up front,
    naming the column, instead of carrying a value the destination would read differently."""
    spec = make_spec([{"name": "m", "schema": "public", "key": ["k"], "columns": [
        {"name": "k", "type": "integer"}, {"name": "plain", "type": "money"}, {"name": "list", "type": "money[]"}]}],
        name="m")
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE TABLE public.m (k integer PRIMARY KEY, plain money, list money[])")
    with psycopg.connect(dbpair.tgt_dsn, autocommit=True) as c:
        mon = c.execute("SELECT current_setting('lc_monetary')").fetchone()[0]
        other = "C" if mon != "C" else "POSIX"
        c.execute(sql.SQL("ALTER DATABASE {} SET lc_monetary = {}").format(sql.Identifier(c.info.dbname),
                                                                          sql.Literal(other)))
    with pytest.raises(capture.CaptureError, match=r"\['m.list'\] hold money inside an array"):
        capture.capture_on(spec, RUN)
    assert not capture.is_on(spec)


def test_every_value_round_trips_from_a_postgresql_15_source(pg15_server, servers, monkeypatch):
    """The same matrix with a PostgreSQL 15 source and the PostgreSQL 18 target (forward), and back
    (reverse) onto PostgreSQL 15; pgvector and interval infinity are left out (not on 15)."""
    name = "cap15_" + uuid.uuid4().hex[:8]
    src, tgt = _create_db(pg15_server, name), _create_db(servers["target"], name)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", src)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", tgt)
    try:
        with psycopg.connect(tgt) as c:
            monetary = c.execute("SELECT current_setting('lc_monetary')").fetchone()[0]
        with psycopg.connect(src, autocommit=True) as c:
            assert c.info.server_version // 10000 == 15
            # money[] prints through lc_monetary: both servers must agree (capture refuses otherwise, tested above)
            c.execute(sql.SQL("ALTER DATABASE {} SET lc_monetary = {}").format(sql.Identifier(name),
                                                                              sql.Literal(monetary)))
        run_matrix(src, tgt)
    finally:
        _drop_db(pg15_server, name)
        _drop_db(servers["target"], name)


def test_declared_transforms_apply_to_captured_rows_as_in_the_backfill(dbpair):
    """A vector store declared `normalize: true` and a search store whose analyzer changes: the backfill
    copies the transformed values; rows the application writes during the run must arrive the same way."""
    from dbguard import transforms

    spec = make_spec([{"name": "documents", "schema": "public", "key": ["id"],
                       "columns": [{"name": "id", "type": "bigint"}, {"name": "title", "type": "text"},
                                   {"name": "embedding", "type": "vector(3)"}, {"name": "tsv", "type": "tsvector"}],
                       "vector": [{"column": "embedding", "dim": 3, "source_metric": "l2", "source_normalized": False,
                                   "metric": "cosine", "normalize": True, "embed_model": "test-v1"}],
                       "search": [{"column": "tsv", "source_columns": ["title"], "source_config": "english",
                                   "config": "simple"}]}],
                     name="vec", gold="include/gold/demo_docs.jsonl")
    t = spec.tables[0]
    for dsn in (dbpair.src_dsn, dbpair.tgt_dsn):
        with psycopg.connect(dsn, autocommit=True) as c:
            c.execute("CREATE EXTENSION IF NOT EXISTS vector")
            c.execute("CREATE TABLE public.documents (id bigint PRIMARY KEY, title text, embedding vector(3), "
                      "tsv tsvector)")
    capture.capture_on(spec, RUN)
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        c.execute("INSERT INTO public.documents SELECT g, 'The running dogs ' || g, ARRAY[g, -2 * g, 0.5]::vector(3), "
                  "to_tsvector('english', 'The running dogs ' || g) FROM generate_series(1, 20) g")
        c.execute("UPDATE public.documents SET embedding = '[3,4,0]', title = 'Moved cats' WHERE id = 7")
        c.execute("UPDATE public.documents SET id = 700 WHERE id = 8")
    res = capture.drain(spec, RUN)
    assert res["dual_write_fail"] == 0, capture.failures(spec, RUN)
    # what the backfill would have copied: the same expressions, evaluated on the source
    backfill = sql.SQL("SELECT id, title, ({})::text, ({})::text FROM public.documents ORDER BY id").format(
        transforms.source_expr(t, t.column("embedding")), transforms.source_expr(t, t.column("tsv")))
    with db.connect("dbguard_source") as s, db.connect("dbguard_target") as g:
        want = s.execute(backfill).fetchall()
        got = g.execute("SELECT id, title, embedding::text, tsv::text FROM public.documents ORDER BY id").fetchall()
    assert got == want and len(got) == 20
    row7 = next(r for r in got if r[0] == 7)
    assert row7[2] == "[0.6,0.8,0]"
    assert "'cats'" in row7[3] and "'moved'" in row7[3]  # the simple analyzer: no stemming ('cat', 'move')
