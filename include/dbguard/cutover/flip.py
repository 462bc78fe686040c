"""The flip: move the application from the source to the target in one bounded step.

count (whole-table counts, before the freeze: writers go on) -> freeze -> drain -> verify -> sequences ->
reverse capture -> fence the source -> flip -> unfreeze; then forward capture off. Undo beside do: every
step's effect is either inside the source freeze transaction (fence, flip: rolled back with it) or undone
explicitly on failure (reverse capture off), so a failed cutover leaves the source the one writable primary
with forward capture still on.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any

import psycopg

from .. import capture, db, target_schema
from ..spec import MigrationSpec
from . import fence, pointer, readers, sequences, state as st, watermark
from .steps import CutoverError, Steps, resolve, resume, state, verify_full


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


def _verify(spec: MigrationSpec, run_id: str, src: psycopg.Connection,
            before: watermark.Counted | None) -> tuple[str, dict[str, Any]]:
    """The cutover's verify under the freeze (`src` holds it): ("changed", ...) when the checksum gate's
    watermark holds — count + checksum of the rows changed since the gate, and whole-table counts taken before
    the freeze (`before`) brought up to now by those rows (watermark.py says why that is exact) — else ("full",
    verify_full). Any mismatch raises."""
    changed = watermark.verify(spec, run_id, src, before)
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
    the step. After the commit (or a COMMIT whose reply was lost and which the re-read finds committed) an
    error is never undone: the target is the primary, and the error is reported in `errors_after_commit`.
    `cutover_ms` is the wall time writers were frozen."""
    spec = resolve(spec)
    resumed = pointer.unpause(spec, state(spec, run_id)["primary"])  # a crashed attempt's paused alias
    reasons = check_ready(spec, run_id)
    if reasons:
        raise CutoverError("cutover refused before freezing anything: " + "; ".join(reasons))
    steps = Steps(spec, run_id, "cutover", fail_at)
    out: dict[str, Any] = {"run_id": run_id, "pointer": spec.cutover.pointer, "errors_after_commit": [],
                           **({"unpaused": resumed} if resumed else {})}
    frozen_at, held, q, before = None, None, None, None
    try:
        with steps.step("prepare"), db.source(spec) as src:
            st.ensure(src)
            pointer.prepare(src, spec)
            st.write(src, spec, run_id, phase="before", primary_side="source", pointer=spec.cutover.pointer,
                     last_error=None)
            src.commit()
            _fresh_reverse_capture(spec, run_id)  # outside the freeze: reverse capture goes on inside it
        with steps.step("count"):  # the whole-table counts, outside the freeze (None: none to take)
            before = watermark.count_before(spec, run_id)
        with steps.step("freeze"):
            cm = capture.quiesced(spec, run_id, "forward", lock_timeout_ms=spec.cutover.lock_timeout_ms,
                                  retries=spec.cutover.retries)
            frozen_at = time.monotonic()  # writers queue behind the freeze's lock requests from here
            held = pointer.hold(spec)  # pgbouncer: PAUSE the alias first, bounded (see pgbouncer.py)
            src, info = cm.__enter__()
            q = cm
        out["freeze"] = {"attempts": info["attempts"], "drained": info["drained"]}
        if info.get("dual_write_fail"):
            raise CutoverError(f"dual_write_fail = {info['dual_write_fail']} after the final drain")
        with steps.step("verify"):
            try:
                out["verify_mode"], out["verify"] = _verify(spec, run_id, src, before)
            finally:
                if before is not None:
                    before.close()  # its snapshots end before the flip's DDL and the application's writes
        with steps.step("sequences"), db.target(spec) as tgt:
            out["sequences"] = sequences.sync(src, tgt, spec, "source")
            tgt.commit()
        with steps.step("reverse_capture"):
            capture.capture_on(spec, run_id, direction="reverse")
        with steps.step("fence"):
            fence.install(src, spec, "source")
        with steps.step("pointer"):
            out["readers"] = readers.at_flip(src, spec, run_id)  # Qdrant stores: last window, readers moved
            pointer.point(src, spec, "target")
            st.write(src, spec, run_id, phase="cutover", primary_side="target", stamp="cutover_at")
        with steps.step("unfreeze"):
            cm, q = q, None
            cm.__exit__(None, None, None)  # COMMIT: fence, pointer and phase at once
    except CutoverError as e:
        if before is not None:
            before.close()
        if q is not None:
            with contextlib.suppress(Exception):
                q.__exit__(type(e), e, e.__traceback__)  # rolls the freeze transaction back
        committed = _committed(spec, run_id, str(e))
        if not committed:
            undo = _undo_cutover(spec, run_id, str(e))
            if held is not None:
                undo.append(pointer.release(spec, held, "source"))
            steps.record({"cutover_ms": None, "cutover_aborted": {"error": str(e), "undo": undo}})
            raise CutoverError(f"{e}; undone: {', '.join(undo) or 'nothing'}; the source stays the writable "
                               "primary with forward capture on") from e.__cause__
        out["errors_after_commit"].append(f"{e} (the flip had committed: kept, not undone)")
    cutover_ms = round((time.monotonic() - frozen_at) * 1000, 1)
    # after the commit nothing is undone: an error is reported, and the target stays the primary
    try:
        with steps.step("resume"):
            if held is not None:
                a, held = held, None
                resume(spec, a, "target")
    except CutoverError as e:
        out["errors_after_commit"].append(str(e))
        if held is not None:  # it failed before RESUME was sent: once more, on a fresh admin connection
            out["errors_after_commit"].append(pointer.release(spec, None, "target"))
            held.close()
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
                  "cutover_verify": {"mode": out.get("verify_mode"), "tables": out.get("verify")},
                  **({"cutover_errors_after_commit": out["errors_after_commit"]}
                     if out["errors_after_commit"] else {})})
    return out


def _committed(spec: MigrationSpec, run_id: str, error: str) -> bool:
    """Whether the flip committed, read from the source on a fresh connection (never assumed from where the
    error came: a COMMIT whose reply was lost may have completed). Unknown raises: nothing is undone then."""
    try:
        with db.source(spec) as src:
            return st.read(src, spec, run_id)["phase"] == "cutover"
    except Exception as e:  # noqa: BLE001  reported with the original error
        raise CutoverError(f"{error}; and whether the flip committed cannot be read from the source "
                           f"({(str(e).strip().splitlines() or [type(e).__name__])[0]}): nothing was undone; "
                           "run `dbguard status` (or cutover.state) once the source is reachable: phase "
                           "'cutover' means the target is the primary, 'before' that the source still is, and "
                           "a cutover run again undoes what is left") from e


def _fresh_reverse_capture(spec: MigrationSpec, run_id: str) -> None:
    """A retried cutover starts reverse capture afresh: an earlier attempt of this run may have left its
    start point, its ledger ops (writes on the target while the source was still the primary: not the
    application's) and its triggers. capture_on keeps a start point it finds for the same run, so clear it."""
    with db.target(spec) as tgt:
        if tgt.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is None:
            return
        row = tgt.execute("SELECT run_id, capture_snapshot FROM dbguard.control WHERE migration = %s AND "
                          "direction = 'reverse'", (spec.name,)).fetchone()
        if row is None or row[0] != run_id or row[1] is None:
            return  # a first attempt (another run's start point is not kept by capture_on either)
    capture.capture_off(spec, run_id, direction="reverse")
    with db.target(spec) as tgt:
        tgt.execute("UPDATE dbguard.control SET capture_snapshot = NULL, capture_op_id = NULL "
                    "WHERE migration = %s AND direction = 'reverse'", (spec.name,))
        tgt.commit()
    with db.source(spec) as src:  # the reverse applier's cursor lives on its destination
        if src.execute("SELECT to_regclass('dbguard.apply_cursor')").fetchone()[0] is not None:
            src.execute("DELETE FROM dbguard.apply_cursor WHERE migration = %s AND direction = 'reverse' "
                        "AND run_id = %s", (spec.name, run_id))
        src.commit()


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
        with contextlib.suppress(Exception):  # the control row; pgbouncer's alias too (release checks it)
            pointer.point(src, spec, "source")
        st.write(src, spec, run_id, phase="before", primary_side="source", last_error=error)
        src.commit()
    undo.append("freeze released")
    return undo
