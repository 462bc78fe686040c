"""The flip back: after a cutover, return the application to the source losing no write made on the target;
and `finish`, which ends the rollback offer.

rollback: freeze the target -> drain reverse -> verify -> sequences on the source -> fence target / unfence
source + flip back -> unfreeze -> reverse capture off. Checkpointed in dbguard.cutover_state, resumable.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any

from psycopg import sql

from .. import capture, db, ledger, preflight
from ..capture.common import lock_retrying
from ..spec import MigrationSpec
from . import fence, pointer, readers, repair, sequences, state as st, watermark
from .steps import CutoverError, Steps, resolve, resume, state


def _writes_after_cutover(spec: MigrationSpec, run_id: str) -> dict[str, int]:
    """Rows written on the new primary since the flip (reverse ledger ops) and straggling source writes
    refused by the fence (always 0 applied)."""
    with db.target(spec) as tgt:
        if tgt.execute("SELECT to_regclass('dbguard.change_ledger')").fetchone()[0] is None:
            return {"target": 0, "source": 0}
        n = tgt.execute("SELECT count(*) FROM dbguard.change_ledger WHERE migration = %s AND direction = 'reverse'",
                        (spec.name,)).fetchone()[0]
    return {"target": int(n), "source": 0}


def rollback(spec: MigrationSpec, run_id: str, *, repair_from: str | None = None,
             fail_at: str | None = None) -> dict[str, Any]:
    """Go back to the source after a cutover, losing no write made on the target; resumes from its last
    durable checkpoint when interrupted. Before any cutover there is nothing to flip back: stages.rollback
    (the entry the CLI and the DAG call) aborts such a run instead.

    No moment has both sides writable: the target's fence commits (ending the target's freeze) before the
    source's fence is lifted with the flip back, so a crash between the two leaves both sides fenced and the
    pointer on the target; the next rollback starts over from the freeze and verifies again.
    When the verify under the freeze finds rows that differ, they are named (bisected as reconcile does);
    `repair_from="target"` re-copies them from the target onto the source under the same freeze and goes on."""
    if repair_from not in (None, "target"):
        raise CutoverError(f"repair_from={repair_from!r}: the only side rollback repairs from is 'target' (the "
                           "primary until the flip back)")
    s = state(spec, run_id)
    if s["phase"] == "before":
        raise CutoverError(f"run {run_id} was not cut over (phase before): there is nothing to flip back; abort it "
                           "with `dbguard rollback` (stages.rollback: capture off, schema freeze lifted)")
    if s["phase"] == "finished":
        raise CutoverError(f"rollback is no longer offered for run {run_id}: finished at {s.get('finished_at')} "
                           f"(rollback_ttl_minutes={spec.rollback_ttl_minutes:g}); reverse capture is off and the "
                           "source is stale and fenced. Migrate back with a new run (target -> source) instead")
    if s["phase"] == "rolled_back":
        return {"run_id": run_id, "status": "rolled_back", "already": True, "primary": "source"}
    spec = resolve(spec)
    done = list(s.get("checkpoints") or [])
    steps = Steps(spec, run_id, "rollback", fail_at)
    out: dict[str, Any] = {"run_id": run_id, "resumed_after": done[-1] if done else None}
    t_start = time.monotonic()
    unpaused = pointer.unpause(spec, s["primary"])  # a crashed attempt may have left the alias paused
    if unpaused:
        out["unpaused"] = unpaused
    with db.source(spec) as src:
        st.write(src, spec, run_id, phase="rolling_back", **({} if done else {"stamp": "rollback_started_at"}))
        src.commit()
    try:
        if "pointer" not in done:
            _flip_back(spec, run_id, steps, done, out, repair_from)
        if "reverse_capture_off" not in done:
            with steps.step("reverse_capture_off"):
                capture.drain(spec, run_id, direction="reverse")
                capture.capture_off(spec, run_id, direction="reverse")
                done.append("reverse_capture_off")
        if "release" not in done:
            with steps.step("release"):
                preflight.release_freeze(spec)  # the run's schema freeze on the source
                done.append("release")
    except CutoverError as e:
        with db.source(spec) as src:
            st.write(src, spec, run_id, checkpoints=done, last_error=str(e))
            src.commit()
        steps.record({"rollback_interrupted": {"error": str(e), "checkpoints": done,
                                               **({"differing_rows": out["differing_rows"]}
                                                  if out.get("differing_rows") else {})}})
        where = "the source is the primary again" if "pointer" in done else \
            "the target stays the writable primary (source fenced, pointer on the target)"
        again = "dbguard rollback --repair-from target to copy those rows from the target onto the source " \
                "under the freeze and complete" if out.get("differing_rows") and not repair_from else \
                f"run rollback again to resume after {done[-1] if done else 'the start'}"
        raise CutoverError(f"{e}; {where}; {again}") from e.__cause__
    with db.source(spec) as src:
        st.write(src, spec, run_id, phase="rolled_back", checkpoints=done, last_error=None, stamp="rolled_back_at")
        src.commit()
    rollback_ms = round((time.monotonic() - t_start) * 1000, 1)
    writes = _writes_after_cutover(spec, run_id)
    steps.record({"rollback_ms": rollback_ms, "writes_after_cutover": writes,
                  **({"rollback_repaired": out["repaired"]} if out.get("repaired") else {})})
    with db.target(spec) as tgt:
        ledger.finish_run(tgt, run_id, spec.name, "rolled_back")
    out.update(status="rolled_back", primary="source", rollback_ms=rollback_ms, steps=steps.done,
               writes_after_cutover=writes)
    return out


def _flip_back(spec: MigrationSpec, run_id: str, steps: Steps, done: list[str], out: dict[str, Any],
               repair_from: str | None) -> None:
    """The freeze, its verify, the target's fence (committed first) and the flip back (committed second)."""
    # the pointer row first (applications read it FOR SHARE, then write to the target): taking it after the
    # target's tables would wait for a writer that waits for us
    ptr, q, held = db.source(spec), None, None
    frozen_at = time.monotonic()
    try:
        with steps.step("freeze"):
            held = pointer.hold(spec)
            lock_retrying(ptr, spec.cutover.lock_timeout_ms * (spec.cutover.retries + 1),
                          lambda: ptr.execute("LOCK TABLE dbguard.control IN EXCLUSIVE MODE"))
            cm = capture.quiesced(spec, run_id, "reverse", lock_timeout_ms=spec.cutover.lock_timeout_ms,
                                  retries=spec.cutover.retries)
            tgt, info = cm.__enter__()
            q = cm
        if info.get("dual_write_fail"):
            raise CutoverError(f"reverse dual_write_fail = {info['dual_write_fail']} after the final drain")
        with steps.step("verify"):
            out["verify"] = repair.verify_or_repair(spec, out, repair_from)
        with steps.step("sequences"):
            out["sequences"] = sequences.sync(tgt, ptr, spec, "target")
        with steps.step("fence_target"):
            fence.install(tgt, spec, "target")
            cm, q = q, None
            cm.__exit__(None, None, None)  # COMMIT: the target is fenced before the source is unfenced
        with steps.step("pointer"):
            ptr.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                sql.Literal(f"{spec.cutover.lock_timeout_ms}ms")))
            fence.remove(ptr, spec, "source")
            pointer.point(ptr, spec, "source")
            out["readers"] = readers.at_flip_back(ptr, spec, run_id)  # Qdrant stores: last window, readers back
            st.write(ptr, spec, run_id, primary_side="source", checkpoints=[*done, "pointer"])
            ptr.commit()
            done.append("pointer")
        with steps.step("unfreeze"):
            if held is not None:
                a, held = held, None
                resume(spec, a, "source")
            done.append("unfreeze")
    except BaseException as e:
        if q is not None:
            with contextlib.suppress(Exception):
                q.__exit__(type(e), e, e.__traceback__)
        ptr.close()  # rolls back whatever of the flip back did not commit
        flipped = "pointer" in done or _flipped_back(spec, run_id)
        if flipped and "pointer" not in done:  # its COMMIT completed though the reply was lost
            done.append("pointer")
        if not flipped:  # undo beside do: the target is the writable primary again
            with contextlib.suppress(Exception), db.target(spec) as t:  # its COMMIT may have gone through unseen
                fence.remove(t, spec, "target")
                t.commit()
            if spec.cutover.pointer == "pgbouncer":
                with contextlib.suppress(Exception):  # the alias may have been rewritten: the target again
                    with db.source(spec) as c:
                        pointer.point(c, spec, "target")
                        c.commit()
        if held is not None:
            msg = pointer.release(spec, held, "source" if flipped else "target")
            out.setdefault("notes", []).append(msg)
        raise
    finally:
        ptr.close()
    out["rollback_freeze_ms"] = round((time.monotonic() - frozen_at) * 1000, 1)


def _flipped_back(spec: MigrationSpec, run_id: str) -> bool:
    """Whether the flip back committed, read on a fresh connection (a lost COMMIT reply may hide it). Unknown
    counts as flipped: then nothing is undone (the target's fence stays; both sides fenced refuse, never lose)."""
    try:
        with db.source(spec) as src:
            return st.read(src, spec, run_id)["primary_side"] == "source"
    except Exception:  # noqa: BLE001
        return True


# ---- finish ---------------------------------------------------------------------------------------

def finish(spec: MigrationSpec, run_id: str, *, force: bool = False) -> dict[str, Any]:
    """After rollback_ttl_minutes (or with force): reverse capture off, rollback no longer offered.
    The source keeps its fence for good: it is stale from now on and nobody should write to it."""
    s = state(spec, run_id)
    if s["phase"] == "finished":
        return {"run_id": run_id, "phase": "finished", "already": True}
    if s["phase"] != "cutover":
        raise CutoverError(f"finish: run {run_id} is in phase {s['phase']!r}; only a cut-over run is finished")
    at = dt.datetime.fromisoformat(s["cutover_at"])
    expires = at + dt.timedelta(minutes=spec.rollback_ttl_minutes)
    if not force and dt.datetime.now(dt.timezone.utc) < expires:
        raise CutoverError(f"finish: rollback is offered until {expires.isoformat()} (rollback_ttl_minutes="
                           f"{spec.rollback_ttl_minutes:g}); wait, or finish with force=True")
    spec = resolve(spec)
    capture.drain(spec, run_id, direction="reverse")
    readers.at_finish(spec, run_id)
    off = capture.capture_off(spec, run_id, direction="reverse")
    with contextlib.suppress(Exception):  # both normally gone since the cutover
        capture.capture_off(spec, run_id, direction="forward")
        watermark.disarm(spec)
    with db.source(spec) as src:
        st.write(src, spec, run_id, phase="finished", stamp="finished_at")
        src.commit()
    with db.target(spec) as tgt:
        ledger.event(tgt, run_id, spec.name, "cutover.finish",
                     {"rollback_offered": False, "source_fence_kept": True, "forced": force})
    return {"run_id": run_id, "phase": "finished", "rollback_offered": False, "source_fenced": True,
            "reverse_capture_dropped": off["dropped_functions"]}
