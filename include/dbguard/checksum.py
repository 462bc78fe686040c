"""The canonical typed row hash and range checksums, computed inside each database.

Row hash: the first 64 bits of md5 over `record_send(ROW(canonical columns))`.
record_send's binary form is typed and length-prefixed per column (so
'12'||'3' differs from '1'||'23', and NULL from ''), never case-folds,
carries timestamptz as UTC microseconds (session time zones cannot matter),
floats exactly, and numerics after `trim_scale` (so 0.710 equals .71, while
the text '.71' still differs from '0.71'). Text is sent in the client encoding
(UTF-8 here), so server encodings do not matter either.

Range checksum: (count, sum of row hashes) — order-independent, so the two
sides may scan in any order.
"""
from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

from .db import qname
from .ranges import KeyRange, predicate
from .spec import Table
from .transforms import checksum_expr


@dataclass(frozen=True)
class Checksum:
    count: int
    total: int  # sum of 64-bit row hashes (arbitrary precision)

    def to_dict(self) -> dict:
        return {"count": self.count, "sum": str(self.total)}


def relation(table: Table, side: str) -> sql.Composed:
    return qname(table.schema_, table.name) if side == "source" else qname(table.target_schema, table.target_name)


def row_hash(table: Table, side: str, tolerance: float = 1e-6) -> sql.Composable:
    """`tolerance` is the spec's gates.float_tolerance (vector components are rounded to it)."""
    cols = sql.SQL(", ").join(checksum_expr(table, c, side, tolerance) for c in table.columns)
    return sql.SQL("('x' || left(md5(record_send(ROW({}))), 16))::bit(64)::bigint").format(cols)


def checksum_query(table: Table, side: str, r: KeyRange | None = None, tolerance: float = 1e-6) -> sql.Composed:
    where = predicate(table, r) if r is not None else sql.SQL("true")
    return sql.SQL("SELECT count(*), coalesce(sum({h}), 0) FROM {t} WHERE {w}").format(
        h=row_hash(table, side, tolerance), t=relation(table, side), w=where)


def checksum(conn: psycopg.Connection, table: Table, side: str, r: KeyRange | None = None,
             tolerance: float = 1e-6) -> Checksum:
    count, total = conn.execute(checksum_query(table, side, r, tolerance)).fetchone()
    return Checksum(int(count), int(total))
