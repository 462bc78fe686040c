"""A target that can serve as primary: the source's schema, rebuilt on the target.

Do / undo, in run order:
- `create_types` (preflight): enums (label order), domains (base, default, NOT NULL, checks) and
  composite types the migrated tables use, in their source schema; undo `drop_types`.
- `table_sql` (preflight): CREATE TABLE with defaults, identity columns, serial sequences
  (owned by their column, so pg_get_serial_sequence finds them), generated columns (re-generated,
  never copied), NOT NULL, CHECK and UNIQUE constraints. Undo: dropping the table (rollback).
- `finish` (after reconcile, before the checksum gate): foreign keys added NOT VALID then
  VALIDATEd, and the source's other indexes (unless the spec declares target.indexes); undo `unfinish`.
- `differences(spec)`: every way the target tables differ from the source, [] when the target
  could take over as primary (preflight after creation, and cutover, call it).
Every identifier goes through sql.Identifier; expressions come from the source's own catalog
(pg_get_expr / pg_get_constraintdef), i.e. SQL the source server printed.
"""
from __future__ import annotations

import re

import psycopg
from psycopg import sql

from . import catalog, db
from .catalog import TableInfo
from .spec import Column, MigrationSpec, Table
from .transforms import is_textlike


def _type_exists(conn: psycopg.Connection, schema: str, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_type t JOIN pg_namespace n ON n.oid = t.typnamespace "
                        "WHERE n.nspname = %s AND t.typname = %s", (schema, name)).fetchone() is not None


def type_sql(t: dict) -> sql.Composed:
    name = db.qname(t["schema"], t["name"])
    if t["kind"] == "enum":
        return sql.SQL("CREATE TYPE {} AS ENUM ({})").format(name, sql.SQL(", ").join(map(sql.Literal, t["labels"])))
    if t["kind"] == "composite":
        return sql.SQL("CREATE TYPE {} AS ({})").format(name, sql.SQL(", ").join(
            sql.SQL("{} {}").format(sql.Identifier(a["name"]), sql.SQL(a["type"])) for a in t["attributes"]))
    parts = [sql.SQL("CREATE DOMAIN {} AS {}").format(name, sql.SQL(t["base"]))]
    if t["default"] is not None:
        parts.append(sql.SQL("DEFAULT {}").format(sql.SQL(t["default"])))
    if t["not_null"]:
        parts.append(sql.SQL("NOT NULL"))
    parts += [sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(c["name"]), sql.SQL(c["def"])) for c in t["checks"]
              if c["def"].startswith("CHECK")]
    return sql.SQL(" ").join(parts)


def _infos(spec: MigrationSpec, src: psycopg.Connection) -> dict[str, TableInfo]:
    return {t.ref: info for t in spec.tables if (info := catalog.describe(src, t.schema_, t.name)) is not None}


def create_types(spec: MigrationSpec, src: psycopg.Connection, tgt: psycopg.Connection) -> list[str]:
    """Create on the target every user-defined type the migrated tables use (dependencies first)."""
    created = []
    for info in _infos(spec, src).values():
        for t in info.types:
            if _type_exists(tgt, t["schema"], t["name"]):
                continue
            tgt.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(t["schema"])))
            tgt.execute(type_sql(t))
            created.append(f"{t['schema']}.{t['name']}")
    return created


def drop_types(spec: MigrationSpec, src: psycopg.Connection, tgt: psycopg.Connection) -> None:
    """Undo of create_types (after the tables are gone)."""
    for info in _infos(spec, src).values():
        for t in reversed(info.types):
            kw = "DOMAIN" if t["kind"] == "domain" else "TYPE"
            tgt.execute(sql.SQL("DROP {} IF EXISTS {}").format(sql.SQL(kw), db.qname(t["schema"], t["name"])))


_NEXTVAL = re.compile(r"^nextval\('(.+)'::regclass\)$")


def _same_type(c: Column) -> bool:
    return c.target_type is None or c.target_type == c.type


def table_sql(spec: MigrationSpec, t: Table, info: TableInfo | None, collation) -> list[sql.Composed]:
    """CREATE SEQUENCE(s) + CREATE TABLE + ALTER SEQUENCE OWNED BY for one table."""
    before, after, cols = [], [], []
    for c in t.columns:
        ci = info.column(c.name) if info else None
        parts = [sql.Identifier(c.name), sql.SQL(c.tgt_type)]
        if is_textlike(c.tgt_type):
            parts.append(sql.SQL("COLLATE {}").format(sql.Identifier(collation(c))))
        if ci is not None and _same_type(c):
            if ci.generated:
                parts.append(sql.SQL("GENERATED ALWAYS AS ({}) STORED").format(sql.SQL(ci.generated)))
            elif ci.identity:
                parts.append(sql.SQL("GENERATED {} AS IDENTITY").format(
                    sql.SQL("ALWAYS" if ci.identity == "a" else "BY DEFAULT")))
            elif ci.default is not None:
                m = _NEXTVAL.match(ci.default)
                if m and ci.sequence:  # serial: the same sequence name in the target schema, owned by the column
                    seq = db.qname(t.target_schema, ci.sequence_name)
                    before.append(sql.SQL("CREATE SEQUENCE IF NOT EXISTS {}").format(seq))
                    after.append(sql.SQL("ALTER SEQUENCE {} OWNED BY {}.{}").format(
                        seq, db.qname(t.target_schema, t.target_name), sql.Identifier(c.name)))
                    parts.append(sql.SQL("DEFAULT nextval({}::regclass)").format(sql.Literal(seq.as_string(None))))
                elif not m:
                    parts.append(sql.SQL("DEFAULT {}").format(sql.SQL(ci.default)))
        if not c.nullable or c.name in t.key or (ci is not None and ci.not_null):
            parts.append(sql.SQL("NOT NULL"))
        cols.append(sql.SQL(" ").join(parts))
    cols.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, t.key))))
    if info is not None:
        names = {c.name for c in t.columns}
        for ck in info.checks:
            if all(_mentions_only(ck["def"], names, info)):
                cols.append(sql.SQL("CONSTRAINT {} {}").format(sql.Identifier(ck["name"]), sql.SQL(ck["def"])))
        for u in info.uniques:
            if u["constraint"] and set(u["columns"]) <= names and sorted(u["columns"]) != sorted(t.key):
                cols.append(sql.SQL("CONSTRAINT {} UNIQUE ({})").format(
                    sql.Identifier(u["name"]), sql.SQL(", ").join(map(sql.Identifier, u["columns"]))))
    create = sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(db.qname(t.target_schema, t.target_name),
                                                                  sql.SQL(", ").join(cols))
    return before + [create] + after


def _mentions_only(check_def: str, names: set[str], info: TableInfo):
    """A CHECK is kept when it names no excluded source column."""
    for c in info.columns:
        if c.name not in names:
            yield not re.search(r'(?<![\w"])' + re.escape(sql.Identifier(c.name).as_string(None)) + r'(?![\w"])',
                                check_def) and not re.search(r"\b" + re.escape(c.name) + r"\b", check_def)
    yield True


def _index_target_def(idef: str, info: TableInfo, t: Table) -> str | None:
    """The source's CREATE INDEX retargeted to the target table (same index name)."""
    src = sql.SQL("{}.{}").format(sql.Identifier(info.schema), sql.Identifier(info.name)).as_string(None)
    tgt = db.qname(t.target_schema, t.target_name).as_string(None)
    m = re.match(r"^CREATE (UNIQUE )?INDEX (\S+|\"(?:[^\"]|\"\")+\") ON (ONLY )?", idef)
    if m is None:
        return None
    rest = idef[m.end():]
    for spelled in (src, f"{info.schema}.{info.name}", sql.Identifier(info.name).as_string(None), info.name):
        if rest.startswith(spelled + " "):
            return idef[:m.start(3) if m.group(3) else m.end()] + tgt + rest[len(spelled):]
    return None


def _index_name(table: str, columns: list[str]) -> str:
    import hashlib

    name = "_".join([table, *columns, "idx"])
    if len(name.encode()) <= 63:
        return name
    return name.encode()[:50].decode(errors="ignore") + "_" + hashlib.md5(name.encode()).hexdigest()[:8]


def declared_index_sql(t: Table, ix, name: str) -> sql.Composed:
    """CREATE INDEX for a spec-declared target.indexes entry."""
    cols = sql.SQL(", ").join(
        sql.SQL("{}{}").format(sql.Identifier(c), sql.SQL(" ") + sql.Identifier(ix.opclass) if ix.opclass else sql.SQL(""))
        for c in ix.columns)
    with_ = sql.SQL("")
    if ix.with_:
        with_ = sql.SQL(" WITH ({})").format(sql.SQL(", ").join(
            sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in ix.with_.items()))
    return sql.SQL("CREATE {}INDEX IF NOT EXISTS {} ON {} USING {} ({}){}").format(
        sql.SQL("UNIQUE " if ix.unique else ""), sql.Identifier(name), db.qname(t.target_schema, t.target_name),
        sql.SQL(ix.method), cols, with_)


def _has_index(conn: psycopg.Connection, schema: str, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relname = %s", (schema, name)).fetchone() is not None


def _has_constraint(conn: psycopg.Connection, oid: int, name: str) -> bool:
    return conn.execute("SELECT 1 FROM pg_constraint WHERE conrelid = %s AND conname = %s",
                        (oid, name)).fetchone() is not None


def finish(spec: MigrationSpec, run_id: str | None = None) -> dict:
    """After the backfill: the source's foreign keys (NOT VALID, then VALIDATE) among migrated tables and
    its other indexes (retrieval's ANN/GIN indexes and spec-declared target.indexes are built elsewhere)."""
    by_source = {(t.schema_, t.name): t for t in spec.tables}
    done = {"foreign_keys": [], "indexes": []}
    with db.source(spec) as src, db.target(spec) as tgt:
        infos = _infos(spec, src)
        for t in spec.tables:
            info = infos.get(t.ref)
            oid = catalog.regclass(tgt, t.target_schema, t.target_name)
            if info is None or oid is None:
                continue
            names = {c.name for c in t.columns}
            for fk in info.foreign_keys:
                parent = by_source.get((fk["ref_schema"], fk["ref_table"]))
                if parent is None or not set(fk["columns"]) <= names or _has_constraint(tgt, oid, fk["name"]):
                    continue
                tail = fk["tail"]  # MATCH / ON UPDATE / ON DELETE / DEFERRABLE as on the source
                tgt.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} FOREIGN KEY ({}) REFERENCES {} ({}){} NOT VALID")
                            .format(db.qname(t.target_schema, t.target_name), sql.Identifier(fk["name"]),
                                    sql.SQL(", ").join(map(sql.Identifier, fk["columns"])),
                                    db.qname(parent.target_schema, parent.target_name),
                                    sql.SQL(", ").join(map(sql.Identifier, fk["ref_columns"])),
                                    sql.SQL(tail)))
                tgt.commit()
                done["foreign_keys"].append(f"{t.ref}.{fk['name']}")
                _validate(spec, run_id, tgt, t, fk["name"])
            if t.target.indexes:  # the spec overrides the source's indexes: build those
                for ix in t.target.indexes:
                    name = ix.name or _index_name(t.target_name, ix.columns)
                    if not _has_index(tgt, t.target_schema, name):
                        tgt.execute(declared_index_sql(t, ix, name))
                        tgt.commit()
                        done["indexes"].append(f"{t.ref}.{name}")
                continue
            for ix in info.indexes + [u for u in info.uniques if not u["constraint"]]:
                if ix.get("method") in ("hnsw", "ivfflat", "gin") and (t.vector or t.search):
                    continue  # retrieval.build_indexes builds the store indexes with the spec's parameters
                if not set(ix["columns"]) - {None, ""} <= names or _has_index(tgt, t.target_schema, ix["name"]):
                    continue
                ddl = _index_target_def(ix["def"], info, t)
                if ddl is None:
                    continue
                tgt.execute(sql.SQL(ddl))
                tgt.commit()
                done["indexes"].append(f"{t.ref}.{ix['name']}")
    return done


def _validate(spec: MigrationSpec, run_id: str | None, tgt: psycopg.Connection, t: Table, name: str,
              attempts: int = 5) -> None:
    """VALIDATE a NOT VALID foreign key. Under a live writer the target is a consistent copy only once the
    captured changes are applied (tables are copied at different snapshots: a child row may be there before
    its parent arrives through capture), so with capture on each attempt first drains the change ledger."""
    from . import capture

    stmt = sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(db.qname(t.target_schema, t.target_name),
                                                                 sql.Identifier(name))
    for i in range(attempts):
        if spec.capture.enabled and run_id is not None and capture.is_on(spec):
            capture.drain(spec, run_id)
        try:
            tgt.execute(stmt)
            tgt.commit()
            return
        except psycopg.errors.ForeignKeyViolation:
            tgt.rollback()
            if i == attempts - 1 or not (spec.capture.enabled and capture.is_on(spec)):
                raise


def unfinish(spec: MigrationSpec) -> None:
    """Undo of finish: drop the foreign keys and indexes it added (tables and data stay)."""
    with db.source(spec) as src, db.target(spec) as tgt:
        infos = _infos(spec, src)
        for t in spec.tables:
            info = infos.get(t.ref)
            if info is None:
                continue
            for fk in info.foreign_keys:
                tgt.execute(sql.SQL("ALTER TABLE IF EXISTS {} DROP CONSTRAINT IF EXISTS {}").format(
                    db.qname(t.target_schema, t.target_name), sql.Identifier(fk["name"])))
            for ix in info.indexes:
                tgt.execute(sql.SQL("DROP INDEX IF EXISTS {}").format(db.qname(t.target_schema, ix["name"])))
        tgt.commit()


def _shape(info: TableInfo, names: set[str] | None = None) -> dict[str, dict]:
    """What must be equal on both sides, per table, without names of the relation itself."""
    cols = {c.name: (c.type, c.not_null, c.default if not (c.default or "").startswith("nextval(") else "nextval",
                     c.identity, c.generated, bool(c.sequence)) for c in info.columns if names is None or c.name in names}
    return {
        "columns": cols,
        "primary key": tuple(info.primary_key),
        "checks": {c["def"] for c in info.checks},
        "unique": {tuple(u["columns"]) for u in info.uniques},
        "foreign keys": {(tuple(f["columns"]), f["ref_table"], tuple(f["ref_columns"]), f["tail"])
                         for f in info.foreign_keys},
        "indexes": {(ix["method"], tuple(ix["columns"]), ix.get("expr")) for ix in info.indexes},
    }


def differences(spec: MigrationSpec, *, ignore: tuple[str, ...] = ()) -> list[str]:
    """Every way the target tables differ from the source tables: [] when the target could be primary.
    Declared type changes (target_type) and excluded columns are the spec's intent, not differences.
    `ignore` leaves out kinds not built yet (preflight: ("foreign keys", "indexes"), built after the backfill)."""
    out = []
    spec = catalog.resolve(spec)
    with db.source(spec) as src, db.target(spec) as tgt:
        for t in spec.tables:
            s_info = catalog.describe(src, t.schema_, t.name)
            t_info = catalog.describe(tgt, t.target_schema, t.target_name)
            where = f"{t.ref} -> {t.target_schema}.{t.target_name}"
            if s_info is None or t_info is None:
                out.append(f"{where}: {'source' if s_info is None else 'target'} table does not exist")
                continue
            renamed = {(p.schema_, p.name): p.target_name for p in spec.tables}
            for f in s_info.foreign_keys:  # a parent renamed on the target (target.name) is the same parent
                f["ref_table"] = renamed.get((f["ref_schema"], f["ref_table"]), f["ref_table"])
            s, g = _shape(s_info, {c.name for c in t.columns}), _shape(t_info)
            for name, (typ, nn, default, ident, gen, seq) in s["columns"].items():
                if name not in g["columns"]:
                    out.append(f"{where}: column {name!r} missing on the target")
                    continue
                col = t.column(name)
                want = (col.target_type and col.tgt_type) or typ
                got = g["columns"][name]
                if not _same_type(col):
                    got, typ = (want,) + got[1:], want
                for label, a, b in (("type", typ, got[0]), ("NOT NULL", nn, got[1]), ("default", default, got[2]),
                                    ("identity", ident, got[3]), ("generated", gen, got[4]),
                                    ("owned sequence", seq, got[5])):
                    if a != b and not (label == "type" and col.target_type):
                        out.append(f"{where}: column {name!r} {label}: source {a!r}, target {b!r}")
            for name in g["columns"]:
                if name not in s["columns"]:
                    out.append(f"{where}: column {name!r} exists only on the target")
            for label in ("primary key", "checks", "unique", "foreign keys", "indexes"):
                if label in ignore:
                    continue
                if label == "indexes" and (t.target.indexes or t.vector or t.search):
                    continue  # the spec decides the target's indexes
                if label == "primary key" and s[label] and sorted(s[label]) != sorted(t.key):
                    continue  # the spec chose another key
                a, b = s[label], g[label]
                if a != b:
                    if isinstance(a, set):
                        miss, extra = sorted(map(str, a - b)), sorted(map(str, b - a))
                        out.append(f"{where}: {label} differ: missing on target {miss}, only on target {extra}")
                    else:
                        out.append(f"{where}: {label}: source {a}, target {b}")
    return out
