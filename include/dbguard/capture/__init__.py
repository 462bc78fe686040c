"""Dual writes: origin triggers -> change ledger -> idempotent applier into the destination.

One implementation, either direction: every public function takes `direction="forward"` (source ->
target, during the migration) or `"reverse"` (target -> source, after cutover); see common.Route.
Modules: triggers (origin DDL, trigger functions, capture_on/off), applier (drain, apply_ops, read_ops,
fence_copy), values (exact text row images and the casts back), freeze (quiesced), reads (lag, drift,
failures, dual_write_fail, cursor, is_on), flags (control flags).

Stages (each takes the spec, the run id and the direction, returns JSON-able values, is safe to re-run):
  capture_on   create the origin ledger + control row, one AFTER ROW trigger per table (ENABLE ALWAYS)
  drain        apply captured ops to the destination in batches, exactly once
  capture_off  drop triggers and functions (the ledger stays, for the record)
Reads: lag, drift, failures, dual_write_fail, cursor, is_on, flags. Freeze: quiesced.

Ordering and idempotency. A change's op_id comes from a sequence when the
trigger fires, not when its transaction commits, so a plain "op_id > high
water" cursor would skip an op whose transaction commits after a later op_id
was applied. The applier therefore reads the ledger in *windows* of source
snapshots: window k holds the ops whose transaction is visible in snapshot
S_k and was not visible in S_(k-1) (`pg_visible_in_snapshot`). Such a set is
final (every transaction in it had finished when S_k was taken), windows
follow commit order, and inside a window op_id order is the order in which
conflicting writes happened (a row lock serialises them). The target keeps
the cursor (window snapshots + the op_id high-water mark inside the window)
in `dbguard.apply_cursor` and moves it in the same transaction as the
applied rows, so a replayed batch is a no-op.

Convergence with the backfill: ops are full row images (upsert) or deletes by
key, so replaying every op captured since capture_on, in order, after the
range copies, ends at the source's final state whatever the copies saw. A
copy must not commit between a drain reading an op and applying it; copies
that may overlap a drain take `fence_copy(tgt)` first (shared advisory lock;
each drain batch holds it exclusively).
"""
from __future__ import annotations

from .applier import (COVERED, OP_COLUMNS, TARGET_DDL, WINDOW_FIRST_OP, WINDOW_OPS, apply_ops, drain,
                      ensure_destination, ensure_target, fence_copy, read_ops)
from .common import (DIRECTIONS, SCHEMA, STAGE_DRAIN, STAGE_OFF, STAGE_ON, CaptureError, Route, function_name, route,
                     trigger_name, truncate_function_name)
from .flags import flags, set_flags
from .freeze import quiesced
from .reads import LAG, cursor, drift, dual_write_fail, failures, is_on, lag
from .triggers import ORIGIN_DDL, SOURCE_DDL, capture_off, capture_on, trigger_function_sql

__all__ = ["CaptureError", "DIRECTIONS", "Route", "route", "capture_on", "capture_off", "drain", "apply_ops",
           "read_ops", "fence_copy", "quiesced", "lag", "cursor", "drift", "failures", "dual_write_fail", "is_on",
           "flags", "set_flags", "ensure_target", "ensure_destination", "trigger_name", "function_name",
           "truncate_function_name", "trigger_function_sql"]
