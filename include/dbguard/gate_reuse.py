"""One proof, not two: when the checksum gate may take reconcile's verdict instead of comparing whole tables again.

With dual writes on, reconcile compares every table at a source snapshot S with the applier drained to exactly S,
and the gate used to repeat the same comparison seconds later (2.8 s at 1M rows, 28 s at 10M). Before its
comparison reconcile arms the target's foreign-write counter (cutover.watermark.arm) and `observe`s the state it
is about to compare; when every table is equal with nothing repaired it `record`s that as evidence (metric
`reconcile_evidence`). The gate reuses the verdict only when `check` proves both sides are still in that state:

  - reconcile found every table equal, no orphan, nothing repaired, at one snapshot (else no evidence);
  - the same tables and the same checksum definition (the rendered SQL of every whole-table checksum);
  - the schema freeze is on and the source's capture triggers are the ones reconcile saw: every change to a
    source table since S is then in the change ledger (DDL is refused, TRUNCATE too by capture);
  - the ledger holds no change S does not see, and the applier applied nothing since: the source is as of S,
    the target as the applier left it at S;
  - the counter has not moved and its triggers are still armed: nothing but the applier wrote the target (no
    repair, no re-run copy, no foreign write, by any role, replica sessions too);
  - no table was rewritten on either side (relfilenode and column types as reconcile saw them: an
    `ALTER COLUMN TYPE ... USING` changes rows without firing a row or statement trigger).

Then comparing again would compare the same two states; anything else and the gate measures, naming every
reason (metric `checksum_gate_mode` / `checksum_gate_reason`). A change made just after the check is like one
made just after a measured gate: it is an op S does not see, so the verified watermark (snapshot S) covers it
at release and cutover.
"""
from __future__ import annotations

import hashlib
import json
from typing import Any

import psycopg

from . import db, guards, ledger
from .checksum import Hashing, checksum_query, relation
from .cutover.watermark import _armed, _capture_triggers, _position
from .spec import MigrationSpec

METRIC = "reconcile_evidence"
REUSED = "reused reconcile verdict"
MEASURED = "measured"

# every member of the migrated tables (partitions too): storage (a rewrite gets a new relfilenode) and the
# columns' types, as the checksum reads them
CATALOG = """
SELECT c.oid::bigint, c.relfilenode::bigint,
       coalesce(array_agg(a.attname || ':' || a.atttypid || ':' || a.atttypmod || ':' || a.attcollation
                          ORDER BY a.attnum) FILTER (WHERE a.attnum IS NOT NULL), '{}')
FROM pg_class c LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
WHERE c.oid = ANY(%s::oid[]) GROUP BY c.oid ORDER BY 1
"""

# changes captured on the source that snapshot S does not see (capped: any one is enough to re-measure)
UNSEEN = """
SELECT count(*) FROM (SELECT 1 FROM dbguard.change_ledger
                      WHERE migration = %(m)s AND direction = 'forward'
                        AND source_xid >= pg_snapshot_xmin(%(s)s::pg_snapshot)
                        AND NOT pg_visible_in_snapshot(source_xid, %(s)s::pg_snapshot) LIMIT 10000) x
"""


APPLIED = "SELECT applied FROM dbguard.apply_cursor WHERE migration = %s AND direction = 'forward' AND run_id = %s"


def definition(spec: MigrationSpec, src: psycopg.Connection, tgt: psycopg.Connection) -> str:
    """A digest of what a whole-table comparison is: the resolved tables as the spec declares them and the SQL
    of each side's checksum (columns, casts, transforms, tolerance, algorithm)."""
    h = Hashing.between(spec, src, tgt)
    parts = [json.dumps([t.model_dump(mode="json") for t in spec.table_order()], sort_keys=True, default=str)]
    for t in spec.table_order():
        parts.append(checksum_query(t, "source", None, h).as_string(src))
        parts.append(checksum_query(t, "target", None, h).as_string(tgt))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def _catalog(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> list:
    ids = guards.oids(conn, [relation(t, side) for t in spec.tables])
    return [list(r) for r in conn.execute(CATALOG, (ids,)).fetchall()]


def observe(spec: MigrationSpec, foreign_writes: list | None) -> dict[str, Any]:
    """Before reconcile's comparison: the state it compares under (a change after this shows at the gate).
    `foreign_writes` is where watermark.arm() left the target's counter (None: it could not arm)."""
    with db.source(spec) as src, db.target(spec) as tgt:
        out = {"definition": definition(spec, src, tgt), "capture": _capture_triggers(src, spec),
               "source_catalog": _catalog(src, spec, "source"), "target_catalog": _catalog(tgt, spec, "target"),
               "foreign_writes": foreign_writes, "tables": sorted(t.ref for t in spec.tables)}
        src.rollback()
        tgt.rollback()
    return out


def record(spec: MigrationSpec, run_id: str, observed: dict[str, Any] | None, tables: dict[str, dict], *,
           snapshot: str | None = None, applied: int | None = None, why: str = "") -> None:
    """After reconcile: the evidence when every table was equal at `snapshot` with the applier's count
    `applied`; else why there is none (a stale verdict of an earlier attempt never survives)."""
    equal = bool(tables) and all(r["equal"] and not r["orphans"] and not r.get("repaired_rows")
                                 for r in tables.values())
    if observed is not None and snapshot is not None and equal:
        value = {**observed, "snapshot": snapshot, "applied": applied}
    else:
        value = {"none": why or "reconcile did not find every table equal at one source snapshot"}
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, METRIC, value)


def check(spec: MigrationSpec, run_id: str) -> tuple[dict[str, Any] | None, list[str]]:
    """(evidence, reasons): the gate may reuse reconcile's verdict when `reasons` is empty. One connection per
    side (the check is the whole cost of a reused gate)."""
    if not spec.capture.enabled:
        return None, ["dual writes are off: no change ledger proves the tables unchanged since reconcile"]
    with db.source(spec) as src, db.target(spec) as tgt:
        ev, reasons = _check(spec, run_id, src, tgt)
        src.rollback()
        tgt.rollback()
    return ev, reasons


def _check(spec: MigrationSpec, run_id: str, src: psycopg.Connection,
           tgt: psycopg.Connection) -> tuple[dict[str, Any] | None, list[str]]:
    m = ledger.metrics(tgt, run_id)
    ev = m.get(METRIC) or {"none": "reconcile recorded no evidence (it ran before capture, or not at all)"}
    if "none" in ev:
        return None, [ev["none"]]
    reasons = []
    now = sorted(t.ref for t in spec.tables)
    if sorted(m.get("reconcile") or {}) != ev["tables"] or now != ev["tables"]:
        reasons.append(f"the table set changed since reconcile ({ev['tables']} then, {now} now)")
    if not spec.schema_freeze:
        reasons.append("schema_freeze is off: a DDL on the source could change rows the ledger never sees")
    if definition(spec, src, tgt) != ev["definition"]:
        reasons.append("the checksum definition changed since reconcile (spec or dbguard version)")
    # capture on all along, on every member: the same triggers (oid, enabled) as reconcile saw
    if _capture_triggers(src, spec) != ev["capture"] or len(ev["capture"]) != len(
            guards.oids(src, [relation(t, "source") for t in spec.tables])):
        reasons.append("the source's capture triggers are not the ones reconcile saw (capture was off or disabled)")
    for side, conn in (("source", src), ("target", tgt)):
        if _catalog(conn, spec, side) != ev[f"{side}_catalog"]:
            reasons.append(f"a {side} table was rewritten or its column types changed since reconcile")
    if ev.get("foreign_writes") is None:
        reasons.append("reconcile could not arm the target's foreign-write counter (a writer held the tables)")
    elif not _armed(tgt, spec):
        reasons.append("the target's foreign-write triggers were dropped or disabled since reconcile")
    elif (pos := _position(tgt)) != ev["foreign_writes"]:
        reasons.append(f"the target was written outside the applier since reconcile (a repair, a re-run copy or "
                       f"a foreign write): counter {ev['foreign_writes'][0]} -> {pos[0]}")
    unseen = src.execute(UNSEEN, {"m": spec.name, "s": ev["snapshot"]}).fetchone()[0]
    if unseen:
        reasons.append(f"{unseen}{'+' if unseen >= 10000 else ''} change(s) captured on the source since "
                       "reconcile's snapshot")
    row = tgt.execute(APPLIED, (spec.name, run_id)).fetchone()
    applied = row[0] if row else 0
    if applied != ev["applied"]:
        reasons.append(f"the applier applied {applied - (ev['applied'] or 0)} change(s) to the target since reconcile")
    return ev, reasons
