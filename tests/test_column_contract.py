"""One resolved column contract everywhere: every column shape a spec may declare, under a live writer,
through capture, drain, cutover, the tail on the new primary and rollback.

Each case migrates one table with the library stages the DAG's tasks call, in the DAG's order (the soak's
drain and the rollback task get the spec as loaded, not resolved, as in the DAG). A writer that follows the
pointer inserts, updates and deletes rows the whole time. After the cutover and after the rollback every
row's text (every migrated column, `::text`) is identical on both sides, and no captured change failed to
apply in either direction.
"""
from __future__ import annotations

import time

import psycopg
import pytest
from psycopg import sql

from dbguard import capture, cutover, flow, ledger, stages
from dbguard import preflight as pf
from dbguard.spec import parse_spec
from dbguard.writer import Op, Workload, Writer

RUN = "contract-run"
ROWS = 300

BASE = """
CREATE SCHEMA app;
CREATE TABLE app.items (
    id      bigint PRIMARY KEY,
    legacy  text,
    created timestamptz NOT NULL DEFAULT '2026-01-02 03:04:05+00',
    note    text,
    qty     integer NOT NULL DEFAULT 0,
    price   numeric(10,2),
    tags    text[]
);
INSERT INTO app.items (id, legacy, created, note, qty, price, tags)
SELECT i, 'legacy ' || i, '2026-01-01 00:00:00+00'::timestamptz + i * interval '1 minute', 'note ' || i, i % 17,
       (i % 1000) / 7.0, ARRAY['t' || i, NULL]
FROM generate_series(1, %(rows)s) i;
"""

# column shape -> (extra source DDL, the table's spec fields besides name/schema/key)
CASES = {
    "subset_other_order": ("", {"columns": [{"name": "note", "type": "text"},
                                            {"name": "id", "type": "bigint", "nullable": False}]}),
    "no_columns": ("", {}),
    "exclude_columns": ("", {"exclude_columns": ["legacy"]}),
    "target_type": ("", {"columns": [{"name": "qty", "type": "integer", "target_type": "bigint", "nullable": False},
                                     {"name": "id", "type": "bigint", "nullable": False}]}),
    "generated": ("ALTER TABLE app.items ADD COLUMN total numeric GENERATED ALWAYS AS (qty * price) STORED;", {}),
    "dropped_columns": ("ALTER TABLE app.items ADD COLUMN gone int DEFAULT 7; ALTER TABLE app.items DROP COLUMN legacy;"
                        "ALTER TABLE app.items ADD COLUMN later text DEFAULT 'x'; ALTER TABLE app.items DROP COLUMN gone;",
                        {}),
    # written through the parent and straight into a partition; one partition was built with a column since
    # dropped, so its attnums differ from the parent's (copy, trigger and applier must go by name)
    "partitioned": ("""
ALTER TABLE app.items RENAME TO items_plain;
CREATE TABLE app.items (LIKE app.items_plain INCLUDING DEFAULTS, PRIMARY KEY (id)) PARTITION BY RANGE (id);
CREATE TABLE app.items_low PARTITION OF app.items FOR VALUES FROM (MINVALUE) TO (151);
CREATE TABLE app.items_high (junk int, LIKE app.items_plain INCLUDING DEFAULTS);
ALTER TABLE app.items_high DROP COLUMN junk;
ALTER TABLE app.items ATTACH PARTITION app.items_high FOR VALUES FROM (151) TO (1000000);
CREATE TABLE app.items_rest PARTITION OF app.items DEFAULT;
INSERT INTO app.items SELECT * FROM app.items_plain;
DROP TABLE app.items_plain;""", {}),
}


def spec_for(fields: dict):
    return parse_spec({
        "name": "contract", "source": {"conn_id": "dbguard_source"},
        "target": {"conn_id": "dbguard_target", "encoding": "UTF8", "collation": "C", "ctype": "C"},
        "tables": [{"name": "items", "schema": "app", "key": ["id"], **fields}],
        "backfill": {"batch_rows": 100},
    }, "test")


class ItemsWorkload(Workload):
    """Inserts, updates and deletes app.items rows, only columns every case migrates; updates of keys < 151
    name `partition` when given (a partition of the partitioned case)."""

    weights = {"insert": 4, "update": 5, "delete": 1}

    def __init__(self, partition: str | None = None):
        self.partition = partition
        self.live = list(range(1, ROWS + 1))  # acknowledged and live
        self.next_id = 1_000_000

    def run(self, kind, conn, rng):
        if kind == "insert" or len(self.live) < 50:
            self.next_id += 1
            k = self.next_id
            conn.execute("INSERT INTO app.items (id, note, qty, price, created) VALUES (%s, %s, %s, %s, "
                         "'2026-03-04 05:06:07.123456+00')", (k, f"new {k}", k % 13, k % 100))
            return Op("insert", k, True)
        if kind == "update":
            k = rng.choice(self.live)
            rel = sql.Identifier("app", self.partition if self.partition and k < 151 else "items")
            conn.execute(sql.SQL("UPDATE {} SET note = %s, qty = qty + 1, price = price + 0.01 WHERE id = %s").format(
                rel), (f"upd {rng.random():.6f}", k))
            return Op("update", k, True)
        k = self.live[rng.randrange(len(self.live))]
        conn.execute("DELETE FROM app.items WHERE id = %s", (k,))
        return Op("delete", k, None)

    def acknowledged(self, op):
        if op.kind == "insert":
            self.live.append(op.key)
        elif op.kind == "delete":
            self.live.remove(op.key)


def items_writer(pair, partition: str | None = None) -> Writer:
    """An application that follows the pointer (dbguard.control.write_target FOR SHARE on the source) and
    writes app.items on that side at 150 ops/s. Its `after_back` holds the keys written to the source after it
    had written to the target (the flip back): those are on the source only, as they should be."""
    return Writer(ItemsWorkload(partition), pair.src_dsn, pair.tgt_dsn, migration="contract", follow=True, rate=150,
                  seed=11)


def migrated_columns(pair, excluded: list[str]) -> list[str]:
    """What the copy must carry, read independently of dbguard: the source's live columns minus excluded."""
    with pair.src() as c:
        cols = [r[0] for r in c.execute("SELECT attname FROM pg_attribute WHERE attrelid = 'app.items'::regclass "
                                        "AND attnum > 0 AND NOT attisdropped ORDER BY attnum")]
    return [c for c in cols if c not in excluded]


def rows_text(dsn: str, cols: list[str]) -> dict[int, tuple]:
    with psycopg.connect(dsn) as c:
        c.execute("SET TimeZone = 'UTC'")
        q = sql.SQL("SELECT id, {} FROM app.items").format(
            sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(x)) for x in cols))
        return {r[0]: r[1:] for r in c.execute(q)}


def assert_same_rows(pair, cols: list[str], skip: set[int] = frozenset()) -> int:
    s, g = rows_text(pair.src_dsn, cols), rows_text(pair.tgt_dsn, cols)
    for k in skip:
        s.pop(k, None), g.pop(k, None)
    diff = sorted(k for k in s.keys() | g.keys() if s.get(k) != g.get(k))
    assert not diff, f"{len(diff)} rows differ, e.g. {[(k, s.get(k), g.get(k)) for k in diff[:3]]}"
    return len(s)


def failures(pair) -> dict:
    with pair.tgt() as t:
        m = ledger.metrics(t, RUN)
    return {"forward": m.get("dual_write_fail"), "reverse": m.get("dual_write_fail.reverse")}


@pytest.mark.parametrize("case", list(CASES))
def test_column_shape_under_a_writer_through_cutover_and_rollback(dbpair, case, tmp_path, monkeypatch):
    ddl, fields = CASES[case]
    with dbpair.src(autocommit=True) as c:
        c.execute(BASE.replace("%(rows)s", str(ROWS)))
        if ddl:
            c.execute(ddl)
    spec = spec_for(fields)  # as loaded: the stages resolve it, and so must everything else
    cols = migrated_columns(dbpair, fields.get("exclude_columns", []))
    w = items_writer(dbpair, partition="items_low" if case == "partitioned" else None)
    with dbpair.src() as src:  # the pointer the writer follows exists before capture starts
        from dbguard.cutover import pointer
        pointer.prepare(src, spec)
        src.commit()
    w.start()
    try:
        stages.preflight(spec, RUN)
        stages.capture_on(spec, RUN)
        time.sleep(0.3)
        for r in stages.plan_ranges(spec, RUN, "items"):
            stages.copy_range(spec, RUN, r)
        assert stages.reconcile(spec, RUN)["checksum_ok"]
        stages.finish_schema(spec, RUN)
        passed, msg = stages.checksum_gate(spec, RUN)
        assert passed, msg
        time.sleep(0.5)
        verdict, msg = flow.soak_measure(spec, RUN)  # the soak task's drain, with the spec as the DAG has it
        assert verdict is not False, (msg, [f["error"] for f in capture.failures(spec, RUN)[:2]])
        d = capture.drain(spec, RUN)  # the library's own entry point
        assert d["dual_write_fail"] == 0, capture.failures(spec, RUN)[:3]
        out = cutover.cutover(spec, RUN)
        assert out["primary"] == "target"
        assert out["verify_mode"] == "changed", out["verify"]  # the watermark's changed-rows verify ran
        flow.tail(spec, RUN)
        time.sleep(0.8)  # the writer follows the pointer: writes on the new primary, captured in reverse
        w.pause()
        capture.drain(spec, RUN, direction="reverse")
        n_after_cutover = assert_same_rows(dbpair, cols)
        w.resume()
        time.sleep(0.5)
        rb = flow.rollback(spec, RUN)  # the rollback task's call
        assert rb["status"] == "rolled_back", rb
        time.sleep(0.3)
    finally:
        w.stop()
    assert w.errors == [], w.errors[:3]
    assert w.sides["target"] > 0 and w.sides["source"] > 0, w.sides
    assert failures(dbpair) == {"forward": 0, "reverse": 0}
    assert cutover.state(spec, RUN)["primary"] == "source"
    n = assert_same_rows(dbpair, cols, skip=w.after_back)
    assert n > ROWS // 2 and n_after_cutover > ROWS // 2
    # the report lists the same contract
    with dbpair.tgt() as t:
        listed = ledger.metrics(t, RUN)["migrated_columns"]["items"]
    assert [c.split(" (")[0] for c in listed] == cols, listed
    monkeypatch.setenv("DBGUARD_REPORT_DIR", str(tmp_path))
    page = open(stages.finalize(spec, RUN, "rolled_back")["report"]).read()
    assert f"<li>items: {', '.join(listed)}</li>".replace("->", "-&gt;") in page


def test_an_excluded_not_null_column_without_default_is_refused_before_the_flip(dbpair):
    """Reverse capture carries the migrated columns only: the source could not take back a row the application
    writes on the target while an excluded column is NOT NULL without a default, so rollback would lose it.
    Cutover and a run that will cut over refuse it, naming the column and the fix; a copy-only run may."""
    with dbpair.src(autocommit=True) as c:
        c.execute(BASE.replace("%(rows)s", "20"))
        c.execute("ALTER TABLE app.items ALTER COLUMN legacy SET NOT NULL")
    spec = spec_for({"exclude_columns": ["legacy"]})
    with pytest.raises(Exception, match=r"exclude_columns: 'legacy' is NOT NULL without a default .*SET DEFAULT"):
        stages.preflight(spec.model_copy(update={"run_cutover": True}), RUN, dry_run=True)
    stages.preflight(spec, RUN)  # without run_cutover nothing will need the column back
    stages.capture_on(spec, RUN)
    for r in stages.plan_ranges(spec, RUN, "items"):
        stages.copy_range(spec, RUN, r)
    assert stages.reconcile(spec, RUN)["checksum_ok"]
    stages.finish_schema(spec, RUN)
    assert any("'legacy' is NOT NULL without a default" in r for r in cutover.check_ready(spec, RUN))
    with pytest.raises(cutover.CutoverError, match="refused before freezing anything: .*'legacy'"):
        cutover.cutover(spec, RUN)
    pf.release_freeze(spec)  # the fix the message names is DDL, made outside the schema freeze
    with dbpair.src(autocommit=True) as c:
        c.execute("ALTER TABLE app.items ALTER COLUMN legacy SET DEFAULT 'unknown'")
    assert not any("'legacy'" in r for r in cutover.check_ready(spec, RUN))


def test_the_dag_doc_states_the_contract_without_reading_the_catalog():
    """A spec without `columns` migrates every source column: the DAG's doc said '0' columns."""
    from dbguard.airflow.dag_factory import _columns_md

    t = lambda fields: spec_for(fields).tables[0]  # noqa: E731
    assert _columns_md(t({})) == "every source column"
    assert _columns_md(t(CASES["subset_other_order"][1])) == "every source column (2 declared)"
    assert _columns_md(t({"exclude_columns": ["legacy"]})) == "every source column except `legacy`"
