"""The control flags applications read (dual_write, read_source), one row per migration and direction."""
from __future__ import annotations

from ..spec import MigrationSpec
from .common import route
from .triggers import SOURCE_DDL

_OFF = {"dual_write": False, "read_source": True, "run_id": None}


def set_flags(spec: MigrationSpec, *, dual_write: bool | None = None, read_source: bool | None = None,
              direction: str = "forward") -> dict:
    """Change the flags applications read (cutover flips read_source)."""
    r = route(spec, direction)
    with r.origin() as src:
        src.execute(SOURCE_DDL)
        src.execute(
            """INSERT INTO dbguard.control (migration, direction, dual_write, read_source)
               VALUES (%(m)s, %(dir)s, coalesce(%(d)s, false), coalesce(%(r)s, true))
               ON CONFLICT (migration, direction) DO UPDATE SET
                 dual_write = coalesce(%(d)s, dbguard.control.dual_write),
                 read_source = coalesce(%(r)s, dbguard.control.read_source), updated_at = clock_timestamp()""",
            {"m": spec.name, "dir": direction, "d": dual_write, "r": read_source})
        src.commit()
    return flags(spec, direction)


def flags(spec: MigrationSpec, direction: str = "forward") -> dict:
    r = route(spec, direction)
    with r.origin() as src:
        if not src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
            return dict(_OFF)
        row = src.execute("SELECT dual_write, read_source, run_id FROM dbguard.control WHERE migration = %s "
                          "AND direction = %s", (spec.name, direction)).fetchone()
    return dict(zip(("dual_write", "read_source", "run_id"), row)) if row else dict(_OFF)
