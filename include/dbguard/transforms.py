"""Per-column SQL expressions: what the copy selects and what the checksum hashes.

`source_expr` is the declared transform applied while copying (identity for
plain columns). `checksum_expr` is the canonical form hashed on each side:
after the transform on the source, cast to the target type when the type
changes, numeric trailing zeros trimmed, extension types (whose type OIDs
differ between databases) hashed through their text form.
"""
from __future__ import annotations

import re

from psycopg import sql

from .spec import Column, Table

# Built-in types keep the same OID in every PostgreSQL database, so their
# binary send form (inside record_send) is comparable across servers.
_BUILTIN = re.compile(
    r"^(smallint|integer|int|int2|int4|int8|bigint|numeric|decimal|real|float4|float8|double precision|float"
    r"|text|character varying|varchar|character|char|bpchar|name|boolean|bool|date|time|timetz|timestamp|timestamptz"
    r"|interval|uuid|json|jsonb|bytea|inet|cidr|macaddr|macaddr8|money|bit|bit varying|varbit|oid|tsvector|xml)"
    r"\b"
)
# Types with an extended hash function (usable inside hash_record_extended), and arrays of them.
_HASHABLE = re.compile(
    r"^(smallint|integer|int|int2|int4|int8|bigint|numeric|decimal|real|float4|float8|double precision|float"
    r"|text|character varying|varchar|character|char|bpchar|name|boolean|bool|date|time|timetz|timestamp"
    r"|timestamptz|interval|uuid|jsonb|bytea|inet|cidr|macaddr|macaddr8|oid)\b"
)
_NUMERIC = re.compile(r"^(numeric|decimal)\b")
_TEXTLIKE = re.compile(r"^(text|character varying|varchar|character|char|bpchar|name|citext)\b")


def base_type(type_: str) -> str:
    return type_.removesuffix("[]") if not type_.endswith("[][]") else type_.rstrip("[]")


def is_builtin(type_: str) -> bool:
    return bool(_BUILTIN.match(type_))


def is_textlike(type_: str) -> bool:
    return bool(_TEXTLIKE.match(type_)) and not type_.endswith("]")


def source_expr(table: Table, column: Column) -> sql.Composable:
    """The expression the copy selects on the source for this column."""
    from .stores import search, vector  # store transforms: L2 normalisation, analyzer change

    if (vs := vector.store_for(table, column.name)) is not None:
        return vector.source_expr(table, vs)
    if (ss := search.store_for(table, column.name)) is not None:
        return search.source_expr(table, ss)
    return sql.Identifier(column.name)


def checksum_expr(table: Table, column: Column, side: str, tolerance: float = 1e-6,
                  algorithm: str = "hash_record") -> sql.Composable:
    """The canonical expression hashed for this column on `side` ('source' or 'target').

    `tolerance` (the spec's gates.float_tolerance) rounds vector components after the transform.
    `algorithm` is checksum.Hashing's: for "hash_record" the value must have an extended hash
    function (else its text is hashed) and text hashes under COLLATE "C" (a nondeterministic
    collation would hash 'A' like 'a'); for "md5" (record_send) numerics are trimmed and
    extension types, whose OIDs differ between databases, go through text.
    """
    from .stores import search, vector

    if (vs := vector.store_for(table, column.name)) is not None:
        return vector.checksum_expr(table, vs, side, tolerance)
    if (ss := search.store_for(table, column.name)) is not None and search.transforms_column(ss):
        return search.checksum_expr(table, ss, side)
    if side == "source":
        expr: sql.Composable = source_expr(table, column)
        if column.tgt_type != column.type:
            expr = sql.SQL("({})::{}").format(expr, sql.SQL(column.tgt_type))
    else:
        expr = sql.Identifier(column.name)
    t = column.tgt_type
    if algorithm == "hash_record":
        if not _HASHABLE.match(t):
            return sql.SQL("({})::text").format(expr)
        if _TEXTLIKE.match(t):
            return sql.SQL('({}) COLLATE "C"').format(expr)
        return expr
    if _NUMERIC.match(t):
        expr = sql.SQL("trim_scale({})").format(expr) if not t.endswith("]") else expr
    if not is_builtin(t):
        expr = sql.SQL("({})::text").format(expr)
    return expr
