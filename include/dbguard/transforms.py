"""Per-column SQL expressions: what the copy selects and what the checksum hashes.

`source_expr` is what the copy selects on the source: the declared transform (vector normalisation, an
analyzer change), and for a changed `target_type` the SQL cast to it — the one conversion the copy, the
change capture (capture.values.cast_expr) and the checksum all make, so real -> double precision gives
0.100000001490116 everywhere instead of 0.1 in one place and the cast in another.

`checksum_exprs` is the canonical form hashed on each side: **two values whose text output differs hash
differently**, because that is what a user sees. A type's own hash follows its equality, which is looser
than its text: −0 = 0 (floats), 1.10 = 1.1 (numeric, also inside jsonb), '1 day' = '24 hours' (interval),
'[0:2]={1,2,3}' hashes like '{1,2,3}' (array bounds), 'A' = 'a' (citext, nondeterministic collations). So
each such type adds what its equality ignores, as cheaply as it can: floats their sign of zero (a text cast
for zeros only, also for float arrays that hold a zero), numerics their scale, arrays their bounds, jsonb, json,
interval and types without a hash function their text. Extension types go through text (their OIDs differ
between databases).
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
    if column.tgt_type != column.type:
        return sql.SQL("({})::{}").format(sql.Identifier(column.name), sql.SQL(column.tgt_type))
    return sql.Identifier(column.name)


_FLOAT = re.compile(r"^(real|float4|float8|double precision|float)\b")
_TEXT_HASHED = re.compile(r"^(jsonb|json|interval)\b")  # equality looser than the text: hash the text


def checksum_exprs(table: Table, column: Column, side: str, tolerance: float = 1e-6,
                   algorithm: str = "hash_record") -> list[sql.Composable]:
    """The canonical expressions hashed for this column on `side` ('source' or 'target'), in order.

    `tolerance` (the spec's gates.float_tolerance) rounds vector components after the transform.
    `algorithm` is checksum.Hashing's. "hash_record" (hash_record_extended over the row) needs values with
    an extended hash function and text under COLLATE "C"; what each type's equality ignores is added (see
    the module docstring). "md5" hashes record_send, whose binary forms already keep scale, sign of zero,
    array bounds and interval fields; extension types go through text.
    """
    from .stores import search, vector

    if (vs := vector.store_for(table, column.name)) is not None:
        return [vector.checksum_expr(table, vs, side, tolerance)]
    if (ss := search.store_for(table, column.name)) is not None and search.transforms_column(ss):
        return [search.checksum_expr(table, ss, side)]
    e = source_expr(table, column) if side == "source" else sql.Identifier(column.name)
    t = column.tgt_type
    text = sql.SQL("({})::text").format(e)
    if algorithm != "hash_record":
        return [e if is_builtin(t) else text]
    array = t.endswith("]")
    if not _HASHABLE.match(t) or _TEXT_HASHED.match(t) or (array and _NUMERIC.match(t)):
        return [text]
    if array:
        # the element hashes ignore bounds: add them where they are not the default [1:n]
        bounds = sql.SQL("CASE WHEN array_ndims({0}) <> 1 OR array_lower({0}, 1) <> 1 "
                         "THEN array_dims({0}) END").format(e)
        if _FLOAT.match(t):  # −0 hides as 0: the text of arrays holding a zero only (array_send: 2.5x dearer)
            return [e, bounds, sql.SQL("CASE WHEN 0 = ANY({0}) THEN ({0})::text END").format(e)]
        arr = sql.SQL('({}) COLLATE "C"').format(e) if _TEXTLIKE.match(t) else e
        return [arr, bounds]
    if _TEXTLIKE.match(t):
        return [sql.SQL('({}) COLLATE "C"').format(e)]
    if _FLOAT.match(t):  # −0 = 0 for the hash: add the text of zeros only (cheap)
        return [e, sql.SQL("CASE WHEN {0} = 0 THEN ({0})::text END").format(e)]
    if _NUMERIC.match(t):  # 1.10 = 1.1 for the hash: add the scale. NaN, ±Infinity and NULL hash alike (0) and
        # have no scale: name the special values (normal values keep the plain scale, so their hashes do not change)
        return [e, sql.SQL("coalesce(scale({0}), CASE WHEN {0} = 'NaN' THEN -1 WHEN {0} > 0 THEN -2 "
                           "WHEN {0} < 0 THEN -3 END)").format(e)]
    return [e]
