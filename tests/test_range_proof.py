"""The per-range proof (range_proof): the bytes the relay carried against the range read back from the target.

A target that changes a value as it lands (a trigger the copy cannot switch off: ENABLE ALWAYS) must fail the
range it lands in, and only that one, and the ledger must name it. Declared changes (a target_type) must still
verify; tables the stream cannot prove fall back to the SQL checksum and say so.
"""
from __future__ import annotations

import pytest
from psycopg import sql

from dbguard import backfill, catalog, stages
from dbguard.ranges import plan
from util import run, spec

# (type, the source's value, what the target's trigger writes instead): each prints differently.
CHANGES = {
    "float8 -0 for 0": ("double precision", "0", "'-0'::float8"),
    "array lower bound shifted": ("integer[]", "'{1,2}'", "'[2:3]={1,2}'::integer[]"),
    "json whitespace": ("json", "'{\"a\":1}'", "'{\"a\": 1}'::json"),
    "json key order": ("json", "'{\"a\":1,\"b\":2}'", "'{\"b\":2,\"a\":1}'::json"),
    "numeric NaN became NULL": ("numeric", "'NaN'", "NULL"),  # the SQL checksum hashed both alike (fixed with this proof)
}


def _table(dbpair, type_: str, value: str, rows: int = 30) -> None:
    with dbpair.src() as c:
        run(c, sql.SQL("CREATE TABLE t (id integer PRIMARY KEY, v {})").format(sql.SQL(type_)).as_string(c),
            sql.SQL("INSERT INTO t SELECT g, CASE WHEN g % 2 = 0 THEN ({})::{} END FROM generate_series(1, {}) g")
            .format(sql.SQL(value), sql.SQL(type_), sql.Literal(rows)).as_string(c))


def _spec(type_: str, **backfill_opts):
    return spec([{"name": "t", "key": ["id"], "columns": [{"name": "id", "type": "integer"},
                                                          {"name": "v", "type": type_}]}],
                schema_freeze=False, backfill=backfill_opts)


def _trigger(dbpair, replacement: str, at_id: int) -> None:
    """Row `at_id` lands changed: a BEFORE INSERT trigger that fires even in replica mode (ENABLE ALWAYS)."""
    with dbpair.tgt() as c:
        run(c, sql.SQL("CREATE FUNCTION alter_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                       "IF NEW.id = {} THEN NEW.v := {}; END IF; RETURN NEW; END $$").format(
            sql.Literal(at_id), sql.SQL(replacement)).as_string(c),
            "CREATE TRIGGER alter_row BEFORE INSERT ON t FOR EACH ROW EXECUTE FUNCTION alter_row()",
            "ALTER TABLE t ENABLE ALWAYS TRIGGER alter_row")


@pytest.mark.parametrize("case", CHANGES)
def test_a_value_changed_as_it_lands_fails_its_range_and_names_it(dbpair, case):
    type_, value, replacement = CHANGES[case]
    _table(dbpair, type_, value)
    s = _spec(type_)
    stages.preflight(s, "p")
    _trigger(dbpair, replacement, at_id=14)  # in the second range: ids 11..20
    s = catalog.resolve(s)
    with dbpair.src() as c:
        ranges = plan(c, s.tables[0], 10)
    results = [backfill.copy_range(s, "p", r) for r in ranges]
    assert [r.ok for r in results] == [True, False, True], [r.to_dict() for r in results]
    assert all(r.extra["proof"] == "stream" for r in results)
    bad = results[1]
    assert bad.source.count == bad.target.count == 10 and bad.source.total != bad.target.total
    assert bad.label == "t #1 [11 .. 21)"
    with dbpair.tgt() as c:
        assert c.execute("SELECT range_id, status, lo, hi FROM dbguard.ranges WHERE run_id = 'p' "
                         "AND status <> 'verified'").fetchall() == [(1, "mismatch", ["11"], ["21"])]


def test_a_foreign_row_in_the_range_fails_the_count(dbpair):
    """A row the source does not have, written into the range on the target as the copy lands (here by the
    trigger): the read-back holds one row more than the relay carried."""
    _table(dbpair, "text", "'x'")
    s = _spec("text")
    stages.preflight(s, "p")
    with dbpair.tgt() as c:
        run(c, "CREATE FUNCTION extra_row() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
               "IF NEW.id = 5 THEN INSERT INTO t VALUES (1005, 'foreign'); END IF; RETURN NEW; END $$",
            "CREATE TRIGGER extra_row AFTER INSERT ON t FOR EACH ROW EXECUTE FUNCTION extra_row()",
            "ALTER TABLE t ENABLE ALWAYS TRIGGER extra_row")
    res = backfill.copy_range(catalog.resolve(s), "p", plan_all(s))
    assert not res.ok and (res.source.count, res.target.count) == (30, 31)


def plan_all(s):
    from dbguard.ranges import KeyRange
    return KeyRange("t", 0, None, None)


def test_declared_type_changes_verify_through_the_cast(dbpair):
    """int -> bigint (text COPY), real -> double precision, numeric scale widened, text -> varchar: the source
    read applies each declared cast, so the stream is what the target holds and every range verifies."""
    with dbpair.src() as c:
        run(c, "CREATE TABLE m (k text PRIMARY KEY, i integer, r real, n numeric(12,2), s text)",
            "INSERT INTO m SELECT (ARRAY['a','B','ä','Z','ß','b '])[g % 6 + 1] || g, g, "
            "CASE WHEN g % 3 = 0 THEN '-0' ELSE g / 7.0 END, g / 3.0, 's' || g FROM generate_series(1, 200) g")
    s = spec([{"name": "m", "key": ["k"], "columns": [
        {"name": "k", "type": "text"}, {"name": "i", "type": "integer", "target_type": "bigint"},
        {"name": "r", "type": "real", "target_type": "double precision"},
        {"name": "n", "type": "numeric(12,2)", "target_type": "numeric(14,4)"},
        {"name": "s", "type": "text", "target_type": "character varying(20)"}]}],
        schema_freeze=False, )
    stages.preflight(s, "tt")
    s = catalog.resolve(s)
    with dbpair.src() as c:
        ranges = plan(c, s.tables[0], 50)
    results = [backfill.copy_range(s, "tt", r) for r in ranges]
    assert len(results) == 4 and all(r.ok and r.extra["proof"] == "stream" for r in results), \
        [r.to_dict() for r in results]
    assert sum(r.source.count for r in results) == 200
    with dbpair.tgt() as c:
        assert c.execute("SELECT n::text FROM m WHERE i = 3").fetchone() == ("1.0000",)


def test_a_generated_column_falls_back_to_the_checksum_and_says_so(dbpair):
    with dbpair.src() as c:
        run(c, "CREATE TABLE g (id integer PRIMARY KEY, a integer, b integer GENERATED ALWAYS AS (a * 2) STORED)",
            "INSERT INTO g (id, a) SELECT x, x FROM generate_series(1, 50) x")
    s = spec([{"name": "g", "key": ["id"], "columns": [{"name": "id", "type": "integer"}, {"name": "a", "type": "integer"},
                                                       {"name": "b", "type": "integer", "generated": True}]}],
             schema_freeze=False)
    stages.preflight(s, "g")
    from dbguard.ranges import KeyRange
    res = backfill.copy_range(catalog.resolve(s), "g", KeyRange("g", 0, None, None))
    assert res.ok and res.extra["proof"] == "checksum" and res.to_dict()["proof"] == "checksum"
    assert "generated column" in res.to_dict()["proof_why"]


def test_verify_checksum_keeps_the_sql_checksum(dbpair):
    _table(dbpair, "text", "'x'")
    s = _spec("text", verify="checksum")
    stages.preflight(s, "p")
    res = backfill.copy_range(catalog.resolve(s), "p", plan_all(s))
    assert res.ok and res.extra["proof"] == "checksum" and res.source.count == 30



def test_the_read_back_walks_the_key_index_and_restores_the_planner_settings(dbpair):
    """Rows the copy just wrote have no statistics: left alone the planner sorts the range (on disk, at 250,000
    rows). The read-back runs with sort and bitmap scans off, and only for its own statement: the transaction's
    settings, including one the session set itself, are as before."""
    from dbguard import range_proof

    _table(dbpair, "text", "'x'", rows=20_000)
    s = catalog.resolve(_spec("text"))
    query = sql.SQL("EXPLAIN SELECT * FROM t WHERE id BETWEEN 10 AND 15000 ORDER BY id")
    with dbpair.tgt() as c:
        run(c, "CREATE TABLE t (id integer PRIMARY KEY, v text)")
        c.execute("BEGIN")
        c.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 20000) g")  # as the copy: no statistics
        left_alone = "\n".join(r[0] for r in c.execute(query).fetchall())
        with range_proof.index_order(c):
            hinted = "\n".join(r[0] for r in c.execute(query).fetchall())
        got = range_proof.read_back(c, s.tables[0], plan(c, s.tables[0], 50_000)[0], "binary")
        after = c.execute("SELECT current_setting('enable_sort'), current_setting('enable_bitmapscan')").fetchone()
        c.execute("ROLLBACK")
        c.execute("SET enable_bitmapscan = off")  # the session's own choice: must survive
        c.execute("BEGIN")
        with range_proof.index_order(c):
            pass
        session = c.execute("SELECT current_setting('enable_sort'), current_setting('enable_bitmapscan')").fetchone()
        c.execute("ROLLBACK")
    assert "Sort" in left_alone, left_alone  # the situation is real
    assert "Index Scan" in hinted and "Sort" not in hinted, hinted
    assert got.count == 20_000
    assert after == ("on", "on") and session == ("on", "off")
