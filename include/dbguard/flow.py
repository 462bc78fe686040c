"""The run's path around the flip: the window, the soak, which undo runs, and the final status.

Pure decisions (no Airflow): the DAG's thin tasks call these with Airflow's task states, so the same
rules are unit-tested here and exercised by real DAG runs.

    ... -> retrieval_gate -> wait_for_window -> soak -> [approval] -> cutover -> tail
        -> rollback (all_done) -> release (all_done) -> finalize (all_done)

`rollback` runs `cutover.rollback` when the flip happened and anything failed, or when a gate
escalated before the flip (checksum divergence that survived repair, retrieval drift escalation);
`release` aborts cleanly (capture off, freeze lifted) for any other failure before the flip, and for
a run that did not cut over at all. After a clean flip neither runs: the dual-write tail holds.
"""
from __future__ import annotations

import datetime as dt
import time
from typing import Any

from . import db, ledger
from .spec import MigrationSpec

FAILED = {"failed", "upstream_failed"}
# Gates whose failure is an escalation: the migration itself is wrong, so the run is rolled back
# (before the flip that is an abort that also marks the run rolled_back), not merely released.
ESCALATIONS = ("checksum_gate", "retrieval_gate")
SOAK_SINCE = "soak_green_since"


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


# ---- window -------------------------------------------------------------------------------------

def window_verdict(spec: MigrationSpec, now: dt.datetime, waiting_since: dt.datetime
                   ) -> tuple[str, str, dt.datetime | None]:
    """("pass" | "wait" | "fail", message, next opening). No window: pass. Inside: pass. Outside: wait
    until the next opening, or fail at once when that opening is after the deadline
    (waiting_since + window_deadline_minutes), naming the window and the opening."""
    w = spec.window
    if w is None:
        return "pass", "no window declared: the flip may happen any time", None
    if w.contains(now):
        return "pass", f"inside the window {w.describe()}", None
    opening = w.next_open(now)
    if spec.window_deadline_minutes is not None:
        deadline = waiting_since + dt.timedelta(minutes=spec.window_deadline_minutes)
        if opening > deadline:
            return "fail", (f"the window {w.describe()} next opens at {opening.isoformat()}, after the deadline "
                            f"{deadline.isoformat()} (window_deadline_minutes={spec.window_deadline_minutes:g}); "
                            "nothing was flipped: re-run before the next window or raise window_deadline_minutes"
                            ), opening
    return "wait", f"outside the window {w.describe()}; next opening {opening.isoformat()}", opening


def record_wait(spec: MigrationSpec, run_id: str, message: str, opening: dt.datetime) -> None:
    """Ledger event 'wait_for_window' when the run defers until the window opens (timeline, incident note)."""
    with db.target(spec) as tgt:
        ledger.event(tgt, run_id, spec.name, "wait_for_window", {"message": message, "opening": opening.isoformat()})


# ---- soak ---------------------------------------------------------------------------------------

def soak_measure(spec: MigrationSpec, run_id: str) -> tuple[bool | None, str]:
    """One measurement without a freeze: (True green | None red | False failed, message).
    Green: capture drained within gates.max_lag_ops, dual_write_fail = 0, the checksum verdict still true,
    retrieval drift within delta_s_max where stores exist (the retrieval gate's judgement of fresh shadow
    reads). The exact count + checksum is retaken by the cutover under its write freeze."""
    from . import capture, retrieval

    parts, green = [], True
    if spec.capture.enabled and capture.is_on(spec):
        d = capture.drain(spec, run_id)
        if d["dual_write_fail"]:
            return False, f"dual_write_fail = {d['dual_write_fail']}: a captured change could not be applied"
        green &= d["lag"] <= spec.gates.max_lag_ops
        parts.append(f"lag {d['lag']} op(s) (max {spec.gates.max_lag_ops})")
        if spec.has_stores:  # Qdrant collections: the writes since the last pass, not only at release
            q = retrieval.sync_collections(spec, run_id)
            if q["dual_write_fail"]:
                return False, (f"dual_write_fail = {q['dual_write_fail']}: a Qdrant collection refused a write: "
                               + "; ".join(f"{s}: {r['refused'][:3]}" for s, r in q["stores"].items() if r["refused"]))
            if q["unavailable"]:  # the window stays; red until a pass gets through
                green = False
                parts.append("collection unreachable: " + "; ".join(q["unavailable"]))
            if q["stores"]:
                parts.append("collections " + ", ".join(f"{s} +{r['upserted']} -{r['deleted']}"
                                                        for s, r in q["stores"].items()))
    with db.target(spec) as tgt:
        m = ledger.metrics(tgt, run_id)
    if m.get("checksum_ok") is not True:
        return False, f"checksum_ok is {m.get('checksum_ok')!r}, not true"
    parts.append("checksum_ok true")
    if spec.has_stores:
        retrieval.shadow_reads(spec, run_id)
        status, msg = retrieval.retrieval_gate(spec, run_id, first_seen_at=None, now=utcnow())
        if status == "fail":
            return False, msg
        green &= status == "pass"
        parts.append(f"retrieval {status}")
    return (True if green else None), "; ".join(parts)


def soak_gate(spec: MigrationSpec, run_id: str, now: dt.datetime | None = None) -> tuple[bool | None, str]:
    """Pass after soak_minutes of continuous green measurements (the first green time is kept in the
    ledger, metric soak_green_since; a red measurement clears it). False fails the run at once."""
    now = now or utcnow()
    verdict, msg = soak_measure(spec, run_id)
    with db.target(spec) as tgt:
        since = ledger.metrics(tgt, run_id).get(SOAK_SINCE)
        if verdict is not True:
            ledger.set_metric(tgt, run_id, spec.name, SOAK_SINCE, None, commit=False)
            ledger.event(tgt, run_id, spec.name, "soak", {"green": False, "message": msg})
            return verdict, f"soak red, clock reset: {msg}"
        if since is None:
            since = now.isoformat()
            ledger.set_metric(tgt, run_id, spec.name, SOAK_SINCE, since, commit=False)
            ledger.event(tgt, run_id, spec.name, "soak", {"green": True, "since": since, "message": msg})
    green_for = (now - dt.datetime.fromisoformat(since)).total_seconds() / 60
    if green_for >= spec.soak_minutes:
        return True, f"soak green for {green_for:.2f} of {spec.soak_minutes:g} minute(s): {msg}"
    return None, f"soak green for {green_for:.2f} of {spec.soak_minutes:g} minute(s): {msg}"


# ---- routing and status -------------------------------------------------------------------------

def flipped(spec: MigrationSpec, run_id: str) -> bool:
    """True when the target is the primary for this run (cutover.state), i.e. an undo must flip back."""
    try:
        from . import cutover

        st = cutover.state(spec, run_id)
    except Exception:  # noqa: BLE001  no ledger / no cutover record yet: nothing was flipped
        return False
    return (st.get("primary") or st.get("primary_side")) == "target"


def needs_rollback(states: dict[str, str | None], is_flipped: bool) -> bool:
    """The rollback task runs cutover.rollback when the flip happened and anything failed, or when a gate
    escalated before the flip (checksum_gate / retrieval_gate failed). A clean flip holds (the tail)."""
    if is_flipped:
        return any(s in FAILED for s in states.values())
    return any(states.get(g) == "failed" for g in ESCALATIONS)


def needs_release(is_flipped: bool) -> bool:
    """The release task (abort: last drain, capture off, schema freeze lifted; idempotent) runs whenever the
    source is the primary at that point: any failure before the flip, a run that did not flip, and after a
    rollback (it lifts whatever hold is left)."""
    return not is_flipped


def status(states: dict[str, str | None], *, is_flipped: bool, dry_run: bool = False) -> str:
    """cutover | rolled_back | aborted | failed | success | dry_run for a run with the cutover stages.
    Tasks `rollback` / `release` are the undo tasks; their success decides rolled_back / aborted."""
    if dry_run:
        return "dry_run"
    if states.get("rollback") == "success":
        return "rolled_back"
    undo_failed = states.get("rollback") == "failed" or states.get("release") == "failed"
    others = {t: s for t, s in states.items() if t not in ("rollback", "release")}
    if undo_failed:
        return "failed"
    if any(s in FAILED for s in others.values()):
        return "failed" if is_flipped else "aborted"
    if is_flipped:
        return "cutover"
    return "success"


def drill(conf: dict | None, where: str) -> str | None:
    """Run conf `fail_at` rehearses a failure (a game day): "tail" fails the task after the flip, so the
    rollback path runs; "cutover.<step>" makes that cutover step fail (cutover's fail_at hook). Returns the
    part after `where` + "." (or "" for an exact match) when it applies here, else None."""
    at = (conf or {}).get("fail_at")
    if not isinstance(at, str):
        return None
    if at == where:
        return ""
    return at[len(where) + 1:] if at.startswith(where + ".") else None


def tail(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """After the flip: the target is the primary and reverse capture keeps the source current until
    `finish` (dbguard_<name>_finish, after rollback_ttl_minutes). Records when rollback stops being offered.
    With Qdrant stores, readers search the collections now: the tail carries the target's writes into them
    (cutover.readers.keep_current) until rollback_ttl_minutes is up or the run is rolled back / finished."""
    from .cutover import readers

    until = utcnow() + dt.timedelta(minutes=spec.rollback_ttl_minutes)
    out = {"primary": "target", "reverse_capture": True, "rollback_offered_until": until.isoformat()}
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, run_id, spec.name, "rollback_offered_until", out["rollback_offered_until"],
                          commit=False)
        ledger.event(tgt, run_id, spec.name, "tail", out)
    if readers.stores(spec):
        out["collections"] = readers.keep_current(spec, run_id, time.monotonic() + spec.rollback_ttl_minutes * 60)
        with db.target(spec) as tgt:
            ledger.event(tgt, run_id, spec.name, "tail.collections", out["collections"])
    return out


def rollback(spec: MigrationSpec, run_id: str | None, *, drop_target: bool = False,
             repair_from: str | None = None) -> dict[str, Any]:
    """The rollback DAG's one call: after a flip (or a half-done rollback) `cutover.rollback`, which resumes
    from its last checkpoint; before any flip the abort of stages.rollback (optionally dropping the target)."""
    from . import stages

    run_id = run_id or stages.latest_run(spec) or "rollback"
    try:
        from . import cutover

        phase = cutover.state(spec, run_id).get("phase")
    except Exception:  # noqa: BLE001  no cutover record: nothing was flipped
        phase = None
    if phase in ("cutover", "rolling_back"):  # cutover.state phases: before | cutover | rolling_back | ...
        return {"run_id": run_id, **cutover.rollback(spec, run_id, repair_from=repair_from)}
    return stages.rollback(spec, run_id, drop_target=drop_target)
