"""The application's objects around a table, as comparable values: triggers (and their enabled state), row-level
security flags, policies, partitions and their bounds, the sequences its defaults draw from, and the views
and materialized views that read it. `target_schema.differences` compares them between source and target,
object by object. dbguard's own triggers (functions in schema dbguard) are not the application's."""
from __future__ import annotations

import psycopg

from . import catalog

POST_DATA = ("foreign keys", "indexes", "triggers", "row security", "policies")  # built after the copy

_TRIGGERS = """
SELECT t.tgname, t.tgenabled, t.tgtype, pn.nspname || '.' || p.proname,
       (SELECT array_agg(a.attname ORDER BY a.attname) FROM pg_attribute a
        WHERE a.attrelid = t.tgrelid AND a.attnum = ANY(t.tgattr))
FROM pg_trigger t JOIN pg_proc p ON p.oid = t.tgfoid JOIN pg_namespace pn ON pn.oid = p.pronamespace
WHERE t.tgrelid = %s AND NOT t.tgisinternal AND pn.nspname <> 'dbguard'"""

_POLICIES = """
SELECT polname, polcmd, {permissive},
       ARRAY(SELECT CASE WHEN r = 0 THEN 'public' ELSE r::regrole::text END FROM unnest(polroles) r ORDER BY 1),
       pg_get_expr(polqual, polrelid), pg_get_expr(polwithcheck, polrelid)
FROM pg_policy WHERE polrelid = %s"""

_PARTITIONS = """
SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
WHERE i.inhparent = %s AND c.relispartition"""

_SEQUENCES = """
SELECT DISTINCT s.relname FROM pg_attrdef ad
JOIN pg_depend d ON d.classid = 'pg_attrdef'::regclass AND d.objid = ad.oid AND d.refclassid = 'pg_class'::regclass
JOIN pg_class s ON s.oid = d.refobjid AND s.relkind = 'S'
WHERE ad.adrelid = %s"""  # by name: a renamed table's own sequences move to its target schema

_VIEWS = """
SELECT DISTINCT n.nspname || '.' || v.relname, v.relkind FROM pg_rewrite r
JOIN pg_depend d ON d.classid = 'pg_rewrite'::regclass AND d.objid = r.oid
JOIN pg_class v ON v.oid = r.ev_class AND v.relkind IN ('v', 'm') JOIN pg_namespace n ON n.oid = v.relnamespace
WHERE d.refclassid = 'pg_class'::regclass AND d.refobjid = %s AND r.ev_class <> %s"""

_ENABLED = {"O": "enabled", "D": "disabled", "R": "replica", "A": "always"}


def describe(conn: psycopg.Connection, schema: str, name: str) -> dict[str, dict] | None:
    """kind -> {object name: comparable value} for the table schema.name (None when it does not exist)."""
    oid = catalog.regclass(conn, schema, name)
    if oid is None:
        return None
    v = conn.info.server_version
    out: dict[str, dict] = {}
    out["triggers"] = {n: (_ENABLED.get(e, e), typ, fn, tuple(cols or ()))
                       for n, e, typ, fn, cols in conn.execute(_TRIGGERS, (oid,))}
    rls = conn.execute("SELECT relrowsecurity, relforcerowsecurity FROM pg_class WHERE oid = %s", (oid,)).fetchone() \
        if v >= 90500 else (False, False)
    out["row security"] = {"enable": rls[0], "force": rls[1]}
    out["policies"] = {r[0]: tuple(r[1:]) for r in conn.execute(
        _POLICIES.format(permissive="polpermissive" if v >= 100000 else "true"), (oid,))} if v >= 90500 else {}
    if v >= 100000:
        key = conn.execute("SELECT CASE WHEN relkind = 'p' THEN pg_get_partkeydef(oid) END FROM pg_class "
                           "WHERE oid = %s", (oid,)).fetchone()[0]
        out["partitions"] = {"(partition key)": key, **dict(conn.execute(_PARTITIONS, (oid,)).fetchall())}
    else:
        out["partitions"] = {"(partition key)": None}
    out["sequences"] = {r[0]: True for r in conn.execute(_SEQUENCES, (oid,))}
    out["views"] = {n: {"v": "view", "m": "materialized view"}[k] for n, k in conn.execute(_VIEWS, (oid, oid))}
    return out


_ONE = {"triggers": "trigger", "policies": "policy", "partitions": "partition", "sequences": "sequence",
        "views": "view"}
_ACK_KIND = {"triggers": "trigger", "policies": "policy", "partitions": "partition"}


def compare(where: str, src: dict, tgt: dict, *, ignore=(), acknowledged=lambda entry: False,
            qualify=lambda kind, n: n) -> list[str]:
    """One line per object that differs; `qualify(kind, name)` gives the name preflight's acknowledge uses."""
    out = []
    for kind, a in src.items():
        if kind in ignore:
            continue
        b = tgt.get(kind, {})
        for n in sorted(set(a) | set(b)):
            if a.get(n) == b.get(n):
                continue
            ack = "materialized_view" if a.get(n) == "materialized view" else _ACK_KIND.get(kind, kind.rstrip("s"))
            if n not in b and acknowledged(f"not_reproduced {ack} {qualify(kind, n)}"):
                continue
            one = _ONE.get(kind, kind)
            if kind == "row security":
                out.append(f"{where}: row level security {n}: source {a.get(n)}, target {b.get(n)}")
            elif n not in b:
                out.append(f"{where}: {one} {n!r} missing on the target")
            elif n not in a:
                out.append(f"{where}: {one} {n!r} exists only on the target")
            else:
                out.append(f"{where}: {one} {n!r}: source {a[n]}, target {b[n]}")
    return out


def summary(src: dict | None, tgt: dict | None) -> list[dict]:
    """Per kind: what the source has, what the target has, equal or not (for the run report)."""
    def show(kind: str, d: dict | None) -> str:
        if d is None:
            return "(no table)"
        v = d.get(kind, {})
        if kind == "row security":
            return ", ".join(k for k, on in v.items() if on) or "off"
        names = [n for n in v if n != "(partition key)"]
        return ", ".join(names) or "–"
    return [{"kind": kind, "source": show(kind, src), "target": show(kind, tgt),
             "equal": src is not None and tgt is not None and src.get(kind) == tgt.get(kind)}
            for kind in (src or tgt or {})]
