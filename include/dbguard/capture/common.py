"""Shared pieces of change capture: the route (which database is origin, which destination),
names, the error type, cursor and control reads."""
from __future__ import annotations

import hashlib
import random
import time
from dataclasses import dataclass
from typing import Callable, TypeVar
import psycopg
from psycopg import sql

from .. import db, ledger
from ..errors import DbguardError
from ..spec import MigrationSpec, Table

SCHEMA = "dbguard"
STAGE_ON, STAGE_DRAIN, STAGE_OFF = "capture_on", "drain_changes", "capture_off"
DIRECTIONS = ("forward", "reverse")


class CaptureError(DbguardError):
    """Change capture could not be switched on/off or applied; the message names the object and the fix."""


# ---- the route -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Route:
    """One capture direction. forward: origin = source database (tables `schema.name`), destination =
    target database (`target_schema.target_name`). reverse (after cutover): the other way round.
    Ledger, control row and triggers live on the origin; cursor, batches and failures on the destination;
    both sides key every row by `direction` too, so the two never mix even in one database."""
    spec: MigrationSpec
    direction: str

    @property
    def tables(self) -> list[Table]:
        """The spec's tables with their resolved column lists (catalog.resolve: undeclared source columns
        added in source order, exclude_columns left out, generated columns marked). The trigger's row image
        and the applier's reading of it are both built from this list, whoever passed the spec in."""
        from .. import catalog

        return catalog.resolve(self.spec).tables

    @property
    def forward(self) -> bool:
        return self.direction == "forward"

    def origin(self, **kw) -> psycopg.Connection:
        return (db.source if self.forward else db.target)(self.spec, **kw)

    def dest(self, **kw) -> psycopg.Connection:
        return (db.target if self.forward else db.source)(self.spec, **kw)

    def origin_name(self, t: Table) -> tuple[str, str]:
        return (t.schema_, t.name) if self.forward else (t.target_schema, t.target_name)

    def dest_name(self, t: Table) -> tuple[str, str]:
        return (t.target_schema, t.target_name) if self.forward else (t.schema_, t.name)

    def origin_rel(self, t: Table) -> sql.Composed:
        return db.qname(*self.origin_name(t))

    def dest_rel(self, t: Table) -> sql.Composed:
        return db.qname(*self.dest_name(t))

    def stage(self, stage: str) -> str:
        """Run-ledger stage name: `capture_on` forward, `reverse_capture_on` reverse."""
        return stage if self.forward else f"reverse_{stage}"

    @property
    def label(self) -> str:
        return "source" if self.forward else "target"


def route(spec: MigrationSpec, direction: str = "forward") -> Route:
    if direction not in DIRECTIONS:
        raise CaptureError(f"direction {direction!r} is not valid; use 'forward' (source -> target) or "
                           "'reverse' (target -> source, after cutover)")
    return Route(spec, direction)


def record(spec: MigrationSpec, run_id: str, stage: str, detail: dict, **kw) -> None:
    """Run-ledger event (the run ledger always lives in the target database, whatever the direction)."""
    with db.target(spec) as tgt:
        ledger.ensure(tgt)
        ledger.event(tgt, run_id, spec.name, stage, detail, **kw)


# ---- names ---------------------------------------------------------------------------------

def _name(*parts: str) -> str:
    """A PostgreSQL identifier from parts, hashed down to 63 bytes when too long."""
    full = "_".join(parts)
    if len(full.encode()) <= 63:
        return full
    return full[:50] + "_" + hashlib.md5(full.encode()).hexdigest()[:12]


def _tag(direction: str) -> str:
    return "capture" if direction == "forward" else "capture_rev"


def trigger_name(spec: MigrationSpec, direction: str = "forward") -> str:
    return _name("dbguard_" + _tag(direction), spec.name)


def function_name(spec: MigrationSpec, table: Table, direction: str = "forward") -> str:
    r = route(spec, direction)
    return _name(_tag(direction), spec.name, *r.origin_name(table))


def truncate_function_name(spec: MigrationSpec, direction: str = "forward") -> str:
    return _name(_tag(direction), spec.name, "no_truncate")


def _source_rel(t: Table) -> sql.Composed:
    return db.qname(t.schema_, t.name)


def _target_rel(t: Table) -> sql.Composed:
    return db.qname(t.target_schema, t.target_name)


# ---- reads shared by the applier and the views ---------------------------------------------------

def _control(origin: psycopg.Connection, r: Route):
    """(run_id, capture_snapshot, capture_op_id) of this migration's control row for the direction."""
    if not origin.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
        return None
    return origin.execute("SELECT run_id, capture_snapshot, capture_op_id FROM dbguard.control "
                          "WHERE migration = %s AND direction = %s", (r.spec.name, r.direction)).fetchone()


CURSOR_FIELDS = ("prev_snapshot", "cur_snapshot", "op_cursor", "high_water", "applied", "batches", "target_rev")


def _cursor_state(dest: psycopg.Connection, r: Route, run_id: str) -> dict:
    if not dest.execute("SELECT to_regclass('dbguard.apply_cursor') IS NOT NULL").fetchone()[0]:
        return {}
    row = dest.execute("SELECT " + ", ".join(CURSOR_FIELDS) + " FROM dbguard.apply_cursor "
                       "WHERE migration = %s AND direction = %s AND run_id = %s",
                       (r.spec.name, r.direction, run_id)).fetchone()
    dest.rollback()
    return dict(zip(CURSOR_FIELDS, row)) if row else {}



# ---- taking locks without making the application a deadlock victim ------------------------------

T = TypeVar("T")
LOCK_ERRORS = (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected)
LOCK_STEP_MS = 400  # below PostgreSQL's default deadlock_timeout (1 s)


def lock_retrying(conn: psycopg.Connection, budget_ms: int, fn: Callable[[], T]) -> T:
    """Run `fn` (statements that take table locks, in `conn`'s transaction) with lock_timeout steps shorter
    than deadlock_timeout, rolling back and trying again until `budget_ms` is spent. An application
    transaction that locks the same tables in the other order then waits a moment instead of being chosen
    as a deadlock victim: dbguard gives way first. Re-raises the last lock error when the budget is spent."""
    deadline = time.monotonic() + budget_ms / 1000
    while True:
        step = max(1, int(min(LOCK_STEP_MS, (deadline - time.monotonic()) * 1000)))
        try:
            conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{step}ms")))
            return fn()
        except LOCK_ERRORS:
            conn.rollback()
            if time.monotonic() >= deadline:
                raise
            _cancel_autovacuum(conn)
            time.sleep(random.uniform(0.005, 0.03))


# PostgreSQL cancels an autovacuum that blocks a lock request once the request has waited deadlock_timeout;
# steps shorter than that never trigger it, so right after a freshly loaded table's auto-ANALYZE a trigger
# could not be created within any budget (seen by bench scale). Do what the server would: cancel (never
# terminate) autovacuum workers of this database, except anti-wraparound ones; they run again later.
_AUTOVACUUM_CANCEL = """SELECT count(*) FILTER (WHERE pg_cancel_backend(pid)) FROM pg_stat_activity
WHERE backend_type = 'autovacuum worker' AND datname = current_database()
  AND query NOT LIKE '%to prevent wraparound%'"""


def _cancel_autovacuum(conn: psycopg.Connection) -> None:
    try:
        conn.execute(_AUTOVACUUM_CANCEL)
    except psycopg.Error:  # no privilege (superuser or pg_signal_autovacuum_worker): wait for it instead
        pass
    conn.rollback()
