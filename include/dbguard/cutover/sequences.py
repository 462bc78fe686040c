"""Sequences and identity columns: after a flip, the new primary's sequences start past every value the
old primary used, so an insert without a key never collides (`pg_get_serial_sequence` on both sides, or the
sequence a column's default draws from)."""
from __future__ import annotations

import psycopg
from psycopg import sql

from .. import db
from ..errors import DbguardError
from ..spec import MigrationSpec


def _rel(t, side: str) -> sql.Composed:
    return db.qname(t.schema_, t.name) if side == "source" else db.qname(t.target_schema, t.target_name)


def _seqs(conn: psycopg.Connection, pairs: list[tuple[sql.Composed, str]]) -> list[str | None]:
    """For each (relation, column): the column's own sequence (serial, identity), else the one its default draws
    from (nextval of a sequence no column owns). One round trip for all: this runs under the write freeze."""
    if not pairs:
        return []
    rels, cols = [r.as_string(conn) for r, _ in pairs], [c for _, c in pairs]
    return [r[0] for r in conn.execute(
        "SELECT coalesce(pg_get_serial_sequence(x.r, x.c), (SELECT d.refobjid::regclass::text FROM pg_attrdef ad "
        "JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum JOIN pg_depend d ON d.classid = "
        "'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass JOIN pg_class s ON "
        "s.oid = d.refobjid AND s.relkind = 'S' WHERE ad.adrelid = x.r::regclass AND a.attname = x.c LIMIT 1)) "
        "FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS x(r, c, n) ORDER BY x.n", (rels, cols)).fetchall()]


def _used(conn: psycopg.Connection, rel: sql.Composed, col: str, seq: str | None) -> int | None:
    """The highest value used: max(last value of the sequence, max(column))."""
    last = conn.execute("SELECT pg_sequence_last_value(%s::regclass)", (seq,)).fetchone()[0] if seq else None
    top = conn.execute(sql.SQL("SELECT max({}) FROM {}").format(sql.Identifier(col), rel)).fetchone()[0]
    vals = [int(v) for v in (last, top) if v is not None]
    return max(vals) if vals else None


def sync(old: psycopg.Connection, new: psycopg.Connection, spec: MigrationSpec, old_side: str) -> list[dict]:
    """Set every sequence-backed column's sequence on the new primary past the old primary's values.
    `old`/`new` are connections to the old and the new primary; raises naming the column when the new side
    lacks the sequence the old side has."""
    new_side = "target" if old_side == "source" else "source"
    cols = [(t, c) for t in spec.tables for c in t.columns]
    olds = _seqs(old, [(_rel(t, old_side), c.name) for t, c in cols])
    news = _seqs(new, [(_rel(t, new_side), c.name) for t, c in cols])
    out = []
    for (t, c), old_seq, new_seq in zip(cols, olds, news):
        if old_seq is None and new_seq is None:
            continue
        if new_seq is None:
            raise DbguardError(f"tables[{t.name}].columns[{c.name}]: the {old_side} has sequence {old_seq} but the "
                               f"{new_side} column owns none; recreate it as identity/serial on the {new_side} "
                               "(preflight does for new targets)")
        value = max((v for v in (_used(old, _rel(t, old_side), c.name, old_seq),
                                 _used(new, _rel(t, new_side), c.name, new_seq)) if v is not None), default=None)
        if value is not None:
            new.execute("SELECT setval(%s::regclass, %s, true)", (new_seq, value))
        out.append({"table": t.ref, "column": c.name, "sequence": new_seq, "set_to": value})
    return out
