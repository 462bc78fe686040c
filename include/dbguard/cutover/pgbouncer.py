"""The pgbouncer pointer: applications connect to an alias of a PgBouncer (pool_mode = transaction);
the flip rewrites that alias's [databases] entry to the other server and reloads.

Order (both directions): PAUSE <alias> before the write freeze (pooled clients queue inside PgBouncer
instead of waiting on the database's locks, which PAUSE itself would wait for), rewrite + RELOAD at the
pointer step, RESUME after the freeze commits, or on any failure (after pointing back). The admin console
takes simple queries only; psycopg sends a parameterless execute as one, and the alias is a plain
identifier (spec Ident), so the statements are built from it safely.
"""
from __future__ import annotations

import re
from pathlib import Path

import psycopg

from .. import db
from ..errors import DbguardError
from ..spec import MigrationSpec

KEYS = ("host", "port", "dbname", "user")


def admin(spec: MigrationSpec) -> psycopg.Connection:
    p = spec.cutover.pgbouncer
    return psycopg.connect(host=p.host, port=p.port, user=p.user, dbname="pgbouncer", autocommit=True,
                           connect_timeout=5)


def _where(spec: MigrationSpec, side: str) -> dict[str, str]:
    with (db.source if side == "source" else db.target)(spec) as c:
        i = c.info
        return {"host": i.host, "port": str(i.port), "dbname": i.dbname, "user": i.user}


def _entry(spec: MigrationSpec) -> tuple[list[str], int, dict[str, str]]:
    """(ini lines, index of the alias line, its key=value settings)."""
    p = spec.cutover.pgbouncer
    path = Path(p.config)
    if not path.is_file():
        raise DbguardError(f"cutover.pgbouncer.config: {path} is not a file; give the pgbouncer ini path")
    lines = path.read_text().splitlines()
    section = None
    for i, line in enumerate(lines):
        s = line.strip()
        if s.startswith("["):
            section = s.strip("[]").strip().lower()
        elif section == "databases" and re.match(rf"^{re.escape(p.database)}\s*=", s):
            value = s.split("=", 1)[1]
            return lines, i, dict(kv.split("=", 1) for kv in value.split() if "=" in kv)
    raise DbguardError(f"cutover.pgbouncer.database: no entry {p.database!r} in [databases] of {path}; add one "
                       "(alias = host=... port=... dbname=...)")


def point(spec: MigrationSpec, side: str, conn: psycopg.Connection | None = None) -> dict:
    """Rewrite the alias to `side` and RELOAD (the alias stays paused when it was)."""
    lines, i, settings = _entry(spec)
    settings.update(_where(spec, side))
    lines[i] = f"{spec.cutover.pgbouncer.database} = " + " ".join(f"{k}={v}" for k, v in settings.items())
    Path(spec.cutover.pgbouncer.config).write_text("\n".join(lines) + "\n")
    with admin(spec) if conn is None else _borrow(conn) as a:
        a.execute("RELOAD")
    return {"kind": "pgbouncer", "write_target": side, "entry": {k: settings[k] for k in KEYS if k in settings}}


class _borrow:
    def __init__(self, conn):
        self.conn = conn

    def __enter__(self):
        return self.conn

    def __exit__(self, *a):
        return False


def current(spec: MigrationSpec) -> str | None:
    """Which side the alias points at now (None when neither)."""
    _, _, settings = _entry(spec)
    for side in ("source", "target"):
        w = _where(spec, side)
        if all(settings.get(k) == w[k] for k in ("host", "port", "dbname")):
            return side
    return None


def pause(spec: MigrationSpec) -> psycopg.Connection:
    a = admin(spec)
    a.execute(f"PAUSE {spec.cutover.pgbouncer.database}")  # Ident: a plain identifier
    return a


def resume(a: psycopg.Connection, spec: MigrationSpec) -> None:
    try:
        a.execute(f"RESUME {spec.cutover.pgbouncer.database}")
    finally:
        a.close()


def reachable(spec: MigrationSpec) -> str | None:
    try:
        _entry(spec)
        with admin(spec) as a:
            a.execute("SHOW VERSION")
    except (DbguardError, psycopg.Error, OSError) as e:
        return f"pgbouncer admin console / config not usable: {(str(e).strip().splitlines() or ['?'])[0]}"
    return None
