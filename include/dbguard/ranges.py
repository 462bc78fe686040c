"""Key ranges: one value shared by backfill, reconcile and repair.

A `KeyRange` is [lo, hi) over a table's key columns in key order; `None`
means unbounded, so the first and last ranges of a plan also cover keys
outside what the source held at planning time (extra rows in the target).
Bounds are kept as the key values' text forms (JSON-able for XCom) and cast
back to the column type in SQL. Text keys compare under COLLATE "C" on both
sides: byte order is the same in every database, whatever their collations.
"""
from __future__ import annotations

from dataclasses import dataclass, asdict
from typing import Iterable

import psycopg
from psycopg import sql

from .db import qname
from .spec import Table
from .transforms import is_builtin, is_textlike


@dataclass(frozen=True)
class KeyRange:
    table: str
    range_id: int
    lo: tuple[str, ...] | None  # inclusive
    hi: tuple[str, ...] | None  # exclusive

    def __post_init__(self):
        if self.lo is not None and self.hi is not None and len(self.lo) != len(self.hi):
            raise ValueError("lo and hi must have the same number of key columns")

    @property
    def label(self) -> str:
        fmt = lambda b: ",".join(b)  # noqa: E731
        lo = fmt(self.lo) if self.lo is not None else "-inf"
        hi = fmt(self.hi) if self.hi is not None else "+inf"
        return f"{self.table} #{self.range_id} [{lo} .. {hi})"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lo"] = list(self.lo) if self.lo is not None else None
        d["hi"] = list(self.hi) if self.hi is not None else None
        d["label"] = self.label
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "KeyRange":
        return cls(d["table"], int(d["range_id"]),
                   tuple(d["lo"]) if d.get("lo") is not None else None,
                   tuple(d["hi"]) if d.get("hi") is not None else None)

    def split(self, bounds: Iterable[tuple[str, ...]], first_id: int = 0) -> list["KeyRange"]:
        """Cut at the given interior boundaries (sorted, strictly inside)."""
        edges = [self.lo, *bounds, self.hi]
        return [KeyRange(self.table, first_id + i, edges[i], edges[i + 1]) for i in range(len(edges) - 1)]


def _ordered(expr: sql.Composable, type_: str) -> sql.Composable:
    """A key value as ranges compare it, the same on both servers: text under COLLATE "C" (byte order);
    a user-defined type (domain, enum, composite) as its text under COLLATE "C", because its order depends
    on what each database defines (a domain over text follows the database collation, an enum its labels'
    creation order). Such keys cannot use an index for range scans; built-in keys keep theirs."""
    if is_textlike(type_):
        return sql.SQL('{} COLLATE "C"').format(expr)
    if not is_builtin(type_):
        return sql.SQL('({})::text COLLATE "C"').format(expr)
    return expr


def key_exprs(table: Table, alias: str | None = None) -> list[sql.Composable]:
    return [_ordered(sql.Identifier(alias, k) if alias else sql.Identifier(k), table.column(k).type)
            for k in table.key]


def key_row(table: Table, alias: str | None = None) -> sql.Composable:
    return sql.SQL("({})").format(sql.SQL(", ").join(key_exprs(table, alias)))


def _bound_row(table: Table, values: tuple[str, ...]) -> sql.Composable:
    parts = []
    for k, v in zip(table.key, values):
        t = table.column(k).type
        lit = sql.SQL("{}::{}").format(sql.Literal(v), sql.SQL(t)) if is_builtin(t) else sql.Literal(v)
        parts.append(_ordered(lit, t))
    return sql.SQL("({})").format(sql.SQL(", ").join(parts))


def predicate(table: Table, r: KeyRange, alias: str | None = None) -> sql.Composable:
    conds: list[sql.Composable] = []
    row = key_row(table, alias)
    if r.lo is not None:
        conds.append(sql.SQL("{} >= {}").format(row, _bound_row(table, r.lo)))
    if r.hi is not None:
        conds.append(sql.SQL("{} < {}").format(row, _bound_row(table, r.hi)))
    return sql.SQL(" AND ").join(conds) if conds else sql.SQL("true")


def order_by(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(key_exprs(table))


def key_text(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in table.key)


def plan(conn: psycopg.Connection, table: Table, batch_rows: int, within: KeyRange | None = None,
         schema: str | None = None, name: str | None = None) -> list[KeyRange]:
    """Cut the table (or one range of it) into ranges of about `batch_rows` rows each.

    Boundaries are real keys taken every `batch_rows` rows in key order, so
    gaps in the key space never produce empty or oversized ranges.
    """
    within = within or KeyRange(table.ref, 0, None, None)
    q = sql.SQL(
        "SELECT {kt} FROM (SELECT {keys}, row_number() OVER (ORDER BY {ob}) AS rn FROM {t} WHERE {p}) s "
        "WHERE rn % {n} = 1 AND rn > 1 ORDER BY rn"
    ).format(kt=key_text(table), keys=sql.SQL(", ").join(map(sql.Identifier, table.key)),
             ob=order_by(table), t=qname(schema or table.schema_, name or table.name),
             p=predicate(table, within), n=sql.Literal(batch_rows))
    bounds = [tuple(row) for row in conn.execute(q).fetchall()]
    return within.split(bounds)
