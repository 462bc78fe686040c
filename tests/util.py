"""Helpers for tests: build specs as dicts, run SQL, compare tables independently."""
from __future__ import annotations

import copy

import psycopg

from dbguard.spec import MigrationSpec, parse_spec


def spec(tables: list[dict], **top) -> MigrationSpec:
    raw = {"name": top.pop("name", "t"), "source": {"conn_id": "dbguard_source"},
           "target": {"conn_id": "dbguard_target", **top.pop("target", {})}, "tables": copy.deepcopy(tables)}
    raw.update(top)
    return parse_spec(raw)


def run(conn: psycopg.Connection, *statements: str) -> None:
    for s in statements:
        conn.execute(s)
    conn.commit()


def fingerprint(conn: psycopg.Connection, relation: str, order: str = "id") -> tuple[int, str]:
    """Independent of dbguard's checksum: row count and md5 of all rows' text in key order."""
    return conn.execute(
        f"SELECT count(*), md5(coalesce(string_agg(t::text, E'\\n' ORDER BY {order}), '')) FROM {relation} t"
    ).fetchone()
