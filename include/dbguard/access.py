"""What the migration role must be able to do with each migrated table, checked by preflight (reads only).

- Own it (or be a member of its owner, or superuser): capture enables its triggers with
  `ALTER TABLE ... ENABLE ALWAYS TRIGGER`, which only the owner may run; GRANT TRIGGER is not enough.
  Checked on the source (forward capture) and on the target (reverse capture after the flip); a target
  table not created yet is judged as preflight will create it: with the source's owner, RLS and FORCE.
- Read every row: on a table with row-level security enabled, a role that is not superuser, has no
  BYPASSRLS and does not own the table (or owns it under FORCE ROW LEVEL SECURITY) sees only the rows its
  policies show. COPY, counts and checksums all see that same subset, so a run would pass with rows missing.
  dbguard's sessions also set row_security = off (db.SESSION_SETTINGS), so such a read raises instead.
"""
from __future__ import annotations

import psycopg
from psycopg import sql

from . import catalog, db
from .spec import MigrationSpec

_TABLE = """
SELECT c.relowner::regrole::text, r.rolname, c.relrowsecurity, c.relforcerowsecurity
FROM pg_class c JOIN pg_roles r ON r.oid = c.relowner WHERE c.oid = %s
"""
_ROLE = "SELECT current_user, rolsuper, rolbypassrls FROM pg_roles WHERE rolname = current_user"
# does the role have the owner's privileges (member of it, or superuser)? NULL: no such role on this server
_OWNS = "SELECT pg_has_role(oid, 'USAGE') FROM pg_roles WHERE rolname = %s"

Catalog = dict[str, tuple[str, str, bool, bool]]  # table ref -> (owner as SQL text, owner rolname, rls, forced)


def source_catalog(conn: psycopg.Connection, spec: MigrationSpec) -> Catalog:
    """Owner and row-level security of each migrated source table: what the target's copy will have too
    (pg_dump restores ownership, RLS and FORCE), so preflight can check the target before it exists."""
    out = {}
    for t in spec.tables:
        oid = catalog.regclass(conn, t.schema_, t.name)
        if oid is not None:
            out[t.ref] = tuple(conn.execute(_TABLE, (oid,)).fetchone())
    return out


def _ident(conn: psycopg.Connection, name: str) -> str:
    return sql.Identifier(name).as_string(conn)


def problems(conn: psycopg.Connection, spec: MigrationSpec, side: str, source: Catalog | None = None) -> list[str]:
    """Every ownership and row-level-security problem of the role on `side` ("source" | "target"). A target
    table that does not exist yet is judged as it will be created: with the source table's owner (when that
    role exists on the target; else the migration role owns it), RLS and FORCE."""
    role, superuser, bypass = conn.execute(_ROLE).fetchone()
    out = []
    for t in spec.tables:
        schema, name = (t.schema_, t.name) if side == "source" else (t.target_schema, t.target_name)
        oid = catalog.regclass(conn, schema, name)
        if oid is not None:
            owner, owner_name, rls, forced = conn.execute(_TABLE, (oid,)).fetchone()
        elif side == "target" and source and t.ref in source:
            owner, owner_name, rls, forced = source[t.ref]
        else:  # missing or not visible: the contract check names it
            continue
        owns = conn.execute(_OWNS, (owner_name,)).fetchone()
        owns = True if owns is None else owns[0]  # an owner missing on the target: the migration role owns it
        rel = db.qname(schema, name).as_string(conn)
        will = "" if oid is not None else " (to be created as on the source)"
        if not owns:
            out.append(
                f"{side}: {schema}.{name}{will} is owned by {owner}, not by {role}: capture enables its triggers "
                f"with ALTER TABLE ... ENABLE ALWAYS TRIGGER, which only the owner may run (GRANT TRIGGER is not "
                f"enough){'; reverse capture runs on the target after the flip' if side == 'target' else ''}. "
                + (f"ALTER TABLE {rel} OWNER TO {_ident(conn, role)}, or " if oid is not None else "")
                + f"make the role a member of the owner{' on the ' + side if oid is None else ''} "
                f"(GRANT {owner} TO {_ident(conn, role)}), or run dbguard as {owner}")
        if rls and not superuser and not bypass and (forced or not owns):
            why = ("owns it, but FORCE ROW LEVEL SECURITY applies the policies to the owner too" if owns and forced
                   else "neither owns it nor is superuser")
            out.append(
                f"{side}: {schema}.{name}{will} has row-level security enabled{' and forced' if forced else ''}, and "
                f"role {role} {why}; without BYPASSRLS it reads only the rows its policies show, and COPY, "
                f"counts and checksums would all agree on that subset while rows are missing. As a superuser run "
                f"ALTER ROLE {_ident(conn, role)} BYPASSRLS (or run dbguard as a superuser)")
    return out
