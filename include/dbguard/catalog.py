"""Read-only introspection of source tables (pg_catalog), and the resolved spec.

`describe(conn, schema, name)` returns everything the target needs to serve as
primary: columns in order (type, NOT NULL, default, identity + owned sequence,
generated expression, collation), primary key / unique constraints and indexes,
CHECK constraints, foreign keys, other indexes, the user-defined types the
columns use, vector and tsvector columns, and the row estimate. Names are exact
(any identifier); the table is found by OID from `sql.Identifier`-quoted text.

`resolve(spec)` completes each table's columns from the source catalog: a spec
may omit `columns` (or name only some of them) and every source column that is
not excluded is migrated with its source type. Stage entry points call it (see
stages.py), so everyone keeps using `table.columns`.
"""
from __future__ import annotations

import difflib
import threading
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from .errors import SpecError


@dataclass
class ColumnInfo:
    name: str
    type: str               # format_type()
    not_null: bool
    default: str | None     # pg_get_expr of the default (None for identity/generated)
    identity: str           # '' | 'a' (ALWAYS) | 'd' (BY DEFAULT)
    generated: str | None   # expression of a STORED generated column
    collation: str | None   # non-default collation name
    sequence: str | None    # owned sequence (identity or serial), qualified
    type_oid: int = 0
    sequence_name: str | None = None  # the owned sequence's own name (unqualified, unquoted)


@dataclass
class TableInfo:
    schema: str
    name: str
    oid: int
    columns: list[ColumnInfo]
    primary_key: list[str]
    uniques: list[dict]       # {"name", "columns", "nullable", "constraint": bool, "def"}
    checks: list[dict]        # {"name", "def"}  (def is "CHECK (...)")
    foreign_keys: list[dict]  # {"name", "columns", "ref_schema", "ref_table", "ref_columns", "def"}
    indexes: list[dict]       # non-key, non-constraint indexes: {"name", "def", "method", "columns", "opclass"}
    types: list[dict]         # user-defined types used, dependencies first
    reltuples: float
    relpages: int
    vectors: list[dict] = field(default_factory=list)   # {"column", "dim", "metric", "index"}
    tsvectors: list[dict] = field(default_factory=list)  # {"column", "config", "source_columns"}

    def column(self, name: str) -> ColumnInfo | None:
        return next((c for c in self.columns if c.name == name), None)

    @property
    def key(self) -> list[str]:
        """The primary key, else the first unique constraint/index over NOT NULL columns."""
        if self.primary_key:
            return self.primary_key
        for u in self.uniques:
            if not u["nullable"] and not u.get("partial"):
                return u["columns"]
        return []


def regclass(conn: psycopg.Connection, schema: str, name: str) -> int | None:
    """OID of schema.name, or None; the name is quoted, so any identifier works. None too when this role
    lacks USAGE on the schema (to_regclass would raise): preflight names the missing GRANT."""
    text = sql.SQL("{}.{}").format(sql.Identifier(schema), sql.Identifier(name)).as_string(conn)
    row = conn.execute("SELECT CASE WHEN has_schema_privilege(oid, 'USAGE') THEN to_regclass(%s)::oid END "
                       "FROM pg_namespace WHERE nspname = %s", (text, schema)).fetchone()
    return row[0] if row else None


_COLUMNS = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.attgenerated = '' AND a.attidentity = '' THEN pg_get_expr(d.adbin, d.adrelid) END,
       a.attidentity, CASE WHEN a.attgenerated <> '' THEN pg_get_expr(d.adbin, d.adrelid) END,
       CASE WHEN a.attcollation <> 0 AND a.attcollation <> t.typcollation
            THEN (SELECT collname FROM pg_collation WHERE oid = a.attcollation) END,
       pg_get_serial_sequence(format('%%I.%%I', n.nspname, c.relname), a.attname), a.atttypid,
       (SELECT s.relname FROM pg_class s
        WHERE s.oid = pg_get_serial_sequence(format('%%I.%%I', n.nspname, c.relname), a.attname)::regclass)
FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid JOIN pg_namespace n ON n.oid = c.relnamespace
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
WHERE a.attrelid = %s AND a.attnum > 0 AND NOT a.attisdropped ORDER BY a.attnum
"""

_INDEXES = """
SELECT ic.relname, pg_get_indexdef(i.indexrelid), am.amname, i.indisprimary, i.indisunique,
       i.indpred IS NOT NULL, con.conname IS NOT NULL,
       ARRAY(SELECT a.attname FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o),
       ARRAY(SELECT a.attnotnull FROM unnest(i.indkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n ORDER BY k.o),
       0 = ALL(i.indkey::int2[]),
       ARRAY(SELECT oc.opcname FROM unnest(i.indclass) WITH ORDINALITY k(n, o)
             JOIN pg_opclass oc ON oc.oid = k.n ORDER BY k.o),
       con.conname, pg_get_expr(i.indexprs, i.indrelid)
FROM pg_index i JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam
LEFT JOIN pg_constraint con ON con.conindid = i.indexrelid AND con.contype IN ('p', 'u', 'x')
WHERE i.indrelid = %s ORDER BY ic.relname
"""

_CONSTRAINTS = """
SELECT con.conname, con.contype, pg_get_constraintdef(con.oid),
       ARRAY(SELECT a.attname FROM unnest(con.conkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = k.n ORDER BY k.o),
       rn.nspname, rc.relname,
       ARRAY(SELECT a.attname FROM unnest(con.confkey) WITH ORDINALITY k(n, o)
             JOIN pg_attribute a ON a.attrelid = con.confrelid AND a.attnum = k.n ORDER BY k.o),
       con.confmatchtype, con.confupdtype, con.confdeltype, con.condeferrable, con.condeferred
FROM pg_constraint con
LEFT JOIN pg_class rc ON rc.oid = con.confrelid LEFT JOIN pg_namespace rn ON rn.oid = rc.relnamespace
WHERE con.conrelid = %s AND con.contype IN ('c', 'f') ORDER BY con.conname
"""

_METRIC = {"vector_l2_ops": "l2", "vector_cosine_ops": "cosine", "vector_ip_ops": "ip"}


def describe(conn: psycopg.Connection, schema: str, name: str) -> TableInfo | None:
    """The catalog description of schema.name (None when it does not exist). Reads only."""
    oid = regclass(conn, schema, name)
    if oid is None:
        return None
    columns = [ColumnInfo(*r) for r in conn.execute(_COLUMNS, (oid,))]
    reltuples, relpages = conn.execute("SELECT reltuples, relpages FROM pg_class WHERE oid = %s", (oid,)).fetchone()
    pk: list[str] = []
    uniques, indexes = [], []
    for (iname, idef, method, primary, unique, partial, is_con, cols, notnull, plain, opcs, conname,
         exprs) in conn.execute(_INDEXES, (oid,)):
        if primary:
            pk = list(cols)
        elif unique and plain:
            uniques.append({"name": conname or iname, "columns": list(cols), "nullable": not all(notnull),
                            "constraint": is_con, "partial": partial, "def": idef})
        elif not is_con:
            indexes.append({"name": iname, "def": idef, "method": method, "columns": list(cols),
                            "opclass": list(opcs), "expr": exprs})
    checks, fks = [], []
    for cname, ctype, cdef, cols, rschema, rtable, rcols, match, upd, dele, deferrable, deferred in conn.execute(
            _CONSTRAINTS, (oid,)):
        if ctype == "c":
            checks.append({"name": cname, "def": cdef})
        else:
            fks.append({"name": cname, "columns": list(cols), "ref_schema": rschema, "ref_table": rtable,
                        "ref_columns": list(rcols), "def": cdef, "tail": _fk_tail(match, upd, dele, deferrable, deferred)})
    info = TableInfo(schema, name, oid, columns, pk, uniques, checks, fks, indexes,
                     user_types(conn, [c.type_oid for c in columns]), float(reltuples), int(relpages))
    for c in columns:
        base = c.type.split("(")[0]
        if base == "vector":
            ix = next((x for x in indexes if x["method"] in ("hnsw", "ivfflat") and x["columns"] == [c.name]), None)
            dim = c.type[7:-1] if c.type.startswith("vector(") else None
            info.vectors.append({"column": c.name, "dim": int(dim) if dim else None,
                                 "metric": _METRIC.get(ix["opclass"][0]) if ix else None,
                                 "index": ix["method"] if ix else None})
        elif c.type == "tsvector":
            info.tsvectors.append({"column": c.name, **_ts_config(c, indexes, columns)})
    return info


_FK_ACTION = {"a": None, "r": "RESTRICT", "c": "CASCADE", "n": "SET NULL", "d": "SET DEFAULT"}


def _fk_tail(match: str, upd: str, dele: str, deferrable: bool, deferred: bool) -> str:
    """MATCH / ON UPDATE / ON DELETE / DEFERRABLE of a foreign key, from pg_constraint's codes."""
    parts = ["MATCH FULL"] if match == "f" else []
    parts += [f"ON {w} {_FK_ACTION[c]}" for w, c in (("UPDATE", upd), ("DELETE", dele)) if _FK_ACTION.get(c)]
    if deferrable:
        parts.append("DEFERRABLE INITIALLY DEFERRED" if deferred else "DEFERRABLE")
    return (" " + " ".join(parts)) if parts else ""


def _ts_config(c: ColumnInfo, indexes: list[dict], columns: list[ColumnInfo]) -> dict:
    """The text-search configuration a generated tsvector (or an index expression) shows, e.g.
    to_tsvector('english'::regconfig, ...), and the text columns that expression reads."""
    import re

    for text in [c.generated or "", *(x["def"] for x in indexes)]:
        m = re.search(r"to_tsvector\('([^']+)'::regconfig,(.*)\)", text)
        if m:
            body = m.group(2)
            used = [o.name for o in columns if o.name != c.name and (
                o.type in ("text", "character varying") or o.type.startswith(("character varying(", "character(")))]
            used = [n for n in used if re.search(r'(?<![\w"])(' + re.escape(n) + "|" +
                                                 re.escape(sql.Identifier(n).as_string(None)) + r')(?![\w"])', body)]
            return {"config": m.group(1).split(".")[-1], "source_columns": used}
    return {"config": None, "source_columns": []}


_TYPE_INFO = """
SELECT t.oid, n.nspname, t.typname, t.typtype, t.typelem, t.typbasetype,
       format_type(t.typbasetype, t.typtypmod), t.typnotnull, t.typdefault, t.typrelid
FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace WHERE t.oid = %s
"""


_TYPE_EXTENSIONS = """
WITH RECURSIVE t(root, oid) AS (
    SELECT r, r FROM unnest(%s::oid[]) r
    UNION
    SELECT t.root, v.x FROM t JOIN pg_type p ON p.oid = t.oid
    CROSS JOIN LATERAL (VALUES (p.typelem), (p.typbasetype)) v(x) WHERE v.x <> 0)
SELECT DISTINCT t.root, e.extname FROM t
JOIN pg_depend d ON d.classid = 'pg_type'::regclass AND d.objid = t.oid AND d.deptype = 'e'
JOIN pg_extension e ON e.oid = d.refobjid
"""


def type_extensions(conn: psycopg.Connection, oids: list[int]) -> dict[int, set[str]]:
    """type oid -> the extensions its type comes from (citext, hstore, vector; through arrays and domains)."""
    out: dict[int, set[str]] = {}
    for root, ext in conn.execute(_TYPE_EXTENSIONS, (list(oids),)):
        out.setdefault(root, set()).add(ext)
    return out


def user_types(conn: psycopg.Connection, oids: list[int]) -> list[dict]:
    """User-defined enums, domains and composite types reachable from `oids` (through arrays, domain
    base types and composite attributes), each after the types it depends on. Extension types
    (vector) and built-ins are left out: CREATE EXTENSION brings those."""
    out: list[dict] = []
    seen: set[int] = set()

    def visit(oid: int) -> None:
        if not oid or oid in seen:
            return
        seen.add(oid)
        row = conn.execute(_TYPE_INFO, (oid,)).fetchone()
        if row is None:
            return
        _, nsp, typname, typtype, elem, base, base_fmt, notnull, default, relid = row
        if elem and typtype == "b":  # array: its element type
            visit(elem)
            return
        if nsp in ("pg_catalog", "information_schema") or conn.execute(
                "SELECT 1 FROM pg_depend WHERE classid = 'pg_type'::regclass AND objid = %s AND deptype = 'e'",
                (oid,)).fetchone():
            return
        t = {"schema": nsp, "name": typname, "kind": {"e": "enum", "d": "domain", "c": "composite"}.get(typtype),
             "oid": oid}
        if t["kind"] is None:
            return
        if typtype == "e":
            t["labels"] = [r[0] for r in conn.execute(
                "SELECT enumlabel FROM pg_enum WHERE enumtypid = %s ORDER BY enumsortorder", (oid,))]
        elif typtype == "d":
            visit(base)
            t.update(base=base_fmt, not_null=notnull, default=default, checks=[
                {"name": n, "def": d} for n, d in conn.execute(
                    "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint WHERE contypid = %s "
                    "ORDER BY conname", (oid,))])
        else:
            attrs = conn.execute(
                "SELECT attname, format_type(atttypid, atttypmod), atttypid FROM pg_attribute "
                "WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (relid,)).fetchall()
            for _, _, a_oid in attrs:
                visit(a_oid)
            t["attributes"] = [{"name": n, "type": f} for n, f, _ in attrs]
        out.append(t)

    for o in oids:
        visit(o)
    return out


def did_you_mean(name: str, candidates: list[str]) -> str:
    """' (did you mean "x"?)' — close spellings, and exact case-insensitive matches first."""
    ci = [c for c in candidates if c.lower() == name.lower() and c != name]
    close = ci or difflib.get_close_matches(name, candidates, n=3, cutoff=0.6)
    if not close:
        return ""
    hint = " (names are case-sensitive)" if ci else ""
    return "; did you mean " + " or ".join(repr(c) for c in close) + "?" + hint


# ---- the resolved spec ---------------------------------------------------------------------------

_cache: dict[str, object] = {}
_resolved_ids: set[int] = set()  # ids of specs held in _cache (kept alive there, so ids are not reused)
_lock = threading.Lock()


def is_resolved(spec) -> bool:
    return id(spec) in _resolved_ids


def resolve(spec, conn: psycopg.Connection | None = None, *, fresh: bool = False):
    """The spec with every table's columns completed from the source catalog, in source order.

    Declared columns keep their settings (target_type, collation, nullable); undeclared source columns
    are added with their source type; `exclude_columns` are left out; generated columns are marked so the
    copy skips them. A table missing on the source is left as declared (preflight reports it). Cached per
    process and spec; an already resolved spec is returned as is."""
    from . import db
    from .spec import parse_spec

    if is_resolved(spec) and not fresh:
        return spec
    key = db.dsn_for(spec.source.conn_id) + "\n" + spec.model_dump_json(by_alias=True)
    with _lock:
        hit = None if fresh else _cache.get(key)
    if hit is not None:
        return hit
    raw = spec.model_dump(mode="json", by_alias=True, exclude_none=False)
    problems: list[tuple[str, str]] = []
    own = conn is None
    conn = conn or db.source(spec)
    try:
        for t, rt in zip(spec.tables, raw["tables"]):
            info = describe(conn, t.schema_, t.name)
            where = f"tables[{t.ref}]"
            if info is None:
                continue
            src = {c.name: c for c in info.columns}
            for i, x in enumerate(t.exclude_columns):
                if x not in src:
                    problems.append((f"{where}.exclude_columns[{i}]", f"{x!r} is not a column of "
                                     f"{t.schema_}.{t.name}{did_you_mean(x, list(src))}"))
            declared = {c["name"]: c for c in rt["columns"]}
            cols = []
            for c in info.columns:
                if c.name in t.exclude_columns:
                    continue
                d = declared.pop(c.name, None) or {"name": c.name, "type": c.type}
                if c.generated:
                    d["generated"] = True
                cols.append(d)
            cols += declared.values()  # declared but not on the source: preflight's contract names them
            rt["columns"] = cols
    finally:
        if own:
            conn.close()
    if problems:
        raise SpecError("<spec>", problems)
    out = parse_spec(raw, f"<spec {spec.name} resolved from the source catalog>")
    with _lock:
        _cache[key] = out
        _resolved_ids.add(id(out))
    return out


def write_back_problems(conn: psycopg.Connection, spec) -> list[str]:
    """Source columns a rollback could not fill: an excluded column that is NOT NULL without a default (nor
    identity, nor generated). Reverse capture carries the migrated columns only, so every row the application
    inserts or updates on the target after the flip would be refused by the source (an upsert checks NOT NULL
    before it finds the existing row), and rolling back would lose those writes. Read-only; `conn` is the source."""
    out = []
    for t in spec.tables:
        info = describe(conn, t.schema_, t.name) if t.exclude_columns else None
        for c in (info.columns if info else []):
            if c.name in t.exclude_columns and c.not_null and c.default is None and not c.identity \
                    and not c.generated:
                out.append(f"tables[{t.ref}].exclude_columns: {c.name!r} is NOT NULL without a default on the source "
                           f"{t.schema_}.{t.name}, so a row written on the target after the cutover could not be "
                           "written back on rollback; give it a default on the source (ALTER TABLE ... ALTER COLUMN "
                           "... SET DEFAULT ...) before the run, or migrate the column")
    return out

