"""Read-only views: lag, failures, drift, is_on."""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db, ledger
from ..errors import DbguardError
from ..spec import MigrationSpec, Table
from .common import *  # noqa: F401,F403
from .common import _control, _cursor_state, _source_rel, _target_rel

LAG = """
SELECT count(*) FROM dbguard.change_ledger
WHERE migration = %(m)s
  AND (%(prev)s::pg_snapshot IS NULL OR source_xid >= pg_snapshot_xmin(%(prev)s::pg_snapshot))
  AND (%(prev)s::pg_snapshot IS NULL OR NOT pg_visible_in_snapshot(source_xid, %(prev)s::pg_snapshot))
  AND NOT (%(cur)s::pg_snapshot IS NOT NULL AND op_id <= %(after)s
           AND pg_visible_in_snapshot(source_xid, %(cur)s::pg_snapshot))
"""


# ---- reads: lag, drift, failures ---------------------------------------------------------------

def lag(spec: MigrationSpec, run_id: str) -> int:
    """Committed source ops not yet applied to the target (the drain sensor compares it with gates.max_lag_ops)."""
    with db.target(spec) as tgt:
        st = _cursor_state(tgt, spec, run_id)
    with db.source(spec) as src:
        if st:
            prev, cur, after = st["prev_snapshot"], st["cur_snapshot"], st["op_cursor"]
        else:
            ctl = _control(src, spec)
            if ctl is None or ctl[0] != run_id:
                return 0
            prev, cur, after = ctl[1], None, 0
        return int(src.execute(LAG, {"m": spec.name, "prev": prev, "cur": cur, "after": after}).fetchone()[0])


def dual_write_fail(spec: MigrationSpec, run_id: str) -> tuple[int, list[int]]:
    """(count, op_ids) of ops the applier could not apply in this run; must be 0 before cutover."""
    with db.target(spec) as tgt:
        if not tgt.execute("SELECT to_regclass('dbguard.apply_failures') IS NOT NULL").fetchone()[0]:
            return 0, []
        ids = [r[0] for r in tgt.execute("SELECT op_id FROM dbguard.apply_failures WHERE migration = %s "
                                         "AND run_id = %s ORDER BY op_id", (spec.name, run_id)).fetchall()]
    return len(ids), ids


def failures(spec: MigrationSpec, run_id: str) -> list[dict]:
    """Every recorded apply failure with its error, for the gate message and the report."""
    with db.target(spec) as tgt:
        if not tgt.execute("SELECT to_regclass('dbguard.apply_failures') IS NOT NULL").fetchone()[0]:
            return []
        cur = tgt.execute("SELECT op_id, table_name, op, key, sqlstate, error FROM dbguard.apply_failures "
                          "WHERE migration = %s AND run_id = %s ORDER BY op_id", (spec.name, run_id))
        names = [d.name for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]


def drift(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Ledger high-water marks and per-table counts on both sides."""
    with db.source(spec) as src:
        has_ledger = src.execute("SELECT to_regclass('dbguard.change_ledger') IS NOT NULL").fetchone()[0]
        src_hw, per_table_ops = 0, {}
        if has_ledger:
            ctl = _control(src, spec)
            since = (ctl[2] or 0) if ctl and ctl[0] == run_id else 0
            src_hw = src.execute("SELECT coalesce(max(op_id), 0) FROM dbguard.change_ledger WHERE migration = %s",
                                 (spec.name,)).fetchone()[0]
            per_table_ops = dict(src.execute(
                "SELECT table_name, count(*) FROM dbguard.change_ledger WHERE migration = %s AND op_id > %s "
                "GROUP BY table_name", (spec.name, since)).fetchall())
        src_counts = {t.name: src.execute(sql.SQL("SELECT count(*) FROM {}").format(_source_rel(t))).fetchone()[0]
                      for t in spec.tables}
    with db.target(spec) as tgt:
        st = _cursor_state(tgt, spec, run_id)
        tgt_counts = {}
        for t in spec.tables:
            exists = tgt.execute("SELECT to_regclass(%s) IS NOT NULL",
                                 (_target_rel(t).as_string(tgt),)).fetchone()[0]
            tgt_counts[t.name] = tgt.execute(sql.SQL("SELECT count(*) FROM {}").format(_target_rel(t))).fetchone()[0] \
                if exists else None
    fail_count, fail_ids = dual_write_fail(spec, run_id)
    return {
        "source_high_water": src_hw, "target_high_water": st.get("high_water", 0),
        "applied": st.get("applied", 0), "lag": lag(spec, run_id),
        "dual_write_fail": fail_count, "failed_op_ids": fail_ids,
        "tables": {t.name: {"source_rows": src_counts[t.name], "target_rows": tgt_counts[t.name],
                            "row_diff": None if tgt_counts[t.name] is None else src_counts[t.name] - tgt_counts[t.name],
                            "captured_ops": per_table_ops.get(t.name, 0)} for t in spec.tables},
    }


def is_on(spec: MigrationSpec) -> bool:
    """Are this migration's capture triggers installed on the source?"""
    with db.source(spec) as src:
        return src.execute("SELECT to_regprocedure(%s) IS NOT NULL",
                           (f"{SCHEMA}.{function_name(spec, spec.tables[0])}()",)).fetchone()[0]

