"""The control flags applications read (dual_write, read_source)."""
from __future__ import annotations

import hashlib
import re
import time
from contextlib import contextmanager, nullcontext
from typing import Any, Callable, Iterable

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .. import db, ledger
from ..errors import DbguardError
from ..spec import MigrationSpec, Table
from .triggers import SOURCE_DDL


def set_flags(spec: MigrationSpec, *, dual_write: bool | None = None, read_source: bool | None = None) -> dict:
    """Change the flags applications read (cutover flips read_source)."""
    with db.source(spec) as src:
        src.execute(SOURCE_DDL)
        src.execute(
            """INSERT INTO dbguard.control (migration, dual_write, read_source)
               VALUES (%(m)s, coalesce(%(d)s, false), coalesce(%(r)s, true))
               ON CONFLICT (migration) DO UPDATE SET
                 dual_write = coalesce(%(d)s, dbguard.control.dual_write),
                 read_source = coalesce(%(r)s, dbguard.control.read_source), updated_at = clock_timestamp()""",
            {"m": spec.name, "d": dual_write, "r": read_source})
        src.commit()
    return flags(spec)


def flags(spec: MigrationSpec) -> dict:
    with db.source(spec) as src:
        if not src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
            return {"dual_write": False, "read_source": True, "run_id": None}
        row = src.execute("SELECT dual_write, read_source, run_id FROM dbguard.control WHERE migration = %s",
                          (spec.name,)).fetchone()
    return dict(zip(("dual_write", "read_source", "run_id"), row)) if row else \
        {"dual_write": False, "read_source": True, "run_id": None}

