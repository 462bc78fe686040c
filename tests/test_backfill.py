"""Backfill: ranges are planned on real keys (int with gaps, text, uuid,
composite), copied by streaming COPY, and a range killed half-way and retried
leaves no duplicates and loses nothing."""
import threading
import time

import psycopg
import pytest

from dbguard import preflight, stages
from dbguard.backfill import copy_range
from dbguard.ranges import KeyRange, plan
from util import fingerprint, run, spec

KEY_KINDS = {
    "int_with_gaps": (
        "CREATE TABLE t (id bigint PRIMARY KEY, v text)",
        "INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 700) g UNION ALL "
        "SELECT 1000000000 + g, 'far' FROM generate_series(1, 650) g UNION ALL SELECT 5000000000000, 'last'",
        [{"name": "id", "type": "bigint"}, {"name": "v", "type": "text"}], ["id"], "id"),
    "text": (
        "CREATE TABLE t (id text PRIMARY KEY, v text)",
        "INSERT INTO t SELECT (ARRAY['a','B','ä','Z','ß','日本','b '])[g % 7 + 1] || g, 'v' "
        "FROM generate_series(1, 1351) g",
        [{"name": "id", "type": "text"}, {"name": "v", "type": "text"}], ["id"], 'id COLLATE "C"'),
    "uuid": (
        "CREATE TABLE t (id uuid PRIMARY KEY, v text)",
        "INSERT INTO t SELECT md5(g::text)::uuid, 'v' FROM generate_series(1, 1351) g",
        [{"name": "id", "type": "uuid"}, {"name": "v", "type": "text"}], ["id"], "id"),
    "composite": (
        "CREATE TABLE t (tenant int, code text, v numeric, PRIMARY KEY (tenant, code))",
        "INSERT INTO t SELECT g % 5, 'c' || g, g / 3.0 FROM generate_series(1, 1351) g",
        [{"name": "tenant", "type": "integer"}, {"name": "code", "type": "text"}, {"name": "v", "type": "numeric"}],
        ["tenant", "code"], 'tenant, code COLLATE "C"'),
}


@pytest.mark.parametrize("kind", KEY_KINDS)
def test_ranges_cover_every_key_once_and_copy_is_exact(dbpair, kind):
    ddl, fill, cols, key, order = KEY_KINDS[kind]
    s = spec([{"name": "t", "key": key, "columns": cols}], backfill={"batch_rows": 300}, schema_freeze=False)
    with dbpair.src() as c:
        run(c, ddl, fill)
    stages.preflight(s, "r1")
    with dbpair.src() as c:
        ranges = plan(c, s.tables[0], 300)
        sizes = [c.execute(f"SELECT count(*) FROM t WHERE {_pred(s, r)}").fetchone()[0] for r in ranges]
    assert all(0 < n <= 300 for n in sizes), sizes  # no empty or giant ranges, gaps or not
    assert sum(sizes) == 1351
    for r in ranges:
        assert copy_range(s, "r1", r).ok
    with dbpair.src() as a, dbpair.tgt() as b:
        assert fingerprint(a, "public.t", order) == fingerprint(b, "public.t", order)


def _pred(s, r):
    from dbguard.ranges import predicate
    return predicate(s.tables[0], r).as_string(None)


DEMO_LIKE = [{"name": "id", "type": "bigint"}, {"name": "body", "type": "text"}]


def _setup(dbpair, rows=20000):
    s = spec([{"name": "t", "key": ["id"], "columns": DEMO_LIKE}], schema_freeze=False)
    with dbpair.src() as c:
        run(c, "CREATE TABLE t (id bigint PRIMARY KEY, body text)",
            f"INSERT INTO t SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {rows}) g")
    stages.preflight(s, "r1")
    return s


def test_rerunning_a_range_is_idempotent(dbpair):
    s = _setup(dbpair)
    r = KeyRange("t", 0, None, None)
    first = copy_range(s, "r1", r)
    second = copy_range(s, "r1", r)
    assert first.rows == second.rows == 20000 and second.ok
    with dbpair.src() as a, dbpair.tgt() as b:
        assert fingerprint(a, "t") == fingerprint(b, "t")
        assert b.execute("SELECT attempts FROM dbguard.ranges WHERE run_id = 'r1'").fetchone()[0] == 2


def test_crash_before_commit_leaves_nothing_then_retry_is_exact(dbpair):
    s = _setup(dbpair)
    r = KeyRange("t", 0, ("5000",), ("15000",))

    def crash(conn):
        raise RuntimeError("worker died")

    with pytest.raises(RuntimeError):
        copy_range(s, "r1", r, before_commit=crash)
    with dbpair.tgt() as b:
        assert b.execute("SELECT count(*) FROM t").fetchone()[0] == 0
    assert copy_range(s, "r1", r).rows == 10000
    with dbpair.tgt() as b:
        assert b.execute("SELECT count(*), count(DISTINCT id) FROM t").fetchone() == (10000, 10000)


def test_range_killed_mid_stream_and_retried_has_no_duplicates(dbpair):
    s = _setup(dbpair, rows=20000)
    r = KeyRange("t", 0, None, None)
    copy_range(s, "r1", KeyRange("t", 0, None, ("2000",)))  # some rows already there from an earlier attempt
    killed = threading.Event()

    def killer():
        with dbpair.tgt(autocommit=True) as k:
            for _ in range(200):
                pids = [p for (p,) in k.execute(
                    "SELECT pid FROM pg_stat_activity WHERE application_name = 'dbguard' "
                    "AND datname = current_database() "  # not another test's COPY (pytest -n 2)
                    "AND query LIKE 'COPY%%FROM STDIN%%' AND pid <> pg_backend_pid()")]
                if pids:
                    k.execute("SELECT pg_terminate_backend(%s)", (pids[0],))
                    killed.set()
                    return
                time.sleep(0.01)

    th = threading.Thread(target=killer)
    th.start()
    with pytest.raises(psycopg.Error):
        copy_range(s, "r1", r, rows_per_second=20000)  # throttled: ~1 s, time for the kill
    th.join()
    assert killed.is_set()
    res = copy_range(s, "r1", r)  # the retry
    assert res.ok and res.rows == 20000
    with dbpair.src() as a, dbpair.tgt() as b:
        assert b.execute("SELECT count(*) - count(DISTINCT id) FROM t").fetchone()[0] == 0
        assert fingerprint(a, "t") == fingerprint(b, "t")


def test_throttle_caps_rows_per_second(dbpair):
    s = _setup(dbpair, rows=3000)
    t0 = time.monotonic()
    copy_range(s, "r1", KeyRange("t", 0, None, None), rows_per_second=5000)
    assert time.monotonic() - t0 >= 0.5  # 3000 rows at <= 5000 rows/s


def test_orphans_are_counted_per_range(dbpair):
    tables = [
        {"name": "p", "key": ["id"], "columns": [{"name": "id", "type": "integer"}]},
        {"name": "c", "key": ["id"], "columns": [{"name": "id", "type": "integer"}, {"name": "pid", "type": "integer"}],
         "foreign_keys": [{"columns": ["pid"], "references": "p", "ref_columns": ["id"]}]},
    ]
    s = spec(tables, schema_freeze=False)
    with dbpair.src() as c:
        run(c, "CREATE TABLE p (id int PRIMARY KEY)", "CREATE TABLE c (id int PRIMARY KEY, pid int REFERENCES p)",
            "INSERT INTO p SELECT generate_series(1, 10)", "INSERT INTO c SELECT g, g % 10 + 1 FROM generate_series(1, 50) g")
    preflight.apply(s, "r1")
    res = copy_range(s, "r1", KeyRange("c", 0, None, None))  # child first: every row is an orphan
    assert res.orphans == 50
    copy_range(s, "r1", KeyRange("p", 0, None, None))
    assert copy_range(s, "r1", KeyRange("c", 0, None, None)).orphans == 0


COPY_OUT = ("COPY (SELECT g, repeat(md5(g::text), 20), ARRAY[g::real, -0.0, 'NaN'] FROM generate_series(1, 5000) g) "
            "TO STDOUT (FORMAT binary)")


def test_copy_out_gives_the_same_bytes_as_psycopg_copy_in_1mb_pieces(dbpair):
    from dbguard.backfill import WRITE_BATCH_BYTES, copy_out
    with dbpair.src() as c:
        with c.cursor().copy(COPY_OUT) as cp:
            expected = b"".join(bytes(chunk) for chunk in cp)
        pieces = [bytes(p) for p in copy_out(c, COPY_OUT.encode())]
        assert b"".join(pieces) == expected and len(expected) > 3 * WRITE_BATCH_BYTES
        assert all(len(p) < WRITE_BATCH_BYTES + 1000 for p in pieces) and len(pieces) >= 3
        assert c.execute("SELECT 1").fetchone() == (1,)  # the connection is usable after it
        early = copy_out(c, COPY_OUT.encode())
        next(early)
        early.close()  # a consumer that stops mid-COPY (a target error): the source connection is let go
        assert c.closed


def test_copy_out_raises_the_source_error_mid_stream(dbpair):
    from dbguard.backfill import copy_out
    with dbpair.src() as c:
        q = b"COPY (SELECT 1 / (g - 4000), repeat('x', 500) FROM generate_series(1, 5000) g) TO STDOUT"
        with pytest.raises(psycopg.errors.DivisionByZero, match="division by zero"):
            for _ in copy_out(c, q):
                pass


def test_target_refusing_a_row_mid_copy_fails_the_range_and_commits_nothing(dbpair):
    s = _setup(dbpair, rows=20000)
    with dbpair.tgt(autocommit=True) as b:  # a target that cannot hold row 15000
        b.execute("ALTER TABLE t ADD CONSTRAINT no_15000 CHECK (id <> 15000)")
    with pytest.raises(psycopg.errors.CheckViolation, match="no_15000"):
        copy_range(s, "r1", KeyRange("t", 0, None, None))
    with dbpair.tgt(autocommit=True) as b:
        assert b.execute("SELECT count(*) FROM t").fetchone()[0] == 0
        assert b.execute("SELECT count(*) FROM dbguard.ranges WHERE status = 'verified'").fetchone()[0] == 0
        b.execute("ALTER TABLE t DROP CONSTRAINT no_15000")
    assert copy_range(s, "r1", KeyRange("t", 0, None, None)).ok  # and the retry copies it all
