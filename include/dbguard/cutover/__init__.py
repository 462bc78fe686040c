"""Cutover and rollback: move the application to the target in one bounded, reversible step, and back.

Public API (the DAG's cutover tasks and the CLI call exactly these):
  check_ready(spec, run_id) -> list[str]   every reason the cutover must not start (read-only)
  cutover(spec, run_id)     -> dict        freeze -> drain -> verify -> sequences -> reverse capture ->
                                           fence the source -> flip -> unfreeze; then forward capture off
  rollback(spec, run_id)    -> dict        after a cutover: freeze the target -> drain reverse -> verify ->
                                           sequences on the source -> fence target / unfence source + flip
                                           back -> unfreeze -> reverse capture off. Checkpointed, resumable.
                                           Before a cutover: stages.rollback (release, optional drop).
  finish(spec, run_id)      -> dict        after rollback_ttl_minutes: reverse capture off, rollback no longer
                                           offered; the fence stays on the old primary for good
  state(spec, run_id)       -> dict        phase, primary, pointer, checkpoints, timestamps

Undo beside do: every cutover step's effect is either inside the source freeze transaction (fence, flip:
rolled back with it) or undone explicitly on failure (reverse capture off), so a failed cutover leaves the
source the one writable primary with forward capture still on. State lives in dbguard.cutover_state on the
source (state.py says why). `fail_at="<step>"` is a test hook: that step raises before doing anything.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import time
from typing import Any, Callable

import psycopg
from psycopg import sql

from .. import capture, db, ledger
from ..capture.common import lock_retrying
from ..checksum import Checksum
from ..errors import DbguardError
from ..spec import MigrationSpec
from . import fence, pointer, sequences, state as st, watermark

CUTOVER_STEPS = ("prepare", "freeze", "verify", "sequences", "reverse_capture", "fence", "pointer", "unfreeze",
                 "forward_capture_off")
ROLLBACK_STEPS = ("freeze", "verify", "sequences", "fence_target", "pointer", "unfreeze", "fence_target_again",
                  "reverse_capture_off", "release")
# rollback checkpoints that survive an interruption (the ones before `pointer` live in the freeze transaction)
DURABLE = ("pointer", "unfreeze", "fence_target_again", "reverse_capture_off")


class CutoverError(DbguardError):
    """A cutover or rollback step failed; the message names the step, the cause and what state was left."""


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class _Steps:
    """Times each step, records `cutover.<step>` events, raises CutoverError naming the failing step."""

    def __init__(self, spec: MigrationSpec, run_id: str, kind: str, fail_at: str | None):
        self.spec, self.run_id, self.kind, self.fail_at = spec, run_id, kind, fail_at
        self.done: list[dict] = []

    @contextlib.contextmanager
    def step(self, name: str):
        t0, at = time.monotonic(), _now()
        ok = False
        try:
            if self.fail_at == name:
                raise CutoverError(f"injected failure at {self.kind} step {name!r} (test hook fail_at)")
            yield
            ok = True
        except CutoverError:
            raise
        except Exception as e:  # noqa: BLE001  named, then re-raised as a CutoverError
            msg = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise CutoverError(f"{self.kind} step {name!r} failed: {msg}") from e
        finally:
            self.done.append({"step": name, "ms": round((time.monotonic() - t0) * 1000, 1), "ok": ok, "at": at})

    def record(self, extra: dict[str, Any]) -> None:
        with db.target(self.spec) as tgt:
            ledger.ensure(tgt)
            for s in self.done:
                ledger.event(tgt, self.run_id, self.spec.name, f"{self.kind}.{s['step']}", s, commit=False)
            ledger.set_metric(tgt, self.run_id, self.spec.name, f"{self.kind}_steps", self.done, commit=False)
            for k, v in extra.items():
                ledger.set_metric(tgt, self.run_id, self.spec.name, k, v, commit=False)
            tgt.commit()


def _resolve(spec: MigrationSpec) -> MigrationSpec:
    from .. import catalog
    return catalog.resolve(spec)


# ---- reads ----------------------------------------------------------------------------------------

def state(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """phase (before | cutover | rolling_back | rolled_back | finished), primary (source | target), pointer
    (what the pointer says now), checkpoints and timestamps."""
    with db.source(spec) as src:
        s = st.read(src, spec, run_id)
        s["pointer_says"] = pointer.current(src, spec)
    s["primary"] = s.pop("primary_side")
    s["pointer"] = s.get("pointer") or spec.cutover.pointer
    return s


def check_ready(spec: MigrationSpec, run_id: str) -> list[str]:
    """Every reason the cutover must not start; read-only, before anything is frozen."""
    spec = _resolve(spec)
    reasons: list[str] = []
    try:
        from .. import target_schema
        diffs = target_schema.differences(spec)
    except ImportError as e:  # the schema comparison is another module's; say so rather than pass silently
        diffs = [f"target_schema.differences is not available ({e}); cannot prove the target can be primary"]
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
    if why:
        reasons.append(f"pointer: {why}")
    return reasons


# ---- cutover --------------------------------------------------------------------------------------

def _verify_full(spec: MigrationSpec) -> dict[str, Any]:
    """Count + checksum of every table on both sides (both at once); any mismatch raises. No repair: under
    the freeze nothing may change, and after a drained ledger a difference is a real defect."""
    from ..reconcile import Sides

    sides = Sides(spec)
    out, bad = {}, []
    try:
        for t in spec.tables:
            s, g = sides.checksums(t, None)
            out[t.ref] = {"count": s.count, "equal": s == g}
            if s != g:
                bad.append(f"{t.ref}: source {s.to_dict()} != target {g.to_dict()}")
    finally:
        sides.close()
    if bad:
        raise CutoverError("count + checksum differ under the freeze: " + "; ".join(bad))
    return out


def _verify(spec: MigrationSpec, run_id: str, src: psycopg.Connection) -> tuple[str, dict[str, Any]]:
    """The cutover's verify under the freeze (`src` holds it): ("changed", ...) when the checksum gate's
    watermark holds — whole-table counts plus count + checksum of the rows changed since the gate (watermark.py
    says why that is exact) — else ("full", _verify_full). Any mismatch raises."""
    changed = watermark.verify(spec, run_id, src)
    if changed is None:
        return "full", _verify_full(spec)
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
    spec = _resolve(spec)
    reasons = check_ready(spec, run_id)
    if reasons:
        raise CutoverError("cutover refused before freezing anything: " + "; ".join(reasons))
    steps = _Steps(spec, run_id, "cutover", fail_at)
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


# ---- rollback -------------------------------------------------------------------------------------

def _writes_after_cutover(spec: MigrationSpec, run_id: str) -> dict[str, int]:
    """Rows written on the new primary since the flip (reverse ledger ops) and straggling source writes
    refused by the fence (always 0 applied)."""
    with db.target(spec) as tgt:
        if tgt.execute("SELECT to_regclass('dbguard.change_ledger')").fetchone()[0] is None:
            return {"target": 0, "source": 0}
        n = tgt.execute("SELECT count(*) FROM dbguard.change_ledger WHERE migration = %s AND direction = 'reverse'",
                        (spec.name,)).fetchone()[0]
    return {"target": int(n), "source": 0}


def rollback(spec: MigrationSpec, run_id: str, *, drop_target: bool = False,
             fail_at: str | None = None) -> dict[str, Any]:
    """Go back to the source after a cutover, losing no write made on the target; resumes from its last
    durable checkpoint when interrupted. Before any cutover: stages.rollback (release, optional drop)."""
    s = state(spec, run_id)
    if s["phase"] == "before":
        from .. import stages
        return stages.rollback(spec, run_id, drop_target=drop_target)
    if s["phase"] == "finished":
        raise CutoverError(f"rollback is no longer offered for run {run_id}: finished at {s.get('finished_at')} "
                           f"(rollback_ttl_minutes={spec.rollback_ttl_minutes:g}); reverse capture is off and the "
                           "source is stale and fenced. Migrate back with a new run (target -> source) instead")
    if s["phase"] == "rolled_back":
        return {"run_id": run_id, "status": "rolled_back", "already": True, "primary": "source"}
    spec = _resolve(spec)
    done = list(s.get("checkpoints") or [])
    steps = _Steps(spec, run_id, "rollback", fail_at)
    out: dict[str, Any] = {"run_id": run_id, "resumed_after": done[-1] if done else None}
    t_start = time.monotonic()
    with db.source(spec) as src:
        st.write(src, spec, run_id, phase="rolling_back", **({} if done else {"stamp": "rollback_started_at"}))
        src.commit()
    frozen_at = None
    try:
        if "pointer" not in done:
            # the pointer row first (applications read it FOR SHARE, then write to the target): taking it
            # after the target's tables would wait for a writer that waits for us
            ptr, q, held = db.source(spec), None, None
            try:
                with steps.step("freeze"):
                    frozen_at = time.monotonic()
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
                    out["verify"] = _verify_full(spec)
                with steps.step("sequences"):
                    out["sequences"] = sequences.sync(tgt, ptr, spec, "target")
                with steps.step("fence_target"):
                    fence.install(tgt, spec, "target")
                with steps.step("pointer"):
                    ptr.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(
                        sql.Literal(f"{spec.cutover.lock_timeout_ms}ms")))
                    fence.remove(ptr, spec, "source")
                    pointer.point(ptr, spec, "source")
                    st.write(ptr, spec, run_id, primary_side="source", checkpoints=[*done, "pointer"])
                    ptr.commit()
                    done.append("pointer")
                with steps.step("unfreeze"):
                    q.__exit__(None, None, None)
                    done.append("unfreeze")
            except BaseException as e:
                if q is not None:
                    with contextlib.suppress(Exception):
                        q.__exit__(type(e), e, e.__traceback__)
                if "pointer" not in done and spec.cutover.pointer == "pgbouncer":
                    with contextlib.suppress(Exception):  # the alias may have been rewritten: the target again
                        pointer.point(ptr, spec, "target")
                raise
            finally:
                ptr.close()  # rolls back whatever of the pointer transaction did not commit
                if held is not None:
                    with contextlib.suppress(Exception):
                        pointer.release(spec, held)
            out["rollback_freeze_ms"] = round((time.monotonic() - frozen_at) * 1000, 1)
        if "fence_target_again" not in done:
            # after an interruption between the flip back and the freeze's commit, the target's fence was
            # rolled back: put it up again and bring over anything a straggler wrote there meanwhile
            with steps.step("fence_target_again"), db.target(spec) as tgt:
                fence.install(tgt, spec, "target")
                tgt.commit()
                capture.drain(spec, run_id, direction="reverse")
                done.append("fence_target_again")
        if "reverse_capture_off" not in done:
            with steps.step("reverse_capture_off"):
                capture.drain(spec, run_id, direction="reverse")
                capture.capture_off(spec, run_id, direction="reverse")
                done.append("reverse_capture_off")
        if "release" not in done:
            with steps.step("release"):
                from .. import preflight
                preflight.release_freeze(spec)  # the run's schema freeze on the source
                done.append("release")
    except CutoverError as e:
        if "pointer" in done:  # flipped back but the target's fence may have rolled back with its freeze
            with contextlib.suppress(Exception), db.target(spec) as tgt:
                fence.install(tgt, spec, "target")
                tgt.commit()
        with db.source(spec) as src:
            st.write(src, spec, run_id, checkpoints=done, last_error=str(e))
            src.commit()
        steps.record({"rollback_interrupted": {"error": str(e), "checkpoints": done}})
        where = "the source is the primary again" if "pointer" in done else \
            "the target stays the writable primary (source fenced, pointer on the target)"
        raise CutoverError(f"{e}; {where}; run rollback again to resume after {done[-1] if done else 'the start'}"
                           ) from e.__cause__
    with db.source(spec) as src:
        st.write(src, spec, run_id, phase="rolled_back", checkpoints=done, last_error=None, stamp="rolled_back_at")
        src.commit()
    rollback_ms = round((time.monotonic() - t_start) * 1000, 1)
    writes = _writes_after_cutover(spec, run_id)
    steps.record({"rollback_ms": rollback_ms, "writes_after_cutover": writes})
    with db.target(spec) as tgt:
        ledger.finish_run(tgt, run_id, spec.name, "rolled_back")
    out.update(status="rolled_back", primary="source", rollback_ms=rollback_ms, steps=steps.done,
               writes_after_cutover=writes)
    return out


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
    spec = _resolve(spec)
    capture.drain(spec, run_id, direction="reverse")
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


__all__ = ["CutoverError", "check_ready", "cutover", "rollback", "finish", "state", "CUTOVER_STEPS",
           "ROLLBACK_STEPS"]
