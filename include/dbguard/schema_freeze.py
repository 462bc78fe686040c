"""The schema freeze: event triggers on the source that refuse DDL on the migrated tables while a run holds
them (preflight freezes, release and rollback lift it).

It must hold against every way in:
- **partitions**: every member of a migrated table's partition tree is frozen, and DDL on a relation whose
  ancestor is frozen is refused too, so `ALTER TABLE events_2024 ...`, `ATTACH`/`DETACH PARTITION` (DDL on
  the parent) and `CREATE TABLE ... PARTITION OF` are refused; `DETACH PARTITION ... CONCURRENTLY`, which
  commits a first step before any end-of-command check, is refused at its start while any freeze holds;
  what hangs on a frozen table counts as the table: its indexes, triggers (dbguard's own: dropping the
  TRUNCATE guard or the fence is DDL on the table), constraints, policies and rules;
- **replica-role sessions**: event triggers are ENABLE ORIGIN by default and do not fire in
  `session_replication_role = replica`; the freeze's are ENABLE ALWAYS;
- **other roles**: dbguard's own DDL (capture and fence triggers) passes with a row keyed by its transaction
  id in `dbguard.ddl_pass` (see `guards.allow_ddl`), which only the migration role can write; a setting
  would not do, any role can SET one. The guard runs SECURITY DEFINER, so a role without access to schema
  dbguard gets the freeze's answer (and its DDL on other tables passes), not a permission error.
Undo: `release_freeze` drops this migration's rows; the event triggers go when no run holds a freeze.
"""
from __future__ import annotations

import psycopg
from psycopg import sql

from . import db
from .guards import PASS_DDL
from .spec import MigrationSpec

TRIGGERS = (("ddl_command_end", "dbguard_freeze_ddl"), ("sql_drop", "dbguard_freeze_drop"),
            ("ddl_command_start", "dbguard_freeze_start"))

FREEZE_FN = PASS_DDL + """
CREATE TABLE IF NOT EXISTS dbguard.frozen (
    migration text NOT NULL, run_id text NOT NULL, relid oid NOT NULL, relname text NOT NULL,
    PRIMARY KEY (migration, relid)
);
ALTER TABLE dbguard.frozen ADD COLUMN IF NOT EXISTS root oid;  -- the migrated table a partition belongs to
REVOKE ALL ON dbguard.frozen FROM PUBLIC;
CREATE OR REPLACE FUNCTION dbguard.freeze_guard() RETURNS event_trigger LANGUAGE plpgsql
SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE r record; f record; rel oid;
BEGIN
  -- dbguard's own DDL: its transaction holds a pass only the migration role can write
  IF EXISTS (SELECT 1 FROM dbguard.ddl_pass WHERE xid = pg_current_xact_id()) THEN RETURN; END IF;
  IF TG_EVENT = 'ddl_command_start' THEN
    -- DETACH PARTITION CONCURRENTLY commits its first step (the partition's rows leave the parent's view)
    -- before ddl_command_end could refuse it, and names no object here: refuse it while any freeze holds
    IF current_query() ~* '\mdetach\s+partition\M.*\m(concurrently|finalize)\M' THEN
      SELECT * INTO f FROM dbguard.frozen LIMIT 1;
      IF FOUND THEN
        RAISE EXCEPTION 'dbguard: DETACH PARTITION CONCURRENTLY is blocked while migration % (run %) freezes tables '
          'of this database: it commits before the freeze can check the table; run it after the run ends',
          f.migration, f.run_id USING ERRCODE = 'object_in_use';
      END IF;
    END IF;
    RETURN;
  END IF;
  IF TG_EVENT = 'sql_drop' THEN
    FOR r IN SELECT * FROM pg_event_trigger_dropped_objects() LOOP
      -- a dropped trigger, constraint, policy or rule: the table it hung on (still there) by its address
      rel := CASE WHEN r.object_type IN ('trigger', 'table constraint', 'policy', 'rule')
                       AND cardinality(r.address_names) >= 3
                  THEN to_regclass(format('%I.%I', r.address_names[1], r.address_names[2]))::oid
                  ELSE r.objid END;
      SELECT * INTO f FROM dbguard.frozen WHERE relid = rel ORDER BY relid LIMIT 1;
      IF FOUND THEN
        RAISE EXCEPTION 'dbguard: % is frozen by migration % (run %); DDL is blocked until the run ends',
          f.relname, f.migration, f.run_id USING ERRCODE = 'object_in_use';
      END IF;
    END LOOP;
  ELSE
    FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
      -- the table the command changed: itself, or the one an index, trigger, policy, rule or constraint is on
      rel := CASE r.classid
               WHEN 'pg_class'::regclass THEN coalesce((SELECT indrelid FROM pg_index WHERE indexrelid = r.objid), r.objid)
               WHEN 'pg_trigger'::regclass THEN (SELECT tgrelid FROM pg_trigger WHERE oid = r.objid)
               WHEN 'pg_policy'::regclass THEN (SELECT polrelid FROM pg_policy WHERE oid = r.objid)
               WHEN 'pg_rewrite'::regclass THEN (SELECT ev_class FROM pg_rewrite WHERE oid = r.objid)
               WHEN 'pg_constraint'::regclass THEN (SELECT conrelid FROM pg_constraint WHERE oid = r.objid)
             END;
      -- a frozen table, or a partition (new or old) of one: CREATE TABLE ... PARTITION OF, ATTACH
      SELECT * INTO f FROM dbguard.frozen
       WHERE relid = rel OR relid IN (SELECT a.relid FROM pg_partition_ancestors(rel) a)
       ORDER BY relid = rel DESC LIMIT 1;  -- name the partition itself when it is the one altered
      IF FOUND THEN
        RAISE EXCEPTION 'dbguard: % is frozen by migration % (run %); DDL is blocked until the run ends',
          f.relname, f.migration, f.run_id USING ERRCODE = 'object_in_use';
      END IF;
    END LOOP;
  END IF;
END $$;
"""

# every member of the table's partition tree (pg_partition_tree is empty for a table that is not partitioned)
FREEZE_MEMBERS = """
INSERT INTO dbguard.frozen (migration, run_id, root, relid, relname)
SELECT %(m)s, %(r)s, %(rel)s::regclass, p.relid,
       CASE WHEN p.level = 0 THEN %(name)s::text ELSE format('%%s.%%s (a partition of %%s)', n.nspname, c.relname, %(name)s::text) END
FROM (SELECT %(rel)s::regclass AS relid, 0 AS level
      UNION SELECT relid, level FROM pg_partition_tree(%(rel)s::regclass)) p JOIN pg_class c ON c.oid = p.relid JOIN pg_namespace n ON n.oid = c.relnamespace
ON CONFLICT (migration, relid) DO UPDATE SET run_id = EXCLUDED.run_id
"""


def freeze(conn: psycopg.Connection, spec: MigrationSpec, run_id: str) -> list[str]:
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.freeze'))")
    conn.execute("CREATE SCHEMA IF NOT EXISTS dbguard")
    conn.execute(FREEZE_FN)
    for ev, name in TRIGGERS:
        if not conn.execute("SELECT 1 FROM pg_event_trigger WHERE evtname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE EVENT TRIGGER {} ON {} {} EXECUTE FUNCTION dbguard.freeze_guard()").format(
                sql.Identifier(name), sql.SQL(ev),
                sql.SQL("WHEN TAG IN ('ALTER TABLE')" if ev == "ddl_command_start" else "")))
        conn.execute(sql.SQL("ALTER EVENT TRIGGER {} ENABLE ALWAYS").format(sql.Identifier(name)))
    frozen = []
    for t in spec.tables:
        name = f"{t.schema_}.{t.name}"
        conn.execute(FREEZE_MEMBERS, {"m": spec.name, "r": run_id, "name": name,
                                      "rel": db.qname(t.schema_, t.name).as_string(conn)})
        frozen.append(name)
    conn.commit()
    return frozen


def release_freeze(spec: MigrationSpec) -> int:
    """Undo `freeze` for this migration; safe to call twice or when nothing was frozen. Returns how many
    migrated tables were released (a partitioned table counts once)."""
    with db.source(spec) as conn:
        if conn.execute("SELECT to_regclass('dbguard.frozen')").fetchone()[0] is None:
            return 0
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.freeze'))")
        n = conn.execute("SELECT count(*) FILTER (WHERE root IS NULL OR root = relid) FROM dbguard.frozen "
                         "WHERE migration = %s", (spec.name,)).fetchone()[0]
        conn.execute("DELETE FROM dbguard.frozen WHERE migration = %s", (spec.name,))
        if not conn.execute("SELECT 1 FROM dbguard.frozen LIMIT 1").fetchone():
            for _, name in TRIGGERS:
                conn.execute(sql.SQL("DROP EVENT TRIGGER IF EXISTS {}").format(sql.Identifier(name)))
        conn.commit()
        return n
