"""Qdrant -> pgvector: a collection into a table of the target database, one row per point.

The point id becomes the key (bigint for integer ids, uuid for UUID ids), the gated vector a
vector(dim) column (after the declared transform), and each declared payload field a typed column,
decoded with the payload encodings of `qdrant_payload` (the ones pgvector -> Qdrant writes), so a
value round-trips exactly or preflight refuses it. The proof reads the table back into points with
the same encoders (`qdrant_copy.Source`: key text, vector_send, typed columns) and reduces both sides
with the same hash as every other shape.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from ..db import qname
from ..spec import Column, CollectionMove, QdrantCollection, Table, VectorStore
from . import qdrant_copy, qdrant_payload
from .qdrant_source import SPoint, transform


def table_spec(move: CollectionMove) -> tuple[Table, VectorStore]:
    """The target table as a spec Table + VectorStore (what `qdrant_copy.Source` and the probes read)."""
    t = move.pgvector
    cols = [Column(name=t.key, type=t.key_type, nullable=False), *(Column(name=p.name, type=p.type)
                                                                    for p in t.payload),
            Column(name=t.column, type=f"vector({move.source.dim})")]
    store = VectorStore(column=t.column, dim=move.source.dim, source_metric=move.target_metric,
                        source_normalized=move.target_normalized,
                        metric=move.target_metric, index=t.index, embed_model=move.embed_model,
                        qdrant=QdrantCollection(collection="unused", payload=[p.name for p in t.payload]))
    return Table(name=t.table, schema=t.schema_, key=[t.key], columns=cols, vector=[store]), store


def decoders(move: CollectionMove) -> list[tuple]:
    """(column, payload key, type, decode, encode) per payload column, for the preflight's round trip. The
    decode rounds as the column will (real: float32, read back as its shortest text; numeric(p,s): s digits), so a value the column
    would change fails the round trip before anything is written."""
    return [(p.name, p.key, p.type, _as_stored(p.type, qdrant_payload.decoder(p.type)), qdrant_payload.encoder(p.type))
            for p in move.pgvector.payload]


def _as_stored(sql_type: str, dec):
    import decimal
    import re

    base, is_array = qdrant_payload.base_type(sql_type)
    one = None
    if base in ("real", "float4"):
        one = lambda x: float(str(np.float32(x)))  # noqa: E731  a real reads back as its shortest text
    scale = re.search(r"numeric\s*\(\s*\d+\s*,\s*(\d+)\s*\)", sql_type)
    if base in ("numeric", "decimal") and scale:
        q = decimal.Decimal(1).scaleb(-int(scale.group(1)))
        one = lambda x: x.quantize(q)  # noqa: E731
    if one is None:
        return dec
    fix = lambda v: None if v is None or not isinstance(v, (float, decimal.Decimal)) or v != v else one(v)  # noqa: E731
    return (lambda v: None if dec(v) is None else [fix(x) for x in dec(v)]) if is_array else (lambda v: fix(dec(v)))


def table_problems(conn: psycopg.Connection, move: CollectionMove, where: str) -> list[str]:
    """An existing target table must have the declared columns with the declared types."""
    t = move.pgvector
    rows = conn.execute("SELECT a.attname, format_type(a.atttypid, a.atttypmod) FROM pg_attribute a JOIN pg_class r "
                        "ON r.oid = a.attrelid JOIN pg_namespace n ON n.oid = r.relnamespace WHERE n.nspname = %s "
                        "AND r.relname = %s AND a.attnum > 0 AND NOT a.attisdropped", (t.schema_, t.table)).fetchall()
    conn.rollback()
    if not rows:
        return []
    have = dict(rows)
    want = {t.key: t.key_type, t.column: f"vector({move.source.dim})",
            **{p.name: qdrant_payload.base_type(p.type)[0] + ("[]" if p.type.endswith("[]") else "")
               for p in t.payload}}
    out = []
    for col, typ in want.items():
        got = have.get(col)
        base = qdrant_payload.base_type(got)[0] + ("[]" if got and got.endswith("[]") else "") if got else None
        if got is None or (base != typ and got != typ):
            out.append(f"{where}: target table {t.schema_}.{t.table} column {col!r} is {got or 'missing'}, the spec "
                       f"says {typ}; drop the table or fix pgvector.{'payload' if col not in (t.key, t.column) else col}")
    return out


def create_table(conn: psycopg.Connection, move: CollectionMove) -> bool:
    """CREATE the target table when missing (True if created)."""
    t = move.pgvector
    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(t.schema_)))
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (qname(t.schema_, t.table).as_string(conn),)
                          ).fetchone()[0]
    if not exists:
        cols = [sql.SQL("{} {} PRIMARY KEY").format(sql.Identifier(t.key), sql.SQL(t.key_type))]
        cols += [sql.SQL("{} {}").format(sql.Identifier(p.name), sql.SQL(p.type)) for p in t.payload]
        cols.append(sql.SQL("{} vector({})").format(sql.Identifier(t.column), sql.Literal(move.source.dim)))
        conn.execute(sql.SQL("CREATE TABLE {} ({})").format(qname(t.schema_, t.table), sql.SQL(", ").join(cols)))
    conn.commit()
    return not exists


def expecter(move: CollectionMove):
    """Source point -> the row as a point: the gated vector (transformed), the declared fields by column."""
    gated, cols = move.source.vector_name or "", [(p.name, p.key) for p in move.pgvector.payload]

    def expect(pt: SPoint) -> SPoint:
        v = pt.vectors.get(gated)
        return SPoint(pt.id, {c: pt.payload.get(k) for c, k in cols},
                      {"": transform(move, np.asarray(v, dtype=np.float32))} if v is not None else {})
    return expect


class Side:
    """The target table as the target side of `qdrant_move` (one connection, committed per call)."""

    kind = "pgvector"
    cosine: set[str] = set()

    def __init__(self, conn: psycopg.Connection, move: CollectionMove):
        self.conn, self.move = conn, move
        self.table, self.store = table_spec(move)
        self.source = qdrant_copy.Source(conn, self.table, self.store)
        t = move.pgvector
        self.decode = [(p.name, qdrant_payload.decoder(p.type), qdrant_payload.base_type(p.type)[0] in
                        ("json", "jsonb")) for p in t.payload]
        names = [t.key, *(p.name for p in t.payload), t.column]
        self.upsert = sql.SQL("INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({k}) DO UPDATE SET {set}").format(
            t=qname(t.schema_, t.table), cols=sql.SQL(", ").join(map(sql.Identifier, names)),
            vals=sql.SQL(", ").join([sql.Placeholder()] * (len(names) - 1) + [sql.SQL("%s::vector")]),
            k=sql.Identifier(t.key),
            set=sql.SQL(", ").join(sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(n)) for n in names[1:]))
        self.remove = sql.SQL("DELETE FROM {} WHERE {}::text = ANY(%s)").format(qname(t.schema_, t.table),
                                                                                  sql.Identifier(t.key))

    def stored(self, p: SPoint) -> SPoint:
        return p  # pgvector keeps the float32 vector as sent

    def _row(self, p: SPoint) -> tuple:
        vals: list[Any] = [int(p.id) if self.move.pgvector.key_type == "bigint" else p.id]
        for col, dec, is_json in self.decode:
            v = p.payload.get(col)
            vals.append(Jsonb(v) if is_json and v is not None else dec(v))
        v = p.vectors.get("")
        vals.append(None if v is None else "[" + ",".join(repr(float(x)) for x in v) + "]")
        return tuple(vals)

    def write(self, points: list[SPoint]) -> None:
        if points:
            with self.conn.cursor() as cur:
                cur.executemany(self.upsert, [self._row(p) for p in points])
            self.conn.commit()

    def _spoints(self, pts) -> list[SPoint]:
        return [SPoint(p.id, p.payload, {"": p.vector}) for p in pts]

    def read(self, ids: list[str]) -> list[SPoint]:
        if not ids:
            return []
        s = self.source
        q = s.select + sql.SQL(" AND {}::text = ANY(%s)").format(s.key)
        rows = self.conn.execute(q, (ids,)).fetchall()
        self.conn.rollback()
        return self._spoints(s._points(rows))

    def scan(self, lo, hi) -> list[SPoint]:
        return self._spoints(self.source.range(lo, hi))

    def delete(self, ids: list[str]) -> None:
        if ids:
            self.conn.execute(self.remove, (ids,))
            self.conn.commit()
