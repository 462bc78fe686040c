"""The per-range proof of a backfill: the bytes the relay carried, against the bytes the target gives back.

The source side costs nothing extra: the copy reads the range from the source in key order
(`COPY (SELECT <copied columns> ... ORDER BY key) TO STDOUT`) and the relay hashes that stream as it
passes (xxh3-128, in C: about 10 GB/s, a rounding error beside the copy). The target side reads the
same range back from the transaction that wrote it, same columns, same format, same key order (text keys
under COLLATE "C" on both sides, as the ranges compare them), under the session settings every dbguard
connection pins (DateStyle, IntervalStyle, TimeZone, extra_float_digits, bytea_output), and hashes that
stream. The range verifies when the row counts and the digests are equal.

Equal bytes is exact for every type, including the ones whose equality is looser than what a user sees:
−0 and 0, NaN, an array's lower bounds ('[2:3]={1,2}'), `json` whitespace and key order, numeric scale,
interval fields all change the bytes (binary COPY sends a float's bits, an array's bounds, a numeric's
scale; text COPY their text). A trigger or rule that alters rows as they land, a foreign write into the
range, a target column type that differs from the spec: all change the bytes read back.

Declared changes compare through the declared expression: the source read IS the copy's select list
(transforms.source_expr: a `target_type` is cast on the source), so the source stream is what the target
should hold. Tables the stream cannot prove exactly fall back to the SQL checksum (checksum.py) on both
sides, as before: a vector or search store (normalisation and re-analysis, compared with the spec's float
tolerance), and a generated column (re-generated on the target, never carried, so only a checksum sees it).
`spec.backfill.verify` = "checksum" forces the SQL checksum everywhere.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import psycopg
import xxhash
from psycopg import pq, sql

from .checksum import Checksum, relation
from .ranges import KeyRange, order_by, predicate
from .spec import MigrationSpec, Table
from .transforms import source_expr


class StreamDigest:
    """xxh3-128 over a COPY stream, fed in the ~1 MB pieces `backfill.copy_out` yields, and its row count
    (copy_out sets `messages`: one CopyData message a row, plus the trailer in binary format)."""

    def __init__(self, fmt: str):
        self.fmt, self.h, self.messages = fmt, xxhash.xxh3_128(), 0

    def update(self, chunk) -> None:
        self.h.update(chunk)

    @property
    def rows(self) -> int:
        return max(self.messages - 1, 0) if self.fmt == "binary" else self.messages

    def checksum(self) -> Checksum:
        """As the ledger keeps a range's proof: (rows, the 128-bit digest as an integer)."""
        return Checksum(self.rows, self.h.intdigest())


def fallback_reason(spec: MigrationSpec, table: Table) -> str | None:
    """Why this table's ranges are proven by the SQL checksum instead of the stream, or None."""
    if spec.backfill.verify == "checksum":
        return "backfill.verify: checksum"
    if table.vector or table.search:
        return "a vector or search store transforms its column (compared within gates.float_tolerance)"
    if any(c.generated for c in table.columns):
        return "a generated column is re-generated on the target, not carried by the stream"
    return None


def _opts(fmt: str) -> sql.Composable:
    return sql.SQL("(FORMAT binary)") if fmt == "binary" else sql.SQL("")


def source_query(table: Table, r: KeyRange, fmt: str) -> sql.Composed:
    """The copy's source read, in key order so the target read-back can be compared byte for byte."""
    return sql.SQL("COPY (SELECT {cols} FROM {t} WHERE {w} ORDER BY {ob}) TO STDOUT {o}").format(
        cols=sql.SQL(", ").join(source_expr(table, c) for c in table.copy_columns), t=relation(table, "source"),
        w=predicate(table, r), ob=order_by(table), o=_opts(fmt))


def target_query(table: Table, r: KeyRange, fmt: str) -> sql.Composed:
    return sql.SQL("COPY (SELECT {cols} FROM {t} WHERE {w} ORDER BY {ob}) TO STDOUT {o}").format(
        cols=sql.SQL(", ").join(sql.Identifier(c.name) for c in table.copy_columns),
        t=relation(table, "target"), w=predicate(table, r), ob=order_by(table), o=_opts(fmt))


def read_back(tgt: psycopg.Connection, table: Table, r: KeyRange, fmt: str) -> Checksum:
    """Digest of the range as the target holds it now (in the copy's own transaction), streamed."""
    from .backfill import copy_out  # backfill imports this module

    d = StreamDigest(fmt)
    with index_order(tgt):
        for _ in copy_out(tgt, target_query(table, r, fmt).as_bytes(tgt), digest=d):
            pass
    return d.checksum()


PLANNER_SETTINGS = ("enable_sort", "enable_bitmapscan")


@contextlib.contextmanager
def index_order(conn: psycopg.Connection) -> Iterator[None]:
    """Read in key order along the key's index, for the rest of this statement only.

    The rows the copy just wrote have no statistics yet, so the planner guesses a few thousand rows in the
    range and picks a bitmap scan plus a sort: at 250,000 rows a 140 MB external merge on disk, and a fifth
    more target CPU than walking the primary key's index, which already yields the key order. The previous
    values come back afterwards (SET LOCAL would last until the copy's transaction ends)."""
    before = [(n, conn.execute("SELECT current_setting(%s)", (n,)).fetchone()[0]) for n in PLANNER_SETTINGS]
    for n, _ in before:
        conn.execute("SELECT set_config(%s, 'off', true)", (n,))
    try:
        yield
    finally:
        if not conn.closed and conn.info.transaction_status == pq.TransactionStatus.INTRANS:
            for n, v in before:
                conn.execute("SELECT set_config(%s, %s, true)", (n, v))
