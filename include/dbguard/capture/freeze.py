"""The write freeze: lock the origin tables briefly and drain to zero lag."""
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
from .common import *  # noqa: F401,F403
from .common import _source_rel
from .applier import drain


@contextmanager
def quiesced(spec: MigrationSpec, run_id: str, *, timeout_s: float = 60):
    """Briefly freeze source writes on the migrated tables and drain the ledger to zero lag.

    Holds SHARE locks on the migrated tables (writers wait, readers do not) and an EXCLUSIVE lock
    on the control table (applications that read the flags FOR SHARE wait too) until the block
    ends; then commits. Yields (source connection, info); info["freeze_ms"] is set on exit.
    """
    info: dict[str, Any] = {"drained": 0}
    with db.source(spec) as src:
        src.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{spec.capture.ddl_lock_timeout_ms}ms")))
        t0 = time.monotonic()
        try:
            if src.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is not None:
                src.execute("LOCK TABLE dbguard.control IN EXCLUSIVE MODE")
            for t in spec.tables:
                src.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(_source_rel(t)))
        except psycopg.errors.LockNotAvailable as e:
            raise CaptureError(f"could not freeze writes within capture.ddl_lock_timeout_ms="
                               f"{spec.capture.ddl_lock_timeout_ms} ({e.diag.message_primary}); a long "
                               "transaction holds a migrated table; retry") from None
        while True:
            d = drain(spec, run_id)
            info["drained"] += d["applied"]
            info["dual_write_fail"] = d["dual_write_fail"]
            if d["lag"] == 0:
                break
            if time.monotonic() - t0 > timeout_s:
                raise CaptureError(f"the change ledger did not drain to zero within {timeout_s:.0f} s of the "
                                   f"write freeze (lag {d['lag']}); an open transaction may hold changes")
        yield src, info
        src.commit()
        info["freeze_ms"] = round((time.monotonic() - t0) * 1000, 1)

