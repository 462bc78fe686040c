"""What the migration role must be able to do with each migrated table, checked by preflight (reads only).

- Own it (or be a member of its owner, or superuser): capture enables its triggers with
  `ALTER TABLE ... ENABLE ALWAYS TRIGGER`, which only the owner may run; GRANT TRIGGER is not enough.
  Checked on the source (forward capture) and on existing target tables (reverse capture after the flip).
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
SELECT c.relowner::regrole::text, pg_has_role(c.relowner, 'USAGE'), c.relrowsecurity, c.relforcerowsecurity,
       r.rolsuper, r.rolbypassrls
FROM pg_class c, pg_roles r WHERE c.oid = %s AND r.rolname = current_user
"""


def _ident(conn: psycopg.Connection, name: str) -> str:
    return sql.Identifier(name).as_string(conn)


def problems(conn: psycopg.Connection, spec: MigrationSpec, side: str) -> list[str]:
    """Every ownership and row-level-security problem of the role on `side` ("source" | "target"), for the
    tables that exist there (a target table dbguard creates is owned by the role, without policies)."""
    role = conn.execute("SELECT current_user").fetchone()[0]
    out = []
    for t in spec.tables:
        schema, name = (t.schema_, t.name) if side == "source" else (t.target_schema, t.target_name)
        oid = catalog.regclass(conn, schema, name)
        if oid is None:  # missing or not visible: the contract check names it
            continue
        owner, owns, rls, forced, superuser, bypass = conn.execute(_TABLE, (oid,)).fetchone()
        rel = db.qname(schema, name).as_string(conn)
        if not owns:
            out.append(
                f"{side}: {schema}.{name} is owned by {owner}, not by {role}: capture enables its triggers with "
                f"ALTER TABLE ... ENABLE ALWAYS TRIGGER, which only the owner may run (GRANT TRIGGER is not "
                f"enough){'; reverse capture runs on the target after the flip' if side == 'target' else ''}. "
                f"ALTER TABLE {rel} OWNER TO {_ident(conn, role)}, or make the role a member of the owner "
                f"(GRANT {owner} TO {_ident(conn, role)}), or run dbguard as {owner}")
        if rls and not superuser and not bypass and (forced or not owns):
            why = ("owns it, but FORCE ROW LEVEL SECURITY applies the policies to the owner too" if owns and forced
                   else "neither owns it nor is superuser")
            out.append(
                f"{side}: {schema}.{name} has row-level security enabled{' and forced' if forced else ''}, and "
                f"role {role} {why} and has no BYPASSRLS: it reads only the rows its policies show, and COPY, "
                f"counts and checksums would all agree on that subset while rows are missing. As a superuser run "
                f"ALTER ROLE {_ident(conn, role)} BYPASSRLS (or run dbguard as a superuser)")
    return out
