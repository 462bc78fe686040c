"""What the flip and the flip back share: the step names, the timed step (with its test hook), the state read,
and the whole-table verify under a freeze."""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import signal
import time
from typing import Any

from .. import catalog, db, ledger
from ..errors import DbguardError
from ..reconcile import Sides
from ..spec import MigrationSpec
from . import pointer, state as st

CUTOVER_STEPS = ("prepare", "count", "freeze", "verify", "sequences", "reverse_capture", "fence", "pointer", "unfreeze",
                 "resume", "forward_capture_off")
CUTOVER_COMMITTED = ("resume", "forward_capture_off")  # after the flip's commit: reported, never undone
ROLLBACK_STEPS = ("freeze", "verify", "sequences", "fence_target", "pointer", "unfreeze", "reverse_capture_off",
                  "release")
# rollback checkpoints that survive an interruption (the ones before `pointer` start over from the freeze)
DURABLE = ("pointer", "unfreeze", "reverse_capture_off", "release")


class CutoverError(DbguardError):
    """A cutover or rollback step failed; the message names the step, the cause and what state was left."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class Steps:
    """Times each step, records `cutover.<step>` events, raises CutoverError naming the failing step.

    `fail_at` is a test hook that puts a fault at an exact point: "<step>" raises before the step does
    anything; "<step>:after" raises once the step's work is done (a COMMIT the server completed whose reply
    was lost); "<step>:kill" SIGKILLs this process once the step's work is done (a worker host dying there)."""

    def __init__(self, spec: MigrationSpec, run_id: str, kind: str, fail_at: str | None):
        self.spec, self.run_id, self.kind, self.fail_at = spec, run_id, kind, fail_at
        self.done: list[dict] = []

    @contextlib.contextmanager
    def step(self, name: str):
        t0, at = time.monotonic(), now()
        ok = False
        try:
            if self.fail_at == name:
                raise CutoverError(f"injected failure at {self.kind} step {name!r} (test hook fail_at)")
            yield
            if self.fail_at == f"{name}:kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if self.fail_at == f"{name}:after":
                raise CutoverError(f"injected failure after {self.kind} step {name!r} did its work (test hook "
                                   "fail_at)")
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


def resume(spec: MigrationSpec, held, side: str) -> str:
    """RESUME the alias a freeze paused, on `side` (the committed primary); CutoverError when it stays PAUSED."""
    msg = pointer.release(spec, held, side)
    if "PAUSED" in msg:
        raise CutoverError(msg)
    return msg


def resolve(spec: MigrationSpec) -> MigrationSpec:
    return catalog.resolve(spec)


def state(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """phase (before | cutover | rolling_back | rolled_back | finished), primary (source | target), pointer
    (what the pointer says now), checkpoints and timestamps."""
    with db.source(spec) as src:
        s = st.read(src, spec, run_id)
        s["pointer_says"] = pointer.current(src, spec)
    s["primary"] = s.pop("primary_side")
    s["pointer"] = s.get("pointer") or spec.cutover.pointer
    return s


def verify_full(spec: MigrationSpec) -> dict[str, Any]:
    """Count + checksum of every table on both sides (both at once); any mismatch raises. No repair: under
    the freeze nothing may change, and after a drained ledger a difference is a real defect."""
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
