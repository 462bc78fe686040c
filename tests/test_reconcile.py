"""Reconciliation: a row changed, deleted or added in the target after backfill
is found down to its key, repaired, and the checksum gate then passes; when
repair is not allowed the gate fails naming the table, range and counts."""
import pytest

from dbguard import stages
from util import fingerprint, run, spec

COLS = [{"name": "id", "type": "bigint"}, {"name": "name", "type": "text"}, {"name": "amount", "type": "numeric(12,2)"},
        {"name": "at", "type": "timestamptz"}, {"name": "tags", "type": "text[]"}, {"name": "doc", "type": "jsonb"},
        {"name": "raw", "type": "bytea"}]


def backfilled(dbpair, rows=12000, **top):
    s = spec([{"name": "items", "schema": "app", "key": ["id"], "columns": COLS}],
             backfill={"batch_rows": 2500}, gates={"bisect_leaf_rows": 200, **top.pop("gates", {})}, **top)
    with dbpair.src() as c:
        run(c, "CREATE SCHEMA app",
            "CREATE TABLE app.items (id bigint PRIMARY KEY, name text, amount numeric(12,2), at timestamptz, "
            "tags text[], doc jsonb, raw bytea)",
            f"INSERT INTO app.items SELECT g * 3, 'näme ' || g, g / 7.0, now() - g * interval '1 min', "
            f"ARRAY['a', g::text], jsonb_build_object('g', g, 'k', ARRAY[1, 2]), "
            f"CASE WHEN g % 9 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END "
            f"FROM generate_series(1, {rows}) g")
    stages.preflight(s, "run")
    for r in stages.plan_ranges(s, "run", "items"):
        assert stages.copy_range(s, "run", r)["ok"]
    return s


TAMPER = {
    "changed": "UPDATE app.items SET name = 'tampered' WHERE id = 3000",
    "deleted": "DELETE FROM app.items WHERE id = 27000",
    "added": "INSERT INTO app.items (id, name) VALUES (1000000, 'ghost')",
    "null_vs_empty": "UPDATE app.items SET raw = '' WHERE id = 27",  # id 27 = g 9 holds NULL
}


@pytest.mark.parametrize("how", TAMPER)
def test_tampered_row_is_found_repaired_and_gate_passes(dbpair, how):
    s = backfilled(dbpair)
    with dbpair.tgt() as c:
        run(c, TAMPER[how])
    assert stages.checksum_gate(s, "run")[0] is False  # not reconciled yet
    out = stages.reconcile(s, "run")["tables"]["items"]
    first = out["rounds"][0]
    expected_key = {"changed": "3000", "deleted": "27000", "added": "1000000", "null_vs_empty": "27"}[how]
    found = first["changed_keys"] + first["missing_keys"] + first["extra_keys"]
    assert found == [expected_key]
    assert out["equal"] and out["repaired_rows"] >= 0
    ok, msg = stages.checksum_gate(s, "run")
    assert ok, msg
    with dbpair.src() as a, dbpair.tgt() as b:
        assert fingerprint(a, "app.items") == fingerprint(b, "app.items")


def test_many_scattered_differences_are_all_located(dbpair):
    s = backfilled(dbpair)
    with dbpair.tgt() as c:
        changed = c.execute("SELECT count(*) FROM app.items WHERE id % 997 = 0 AND id % 1201 <> 0").fetchone()[0]
        deleted = c.execute("SELECT count(*) FROM app.items WHERE id % 1201 = 0").fetchone()[0]
        run(c, "UPDATE app.items SET amount = amount + 0.01 WHERE id % 997 = 0",
            "DELETE FROM app.items WHERE id % 1201 = 0",
            "INSERT INTO app.items (id, name) SELECT g * 3 + 1, 'x' FROM generate_series(1, 40) g")
    out = stages.reconcile(s, "run")["tables"]["items"]
    r = out["rounds"][0]
    assert (r["changed"], r["missing"], r["extra"]) == (changed, deleted, 40)
    assert deleted > 0 and changed > 0 and out["equal"]


def test_gate_fails_with_every_table_range_and_count_when_repair_is_off(dbpair):
    s = backfilled(dbpair, gates={"repair_attempts": 0})
    with dbpair.tgt() as c:
        run(c, "DELETE FROM app.items WHERE id = 27000", "UPDATE app.items SET name = 'x' WHERE id = 3")
    out = stages.reconcile(s, "run")
    assert out["checksum_ok"] is False
    ok, msg = stages.checksum_gate(s, "run")
    assert not ok
    assert "items: source 12000 rows" in msg and "target 11999 rows" in msg
    assert "missing 1" in msg and "changed 1" in msg and "27000" in msg and "'3'" in msg
    assert "items #" in msg  # the range label


def test_gate_fails_when_a_planned_range_was_never_copied(dbpair):
    s = backfilled(dbpair)
    with dbpair.tgt() as c:
        run(c, "DELETE FROM dbguard.ranges WHERE range_id = 2")
    stages.reconcile(s, "run")
    ok, msg = stages.checksum_gate(s, "run")
    assert not ok and "backfill incomplete: 4 of 5 planned ranges copied" in msg
