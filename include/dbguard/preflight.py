"""Preflight: read-only checks first, every problem collected; then the writes.

validate (reads only): connections, contract (declared columns and types
exist on the source, keys unique), privileges on both sides with the exact
GRANT that is missing, connection headroom, target database encoding and
collation, existing target tables matching the spec.
apply: create the target database/schemas/tables with explicit encoding,
collation and types; freeze the source schema (event triggers blocking DDL on
the migrated tables and their partitions, see schema_freeze); open the run in
the ledger.
undo (`release_freeze`): drop the freeze for this run; the event trigger goes
when no run holds a freeze any more.
"""
from __future__ import annotations

import re

import psycopg
from psycopg import sql

from . import access, catalog, db, ledger, referrers, retrieval, target_schema
from .schema_freeze import freeze, release_freeze  # noqa: F401  (callers use preflight.release_freeze)
from .errors import ConnectionFailed, PreflightError
from .spec import Column, MigrationSpec, Table
from .transforms import is_textlike

_ALIASES = [
    (r"^int$|^int4$", "integer"), (r"^int8$", "bigint"), (r"^int2$", "smallint"),
    (r"^float8$|^double$|^float$", "double precision"), (r"^float4$", "real"), (r"^bool$", "boolean"),
    (r"^decimal", "numeric"), (r"^varchar", "character varying"), (r"^char\b", "character"),
    (r"^timestamptz", "timestamp with time zone"), (r"^timetz", "time with time zone"),
    (r"^timestamp(\(\d+\))?$", r"timestamp\1 without time zone"), (r"^time(\(\d+\))?$", r"time\1 without time zone"),
]


def canonical_type(t: str) -> str:
    """Spell a declared type the way format_type() prints it."""
    arr = ""
    while t.endswith("[]"):
        t, arr = t[:-2], arr + "[]"
    t = re.sub(r"\s*\(\s*(\d+)\s*,\s*(\d+)\s*\)", r"(\1,\2)", t)
    t = re.sub(r"\s*\(\s*(\d+)\s*\)", r"(\1)", t)
    for pat, rep in _ALIASES:
        if re.search(pat, t):
            t = re.sub(pat, rep, t)
            break
    if t == "character":
        t = "character(1)"
    return t + arr


COLUMNS_Q = """
SELECT a.attname, format_type(a.atttypid, a.atttypmod), a.attnotnull,
       CASE WHEN a.attcollation <> 0 THEN (SELECT collname FROM pg_collation WHERE oid = a.attcollation) END
FROM pg_attribute a
WHERE a.attrelid = to_regclass(%s) AND a.attnum > 0 AND NOT a.attisdropped
"""


def _fq(conn: psycopg.Connection, schema: str, name: str) -> str:
    """Regclass text for schema.name, quoted by psycopg (any identifier, never interpolated raw)."""
    return db.qname(schema, name).as_string(conn)


def _columns(conn: psycopg.Connection, schema: str, name: str) -> dict[str, tuple[str, bool, str | None]] | None:
    fq = _fq(conn, schema, name)
    if conn.execute("SELECT to_regclass(%s)", (fq,)).fetchone()[0] is None:
        return None
    return {n: (t, nn, coll) for n, t, nn, coll in conn.execute(COLUMNS_Q, (fq,))}


def _key_problem(conn: psycopg.Connection, table: Table) -> str | None:
    """Why the key cannot carry ranges and upserts, or None. A unique index over NULL-able columns does not
    make a key: rows whose key holds a NULL fall in no range (never copied) and never conflict (duplicated)."""
    fq = _fq(conn, table.schema_, table.name)
    rows = conn.execute(
        """SELECT i.indexrelid::regclass::text, array_agg(a.attname ORDER BY a.attname),
                  array_agg(a.attname ORDER BY a.attname) FILTER (WHERE NOT a.attnotnull)
           FROM pg_index i
           JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)
           WHERE i.indrelid = to_regclass(%s) AND i.indisunique AND i.indpred IS NULL
           GROUP BY i.indexrelid""", (fq,)).fetchall()
    matching = [(name, nullable) for name, cols, nullable in rows if sorted(cols) == sorted(table.key)]
    if any(not nullable for _, nullable in matching):
        return None
    where = f"tables[{table.ref}].key"
    if matching:
        name, nullable = matching[0]
        return (f"{where}: {table.key} is unique only through index {name}, whose column(s) {nullable} may be NULL; "
                f"rows with a NULL key would never be copied. Make them NOT NULL (ALTER TABLE {table.schema_}."
                f"{table.name} ALTER COLUMN ... SET NOT NULL) or key the table on a primary key")
    return (f"{where}: {table.key} is not unique on the source (no primary key or unique index on exactly these "
            f"columns); ranges and upserts need a unique key")


def _schema_usable(conn: psycopg.Connection, schema: str) -> bool | None:
    """None: no such schema; False: it exists but this role lacks USAGE (to_regclass would raise)."""
    row = conn.execute("SELECT has_schema_privilege(oid, 'USAGE') FROM pg_namespace WHERE nspname = %s",
                       (schema,)).fetchone()
    return None if row is None else row[0]


def _contract(conn: psycopg.Connection, spec: MigrationSpec) -> list[str]:
    problems = []
    role = conn.execute("SELECT current_user").fetchone()[0]
    for t in spec.tables:
        where = f"tables[{t.name}]"
        usable = _schema_usable(conn, t.schema_)
        if usable is False:
            problems.append(f"{where}: source: missing privilege: {_grant('USAGE', 'SCHEMA ' + t.schema_, role)}")
            continue
        cols = _columns(conn, t.schema_, t.name) if usable else None
        if cols is None:
            names = [r[0] for r in conn.execute(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = %s AND c.relkind IN ('r', 'p')", (t.schema_,))] if usable else []
            problems.append(f"{where}: source table {t.schema_}.{t.name} does not exist (or is not visible to "
                            f"this role); fix schema/name in the spec{catalog.did_you_mean(t.name, names)}")
            continue
        for c in t.columns:
            if c.name not in cols:
                problems.append(f"{where}.columns[{c.name}]: no such column on source {t.schema_}.{t.name}; "
                                f"it has {sorted(cols)}{catalog.did_you_mean(c.name, list(cols))}")
            elif cols[c.name][0] != canonical_type(c.type):
                problems.append(f"{where}.columns[{c.name}].type: spec says {canonical_type(c.type)!r} but the "
                                f"source column is {cols[c.name][0]!r}; declare the source type (use target_type "
                                f"to change it on the target)")
        if all(k in cols for k in t.key) and (problem := _key_problem(conn, t)):
            problems.append(problem)
    return problems


def _grant(privilege: str, obj: str, role: str) -> str:
    return f"GRANT {privilege} ON {obj} TO {role}"


def _source_privileges(conn: psycopg.Connection, spec: MigrationSpec) -> list[str]:
    problems = []
    role, superuser = conn.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user"
                                   ).fetchone()
    for t in spec.tables:
        fq = _fq(conn, t.schema_, t.name)
        if not _schema_usable(conn, t.schema_):  # missing, or no USAGE (reported by the contract check)
            continue
        if conn.execute("SELECT to_regclass(%s)", (fq,)).fetchone()[0] is None:
            continue
        for priv in ("SELECT", "TRIGGER"):
            if not conn.execute("SELECT has_table_privilege(%s, %s)", (fq, priv)).fetchone()[0]:
                problems.append(f"source: missing privilege: {_grant(priv, f'TABLE {t.schema_}.{t.name}', role)}")
    if not conn.execute("SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()[0] and \
            conn.execute("SELECT to_regnamespace('dbguard')").fetchone()[0] is None:
        problems.append(f"source: missing privilege: GRANT CREATE ON DATABASE {conn.info.dbname} TO {role} "
                        f"(dbguard keeps its change ledger and freeze list in schema dbguard)")
    if spec.schema_freeze and not superuser:
        problems.append(f"source: schema_freeze needs an event trigger, which only a superuser can create; "
                        f"run as a superuser or set schema_freeze: false (role {role} is not superuser)")
    return problems


def _target_privileges(conn: psycopg.Connection, spec: MigrationSpec) -> list[str]:
    problems = []
    role = conn.execute("SELECT current_user").fetchone()[0]
    for schema in sorted({t.target_schema for t in spec.tables} | {"dbguard"}):
        exists = conn.execute("SELECT to_regnamespace(%s)", (sql.Identifier(schema).as_string(conn),)).fetchone()[0] is not None
        if not exists and not conn.execute(
                "SELECT has_database_privilege(current_database(), 'CREATE')").fetchone()[0]:
            problems.append(f"target: missing privilege: GRANT CREATE ON DATABASE {conn.info.dbname} TO {role} "
                            f"(to create schema {schema}), or create the schema first")
        elif exists and not conn.execute("SELECT has_schema_privilege(%s, 'CREATE')", (schema,)).fetchone()[0]:
            problems.append(f"target: missing privilege: {_grant('CREATE', 'SCHEMA ' + schema, role)}")
    for t in spec.tables:
        fq = _fq(conn, t.target_schema, t.target_name)
        if conn.execute("SELECT to_regclass(%s)", (fq,)).fetchone()[0] is None:
            continue
        for priv in ("SELECT", "INSERT", "UPDATE", "DELETE"):
            if not conn.execute("SELECT has_table_privilege(%s, %s)", (fq, priv)).fetchone()[0]:
                problems.append(f"target: missing privilege: "
                                f"{_grant(priv, f'TABLE {t.target_schema}.{t.target_name}', role)}")
    return problems


def _headroom(conn: psycopg.Connection, side: str, needed: int) -> list[str]:
    max_c, reserved, used = conn.execute(
        """SELECT current_setting('max_connections')::int,
                  current_setting('superuser_reserved_connections')::int,
                  (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')""").fetchone()
    free = max_c - reserved - used
    if free < needed:
        return [f"{side}: connection headroom too small: max_connections {max_c} - reserved {reserved} - in use "
                f"{used} = {free} free, but the plan needs {needed}; lower backfill.concurrency or raise "
                f"max_connections"]
    return []


def _target_database(spec: MigrationSpec) -> list[str]:
    """Encoding/collation of the target database must be what the spec says."""
    tgt = spec.target
    try:
        conn = db.target(spec)
    except ConnectionFailed as e:
        if tgt.database and tgt.create_database and "does not exist" in str(e):
            return []  # created in apply()
        raise
    with conn:
        enc, coll, ctype = conn.execute(
            "SELECT pg_encoding_to_char(encoding), datcollate, datctype FROM pg_database "
            "WHERE datname = current_database()").fetchone()
    problems = []
    for field, want, got in (("encoding", tgt.encoding, enc), ("collation", tgt.collation, coll),
                             ("ctype", tgt.ctype, ctype)):
        if want.replace("-", "").lower() != (got or "").replace("-", "").lower():
            problems.append(f"target.{field}: the target database has {got!r} but the spec says {want!r}; "
                            f"create the database with {field} {want!r} (or set create_database: true with a "
                            f"new database name), or change the spec")
    return problems


def _needs_pgvector(spec: MigrationSpec) -> bool:
    return any(c.tgt_type.startswith(("vector", "halfvec", "sparsevec")) for t in spec.tables for c in t.columns)


def source_extensions(src: psycopg.Connection, spec: MigrationSpec) -> dict[str, list[str]]:
    """extension -> the columns (`tables[t].columns[c]`) whose source type comes from it and that keep that
    type on the target (no `target_type`): the target needs the same extension."""
    out: dict[str, list[str]] = {}
    for t in spec.tables:
        info = catalog.describe(src, t.schema_, t.name)
        if info is None:
            continue
        kept = {c.name for c in t.columns if c.target_type is None}
        cols = [c for c in info.columns if c.name in kept]
        exts = catalog.type_extensions(src, [c.type_oid for c in cols])
        for c in cols:
            for ext in sorted(exts.get(c.type_oid, ())):
                out.setdefault(ext, []).append(f"tables[{t.name}].columns[{c.name}]")
    return out


def _target_extensions(conn: psycopg.Connection, spec: MigrationSpec, needed: dict[str, list[str]]) -> list[str]:
    have = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions")}
    problems = []
    if _needs_pgvector(spec) and "vector" not in have:
        problems.append("target: a vector column needs the pgvector extension, which this server does not have; "
                        "install pgvector on the target server (CREATE EXTENSION vector must work)")
    for ext, cols in sorted(needed.items()):
        if ext not in have and not (ext == "vector" and problems):
            problems.append(f"{', '.join(cols)}: the column's type comes from the source's extension {ext!r}, which "
                            f"the target server does not offer; install it there (CREATE EXTENSION {ext} must work), "
                            "or give the column a target_type the target has (e.g. text), or exclude_columns it")
    return problems


def _target_tables(conn: psycopg.Connection, spec: MigrationSpec) -> list[str]:
    problems = []
    for t in spec.tables:
        cols = _columns(conn, t.target_schema, t.target_name)
        if cols is None:
            continue
        for c in t.columns:
            if c.name not in cols:
                problems.append(f"target table {t.target_schema}.{t.target_name} exists but lacks column "
                                f"{c.name}; drop it or make it match tables[{t.name}]")
            elif cols[c.name][0] != canonical_type(c.tgt_type):
                problems.append(f"tables[{t.name}].columns[{c.name}]: the existing target column is "
                                f"{cols[c.name][0]!r} but the spec says {canonical_type(c.tgt_type)!r}")
            elif is_textlike(c.tgt_type) and cols[c.name][2] not in (None, "default", _collation(spec, c)):
                problems.append(f"tables[{t.name}].columns[{c.name}].collation: the existing target column uses "
                                f"{cols[c.name][2]!r} but the spec says {_collation(spec, c)!r}")
    return problems


def validate(spec: MigrationSpec) -> dict:
    """Every read-only check; raises PreflightError listing all problems. Writes nothing."""
    problems: list[str] = []
    conc = spec.backfill.concurrency
    with db.source(spec) as src:
        problems += _contract(src, spec)
        if spec.run_cutover:  # rollback writes the target's rows back: every source column must be fillable
            problems += catalog.write_back_problems(src, spec)
        problems += _source_privileges(src, spec)
        problems += _headroom(src, "source", 2 * conc + 2)
        problems += access.problems(src, spec, "source")  # ownership (capture), row-level security
        owners = access.source_catalog(src, spec)  # what the target's tables will have (pg_dump restores it)
        refused, acknowledged = referrers.problems(src, spec)  # non-migrated tables referencing migrated ones
        problems += refused
        if not problems:  # vector scan needs the contract to hold
            problems += retrieval.scan_vectors(spec, src)
        extensions = source_extensions(src, spec)
        source_version = src.info.server_version
    problems += _target_database(spec)
    try:
        with db.target(spec) as tgt:
            problems += _target_privileges(tgt, spec)
            problems += _target_tables(tgt, spec)
            problems += access.problems(tgt, spec, "target", owners)
            problems += _headroom(tgt, "target", conc + 2)
            problems += _target_extensions(tgt, spec, extensions)
            problems += retrieval.check_target(spec, tgt)
            target_version = tgt.info.server_version
        if not problems:
            problems += target_schema.unreproducible(spec)
    except ConnectionFailed:
        if not (spec.target.database and spec.target.create_database):
            raise
        target_version = None
    if problems:
        raise PreflightError(problems)
    return {"source_version": source_version, "target_version": target_version, "acknowledged": acknowledged}


def _collation(spec: MigrationSpec, c: Column) -> str:
    return c.collation or spec.target.collation


def create_table_sql(spec: MigrationSpec, t: Table) -> sql.Composed:
    cols = []
    for c in t.columns:
        parts = [sql.Identifier(c.name), sql.SQL(c.tgt_type)]
        if is_textlike(c.tgt_type):
            parts.append(sql.SQL("COLLATE {}").format(sql.Identifier(_collation(spec, c))))
        if not c.nullable or c.name in t.key:
            parts.append(sql.SQL("NOT NULL"))
        cols.append(sql.SQL(" ").join(parts))
    cols.append(sql.SQL("PRIMARY KEY ({})").format(sql.SQL(", ").join(map(sql.Identifier, t.key))))
    return sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(db.qname(t.target_schema, t.target_name),
                                                                sql.SQL(", ").join(cols))


def _create_database(spec: MigrationSpec) -> bool:
    tgt = spec.target
    if not (tgt.database and tgt.create_database):
        return False
    with db.connection(tgt.conn_id, autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (tgt.database,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {} ENCODING {} LC_COLLATE {} LC_CTYPE {} TEMPLATE template0").format(
            sql.Identifier(tgt.database), sql.Literal(tgt.encoding), sql.Literal(tgt.collation),
            sql.Literal(tgt.ctype)))
    return True


def apply(spec: MigrationSpec, run_id: str) -> dict:
    """The writes, after validate() passed: target database/tables, freeze, ledger run."""
    created_db = _create_database(spec)
    with db.target(spec) as tgt:
        for schema in sorted({t.target_schema for t in spec.tables}):
            tgt.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        with db.source(spec) as src:
            for ext in sorted(set(source_extensions(src, spec)) | ({"vector"} if _needs_pgvector(spec) else set())):
                tgt.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
        tgt.commit()
        # the source's schema as pg_dump writes it, with the spec's changes (target_schema.create)
        created = target_schema.create(spec)
        ledger.start_run(tgt, run_id, spec.name, spec.model_dump(mode="json", by_alias=True))
        if spec.has_stores:
            ledger.set_manifest(tgt, spec.name, run_id, retrieval.manifest(spec))
        problems = _target_tables(tgt, spec)
    if problems:
        raise PreflightError(problems)
    frozen = []
    if spec.schema_freeze:
        with db.source(spec) as src:
            frozen = freeze(src, spec, run_id)
    return {"created_database": created_db, "frozen": frozen, "schema_created": created.get("objects", [])}
