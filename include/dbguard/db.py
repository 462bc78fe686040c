"""Connections: conn_id -> DSN -> psycopg 3 connection with a canonical session.

Every connection dbguard opens pins the session settings that change how
values print (TimeZone, DateStyle, IntervalStyle, extra_float_digits,
bytea_output), so text produced on source and target is comparable.
"""
from __future__ import annotations

import os
import re
from contextlib import contextmanager
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import unquote

import psycopg
from psycopg import sql

from .errors import ConnectionFailed

if TYPE_CHECKING:
    from .spec import MigrationSpec

SESSION_SETTINGS = {
    "TimeZone": "UTC",
    "DateStyle": "ISO, YMD",
    "IntervalStyle": "postgres",
    "extra_float_digits": "1",
    "bytea_output": "hex",
    "application_name": "dbguard",
    # as pg_dump does: a row-level security policy that would filter a read raises instead, so COPY, counts
    # and checksums never agree on a silently filtered subset (preflight names the fix: BYPASSRLS)
    "row_security": "off",
}

# The Airflow layer installs a resolver that asks Airflow's connection store;
# the library alone reads AIRFLOW_CONN_<ID> (the same URIs Airflow accepts).
_resolver: Callable[[str], str | None] | None = None


def set_resolver(fn: Callable[[str], str | None] | None) -> None:
    global _resolver
    _resolver = fn


# The Airflow layer installs its secrets masker here, so task logs never show a password that a
# connection URI carried, whatever prints it.
_masker: Callable[[str], None] | None = None


def set_masker(fn: Callable[[str], None] | None) -> None:
    global _masker
    _masker = fn


def env_var(conn_id: str) -> str:
    return f"AIRFLOW_CONN_{conn_id.upper()}"


def dsn_for(conn_id: str) -> str:
    """Resolve a conn_id (or pass a DSN through) to a libpq URI."""
    if "://" in conn_id or "=" in conn_id:
        _check_utf8(None, conn_id)
        return conn_id
    uri = os.environ.get(env_var(conn_id))
    if not uri and _resolver is not None:
        uri = _resolver(conn_id)
    if not uri:
        raise ConnectionFailed(
            f"connection {conn_id!r} is not defined: set {env_var(conn_id)}=postgresql://user:pass@host:5432/db "
            f"or add it in Airflow (Admin > Connections); for the embedded servers run `dbguard embedded`"
        )
    if uri.startswith("postgres://"):  # Airflow's scheme; libpq wants postgresql://
        uri = "postgresql://" + uri[len("postgres://"):]
    if _masker is not None:
        for secret in secrets_in(uri):
            _masker(secret)
    _check_utf8(conn_id, uri)
    return uri


def _check_utf8(conn_id: str | None, uri: str) -> None:
    """psycopg decodes every conninfo value as UTF-8 (a UnicodeDecodeError, not a psycopg error, when a
    %-escape such as %ff decodes to other bytes): refuse such a URI by its conn id, not printing it."""
    try:
        psycopg.conninfo.conninfo_to_dict(uri)
    except UnicodeDecodeError:
        where = (f"connection {conn_id!r}: a %-escape in its URI ({env_var(conn_id)} or the Airflow connection)"
                 if conn_id else "a %-escape in the connection URI")
        raise ConnectionFailed(f"{where} decodes to bytes that are not UTF-8; write a literal % as %25 and other "
                               "characters as the %-escapes of their UTF-8 bytes") from None
    except psycopg.ProgrammingError:
        pass  # malformed otherwise: connect() says so, without the password


def redact(dsn: str) -> str:
    """A DSN safe to print: user@host:port/dbname, never the password."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(dsn)
    except (psycopg.ProgrammingError, UnicodeDecodeError):
        return "<unparseable connection URI>"
    host = info.get("host", "")
    return f"{info.get('user', '')}@{host or 'localhost'}:{info.get('port', '5432')}/{info.get('dbname', '')}"


_URI_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^:/@?#]*:([^@/?#]*)@", re.I)
_KV_PASSWORD = re.compile(r"(?:^|\s)password\s*=\s*('(?:[^'\\]|\\.)*'|\S+)", re.I)


def secrets_in(dsn: str) -> list[str]:
    """Every spelling of the password a DSN carries (raw and %-decoded), to scrub from messages.
    Works on DSNs libpq itself cannot parse (a bad %-escape is exactly when errors quote them)."""
    found = []
    for pat in (_URI_PASSWORD, _KV_PASSWORD):
        for m in pat.finditer(dsn):
            raw = m.group(1).strip("'")
            found += [raw, unquote(raw)]
    return sorted({s for s in found if len(s) >= 3}, key=len, reverse=True)


def scrub(text: str, dsn: str) -> str:
    """`text` with every password of `dsn` replaced by ***."""
    for secret in secrets_in(dsn):
        text = text.replace(secret, "***")
    return text


def connect(conn_id: str, *, autocommit: bool = False, dbname: str | None = None,
            connect_timeout: int = 10) -> psycopg.Connection:
    dsn = dsn_for(conn_id)
    kwargs: dict = {"autocommit": autocommit, "connect_timeout": connect_timeout}
    if dbname:
        kwargs["dbname"] = dbname
    try:
        conn = psycopg.connect(dsn, **kwargs)
    except psycopg.Error as e:  # OperationalError (unreachable) and ProgrammingError (malformed URI)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        hint = ("the connection URI is malformed (a %-escape in the password? write % as %25)"
                if isinstance(e, psycopg.ProgrammingError) else "check that the server runs")
        raise ConnectionFailed(
            f"cannot reach {conn_id!r} ({redact(dsn)}): {scrub(first, dsn)}; {hint} and that "
            f"{env_var(conn_id)} (or the Airflow connection) points at it"
        ) from None
    conn.execute(sql.SQL("SELECT {}").format(sql.SQL(", ").join(
        sql.SQL("set_config({}, {}, false)").format(sql.Literal(k), sql.Literal(v))
        for k, v in SESSION_SETTINGS.items()
        if k != "row_security" or conn.info.server_version >= 90500)))  # one round trip; RLS came in 9.5
    if not autocommit:
        conn.commit()
    return conn


@contextmanager
def connection(conn_id: str, **kw) -> Iterator[psycopg.Connection]:
    conn = connect(conn_id, **kw)
    try:
        yield conn
    finally:
        conn.close()


def source(spec: "MigrationSpec", **kw) -> psycopg.Connection:
    """A connection to the spec's source database."""
    return connect(spec.source.conn_id, **kw)


def target(spec: "MigrationSpec", **kw) -> psycopg.Connection:
    """A connection to the spec's target database (target.database when the spec names one)."""
    return connect(spec.target.conn_id, dbname=spec.target.database, **kw)


def qname(schema: str, name: str) -> sql.Composed:
    return sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name))


def server_version(conn: psycopg.Connection) -> int:
    return conn.info.server_version
