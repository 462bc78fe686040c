"""The pgbouncer pointer: applications connect to an alias of a PgBouncer (pool_mode = transaction);
the flip rewrites that alias's [databases] entry to the other server and reloads.

Order (both directions): PAUSE <alias> before the write freeze (pooled clients queue inside PgBouncer
instead of waiting on the database's locks, which PAUSE itself would wait for), rewrite + RELOAD at the
pointer step, RESUME after the freeze commits, or on any failure (after pointing back). The admin console
takes simple queries only; psycopg sends a parameterless execute as one, and the alias is a plain
identifier (spec Ident), so the statements are built from it safely.

What the rewrite keeps: only host, port and dbname move; the entry's other settings (the application's own
`user`, pool settings) stay, so applications keep logging in as themselves. PAUSE waits for every server
connection of the alias to finish its transaction, so it is bounded (`pause`). A PAUSE outlives the admin
connection that sent it (a crashed dbguard leaves the alias paused), so RESUME is sent only once the alias
points at the side that is the committed primary (`resume`), and a resumed cutover or rollback resumes an
alias it finds paused (`unpause`).
"""
from __future__ import annotations

import contextlib
import re
import select
import time
from pathlib import Path

import psycopg

from .. import db
from ..errors import DbguardError
from ..spec import MigrationSpec

KEYS = ("host", "port", "dbname")  # what the flip moves; `user` and the rest stay the application's


def admin(spec: MigrationSpec) -> psycopg.Connection:
    p = spec.cutover.pgbouncer
    return psycopg.connect(host=p.host, port=p.port, user=p.user, dbname="pgbouncer", autocommit=True,
                           connect_timeout=5)


def _where(spec: MigrationSpec, side: str) -> dict[str, str]:
    with (db.source if side == "source" else db.target)(spec) as c:
        i = c.info
        return {"host": i.host, "port": str(i.port), "dbname": i.dbname}


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
    return {"kind": "pgbouncer", "write_target": side, "entry": {k: settings[k] for k in (*KEYS, "user")
                                                                  if k in settings}}


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


def pause(spec: MigrationSpec, timeout_ms: int) -> psycopg.Connection:
    """PAUSE the alias within `timeout_ms`; PAUSE waits for every transaction holding one of the alias's server
    connections, so past the bound the request is withdrawn (RESUME) and the error names the wait."""
    db_ = spec.cutover.pgbouncer.database  # Ident: a plain identifier
    a = admin(spec)
    pg = a.pgconn
    pg.send_query(f"PAUSE {db_}".encode())
    deadline = time.monotonic() + timeout_ms / 1000
    while True:
        pg.consume_input()
        if not pg.is_busy():
            break
        left = deadline - time.monotonic()
        if left <= 0:
            a.close()
            with contextlib.suppress(psycopg.Error), admin(spec) as b:
                b.execute(f"RESUME {db_}")
            raise DbguardError(f"pgbouncer: PAUSE {db_} did not complete within {timeout_ms} ms (cutover."
                               "lock_timeout_ms x (retries + 1)): a client holds a server connection of the alias "
                               "in a transaction; the pause was withdrawn (RESUME), nothing was frozen. End that "
                               "transaction (SHOW SERVERS on the admin console names it) or raise the bound")
        select.select([pg.socket], [], [], left)
    errors = []
    while (res := pg.get_result()) is not None:
        if res.error_message:
            errors.append(res.error_message.decode(errors="replace").strip())
    if errors:
        a.close()
        raise DbguardError(f"pgbouncer: PAUSE {db_} failed: {errors[0]}")
    return a


def paused(spec: MigrationSpec) -> bool:
    db_ = spec.cutover.pgbouncer.database
    with admin(spec) as a:
        cur = a.execute("SHOW DATABASES")
        col = [d.name for d in cur.description].index("paused")
        return any(r[0] == db_ and int(r[col] or 0) for r in cur.fetchall())


def resume(spec: MigrationSpec, side: str, a: psycopg.Connection | None = None) -> tuple[bool, str]:
    """RESUME the alias, but only when it points at `side` (the committed primary): after a failed re-point,
    releasing the clients would send them to the wrong side. (ok, what happened) — never raises."""
    db_ = spec.cutover.pgbouncer.database
    try:
        try:
            now = current(spec)
            if now != side:
                point(spec, side)  # once more; it failed or was rolled back
                now = current(spec)
        except (DbguardError, psycopg.Error, OSError) as e:
            now = f"? ({(str(e).strip().splitlines() or ['?'])[0]})"
        if now != side:
            return False, (f"pgbouncer alias {db_} left PAUSED: it points at {now}, not at the {side}, the primary; "
                           f"fix its [databases] entry, RELOAD, then RESUME {db_} on the admin console")
        for conn in ([a] if a is not None else []) + [None]:
            try:
                with (admin(spec) if conn is None else conn) as c:
                    c.execute(f"RESUME {db_}")
                return True, f"pgbouncer alias {db_} resumed on the {side}"
            except psycopg.Error as e:
                if "not paused" in str(e):
                    return True, f"pgbouncer alias {db_} was not paused (on the {side})"
                last = (str(e).strip().splitlines() or ["?"])[0]
        return False, (f"pgbouncer alias {db_} left PAUSED: RESUME failed ({last}); run RESUME {db_} on the admin "
                       "console")
    finally:
        if a is not None:
            a.close()


def reachable(spec: MigrationSpec) -> str | None:
    try:
        _entry(spec)
        with admin(spec) as a:
            a.execute("SHOW VERSION")
    except (DbguardError, psycopg.Error, OSError) as e:
        return f"pgbouncer admin console / config not usable: {(str(e).strip().splitlines() or ['?'])[0]}"
    return None
