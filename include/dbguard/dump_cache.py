"""pg_dump once per unchanged schema: preflight reads the source's schema twice (its check, then the
target's creation) and finish_schema once more; each `pg_dump --schema-only` costs a few hundred ms of
catalog queries. The archive is reused only while a fingerprint of the source's catalogs is unchanged:
every DDL, GRANT, COMMENT, SECURITY LABEL or role change inserts, deletes or updates a catalog row (a new
xmin, or a count that changes), so any of them since the last dump means a new one. (What the server updates
in place, such as reltuples, is statistics, which a --schema-only archive does not hold.) Per process, the
last few archives.
"""
from __future__ import annotations

import atexit
import itertools
import shutil
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import psycopg
from psycopg import sql

# the catalogs whose rows pg_dump --schema-only turns into SQL (those the server has and the role may read:
# pg_user_mapping is superuser-only, its options hold passwords)
_CATALOGS = ["pg_class", "pg_attribute", "pg_attrdef", "pg_constraint", "pg_index", "pg_inherits", "pg_trigger",
             "pg_rewrite", "pg_proc", "pg_type", "pg_enum", "pg_range", "pg_namespace", "pg_depend",
             "pg_description", "pg_policy", "pg_sequence", "pg_extension", "pg_event_trigger", "pg_default_acl",
             "pg_statistic_ext", "pg_collation", "pg_cast", "pg_operator", "pg_opclass", "pg_opfamily",
             "pg_init_privs", "pg_seclabel", "pg_ts_config", "pg_ts_dict", "pg_foreign_table",
             "pg_foreign_server", "pg_foreign_data_wrapper", "pg_user_mapping", "pg_language", "pg_conversion",
             "pg_transform", "pg_aggregate", "pg_am", "pg_partitioned_table", "pg_publication", "pg_largeobject_metadata"]
_KEEP = 4

_cache: OrderedDict[tuple, tuple[str, Path, str]] = OrderedDict()  # key -> (fingerprint, archive copy, listing)
_dir: Path | None = None
_seq = itertools.count()
_lock = threading.Lock()


def fingerprint(src: psycopg.Connection) -> str:
    """Count and sum of xmin of every schema catalog's rows, and the roles by name (owners and grantees)."""
    have = [r[0] for r in src.execute("SELECT relname::text FROM pg_class WHERE relnamespace = 'pg_catalog'::regnamespace "
                                      "AND relkind = 'r' AND relname = ANY(%s) AND has_table_privilege(oid, 'SELECT') "
                                      "ORDER BY relname", (_CATALOGS,))]
    parts = [sql.SQL("SELECT {n} || ':' || count(*) || ':' || coalesce(sum(xmin::text::bigint), 0) FROM {t}").format(
        n=sql.Literal(c), t=sql.Identifier("pg_catalog", c)) for c in have]
    parts.append(sql.SQL("SELECT 'roles:' || md5(string_agg(oid::text || '=' || rolname, ',' ORDER BY oid)) "
                         "FROM pg_catalog.pg_roles"))
    rows = src.execute(sql.SQL(" UNION ALL ").join(parts)).fetchall()
    return ";".join(sorted(r[0] for r in rows))


def dump(src: psycopg.Connection, key: tuple, archive: Path, make: Callable[[Path], str]) -> str:
    """Write the schema archive to `archive` and return its listing: `make(archive)` runs pg_dump (and lists
    it), unless the archive for `key` (the DSN and pg_dump's arguments) was made at this same fingerprint."""
    global _dir
    fp = fingerprint(src)  # before the dump: a change after this point makes the next call miss, never hit
    with _lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == fp and hit[1].exists():
            shutil.copyfile(hit[1], archive)
            _cache.move_to_end(key)
            return hit[2]
    listing = make(archive)
    with _lock:
        if _dir is None:
            _dir = Path(tempfile.mkdtemp(prefix="dbguard-dumps-"))
            atexit.register(shutil.rmtree, _dir, True)
        copy = _dir / f"{next(_seq)}.dump"
        shutil.copyfile(archive, copy)
        old = _cache.pop(key, None)
        if old is not None:
            old[1].unlink(missing_ok=True)
        _cache[key] = (fp, copy, listing)
        while len(_cache) > _KEEP:
            _, (_, gone, _) = _cache.popitem(last=False)
            gone.unlink(missing_ok=True)
    return listing
