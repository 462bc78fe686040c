"""Where applications send their writes.

pgbouncer: see pgbouncer.py (the control row is kept in step as a record).

control_table (default): the `dbguard.control` row of the migration (direction 'forward') on the SOURCE:
`read_source` and `write_target` ('source' | 'target'). An application reads it FOR SHARE at the start
of each transaction (README, "Cutover and rollback"); the cutover's freeze holds the row locked, so a
reader waits for the flip and then sees the new value.
"""
from __future__ import annotations

import psycopg

from ..capture.triggers import SOURCE_DDL
from ..spec import MigrationSpec

ADD_COLUMN = ("ALTER TABLE dbguard.control ADD COLUMN IF NOT EXISTS write_target text NOT NULL DEFAULT 'source' "
              "CHECK (write_target IN ('source', 'target'))")


def prepare(src: psycopg.Connection, spec: MigrationSpec) -> None:
    """Before any freeze (DDL on the control table): the control row and its write_target column exist."""
    if src.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is None:
        src.execute(SOURCE_DDL)
    if not src.execute("SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = 'dbguard.control'::regclass "
                       "AND attname = 'write_target' AND NOT attisdropped)").fetchone()[0]:
        src.execute(ADD_COLUMN)
    src.execute("INSERT INTO dbguard.control (migration, direction) VALUES (%s, 'forward') "
                "ON CONFLICT DO NOTHING", (spec.name,))


def point(src: psycopg.Connection, spec: MigrationSpec, side: str) -> dict:
    """Send the application to `side`, in `src`'s transaction (the caller commits it with the phase)."""
    assert side in ("source", "target")
    out = {"kind": "control_table", "write_target": side}
    if spec.cutover.pointer == "pgbouncer":  # the alias moves; the control row says the same, for state()
        from . import pgbouncer
        out = pgbouncer.point(spec, side)
    src.execute("UPDATE dbguard.control SET write_target = %s, read_source = %s, updated_at = clock_timestamp() "
                "WHERE migration = %s AND direction = 'forward'", (side, side == "source", spec.name))
    return out


def current(src: psycopg.Connection, spec: MigrationSpec) -> str | None:
    if spec.cutover.pointer == "pgbouncer":
        from . import pgbouncer
        return pgbouncer.current(spec)
    try:
        row = src.execute("SELECT write_target FROM dbguard.control WHERE migration = %s AND direction = 'forward'",
                          (spec.name,)).fetchone()
    except psycopg.errors.UndefinedColumn:
        src.rollback()
        return "source"
    except psycopg.errors.UndefinedTable:
        src.rollback()
        return "source"
    return row[0] if row else "source"


def reachable(src: psycopg.Connection, spec: MigrationSpec) -> str | None:
    """None when the pointer can be flipped, else why not."""
    if spec.cutover.pointer == "pgbouncer":
        from . import pgbouncer
        return pgbouncer.reachable(spec)
    return None


def hold(spec: MigrationSpec):
    """Before a freeze: pgbouncer pauses the alias (pooled clients queue in PgBouncer), bounded like the freeze's
    locks; None otherwise."""
    if spec.cutover.pointer == "pgbouncer":
        from . import pgbouncer
        return pgbouncer.pause(spec, spec.cutover.lock_timeout_ms * (spec.cutover.retries + 1))
    return None


def release(spec: MigrationSpec, held, side: str) -> str:
    """After a freeze: RESUME the alias `hold` paused, only once it points at `side` (the committed primary).
    What happened, in words ("... left PAUSED ..." when it could not)."""
    from . import pgbouncer
    return pgbouncer.resume(spec, side, held)[1]


def unpause(spec: MigrationSpec, side: str) -> str | None:
    """A crashed cutover or rollback leaves a pgbouncer alias paused: resume it on `side` (the committed
    primary). None when there is nothing to do."""
    if spec.cutover.pointer != "pgbouncer":
        return None
    from . import pgbouncer
    try:
        if not pgbouncer.paused(spec):
            return None
    except (psycopg.Error, OSError):
        return None  # the admin console is not reachable: check_ready names that
    ok, msg = pgbouncer.resume(spec, side)
    if not ok:
        from ..errors import DbguardError
        raise DbguardError(f"the pgbouncer alias was left paused by an earlier attempt: {msg}")
    return msg
