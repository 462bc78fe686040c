"""Scratch databases for benchmarks: one per name on each embedded server, exported as the default conn ids."""
from __future__ import annotations

import psycopg
from psycopg import sql

from dbguard import embedded


def _each_server(name: str, create: bool) -> dict[str, str]:
    out = {}
    for conn_id, uri in embedded.ensure_default().items():
        with psycopg.connect(uri, autocommit=True) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            if create:
                c.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                                  "TEMPLATE template0").format(sql.Identifier(name)))
        out[conn_id] = embedded.with_dbname(uri, name)
    return out


def fresh_databases(name: str) -> dict[str, str]:
    """(Re)create database `name` on the source and target servers; AIRFLOW_CONN_DBGUARD_* point at them."""
    dsns = _each_server(name, create=True)
    embedded.export_env(dsns, override=True)
    return dsns


def drop_databases(name: str) -> None:
    _each_server(name, create=False)
