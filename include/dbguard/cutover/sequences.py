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


def _seq(conn: psycopg.Connection, rel: sql.Composed, col: str) -> str | None:
    """The column's own sequence (serial, identity), else the one its default draws from (nextval of a
    sequence no column owns)."""
    return conn.execute(
        "SELECT coalesce(pg_get_serial_sequence(%(r)s, %(c)s), (SELECT d.refobjid::regclass::text FROM pg_attrdef ad "
        "JOIN pg_attribute a ON a.attrelid = ad.adrelid AND a.attnum = ad.adnum JOIN pg_depend d ON d.classid = "
        "'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass JOIN pg_class s ON "
        "s.oid = d.refobjid AND s.relkind = 'S' WHERE ad.adrelid = %(r)s::regclass AND a.attname = %(c)s LIMIT 1))",
        {"r": rel.as_string(conn), "c": col}).fetchone()[0]


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
    out = []
    for t in spec.tables:
        for c in t.columns:
            old_seq = _seq(old, _rel(t, old_side), c.name)
            new_seq = _seq(new, _rel(t, new_side), c.name)
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
