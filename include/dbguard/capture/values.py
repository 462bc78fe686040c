"""How a captured value travels: as its exact text output, cast back to the destination column's type.

The trigger writes each column as `NEW.col::text` (money as `::numeric::text`, since money's text
depends on lc_monetary); the applier casts that text to the destination column's catalog type. Text
output re-read by the type's input function gives the same value for every type a schema uses (floats
print shortest-exact, numeric keeps its scale, arrays keep bounds and NULLs, json keeps its spelling),
provided the few settings that change how values print are pinned: those are SET on the trigger
function, and only the ones a table's types need (each SET costs time on every captured row).
"""
from __future__ import annotations

from dataclasses import dataclass

import psycopg
from psycopg import sql

# Leaf type OIDs whose text output depends on a session setting.
FLOATS = {700, 701, 600, 601, 602, 603, 604, 628, 718}  # float4/8 and the geometric types built on float8
DATES = {1082, 1114, 1184}  # date, timestamp, timestamptz: DateStyle
INTERVALS = {1186}
MONEY = 790
FIRST_USER_OID = 16384  # types created by extensions and users; their output may use any of the settings

SETTINGS = {  # what the destination session (db.SESSION_SETTINGS) parses
    "floats": ("extra_float_digits", "1"),
    "dates": ("DateStyle", "ISO, YMD"),
    "intervals": ("IntervalStyle", "postgres"),
}


@dataclass(frozen=True)
class ColumnInfo:
    name: str
    type_sql: str  # format_type(): quoted and schema-qualified as needed, safe to splice as a type name
    base_oid: int  # the type under any domains
    builtin: bool  # type lives in pg_catalog (exists under the same name on every server)
    generated: bool  # GENERATED ALWAYS AS (...) STORED: never written, it regenerates
    identity: str  # '' | 'a' (GENERATED ALWAYS: inserts need OVERRIDING SYSTEM VALUE) | 'd'
    leaves: frozenset[int]  # every type reachable through arrays, domains, composites, ranges

    @property
    def money(self) -> bool:
        return self.base_oid == MONEY


_TYPE = """SELECT t.typtype, t.typelem, t.typbasetype, t.typrelid, t.typcategory,
                  (SELECT rngsubtype FROM pg_range WHERE rngtypid = t.oid),
                  (SELECT rngtypid FROM pg_range WHERE rngmultitypid = t.oid)
           FROM pg_type t WHERE t.oid = %s"""


def _leaves(conn: psycopg.Connection, oid: int, cache: dict[int, frozenset[int]], depth: int = 0) -> frozenset[int]:
    if oid in cache:
        return cache[oid]
    cache[oid] = frozenset({oid})  # cycle guard
    row = conn.execute(_TYPE, (oid,)).fetchone()
    out = {oid}
    if row and depth < 12:
        typtype, elem, base, relid, cat, rsub, rng = row
        nxt = [elem] if (cat == "A" and elem) else []
        nxt += [base] if typtype == "d" else []
        nxt += [r for r in (rsub, rng) if r]
        if typtype == "c" and relid:
            nxt += [a for (a,) in conn.execute("SELECT atttypid FROM pg_attribute WHERE attrelid = %s AND attnum > 0 "
                                               "AND NOT attisdropped", (relid,)).fetchall()]
        for n in nxt:
            out |= _leaves(conn, int(n), cache, depth + 1)
    cache[oid] = frozenset(out)
    return cache[oid]


def columns(conn: psycopg.Connection, schema: str, name: str, *, leaves: bool = True) -> dict[str, ColumnInfo]:
    """Catalog facts of every column of schema.name ({} when the table does not exist). The applier needs no
    `leaves` (only the trigger's settings do), which saves a catalog round trip per type."""
    rows = conn.execute(
        """WITH RECURSIVE base(oid, b, depth) AS (
               SELECT a.atttypid, a.atttypid, 0 FROM pg_attribute a
               WHERE a.attrelid = to_regclass(%(rel)s) AND a.attnum > 0 AND NOT a.attisdropped
               UNION ALL
               SELECT base.oid, t.typbasetype, depth + 1 FROM base JOIN pg_type t ON t.oid = base.b
               WHERE t.typtype = 'd' AND depth < 20)
           SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.atttypid,
                  (SELECT b FROM base WHERE base.oid = a.atttypid ORDER BY depth DESC LIMIT 1),
                  t.typnamespace = 'pg_catalog'::regnamespace, a.attgenerated <> '', a.attidentity::text
           FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid
           WHERE a.attrelid = to_regclass(%(rel)s) AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum""",
        {"rel": sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name)).as_string(conn)}).fetchall()
    cache: dict[int, frozenset[int]] = {}
    return {r[0]: ColumnInfo(r[0], r[1], int(r[3]), bool(r[4]), bool(r[5]), (r[6] or "").strip(),
                             _leaves(conn, int(r[2]), cache) if leaves else frozenset({int(r[2])}))
            for r in rows}


def settings_clause(infos: list[ColumnInfo]) -> sql.Composable:
    """SET clauses for a trigger function: only the settings these columns' types print under."""
    leaves = set().union(*(i.leaves for i in infos)) if infos else set()
    need = [k for k, oids in (("floats", FLOATS), ("dates", DATES), ("intervals", INTERVALS)) if leaves & oids]
    if "floats" not in need and any(o >= FIRST_USER_OID for o in leaves):
        need.insert(0, "floats")  # extension types (cube, ...) may print floats through extra_float_digits
    return sql.SQL(" ").join(sql.SQL("SET {} = {}").format(sql.Identifier(SETTINGS[k][0]), sql.Literal(SETTINGS[k][1]))
                             for k in need)


def text_expr(record: str, col: str, info: ColumnInfo | None) -> sql.Composable:
    """A column's value as exact text inside the trigger (`NEW.col::text`; money through numeric)."""
    ref = sql.SQL("{}.{}").format(sql.SQL(record), sql.Identifier(col))
    if info is not None and info.money:
        return sql.SQL("{}::numeric::text").format(ref)
    return sql.SQL("{}::text").format(ref)


def cast_expr(text: sql.Composable, origin: ColumnInfo | None, dest: ColumnInfo) -> sql.Composable:
    """Text -> the destination column's type. A changed built-in type converts through the origin type first,
    the same conversion a copy makes (real -> double precision gives 0.100000001490116, not 0.1)."""
    if dest.money or (origin is not None and origin.money):
        return sql.SQL("{}::numeric::{}").format(text, sql.SQL(dest.type_sql))
    if origin is not None and origin.builtin and origin.type_sql != dest.type_sql:
        return sql.SQL("{}::{}::{}").format(text, sql.SQL(origin.type_sql), sql.SQL(dest.type_sql))
    return sql.SQL("{}::{}").format(text, sql.SQL(dest.type_sql))


def origin_cast(text: sql.Composable, origin: ColumnInfo | None, dest: ColumnInfo) -> sql.Composable:
    """Text -> the value as the origin held it, on the destination server (for declared transforms, which
    are written against the origin's types): money as numeric; a type the destination may not know by the
    origin's name goes straight to the destination's type."""
    if origin is None:
        return sql.SQL("{}::{}").format(text, sql.SQL(dest.type_sql))
    if origin.money:
        return sql.SQL("{}::numeric").format(text)
    if origin.builtin or origin.type_sql == dest.type_sql:
        return sql.SQL("{}::{}").format(text, sql.SQL(origin.type_sql))
    return sql.SQL("{}::{}").format(text, sql.SQL(dest.type_sql))
