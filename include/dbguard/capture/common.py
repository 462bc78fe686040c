"""Shared pieces of change capture: names, relations, the error type, cursor and control reads."""
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

SCHEMA = "dbguard"
STAGE_ON, STAGE_DRAIN, STAGE_OFF = "capture_on", "drain_changes", "capture_off"


class CaptureError(DbguardError):
    """Change capture could not be switched on/off or applied; the message names the object and the fix."""


# ---- names ---------------------------------------------------------------------------------

def _name(*parts: str) -> str:
    """A PostgreSQL identifier from parts, hashed down to 63 bytes when too long."""
    full = "_".join(parts)
    if len(full.encode()) <= 63:
        return full
    return full[:50] + "_" + hashlib.md5(full.encode()).hexdigest()[:12]


def trigger_name(spec: MigrationSpec) -> str:
    return _name("dbguard_capture", spec.name)


def function_name(spec: MigrationSpec, table: Table) -> str:
    return _name("capture", spec.name, table.schema_, table.name)


def truncate_function_name(spec: MigrationSpec) -> str:
    return _name("capture", spec.name, "no_truncate")


def _source_rel(t: Table) -> sql.Composed:
    return db.qname(t.schema_, t.name)


def _target_rel(t: Table) -> sql.Composed:
    return db.qname(t.target_schema, t.target_name)


def _control(src: psycopg.Connection, spec: MigrationSpec):
    if not src.execute("SELECT to_regclass('dbguard.control') IS NOT NULL").fetchone()[0]:
        return None
    return src.execute("SELECT run_id, capture_snapshot, capture_op_id FROM dbguard.control WHERE migration = %s",
                       (spec.name,)).fetchone()


def _cursor_state(tgt: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict:
    if not tgt.execute("SELECT to_regclass('dbguard.apply_cursor') IS NOT NULL").fetchone()[0]:
        return {}
    row = tgt.execute("SELECT prev_snapshot, cur_snapshot, op_cursor, high_water, applied, batches, target_rev "
                      "FROM dbguard.apply_cursor WHERE migration = %s AND run_id = %s", (spec.name, run_id)).fetchone()
    tgt.rollback()
    return dict(zip(("prev_snapshot", "cur_snapshot", "op_cursor", "high_water", "applied", "batches", "target_rev"),
                    row)) if row else {}

