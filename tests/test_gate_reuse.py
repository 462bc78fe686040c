"""One proof, not two: the checksum gate takes reconcile's verdict only when it can prove that nothing changed
since reconcile compared the tables; a write applied since, a repair, a foreign write or a rewrite of a target
table makes it compare again, and what it then finds is what counts."""
import pytest

from dbguard import capture, gate_reuse, ledger, stages
from dbguard.reconcile import RowDiff, repair
from util import run, spec

COLS = [{"name": "id", "type": "bigint"}, {"name": "name", "type": "text"}, {"name": "amount", "type": "numeric(12,2)"}]


def reconciled(dbpair, run_id="gr", **gates):
    """Capture on, every range copied, drained, reconciled at one source snapshot with every table equal."""
    s = spec([{"name": "items", "schema": "app", "key": ["id"], "columns": COLS}],
             backfill={"batch_rows": 1000}, gates=gates)
    with dbpair.src() as c:
        run(c, "CREATE SCHEMA app", "CREATE TABLE app.items (id bigint PRIMARY KEY, name text, amount numeric(12,2))",
            "INSERT INTO app.items SELECT g, 'item ' || g, g / 7.0 FROM generate_series(1, 3000) g")
    stages.preflight(s, run_id)
    stages.capture_on(s, run_id)
    for r in stages.plan_ranges(s, run_id, "app.items"):
        stages.copy_range(s, run_id, r)
    assert stages.drain_gate(s, run_id)[0] is True
    rec = stages.reconcile(s, run_id)
    assert rec["mode"] == "snapshot" and rec["checksum_ok"] is True, rec
    return s


def gate_mode(dbpair, run_id="gr") -> tuple[str, str, list[str]]:
    """checksum_gate_mode, checksum_gate_reason, and the modes of the gate's final_verify events."""
    with dbpair.tgt() as c:
        m = ledger.metrics(c, run_id)
        events = [r[0] for r in c.execute("SELECT detail->>'mode' FROM dbguard.events WHERE run_id = %s "
                                          "AND stage = 'final_verify' ORDER BY id", (run_id,))]
    return m.get("checksum_gate_mode"), m.get("checksum_gate_reason"), events


def test_a_quiet_gate_reuses_reconciles_verdict_and_its_snapshot_is_the_watermark(dbpair):
    s = reconciled(dbpair)
    ok, msg = stages.checksum_gate(s, "gr")
    assert ok and "reused reconcile verdict" in msg, msg
    mode, reason, events = gate_mode(dbpair)
    assert (mode, events) == (gate_reuse.REUSED, ["reused"]), reason
    with dbpair.tgt() as c:
        m = ledger.metrics(c, "gr")
    # the verified watermark is reconcile's snapshot: release and cutover verify every op it does not see
    assert m["verified_watermark"]["snapshot"] == m["reconcile_evidence"]["snapshot"]
    assert m["checksum_ok"] is True and m["final_verify"] == m["reconcile"]
    # a write after the reused gate is an op that snapshot does not see: release verifies it, and passes
    with dbpair.src() as c:
        run(c, "UPDATE app.items SET name = 'late' WHERE id = 7")
    out = stages.release(s, "gr")
    assert out["release_verify"]["checksum_ok"] is True and out["release_verify"]["mode"] == "changed", out


def test_a_write_captured_or_applied_after_reconcile_makes_the_gate_measure(dbpair):
    s = reconciled(dbpair)
    with dbpair.src() as c:
        run(c, "UPDATE app.items SET amount = 1.50 WHERE id = 42")
    _, reasons = gate_reuse.check(s, "gr")  # captured on the source, not applied yet
    assert reasons == ["1 change(s) captured on the source since reconcile's snapshot"], reasons
    assert capture.drain(s, "gr")["applied"] == 1
    ok, msg = stages.checksum_gate(s, "gr")
    assert ok, msg
    mode, reason, events = gate_mode(dbpair)
    assert mode == gate_reuse.MEASURED and events == ["snapshot"], (mode, events)
    assert "captured on the source" in reason and "the applier applied 1 change(s)" in reason, reason


def test_a_repair_after_reconcile_makes_the_gate_measure(dbpair):
    s = reconciled(dbpair)
    t = s.table("app.items")
    assert repair(s, t, RowDiff(changed=[("5",)])) == 1  # re-copies one (equal) row: a repair all the same
    ok, msg = stages.checksum_gate(s, "gr")
    assert ok, msg
    mode, reason, events = gate_mode(dbpair)
    assert mode == gate_reuse.MEASURED and events == ["snapshot"], (mode, events)
    assert "written outside the applier" in reason, reason


@pytest.mark.parametrize("change, why", [
    # a foreign write: no ledger op; the foreign-write counter moves
    ("UPDATE app.items SET name = 'foreign' WHERE id = 9", "written outside the applier"),
    # a rewrite: a row changes without firing any trigger; the table's new relfilenode shows it
    ("ALTER TABLE app.items ALTER COLUMN name TYPE text USING CASE WHEN id = 9 THEN 'x' ELSE name END",
     "a target table was rewritten"),
])
def test_a_target_changed_behind_the_ledger_after_reconcile_fails_the_gate(dbpair, change, why):
    s = reconciled(dbpair, repair_attempts=0)  # no repair: the gate must see the difference, not mend it
    with dbpair.tgt() as c:
        run(c, change)
    ok, msg = stages.checksum_gate(s, "gr")
    assert not ok and "items: source 3000 rows" in msg and "changed ['9']" in msg, msg
    mode, reason, _ = gate_mode(dbpair)
    assert mode == gate_reuse.MEASURED and why in reason, reason


def test_no_reuse_after_a_reconcile_that_found_differences(dbpair):
    """Reconcile that repaired leaves no evidence: the gate measures (a stale earlier verdict never survives)."""
    s = reconciled(dbpair)
    with dbpair.tgt() as c:
        run(c, "DELETE FROM app.items WHERE id = 11")
    rec = stages.reconcile(s, "gr")
    assert rec["checksum_ok"] is True and rec["tables"]["items"]["repaired_rows"] == 1, rec
    ok, msg = stages.checksum_gate(s, "gr")
    assert ok, msg
    mode, reason, _ = gate_mode(dbpair)
    assert mode == gate_reuse.MEASURED and "repaired" in reason, reason
