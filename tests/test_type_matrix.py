"""Backfill carries every value exactly, and the checksum sees what a user sees.

The value catalogue is the capture matrix's (tests/test_capture_fidelity.py: 40+ types with their awkward
values). Through the real backfill every row's text output must arrive byte for byte, and every range must
verify (no false alarm). Then pairs of values that compare equal (or hash alike) but print differently
must give different checksums, under both row-hash algorithms; values that print the same must not.
"""
from __future__ import annotations

import uuid

import psycopg
import pytest
from psycopg import sql

from dbguard import backfill, catalog, checksum, stages
from dbguard.checksum import Hashing
from dbguard.ranges import KeyRange

from conftest import _create_db, _drop_db
from test_capture_fidelity import assert_same, build_spec, create, table_name, values_for
from util import spec as make_spec


def _insert(dsn: str, values: dict[str, list[str]]) -> None:
    with psycopg.connect(dsn, autocommit=True) as c:
        for t, vals in values.items():
            for k, v in enumerate(vals, 1):
                c.execute(sql.SQL("INSERT INTO public.{} VALUES ({}, {})").format(
                    sql.Identifier(table_name(t)), sql.Literal(k), sql.SQL(v)))
            c.execute(sql.SQL("INSERT INTO public.{} VALUES ({}, NULL)").format(
                sql.Identifier(table_name(t)), sql.Literal(len(vals) + 1)))


def backfill_matrix(src: str, tgt: str) -> None:
    values = values_for(src, tgt)
    create(src, values)
    _insert(src, values)
    spec = build_spec(values).model_copy(update={"schema_freeze": False})
    stages.preflight(spec, "matrix")
    spec = catalog.resolve(spec)
    bad = []
    for t in spec.tables:
        res = backfill.copy_range(spec, "matrix", KeyRange(t.ref, 0, None, None))
        if not res.ok:
            bad.append((t.name, res.source.to_dict(), res.target.to_dict()))
    assert_same("backfill", values)
    assert not bad, f"ranges that copied exactly but did not verify (a false alarm): {bad}"


def test_every_value_round_trips_through_the_backfill_and_verifies(dbpair):
    backfill_matrix(dbpair.src_dsn, dbpair.tgt_dsn)


def test_every_value_round_trips_from_a_postgresql_15_source(pg15_server, servers, monkeypatch):  # noqa: F811
    name = "bf15_" + uuid.uuid4().hex[:8]
    src, tgt = _create_db(pg15_server, name), _create_db(servers["target"], name)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", src)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", tgt)
    try:
        with psycopg.connect(tgt) as c:
            monetary = c.execute("SELECT current_setting('lc_monetary')").fetchone()[0]
        with psycopg.connect(src, autocommit=True) as c:
            c.execute(sql.SQL("ALTER DATABASE {} SET lc_monetary = {}").format(sql.Identifier(name),
                                                                              sql.Literal(monetary)))
        backfill_matrix(src, tgt)
    finally:
        _drop_db(pg15_server, name)
        _drop_db(servers["target"], name)


# (type, a, b): a and b print differently, so a source holding a and a target holding b must not verify.
PAIRS = [
    ("real", "'-0'", "'0'"),
    ("double precision", "'-0'", "'0'"),
    ("real[]", "'{-0,1}'", "'{0,1}'"),
    ("double precision[]", "'{{1,-0}}'", "'{{1,0}}'"),
    ("numeric", "'1.10'", "'1.1'"),
    ("numeric", "'0.710'", "'0.71'"),
    ("numeric[]", "'{1.10}'", "'{1.1}'"),
    ("numeric", "'NaN'", "NULL"),  # the type's hash gives NaN, ±Infinity and NULL the same 0
    ("numeric", "'Infinity'", "'NaN'"),
    ("numeric", "'-Infinity'", "NULL"),
    ("jsonb", "'{\"a\": 1.10}'", "'{\"a\": 1.1}'"),
    ("json", "'{\"a\":1,\"b\":2}'", "'{\"b\":2,\"a\":1}'"),
    ("json", "'{\"a\":1}'", "'{\"a\": 1}'"),
    ("interval", "'1 day'", "'24 hours'"),
    ("interval", "'1 mon'", "'30 days'"),
    ("integer[]", "'[0:2]={1,2,3}'", "'{1,2,3}'"),
    ("text[]", "'[0:0]={a}'", "'{a}'"),
    ("text", "'A'", "'a'"),
    ("character varying(5)", "'ab'", "'ab '"),
    ("timetz", "'12:00+01'", "'11:00+00'"),
    ("citext", "'A'", "'a'"),
]
# (type, a, b): different spellings of what prints the same: must verify.
SAME = [
    ("timestamptz", "'2024-01-01 00:00+01'", "'2023-12-31 23:00+00'"),
    ("numeric", "'1.10'", "'1.100'::numeric(10,2)"),
    ("jsonb", "'{\"b\":1, \"a\":2}'", "'{\"a\":2,\"b\":1}'"),
    ("double precision", "'1e2'", "'100'"),
    ("inet", "'10.0.0.1/32'", "'10.0.0.1'"),
]


def _pair_tables(dbpair, cases: list[tuple[str, str, str]]):
    tables = []
    for i, (t, a, b) in enumerate(cases):
        name = f"p{i}"
        for dsn, v in ((dbpair.src_dsn, a), (dbpair.tgt_dsn, b)):
            with psycopg.connect(dsn, autocommit=True) as c:
                if t == "citext":
                    c.execute("CREATE EXTENSION IF NOT EXISTS citext")
                c.execute(sql.SQL("CREATE TABLE {} (k integer PRIMARY KEY, v {})").format(sql.Identifier(name),
                                                                                         sql.SQL(t)))
                c.execute(sql.SQL("INSERT INTO {} VALUES (1, {}), (2, NULL)").format(sql.Identifier(name), sql.SQL(v)))
        tables.append({"name": name, "key": ["k"], "columns": [{"name": "k", "type": "integer"},
                                                              {"name": "v", "type": t}]})
    return make_spec(tables)


def _verdicts(dbpair, spec, algorithm: str) -> list[bool]:
    with dbpair.src() as s, dbpair.tgt() as t:
        h = Hashing(1e-6, algorithm)
        return [checksum.checksum(s, tb, "source", None, h) == checksum.checksum(t, tb, "target", None, h)
                for tb in spec.tables]


@pytest.mark.parametrize("algorithm", ["hash_record", "md5"])
def test_values_that_print_differently_never_share_a_checksum(dbpair, algorithm):
    with dbpair.src() as c:
        has_citext = c.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'citext'").fetchone()
    cases = [p for p in PAIRS if p[0] != "citext" or has_citext]
    spec = _pair_tables(dbpair, cases)
    equal = _verdicts(dbpair, spec, algorithm)
    fooled = [f"{t}: {a} vs {b}" for (t, a, b), eq in zip(cases, equal) if eq]
    assert not fooled, f"{algorithm}: checksum equal although the text differs: {fooled}"


@pytest.mark.parametrize("algorithm", ["hash_record", "md5"])
def test_values_that_print_the_same_verify(dbpair, algorithm):
    spec = _pair_tables(dbpair, SAME)
    noisy = [f"{t}: {a} vs {b}" for (t, a, b), eq in zip(SAME, _verdicts(dbpair, spec, algorithm)) if not eq]
    assert not noisy, f"{algorithm}: checksum differs although the text is the same: {noisy}"


def test_a_target_type_change_converts_once_for_copy_and_checksum(dbpair):
    """real -> double precision: the copy and the checksum make the same conversion, so it verifies."""
    with dbpair.src() as c:
        c.execute("CREATE TABLE m (k integer PRIMARY KEY, r real, n numeric(12,2))")
        c.execute("INSERT INTO m VALUES (1, 0.1, 1.10), (2, '-0', 2.5), (3, 'NaN', NULL), (4, 3.4028235e38, 0)")
        c.commit()
    spec = make_spec([{"name": "m", "key": ["k"], "columns": [
        {"name": "k", "type": "integer"}, {"name": "r", "type": "real", "target_type": "double precision"},
        {"name": "n", "type": "numeric(12,2)", "target_type": "numeric(14,4)"}]}], schema_freeze=False)
    stages.preflight(spec, "tt")
    res = backfill.copy_range(spec, "tt", KeyRange("m", 0, None, None))
    assert res.ok, (res.source.to_dict(), res.target.to_dict())
    with dbpair.tgt() as c:
        assert c.execute("SELECT r::text, n::text FROM m WHERE k = 1").fetchone() == ("0.10000000149011612", "1.1000")
        assert c.execute("SELECT r::text FROM m WHERE k = 2").fetchone() == ("-0",)


def test_a_key_unique_only_over_nullable_columns_is_refused(dbpair):
    from dbguard.errors import PreflightError

    with dbpair.src() as c:
        c.execute("CREATE TABLE u (code text, name text)")
        c.execute("CREATE UNIQUE INDEX u_code ON u (code)")
        c.execute("INSERT INTO u VALUES ('a', 'x'), (NULL, 'lost'), (NULL, 'lost too')")
        c.commit()
    s = make_spec([{"name": "u", "key": ["code"], "columns": [{"name": "code", "type": "text"},
                                                               {"name": "name", "type": "text"}]}])
    with pytest.raises(PreflightError) as e:
        stages.preflight(s, "nk")
    assert "tables[u].key" in str(e.value) and "may be NULL" in str(e.value) and "SET NOT NULL" in str(e.value)


@pytest.mark.parametrize("key_type,ddl,keys", [
    ("mood", "CREATE TYPE mood AS ENUM ('zeta', 'alpha', 'mid', 'beta')", ["zeta", "alpha", "mid", "beta"]),
    ("label", "CREATE DOMAIN label AS text CHECK (VALUE <> '')", ["b", "B", "a", "é", "Z", "_", "aa"]),
])
def test_domain_and_enum_keys_plan_the_same_ranges_on_both_sides(dbpair, key_type, ddl, keys):
    """Ranges over a user-defined key compare its text under COLLATE "C" on both servers, so a range holds
    the same rows wherever its predicate runs: every row copied once, every range verified."""
    with dbpair.src() as c:
        c.execute(ddl)
        c.execute(sql.SQL("CREATE TABLE e (k {} PRIMARY KEY, v integer)").format(sql.SQL(key_type)))
        for i, k in enumerate(keys):
            c.execute("INSERT INTO e VALUES (%s, %s)", (k, i))
        c.commit()
    s = make_spec([{"name": "e", "key": ["k"], "columns": [{"name": "k", "type": key_type},
                                                            {"name": "v", "type": "integer"}]}], schema_freeze=False)
    stages.preflight(s, "ek")
    s = catalog.resolve(s)
    with dbpair.src() as c:
        from dbguard.ranges import plan

        ranges = plan(c, s.tables[0], 2)
    assert len(ranges) == (len(keys) + 1) // 2
    results = [backfill.copy_range(s, "ek", r) for r in ranges]
    assert all(r.ok for r in results) and sum(r.rows for r in results) == len(keys)
    with dbpair.src() as a, dbpair.tgt() as b:
        q = "SELECT k::text, v FROM e ORDER BY k::text"
        assert a.execute(q).fetchall() == b.execute(q).fetchall()
