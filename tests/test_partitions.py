"""Partitioned tables: every guard dbguard installs (fence, TRUNCATE guard, capture, the watermark's
foreign-write counter, the schema freeze) holds for a statement that names a partition, in ordinary and in
session_replication_role = replica sessions, on a PostgreSQL 18 and a PostgreSQL 15 source. PostgreSQL fires
a parent's statement triggers only for statements that name the parent, and event triggers only in origin
sessions unless ENABLE ALWAYS; these tests hold dbguard to both."""
from __future__ import annotations

import time
import uuid

import psycopg
import pytest
from psycopg import sql

from dbguard import capture, cutover, preflight, stages
from dbguard.cutover import fence, watermark
from dbguard.writer import Op, Workload, Writer

from conftest import DbPair, _create_db, _drop_db
from test_capture import assert_identical
from util import fingerprint, run, spec

RUN = "part-run"
# range-partitioned by day: three partitions (one of them partitioned again) and a default
DDL = """
CREATE TABLE events (id bigint NOT NULL, day date NOT NULL, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
CREATE TABLE events_2023 PARTITION OF events FOR VALUES FROM ('2023-01-01') TO ('2024-01-01');
CREATE TABLE events_2024 PARTITION OF events FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
CREATE TABLE events_2025 PARTITION OF events FOR VALUES FROM ('2025-01-01') TO ('2026-01-01') PARTITION BY RANGE (day);
CREATE TABLE events_2025_all PARTITION OF events_2025 FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
CREATE TABLE events_other PARTITION OF events DEFAULT;
"""
MEMBERS = ["events", "events_2023", "events_2024", "events_2025", "events_2025_all", "events_other"]
SEED = ("INSERT INTO events SELECT g, date '2023-01-01' + (g * 7 % 1400), 'v' || g "
        "FROM generate_series(1, 600) g")
COLS = [{"name": "id", "type": "bigint"}, {"name": "day", "type": "date"}, {"name": "v", "type": "text"}]


def part_spec(**top):
    return spec([{"name": "events", "key": ["id", "day"], "columns": COLS}], **top)


@pytest.fixture(params=["pg18", "pg15"])
def pair(request, dbpair, servers, monkeypatch):
    """Source and target databases, the partitioned table seeded on the source (preflight creates the target's,
    partitions and bounds included)."""
    p = dbpair
    if request.param == "pg15":
        pg15 = request.getfixturevalue("pg15_server")
        name = "part15_" + uuid.uuid4().hex[:8]
        src = _create_db(pg15, name)
        monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", src)
        p = DbPair(dbpair.source, dbpair.target, src, dbpair.tgt_dsn)
        request.addfinalizer(lambda: _drop_db(pg15, name))
    with p.src() as c:
        run(c, DDL, SEED)
        assert c.info.server_version // 10000 == (15 if request.param == "pg15" else 18)
    return p


def _refused(dsn, stmt, error=psycopg.errors.ReadOnlySqlTransaction, match="fenced", replica=False):
    with psycopg.connect(dsn, autocommit=True) as c:
        if replica:
            c.execute("SET session_replication_role = replica")
        with pytest.raises(error, match=match):
            c.execute(stmt)


def _copied(s, *, gate: bool = False) -> None:
    """Preflight, capture on and every range copied (and the checksum gate passed)."""
    stages.preflight(s, RUN)
    stages.capture_on(s, RUN)
    for r in stages.plan_ranges(s, RUN, "events"):
        stages.copy_range(s, RUN, r)
    if gate:
        assert stages.checksum_gate(s, RUN)[0]


WRITES = ["UPDATE events_2024 SET v = 'split' WHERE id = (SELECT min(id) FROM events_2024)",
          "INSERT INTO events_2023 VALUES (100001, '2023-03-03', 'straggler')",
          "DELETE FROM events_other WHERE id = (SELECT min(id) FROM events_other)",
          "UPDATE events_2025_all SET v = 'deep' WHERE id = (SELECT min(id) FROM events_2025_all)",
          "TRUNCATE events_2024",
          "UPDATE events SET v = 'parent' WHERE id = 1"]


@pytest.mark.parametrize("replica", [False, True], ids=["origin", "replica"])
def test_fence_refuses_every_write_that_names_a_partition(pair, replica):
    s = part_spec()
    with pair.src() as c:
        assert fence.install(c, s, "source") == ["events"]
        c.commit()
        assert fence.fenced(c, s, "source")
    for stmt in WRITES:
        _refused(pair.src_dsn, stmt, replica=replica)
    with pair.src() as c:  # undo: every partition writable again
        assert fence.remove(c, s, "source") == ["events"]
        c.commit()
        assert not fence.fenced(c, s, "source")
        assert c.execute("SELECT count(*) FROM pg_trigger WHERE tgname LIKE 'dbguard_fence%'").fetchone()[0] == 0
        run(c, *WRITES)


def test_fence_with_a_partition_unfenced_is_not_fenced(pair):
    s = part_spec()
    with pair.src() as c:
        fence.install(c, s, "source")
        c.execute(sql.SQL("DROP TRIGGER {} ON events_2025_all").format(sql.Identifier(fence.trigger_name(s))))
        c.commit()
        assert not fence.fenced(c, s, "source")  # a hole anywhere in the tree is a hole
        fence.install(c, s, "source")  # and installing again closes it
        c.commit()
        assert fence.fenced(c, s, "source")
    _refused(pair.src_dsn, WRITES[3])


def test_capture_and_its_truncate_guard_cover_every_partition(pair):
    s = part_spec(schema_freeze=False)
    _copied(s)
    with pair.src() as c:
        tg = c.execute("SELECT c.relname, t.tgname, t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                       "WHERE t.tgname LIKE 'dbguard_capture%' ORDER BY 1, 2").fetchall()
    names = {n for _, n, _ in tg}
    assert len(names) == 2 and {(r, n) for r, n, _ in tg} == {(r, n) for r in MEMBERS for n in names}, tg
    assert {e for _, _, e in tg} == {"A"}, tg
    for replica in (False, True):
        for part in ("events_2024", "events_2025_all", "events_other"):
            _refused(pair.src_dsn, f"TRUNCATE {part}", psycopg.errors.RaiseException, "TRUNCATE of .* is blocked",
                     replica=replica)
    with psycopg.connect(pair.src_dsn, autocommit=True) as c:  # writes naming partitions, in both kinds of session
        for replica in ("origin", "replica"):
            c.execute(sql.SQL("SET session_replication_role = {}").format(sql.Literal(replica)))
            c.execute("UPDATE events_2024 SET v = v || '+' WHERE id % 5 = 0")
            c.execute("INSERT INTO events_2025_all SELECT id + 5000, day, 'new' FROM events_2025_all WHERE id < 300 "
                      "ON CONFLICT DO NOTHING")
            c.execute("DELETE FROM events_other WHERE id % 3 = 0")
            c.execute("DELETE FROM events_2023 WHERE id % 11 = 0")
        c.execute("UPDATE events SET day = day + 365 WHERE id % 7 = 1")  # moves rows between partitions
    capture.drain(s, RUN)
    assert_identical(pair, s)
    stages.release(s, RUN, verify=False)


def test_a_write_into_a_target_partition_voids_the_changed_rows_verify(pair):
    s = part_spec()
    _copied(s, gate=True)
    with pair.src() as src:
        assert watermark.verify(s, RUN, src) is not None  # the watermark holds: changed rows only
    with pair.tgt() as t:
        rows = t.execute("SELECT c.relname, t.tgenabled FROM pg_trigger t JOIN pg_class c ON c.oid = t.tgrelid "
                         "WHERE t.tgname = %s ORDER BY 1", (watermark.trigger_name(s),)).fetchall()
    assert rows == [(m, "A") for m in sorted(MEMBERS)]
    with psycopg.connect(pair.tgt_dsn, autocommit=True) as t:  # a shape-preserving write nobody captured
        t.execute("SET session_replication_role = replica")
        t.execute("UPDATE events_2024 SET v = upper(v) WHERE id = (SELECT min(id) FROM events_2024)")
    with pair.src() as src:
        assert watermark.verify(s, RUN, src) is None  # noted: the verify compares whole tables
    watermark.disarm(s)
    with pair.tgt() as t:
        assert t.execute("SELECT count(*) FROM pg_trigger WHERE tgname = %s",
                         (watermark.trigger_name(s),)).fetchone()[0] == 0
    stages.release(s, RUN, verify=False)


def test_capture_disabled_on_one_partition_is_refused_and_else_voids_the_watermark(pair):
    """Disabling the capture trigger's clone on one partition would silently stop capture there: the freeze
    refuses it, and where it happened anyway (freeze lifted by hand) the cutover's verify is whole-table."""
    s = part_spec()
    _copied(s, gate=True)
    disable = sql.SQL("ALTER TABLE events_2024 DISABLE TRIGGER {}").format(sql.Identifier(capture.trigger_name(s)))
    with pair.src() as c:
        _refused(pair.src_dsn, disable.as_string(c), psycopg.errors.ObjectInUse,
                 r"public.events_2024 \(a partition of public.events\) is frozen by migration t")
        assert watermark.verify(s, RUN, c) is not None
    preflight.release_freeze(s)  # someone lifts the freeze by hand
    with pair.src() as c:
        run(c, disable.as_string(c))
        run(c, "UPDATE events_2024 SET v = 'not captured' WHERE id = (SELECT min(id) FROM events_2024)")
        assert watermark.verify(s, RUN, c) is None  # the ledger may not hold every change: whole tables


@pytest.fixture
def app_role(pair):
    """An ordinary role that owns the migrated tables (as an application does), dropped afterwards."""
    role = "dbg_app_" + uuid.uuid4().hex[:8]
    with psycopg.connect(pair.tgt_dsn, autocommit=True) as c:  # the new primary has the application's role too
        c.execute(sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)))
    with pair.src() as c:
        run(c, sql.SQL("CREATE ROLE {} LOGIN").format(sql.Identifier(role)).as_string(c),
            sql.SQL("GRANT CREATE, USAGE ON SCHEMA public TO {}").format(sql.Identifier(role)).as_string(c),
            *[sql.SQL("ALTER TABLE {} OWNER TO {}").format(sql.Identifier(m), sql.Identifier(role)).as_string(c)
              for m in MEMBERS])
    yield role, psycopg.conninfo.make_conninfo(pair.src_dsn, user=role)
    with pair.src() as c:
        run(c, sql.SQL("REASSIGN OWNED BY {} TO CURRENT_USER").format(sql.Identifier(role)).as_string(c),
            sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)).as_string(c))
    with psycopg.connect(pair.src_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
    with pair.tgt() as c:
        run(c, sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)).as_string(c))
    with psycopg.connect(pair.tgt_dsn, autocommit=True) as c:
        c.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))


def test_the_appliers_marker_lets_no_other_role_past_the_fence_or_the_counter(pair, app_role):
    """`dbguard.applying = on` marks dbguard's appliers, but any role can SET it: the fence and the
    foreign-write counter let it through only in a session of the role that installed them."""
    role, app_dsn = app_role
    s = part_spec()
    _copied(s, gate=True)
    with pair.tgt() as t:
        run(t, sql.SQL("GRANT ALL ON ALL TABLES IN SCHEMA public TO {}").format(sql.Identifier(role)).as_string(t))
    with psycopg.connect(psycopg.conninfo.make_conninfo(pair.tgt_dsn, user=role), autocommit=True) as t:
        t.execute("SET dbguard.applying = on")
        t.execute("UPDATE events_2024 SET v = upper(v) WHERE id = (SELECT min(id) FROM events_2024)")
    with pair.src() as src:
        assert watermark.verify(s, RUN, src) is None  # counted: the verify compares whole tables
        fence.install(src, s, "source")
        src.commit()
    with psycopg.connect(app_dsn, autocommit=True) as c:
        c.execute("SET dbguard.applying = on")
        for stmt in WRITES[:4]:
            with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="fenced"):
                c.execute(stmt)
        with pytest.raises(psycopg.Error, match="fenced|TRUNCATE of public.events_2024 is blocked"):
            c.execute(WRITES[4])  # capture's TRUNCATE guard, first by name, refuses it too
    with pair.src() as c:  # the reverse applier's session (the installer's role with the marker) passes
        c.execute("SET dbguard.applying = on")
        run(c, WRITES[0])
        fence.remove(c, s, "source")
        c.commit()
    stages.release(s, RUN, verify=False)


def test_an_application_role_follows_the_pointer_and_its_marker_is_no_pass(pair, app_role):
    """An application's own role (no right on dbguard's ledger) reads the pointer FOR SHARE and writes under
    capture; capture's loop guard skips only the appliers' writes (the installing role with the marker), so
    this role's writes with the marker set are captured and reach the target; TRUNCATE stays refused."""
    role, app_dsn = app_role
    s = part_spec()
    _copied(s)
    with psycopg.connect(app_dsn) as c:
        side = c.execute("SELECT write_target FROM dbguard.control WHERE migration = %s AND direction = "
                         "'forward' FOR SHARE", (s.name,)).fetchone()[0]
        assert side == "source"
        c.execute("INSERT INTO events_2023 VALUES (100001, '2023-03-03', 'application')")
        c.commit()
        c.autocommit = True
        c.execute("SET dbguard.applying = on")
        c.execute("UPDATE events_2024 SET v = 'rogue' WHERE id = (SELECT min(id) FROM events_2024)")
        c.execute("DELETE FROM events WHERE id = (SELECT max(id) FROM events)")
        with pytest.raises(psycopg.errors.RaiseException, match="TRUNCATE of public.events_2024 is blocked"):
            c.execute("TRUNCATE events_2024")
    capture.drain(s, RUN)
    with pair.src() as a, pair.tgt() as b:
        assert fingerprint(a, "events", "id, day") == fingerprint(b, "events", "id, day")
    stages.release(s, RUN, verify=False)


def test_schema_freeze_holds_for_partitions_replica_sessions_and_any_role(pair, app_role):
    role, app_dsn = app_role
    s = part_spec()
    assert stages.preflight(s, RUN)["frozen"] == ["public.events"]
    frozen = (psycopg.errors.ObjectInUse, "frozen by migration t")
    with pair.src() as c:
        run(c, "CREATE TABLE events_2026 (LIKE events)")
    for stmt in ["ALTER TABLE events_2024 ADD CONSTRAINT no_x CHECK (v <> 'x')",
                 "CREATE INDEX ON events_2025_all (v)",
                 "ALTER TABLE events_other SET (fillfactor = 50)",
                 "ALTER TABLE events DETACH PARTITION events_other",
                 "ALTER TABLE events_2025 DETACH PARTITION events_2025_all",
                 "ALTER TABLE events ATTACH PARTITION events_2026 FOR VALUES FROM ('2030-01-01') TO ('2031-01-01')",
                 "CREATE TABLE events_2027 PARTITION OF events FOR VALUES FROM ('2031-01-01') TO ('2032-01-01')",
                 "DROP TABLE events_2023"]:
        _refused(pair.src_dsn, stmt, *frozen)
    _refused(pair.src_dsn, "ALTER TABLE events_2025 DETACH PARTITION events_2025_all CONCURRENTLY",
             frozen[0], "DETACH PARTITION CONCURRENTLY is blocked while migration t")
    with pair.src() as c:  # and its first step did not commit: every row still in the parent's view
        assert c.execute("SELECT count(*) FROM events").fetchone()[0] == 600
        assert not c.execute("SELECT bool_or(inhdetachpending) FROM pg_inherits").fetchone()[0]
    # objects that hang on a frozen table or partition: dbguard's own triggers, policies, rules
    stages.capture_on(s, RUN)
    guard = capture.trigger_name(s) + "_truncate"
    for stmt in [f"DROP TRIGGER {guard} ON events_2024", f"DROP TRIGGER {guard} ON events",
                 "CREATE POLICY hide ON events_2024 USING (false)",
                 "CREATE RULE swallow AS ON INSERT TO events_2023 DO INSTEAD NOTHING"]:
        _refused(pair.src_dsn, stmt, *frozen)
    capture.capture_off(s, RUN)
    # session_replication_role = replica: event triggers fire only when ENABLE ALWAYS
    _refused(pair.src_dsn, "ALTER TABLE events ADD COLUMN x int", *frozen, replica=True)
    _refused(pair.src_dsn, "ALTER TABLE events_2024 ADD CONSTRAINT no_y CHECK (v <> 'y')", *frozen, replica=True)
    # a setting any role can set is no pass: the application's role, owner of the tables, tries a
    # shape-preserving rewrite that no checksum over the columns' types would notice
    rewrite = "ALTER TABLE events ALTER COLUMN v TYPE text USING upper(v)"
    with psycopg.connect(app_dsn, autocommit=True) as c:
        c.execute("SET dbguard.allow_ddl = on")
        with pytest.raises(frozen[0], match=frozen[1]):
            c.execute(rewrite)
        c.execute("CREATE TABLE app_own (a int)")  # the role's DDL on tables not migrated stays free
        c.execute("ALTER TABLE app_own ADD COLUMN b int")
    with pair.src() as c:  # dbguard's own DDL still passes the freeze: fence install and capture on/off
        fence.install(c, s, "source")
        c.commit()
        fence.remove(c, s, "source")
        c.commit()
    stages.capture_on(s, RUN)
    capture.capture_off(s, RUN)
    with pair.src() as c:
        assert c.execute("SELECT count(*) FROM events WHERE v <> lower(v)").fetchone()[0] == 0  # nothing rewritten
    assert stages.release(s, RUN)["unfrozen"] == 1
    with pair.src() as c:
        run(c, "ALTER TABLE events_2024 ADD CONSTRAINT no_x CHECK (v <> 'x')")
        assert c.execute("SELECT count(*) FROM pg_event_trigger WHERE evtname LIKE 'dbguard%'").fetchone()[0] == 0


class PartitionWorkload(Workload):
    """Writes the partitioned table the ways real applications do: straight into a partition (insert, update,
    delete), through the parent, and moving rows between partitions (an UPDATE of the partition key)."""

    STATEMENTS = [
        "INSERT INTO events_2024 VALUES (%(id)s, date '2024-01-01' + %(id)s %% 300, 'w' || %(id)s)",
        "UPDATE events_2023 SET v = v || '.' WHERE id = (SELECT id FROM events_2023 ORDER BY random() LIMIT 1)",
        "INSERT INTO events VALUES (%(id)s, date '2026-06-01' + %(id)s %% 90, 'p' || %(id)s)",
        "UPDATE events SET day = day + 365 WHERE id = (SELECT id FROM events_2024 ORDER BY random() LIMIT 1)",
        "DELETE FROM events_other WHERE id = (SELECT id FROM events_other ORDER BY random() LIMIT 1)",
        "UPDATE events_2025_all SET v = upper(v) WHERE id = (SELECT id FROM events_2025_all ORDER BY random() LIMIT 1)",
    ]
    n = 0

    def pick(self, rng):
        self.n += 1
        return str(self.n % len(self.STATEMENTS))

    def run(self, kind, conn, rng):
        conn.execute(self.STATEMENTS[int(kind)], {"id": 200_000 + self.n})
        return Op(kind)


def test_a_partitioned_table_through_cutover_and_rollback_under_a_writer(pair):
    """Written through its partitions the whole time: cutover, a straggler naming a partition refused on the
    old primary (also in a replica session), writes on the new primary, rollback, identical tables."""
    s = part_spec()
    stages.preflight(s, RUN)
    stages.capture_on(s, RUN)
    w = Writer(PartitionWorkload(), pair.src_dsn, pair.tgt_dsn, migration=s.name, follow=True, rate=200).start()
    try:
        for r in stages.plan_ranges(s, RUN, "events"):
            stages.copy_range(s, RUN, r)
        assert stages.reconcile(s, RUN)["checksum_ok"]
        stages.finish_schema(s, RUN)
        assert stages.checksum_gate(s, RUN)[0]
        assert cutover.check_ready(s, RUN) == []
        time.sleep(0.3)
        out = cutover.cutover(s, RUN)
        time.sleep(0.5)
        for stmt in WRITES[:5]:
            _refused(pair.src_dsn, stmt, match=r"fenced: migration t .*target")
            _refused(pair.src_dsn, stmt, match=r"fenced: migration t .*target", replica=True)
    finally:
        w.stop()
    assert w.errors == [], w.errors[:3]
    assert {"source", "target"} <= set(w.sides), set(w.sides)
    rb = cutover.rollback(s, RUN)
    assert rb["status"] == "rolled_back" and cutover.state(s, RUN)["primary"] == "source"
    with pair.src() as src, pair.tgt() as tgt:
        assert fingerprint(src, "events", "id, day") == fingerprint(tgt, "events", "id, day")
        for m in MEMBERS[1:]:  # and partition by partition: every row in the same partition on both sides
            assert fingerprint(src, m, "id, day") == fingerprint(tgt, m, "id, day"), m
    assert out["verify_mode"] == "changed"  # the watermark held: nothing but the applier wrote the target
    _refused(pair.tgt_dsn, WRITES[0], match=r"fenced: migration t .*source")  # the target is the fallback now
