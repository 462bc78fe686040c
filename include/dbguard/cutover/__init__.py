"""Cutover and rollback: move the application to the target in one bounded, reversible step, and back.

Public API (the DAG's cutover tasks and the CLI call exactly these):
  check_ready(spec, run_id) -> list[str]   every reason the cutover must not start (read-only)      flip.py
  cutover(spec, run_id)     -> dict        freeze -> drain -> verify -> sequences -> reverse capture -> flip.py
                                           fence the source -> flip -> unfreeze; then forward capture off
  rollback(spec, run_id)    -> dict        after a cutover: freeze the target -> drain reverse ->     flip_back.py
                                           verify (repair_from="target": re-copy the rows that differ)
                                           -> sequences on the source -> fence the target (commit) ->
                                           unfence the source + flip back (commit) -> resume -> reverse
                                           capture off. Checkpointed, resumable. (Before a cutover the
                                           abort is stages.rollback, which calls this one after a flip.)
  finish(spec, run_id)      -> dict        after rollback_ttl_minutes: reverse capture off, rollback  flip_back.py
                                           no longer offered; the fence stays on the old primary
  state(spec, run_id)       -> dict        phase, primary, pointer, checkpoints, timestamps           steps.py

The parts: fence.py (the write fence), pointer.py / pgbouncer.py (where applications write), sequences.py,
state.py (dbguard.cutover_state on the source), watermark.py (the changed-rows verify), repair.py (the
rollback's verify, the rows that differ, the copy from the target), steps.py (step names, the timed step
and its fault hook `fail_at`). This package never
imports `stages` (the per-task entry points above it); `dbguard.round_trip` (the demo) drives both.
"""
from __future__ import annotations

from .flip import check_ready, cutover
from .flip_back import finish, rollback
from .steps import CUTOVER_COMMITTED, CUTOVER_STEPS, DURABLE, ROLLBACK_STEPS, CutoverError, state

__all__ = ["CutoverError", "check_ready", "cutover", "rollback", "finish", "state", "CUTOVER_STEPS",
           "CUTOVER_COMMITTED", "ROLLBACK_STEPS", "DURABLE"]
