"""The flip: move the application from the source to the target in one bounded step.

freeze -> drain -> verify -> sequences -> reverse capture -> fence the source -> flip -> unfreeze; then
forward capture off. Undo beside do: every step's effect is either inside the source freeze transaction
(fence, flip: rolled back with it) or undone explicitly on failure (reverse capture off), so a failed cutover
leaves the source the one writable primary with forward capture still on.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg

from .. import capture, db, target_schema
from ..spec import MigrationSpec
from . import fence, pointer, sequences, state as st, watermark
from .steps import CutoverError, Steps, resolve, state, verify_full


def check_ready(spec: MigrationSpec, run_id: str) -> list[str]:
    """Every reason the cutover must not start; read-only, before anything is frozen."""
    spec = resolve(spec)
    reasons: list[str] = []
    diffs = target_schema.differences(spec)
    reasons += [f"the target cannot serve as primary: {d}" for d in diffs]
    if not capture.is_on(spec):
        reasons.append("forward capture is not on: writes made since the copy would be lost; run capture_on")
    else:
        fails, _ = capture.dual_write_fail(spec, run_id)
        if fails:
            reasons.append(f"dual_write_fail = {fails}: captured changes could not be applied; see "
                           "dbguard.apply_failures and repair before cutting over")
    s = state(spec, run_id)
    if s["phase"] != "before":
        reasons.append(f"run {run_id} is already past the cutover (phase {s['phase']}, primary {s['primary']})")
    with db.source(spec) as src:
        why = pointer.reachable(src, spec)
        from .. import catalog
        reasons += catalog.write_back_problems(src, spec)  # rollback could not write the target's rows back
    if why:
        reasons.append(f"pointer: {why}")
    return reasons


def _verify(spec: MigrationSpec, run_id: str, src: psycopg.Connection) -> tuple[str, dict[str, Any]]:
    """The cutover's verify under the freeze (`src` holds it): ("changed", ...) when the checksum gate's
    watermark holds — whole-table counts plus count + checksum of the rows changed since the gate (watermark.py
    says why that is exact) — else ("full", verify_full). Any mismatch raises."""
    changed = watermark.verify(spec, run_id, src)
    if changed is None:
        return "full", verify_full(spec)
    bad = [f"{n}: source {r['count']} rows, target {r['target_count']}; rows changed since the gate: source "
           f"{r['source']} != target {r['target']}" for n, r in changed.items() if not r["equal"]]
    if bad:
        raise CutoverError("count + checksum differ under the freeze: " + "; ".join(bad))
    return "changed", changed


def cutover(spec: MigrationSpec, run_id: str, *, fail_at: str | None = None) -> dict[str, Any]:
    """Flip the application from the source to the target (see the module doc for the steps).

    On any failure before the flip commits: the freeze transaction (fence, pointer) rolls back, reverse
    capture is removed, forward capture stays, the source stays the writable primary; CutoverError names
    the step. `cutover_ms` is the wall time writers were frozen."""
    spec = resolve(spec)
    reasons = check_ready(spec, run_id)
    if reasons:
        raise CutoverError("cutover refused before freezing anything: " + "; ".join(reasons))
    steps = Steps(spec, run_id, "cutover", fail_at)
    out: dict[str, Any] = {"run_id": run_id, "pointer": spec.cutover.pointer}
    frozen_at, held = None, None
    try:
        with steps.step("prepare"), db.source(spec) as src:
            st.ensure(src)
            pointer.prepare(src, spec)
            st.write(src, spec, run_id, phase="before", primary_side="source", pointer=spec.cutover.pointer,
                     last_error=None)
            src.commit()
        with steps.step("freeze"):
            q = capture.quiesced(spec, run_id, "forward", lock_timeout_ms=spec.cutover.lock_timeout_ms,
                                 retries=spec.cutover.retries)
            frozen_at = time.monotonic()  # writers queue behind the freeze's lock requests from here
            held = pointer.hold(spec)  # pgbouncer: PAUSE the alias first (see pgbouncer.py)
            src, info = q.__enter__()
        out["freeze"] = {"attempts": info["attempts"], "drained": info["drained"]}
        try:
            if info.get("dual_write_fail"):
                raise CutoverError(f"dual_write_fail = {info['dual_write_fail']} after the final drain")
            with steps.step("verify"):
                out["verify_mode"], out["verify"] = _verify(spec, run_id, src)
            with steps.step("sequences"), db.target(spec) as tgt:
                out["sequences"] = sequences.sync(src, tgt, spec, "source")
                tgt.commit()
            with steps.step("reverse_capture"):
                capture.capture_on(spec, run_id, direction="reverse")
            with steps.step("fence"):
                fence.install(src, spec, "source")
            with steps.step("pointer"):
                pointer.point(src, spec, "target")
                st.write(src, spec, run_id, phase="cutover", primary_side="target", stamp="cutover_at")
            with steps.step("unfreeze"):
                q.__exit__(None, None, None)
                pointer.release(spec, held)
                held = None
        except BaseException as e:
            with contextlib.suppress(Exception):
                q.__exit__(type(e), e, e.__traceback__)
            raise
        cutover_ms = round((time.monotonic() - frozen_at) * 1000, 1)
    except CutoverError as e:
        undo = _undo_cutover(spec, run_id, str(e))
        if held is not None:
            with contextlib.suppress(Exception):
                pointer.release(spec, held)
            undo.append("pgbouncer alias resumed")
        steps.record({"cutover_ms": None, "cutover_aborted": {"error": str(e), "undo": undo}})
        raise CutoverError(f"{e}; undone: {', '.join(undo) or 'nothing'}; the source stays the writable primary "
                           "with forward capture on") from e.__cause__
    # after the flip, outside the freeze: the fence already makes forward capture inert (only applier
    # writes pass it, and capture skips those); DROP TRIGGER would wait for readers of the source.
    try:
        with steps.step("forward_capture_off"):
            if fail_at != "forward_capture_off":
                capture.capture_off(spec, run_id, direction="forward")
                watermark.disarm(spec)  # the target is the primary now: its writes are the application's
    except CutoverError as e:
        out["forward_capture_off_error"] = str(e) + " (finish retries it; the fence keeps it inert)"
    out.update(cutover_ms=cutover_ms, steps=steps.done, primary="target")
    steps.record({"cutover_ms": cutover_ms, "writes_after_cutover": {"target": 0, "source": 0},
                  "cutover_verify": {"mode": out["verify_mode"], "tables": out["verify"]}})
    return out


def _undo_cutover(spec: MigrationSpec, run_id: str, error: str) -> list[str]:
    """A failed cutover: the freeze transaction has rolled back (fence and pointer with it); remove reverse
    capture, make sure the source is unfenced and pointed at, record the error."""
    undo = []
    with contextlib.suppress(Exception):
        capture.capture_off(spec, run_id, direction="reverse")
        undo.append("reverse capture removed")
    with db.source(spec) as src:
        st.ensure(src)
        if fence.fenced(src, spec, "source"):
            fence.remove(src, spec, "source")
            undo.append("source fence removed")
        with contextlib.suppress(Exception):
            pointer.point(src, spec, "source")
        st.write(src, spec, run_id, phase="before", primary_side="source", last_error=error)
        src.commit()
    undo.append("freeze released")
    return undo
