"""Read-only views: lag, failures, drift, is_on (each for one direction)."""
from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from .. import db
from ..spec import MigrationSpec
from .common import SCHEMA, Route, _control, _cursor_state, function_name, route

# Committed ops not yet applied: after `prev`, minus the part of window `cur` at or below the cursor.
LAG = """
SELECT count(*) FROM dbguard.change_ledger
WHERE migration = %(m)s AND direction = %(d)s
  AND (%(prev)s::pg_snapshot IS NULL OR source_xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot))
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
  AND NOT (%(cur)s::pg_snapshot IS NOT NULL AND op_id <= %(after)s
           AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot))
"""


def lag(spec: MigrationSpec, run_id: str, direction: str = "forward") -> int:
    """Committed origin ops not yet applied to the destination (the drain sensor compares it with
    gates.max_lag_ops)."""
    r = route(spec, direction)
    with r.dest() as tgt:
        st = _cursor_state(tgt, r, run_id)
    with r.origin() as src:
        return _lag(src, r, run_id, st)


def _lag(src: psycopg.Connection, r: Route, run_id: str, st: dict) -> int:
    if st:
        prev, cur, after = st["prev_snapshot"], st["cur_snapshot"], st["op_cursor"]
    else:
        ctl = _control(src, r)
        if ctl is None or ctl[0] != run_id:
            return 0
        prev, cur, after = ctl[1], None, 0
    return int(src.execute(LAG, {"m": r.spec.name, "d": r.direction, "prev": prev, "cur": cur,
                                 "after": after}).fetchone()[0])


def failures(spec: MigrationSpec, run_id: str, direction: str = "forward") -> list[dict]:
    """Every recorded apply failure with its error, for the gate message and the report."""
    r = route(spec, direction)
    with r.dest() as tgt:
        return _failures(tgt, r, run_id)


def _failures(tgt: psycopg.Connection, r: Route, run_id: str) -> list[dict]:
    if not tgt.execute("SELECT to_regclass('dbguard.apply_failures') IS NOT NULL").fetchone()[0]:
        return []
    cur = tgt.execute("SELECT op_id, table_name, op, key, sqlstate, error FROM dbguard.apply_failures "
                      "WHERE migration = %s AND direction = %s AND run_id = %s ORDER BY op_id",
                      (r.spec.name, r.direction, run_id))
    names = [d.name for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def dual_write_fail(spec: MigrationSpec, run_id: str, direction: str = "forward") -> tuple[int, list[int]]:
    """(count, op_ids) of ops the applier could not apply in this run; must be 0 (it fails the run)."""
    ids = [f["op_id"] for f in failures(spec, run_id, direction)]
    return len(ids), ids


def drift(spec: MigrationSpec, run_id: str, direction: str = "forward") -> dict[str, Any]:
    """Ledger high-water marks and per-table counts on both sides (origin = source_*, destination = target_*
    in the forward sense; keys keep their names in reverse, with `direction` saying which way)."""
    r = route(spec, direction)
    with r.origin() as src:
        has_ledger = src.execute("SELECT to_regclass('dbguard.change_ledger') IS NOT NULL").fetchone()[0]
        src_hw, per_table_ops = 0, {}
        if has_ledger:
            ctl = _control(src, r)
            since = (ctl[2] or 0) if ctl and ctl[0] == run_id else 0
            src_hw = src.execute("SELECT coalesce(max(op_id), 0) FROM dbguard.change_ledger WHERE migration = %s "
                                 "AND direction = %s", (spec.name, direction)).fetchone()[0]
            per_table_ops = dict(src.execute(
                "SELECT table_name, count(*) FROM dbguard.change_ledger WHERE migration = %s AND direction = %s "
                "AND op_id > %s GROUP BY table_name", (spec.name, direction, since)).fetchall())
        src_counts = {t.ref: src.execute(sql.SQL("SELECT count(*) FROM {}").format(r.origin_rel(t))).fetchone()[0]
                      for t in spec.tables}
    with r.dest() as tgt:
        st = _cursor_state(tgt, r, run_id)
        tgt_counts = {}
        for t in spec.tables:
            exists = tgt.execute("SELECT to_regclass(%s) IS NOT NULL", (r.dest_rel(t).as_string(tgt),)).fetchone()[0]
            tgt_counts[t.ref] = tgt.execute(sql.SQL("SELECT count(*) FROM {}").format(r.dest_rel(t))).fetchone()[0] \
                if exists else None
    fail_count, fail_ids = dual_write_fail(spec, run_id, direction)
    return {
        "direction": direction, "source_high_water": src_hw, "target_high_water": st.get("high_water", 0),
        "applied": st.get("applied", 0), "lag": lag(spec, run_id, direction),
        "dual_write_fail": fail_count, "failed_op_ids": fail_ids,
        "tables": {t.ref: {"source_rows": src_counts[t.ref], "target_rows": tgt_counts[t.ref],
                            "row_diff": None if tgt_counts[t.ref] is None else src_counts[t.ref] - tgt_counts[t.ref],
                            "captured_ops": per_table_ops.get(t.ref, 0)} for t in spec.tables},
    }


def is_on(spec: MigrationSpec, direction: str = "forward") -> bool:
    """Are this migration's capture triggers installed on the origin?"""
    r = route(spec, direction)
    with r.origin() as src:
        fn = sql.SQL("{}()").format(db.qname(SCHEMA, function_name(spec, spec.tables[0], direction)))
        return src.execute("SELECT to_regprocedure(%s) IS NOT NULL", (fn.as_string(src),)).fetchone()[0]


def cursor(spec: MigrationSpec, run_id: str, direction: str = "forward") -> dict[str, Any]:
    """The applier's cursor for this run and direction ({} before the first drain): applied, high_water, ..."""
    r = route(spec, direction)
    with r.dest() as tgt:
        return _cursor_state(tgt, r, run_id)
