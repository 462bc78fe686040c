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

from . import catalog, db, schema_dump, schema_objects
from .schema_objects import POST_DATA  # noqa: F401  (stages.preflight ignores these kinds)
from .catalog import TableInfo
from .errors import DbguardError
from .spec import Column, MigrationSpec, Table
from .transforms import is_textlike


def _same_type(c: Column) -> bool:
    return c.target_type is None or c.target_type == c.type


def create(spec: MigrationSpec) -> dict:
    """Preflight's do: the source's pre-data on the target (schema_dump.PRE), the spec's changes, the views.
    One transaction; a target whose tables all exist already (a re-run) is left as it is."""
    from .preflight import canonical_type

    with db.source(spec) as src, db.target(spec) as tgt:
        existing = {t.ref for t in spec.tables if catalog.regclass(tgt, t.target_schema, t.target_name)}
        if len(existing) == len(spec.tables):
            return {"created": [], "existing": sorted(existing)}
        p = schema_dump.plan(spec, src, tgt)
        before = _objects(tgt)
        try:
            version = tgt.info.server_version
            for schema in sorted({e.schema for e in p.pre + p.views if e.schema not in ("-", "")}):
                tgt.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
            shared = {"TYPE", "DOMAIN", "FUNCTION", "SEQUENCE", "SEQUENCE OWNED BY", "COMMENT", "ACL"}
            tolerate = (lambda kind: True) if existing else (lambda kind: kind in shared)
            created = schema_dump.run_chunks(tgt, schema_dump.script(p, p.pre, target_version=version,
                                                                     drop_roles=p.missing_roles),
                                             commit_each=False, tolerate=tolerate)
            tgt.execute("RESET search_path")
            for t in spec.tables:
                if t.ref not in existing:
                    _changes(src, tgt, t, canonical_type)
            created += schema_dump.run_chunks(tgt, schema_dump.script(p, p.views, target_version=version,
                                                                      drop_roles=p.missing_roles),
                                              commit_each=False, tolerate=lambda kind: True)
            tgt.execute("RESET search_path")
            objects = sorted(_objects(tgt) - before)
            tgt.commit()
        finally:
            p.close()
    return {"created": created, "existing": sorted(existing), "objects": objects}


# the target's types, functions, sequences and views outside pg_catalog / dbguard / extensions, as the server
# spells them (regtype / regprocedure / regclass text): what create() added is what drop() may take away
_OBJECTS = """
SELECT CASE t.typtype WHEN 'd' THEN 'DOMAIN' ELSE 'TYPE' END, t.oid::regtype::text FROM pg_type t
JOIN pg_namespace n ON n.oid = t.typnamespace
WHERE t.typtype IN ('e', 'd', 'c') AND (t.typtype <> 'c' OR (SELECT relkind FROM pg_class WHERE oid = t.typrelid) = 'c')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'dbguard') AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend WHERE classid = 'pg_type'::regclass AND objid = t.oid AND deptype = 'e')
UNION ALL
SELECT 'FUNCTION', p.oid::regprocedure::text FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'dbguard') AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend WHERE classid = 'pg_proc'::regclass AND objid = p.oid AND deptype = 'e')
UNION ALL
SELECT CASE c.relkind WHEN 'S' THEN 'SEQUENCE' WHEN 'v' THEN 'VIEW' ELSE 'MATERIALIZED VIEW' END, c.oid::regclass::text
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('S', 'v', 'm') AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'dbguard')
  AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend WHERE classid = 'pg_class'::regclass AND objid = c.oid AND deptype = 'e')"""

_DROP_ORDER = ("MATERIALIZED VIEW", "VIEW", "SEQUENCE", "FUNCTION", "DOMAIN", "TYPE")


def _objects(conn: psycopg.Connection) -> set[tuple[str, str]]:
    return {(k, n) for k, n in conn.execute(_OBJECTS)}


def drop(spec: MigrationSpec, objects: list) -> dict:
    """Undo of create (rollback --drop-target before a cutover): the target tables (CASCADE: their partitions,
    indexes, triggers, policies, views), then what preflight recorded it created (metric schema_created), each
    RESTRICT: one that something else on the target now uses stays, and is named."""
    dropped, kept = [], []
    with db.target(spec) as tgt:
        for t in spec.tables:
            tgt.execute(sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(db.qname(t.target_schema, t.target_name)))
            dropped.append(f"{t.target_schema}.{t.target_name}")
        tgt.commit()
        for kind in _DROP_ORDER:
            for k, name in objects:
                if k != kind:
                    continue
                tgt.execute("SAVEPOINT dbguard_drop")
                try:  # the name is the target server's own regtype/regprocedure/regclass text
                    tgt.execute(sql.SQL("DROP {} IF EXISTS {} RESTRICT").format(sql.SQL(kind), sql.SQL(name)))
                    dropped.append(f"{kind.lower()} {name}")
                except psycopg.errors.DependentObjectsStillExist:
                    tgt.execute("ROLLBACK TO SAVEPOINT dbguard_drop")
                    kept.append(f"{kind.lower()} {name} (still used on the target)")
        tgt.commit()
    return {"dropped": dropped, "kept": kept}


def unreproducible(spec: MigrationSpec) -> list[str]:
    """Preflight: every source object the target will not have (schema_dump.plan), unless acknowledged."""
    with db.source(spec) as src:
        try:
            tgt = db.target(spec)
        except DbguardError:  # a target database preflight creates: no roles to compare yet
            tgt = None
        try:
            p = schema_dump.plan(spec, src, tgt)
        finally:
            if tgt is not None:
                tgt.close()
    p.close()
    out = _replica_role(spec, p) + p.owner_problems
    return out + [f"{entry}: {why}; the target would not have it. Migrate what it depends on, or accept it by adding "
            f"to the spec: acknowledge: [\"{entry}\"]" for entry, why in p.not_reproduced if not spec.acknowledged(entry)]


_CAN_SET_REPLICA = """SELECT rolsuper OR (current_setting('server_version_num')::int >= 150000
                     AND has_parameter_privilege('session_replication_role', 'SET'))
                     FROM pg_roles WHERE rolname = current_user"""


def _replica_role(spec: MigrationSpec, p: schema_dump.Plan) -> list[str]:
    """The application's triggers must not fire for dbguard's writes: the copy and the appliers set
    session_replication_role = replica, which needs superuser or GRANT SET ON PARAMETER (PostgreSQL 15+)."""
    triggers = [e.name for e in p.post if e.desc == "TRIGGER"]
    if not triggers:
        return []
    out = []
    for side, connect in (("target", db.target), ("source", db.source)):
        try:
            with connect(spec) as conn:
                row = conn.execute(_CAN_SET_REPLICA).fetchone()
                role = conn.execute("SELECT current_user").fetchone()[0]
        except DbguardError:
            continue
        if not (row and row[0]):
            out.append(f"{side}: the migrated tables have the application's triggers ({', '.join(triggers[:5])}), "
                       f"which would fire again for dbguard's own writes (copy, {'forward' if side == 'target' else 'reverse'} "
                       f"applier) unless they run with session_replication_role = replica; "
                       f"GRANT SET ON PARAMETER session_replication_role TO {role} (or run as a superuser)")
    return out


def _changes(src: psycopg.Connection, tgt: psycopg.Connection, t: Table, canonical_type) -> None:
    """The spec's declared changes on a freshly restored table: excluded columns dropped, target_type and
    collation set (the table is empty), NOT NULL where the spec asks, a primary key on the spec's key."""
    rel = db.qname(t.target_schema, t.target_name)
    for name in t.exclude_columns:
        tgt.execute(sql.SQL("ALTER TABLE {} DROP COLUMN IF EXISTS {}").format(rel, sql.Identifier(name)))
    info = catalog.describe(src, t.schema_, t.name)
    for c in t.columns:
        ci = info.column(c.name) if info else None
        if ci is None:
            continue
        col = sql.Identifier(c.name)
        new_type = None if _same_type(c) or canonical_type(c.target_type) == ci.type else c.tgt_type
        coll = c.collation if c.collation and is_textlike(c.tgt_type) else None
        if new_type or coll:
            alter = sql.SQL("ALTER TABLE {} ALTER COLUMN {} TYPE {}{}{}").format(
                rel, col, sql.SQL(c.tgt_type), sql.SQL(" COLLATE ") + sql.Identifier(coll) if coll else sql.SQL(""),
                sql.SQL(" USING NULL::{}").format(sql.SQL(c.tgt_type)) if new_type and not ci.generated else sql.SQL(""))
            tgt.execute("SAVEPOINT dbguard_alter")
            try:
                tgt.execute(alter)
            except psycopg.Error:  # a default or identity the new type cannot keep: the type wins
                tgt.execute("ROLLBACK TO SAVEPOINT dbguard_alter")
                tgt.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP DEFAULT").format(rel, col))
                if ci.identity:
                    tgt.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} DROP IDENTITY IF EXISTS").format(rel, col))
                tgt.execute(alter)
        if not c.nullable and not ci.not_null:
            tgt.execute(sql.SQL("ALTER TABLE {} ALTER COLUMN {} SET NOT NULL").format(rel, col))
    got = catalog.describe(tgt, t.target_schema, t.target_name)
    if got is not None and sorted(got.primary_key) != sorted(t.key) and not any(
            sorted(u["columns"]) == sorted(t.key) and not u.get("partial") for u in got.uniques):
        tgt.execute(sql.SQL("ALTER TABLE {} ADD PRIMARY KEY ({})").format(
            rel, sql.SQL(", ").join(map(sql.Identifier, t.key))))


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
    """After the backfill: the source's post-data on the target (indexes, triggers, RLS, policies, rules,
    their comments and grants; one entry per transaction), populated materialized views refreshed, then
    the foreign keys among migrated tables (NOT VALID, then VALIDATE) and spec-declared target.indexes
    (retrieval's ANN/GIN indexes are built elsewhere); last, VACUUM (ANALYZE) of every target table (vacuum())."""
    by_source = {(t.schema_, t.name): t for t in spec.tables}
    done = {"foreign_keys": [], "indexes": [], "objects": []}
    with db.source(spec) as src, db.target(spec) as tgt:
        p = schema_dump.plan(spec, src, tgt)
        try:
            post = _post_entries(spec, src, p)
            done["objects"] = schema_dump.run_chunks(
                tgt, schema_dump.script(p, post, target_version=tgt.info.server_version, drop_roles=p.missing_roles),
                commit_each=True)
            tgt.execute("RESET search_path")
            for schema, name in p.matviews:
                if catalog.regclass(tgt, schema, name) is not None:
                    tgt.execute(sql.SQL("REFRESH MATERIALIZED VIEW {}").format(db.qname(schema, name)))
                    tgt.commit()
                    done["objects"].append(f"REFRESH MATERIALIZED VIEW {schema}.{name}")
        finally:
            p.close()
        infos = {t.ref: info for t in spec.tables if (info := catalog.describe(src, t.schema_, t.name)) is not None}
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
            for ix in t.target.indexes:  # the spec overrides the source's indexes: build those
                name = ix.name or _index_name(t.target_name, ix.columns)
                if not _has_index(tgt, t.target_schema, name):
                    tgt.execute(declared_index_sql(t, ix, name))
                    tgt.commit()
                    done["indexes"].append(f"{t.ref}.{name}")
    done["indexes"] += [o.split(" ", 1)[1] for o in done["objects"] if o.startswith("INDEX ")]
    done["vacuumed"] = vacuum(spec)
    return done


def vacuum(spec: MigrationSpec) -> list[str]:
    """VACUUM (ANALYZE) every target table (each partition with it), once its indexes are built: the copy left
    no visibility map and no statistics, so every count(*) would read the whole heap (the cutover's counts,
    and the application's queries once the target is its primary), and the planner would guess. With the
    visibility map set, count(*) reads the primary key's index only. Writers are not blocked (SHARE UPDATE
    EXCLUSIVE). Returns the tables vacuumed."""
    done = []
    with db.target(spec, autocommit=True) as tgt:
        for t in spec.tables:
            if catalog.regclass(tgt, t.target_schema, t.target_name) is not None:
                tgt.execute(sql.SQL("VACUUM (ANALYZE) {}").format(db.qname(t.target_schema, t.target_name)))
                done.append(t.ref)
    return done


def _post_entries(spec: MigrationSpec, src: psycopg.Connection, p: schema_dump.Plan) -> list:
    """The post-data entries to restore: without the source's indexes where the spec declares target.indexes,
    the store indexes retrieval builds (hnsw, ivfflat, gin on vector/search tables), and policies that name a
    role missing on the target (acknowledged in preflight)."""
    skip: set[int] = set()
    for e in p.post:
        if e.desc != "INDEX":
            continue
        row = src.execute("SELECT i.indrelid, am.amname, i.indisunique FROM pg_index i JOIN pg_class c ON "
                          "c.oid = i.indexrelid JOIN pg_am am ON am.oid = c.relam WHERE i.indexrelid = %s",
                          (e.objid,)).fetchone()
        if row is None:
            continue
        t = p.tables.get(p.roots.get(row[0], row[0]))
        if t is not None and (t.target.indexes or (row[1] in ("hnsw", "ivfflat", "gin") and (t.vector or t.search))):
            skip.add(e.dump_id)
    if p.missing_roles:
        bad = {r[0] for r in src.execute(
            "SELECT oid FROM pg_policy WHERE EXISTS (SELECT 1 FROM unnest(polroles) r WHERE r <> 0 AND "
            "r::regrole::text = ANY(%s))", (sorted(p.missing_roles),))}
        skip |= {e.dump_id for e in p.post if e.desc == "POLICY" and e.objid in bad}
    changed = True
    while changed:
        changed = False
        for e in p.post:
            if e.dump_id not in skip and set(e.deps) & skip:
                skip.add(e.dump_id)
                changed = True
    return [e for e in p.post if e.dump_id not in skip]


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
        "unique": {tuple(u["columns"]) for u in info.uniques if names is None or set(u["columns"]) <= names},
        "foreign keys": {(tuple(f["columns"]), f["ref_table"], tuple(f["ref_columns"]), f["tail"])
                         for f in info.foreign_keys},
        "indexes": {(ix["method"], tuple(ix["columns"]), ix.get("expr")) for ix in info.indexes
                    if names is None or set(ix["columns"]) - {None, ""} <= names},  # an excluded column's go
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
            out += schema_objects.compare(
                where, schema_objects.describe(src, t.schema_, t.name),
                schema_objects.describe(tgt, t.target_schema, t.target_name), ignore=ignore,
                acknowledged=spec.acknowledged,
                qualify=lambda kind, n, t=t: f"{t.schema_}.{t.name}.{n}" if kind in ("triggers", "policies") else n)
    return out


def objects_summary(spec: MigrationSpec) -> dict[str, list[dict]]:
    """table -> the object-by-object comparison (schema_objects.summary), recorded for the run report."""
    with db.source(spec) as src, db.target(spec) as tgt:
        return {t.ref: schema_objects.summary(schema_objects.describe(src, t.schema_, t.name),
                                              schema_objects.describe(tgt, t.target_schema, t.target_name))
                for t in spec.tables}
