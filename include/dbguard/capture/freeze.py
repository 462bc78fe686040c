"""The write freeze: lock the origin's migrated tables briefly (bounded, retried) and drain to zero lag."""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Iterator

import psycopg
from psycopg import sql

from ..spec import MigrationSpec
from .applier import drain
from .common import LOCK_ERRORS, CaptureError, Route, lock_retrying, route

BLOCKERS = """
SELECT DISTINCT a.pid, a.state, a.application_name, extract(epoch FROM clock_timestamp() - a.xact_start)::int
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE l.granted AND l.pid <> pg_backend_pid() AND l.relation = ANY(%s::regclass[])
ORDER BY 1 LIMIT 5
"""


def _blockers(r: Route) -> str:
    """Who holds locks on the origin's migrated tables right now (pid, state, application, transaction age);
    no query text, which may carry data."""
    try:
        with r.origin(autocommit=True) as c:
            rels = [r.origin_rel(t).as_string(c) for t in r.spec.tables]
            rows = c.execute(BLOCKERS, (rels,)).fetchall()
    except psycopg.Error:
        return "unknown (could not read pg_locks)"
    if not rows:
        return "a transaction that has ended since"
    return ", ".join(f"pid {p} ({s or '?'}, application {a or '-'!r}, transaction open {age} s)"
                     for p, s, a, age in rows)


def _lock(src: psycopg.Connection, r: Route, lock_timeout_ms: int) -> None:
    """Control table, then every migrated table; in steps shorter than deadlock_timeout, so an application
    transaction locking them in another order waits a moment instead of failing with a deadlock."""
    def take() -> None:
        if src.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is not None:
            src.execute("LOCK TABLE dbguard.control IN EXCLUSIVE MODE")
        for t in r.spec.tables:
            src.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(r.origin_rel(t)))

    lock_retrying(src, lock_timeout_ms, take)


@contextmanager
def quiesced(spec: MigrationSpec, run_id: str, direction: str = "forward", *, timeout_s: float = 60,
             lock_timeout_ms: int | None = None, retries: int = 0) -> Iterator[tuple[psycopg.Connection, dict]]:
    """Briefly freeze writes on the ORIGIN's migrated tables and drain the ledger to zero lag.

    Holds SHARE locks on the migrated tables (writers wait, readers do not) and an EXCLUSIVE lock on the
    control table (applications that read the flags FOR SHARE wait too) until the block ends; then commits.
    Locks are taken with a bounded lock_timeout (default capture.ddl_lock_timeout_ms); a timed-out attempt is
    rolled back and retried up to `retries` times with a short backoff, so it never waits behind a long
    transaction forever (gh-ost's cut-over lock). Yields (origin connection, info); info["freeze_ms"] is set
    on exit, info["attempts"] counts lock attempts.
    """
    r = route(spec, direction)
    timeout_ms = lock_timeout_ms or spec.capture.ddl_lock_timeout_ms
    field = "capture.ddl_lock_timeout_ms" if lock_timeout_ms is None else "lock_timeout_ms"
    info: dict[str, Any] = {"drained": 0, "direction": direction, "attempts": 0}
    src = None
    for attempt in range(retries + 1):
        info["attempts"] = attempt + 1
        src = r.origin()
        try:
            _lock(src, r, timeout_ms)
            break
        except LOCK_ERRORS:
            src.close()
            src = None
            if attempt == retries:
                raise CaptureError(
                    f"could not freeze writes on the {r.label}'s migrated tables ({direction}) within "
                    f"{field}={timeout_ms} after {retries + 1} attempt(s): held by {_blockers(r)}; end that "
                    f"transaction, or raise {field} (or the retries)") from None
            time.sleep(min(0.1 * 2 ** attempt, 2.0))
    assert src is not None
    t0 = time.monotonic()
    try:
        while True:
            d = drain(spec, run_id, direction)
            info["drained"] += d["applied"]
            info["dual_write_fail"] = d["dual_write_fail"]
            info["failed_op_ids"] = d["failed_op_ids"]
            if d["lag"] == 0:
                break
            if time.monotonic() - t0 > timeout_s:
                raise CaptureError(f"the change ledger ({direction}) did not drain to zero within {timeout_s:.0f} s "
                                   f"of the write freeze (lag {d['lag']}); an open transaction may hold changes")
        yield src, info
        src.commit()
        info["freeze_ms"] = round((time.monotonic() - t0) * 1000, 1)
    finally:
        src.close()
