"""Full-text search stores: tsvector transform, analyzer pins, target checks, GIN index.

The analyzer is a text-search configuration (`english`, `simple`, ...). When the
spec changes it, the target tsvector is rebuilt in the source SELECT with the
target configuration, so copy and checksum agree; the retrieval gate then
shows what the change does to results.
"""
from __future__ import annotations

import re
from typing import Any, Iterator

import psycopg
from psycopg import sql

from ..db import qname
from . import build_or_swap
from ..spec import MigrationSpec, SearchStore, Table


def stores(spec: MigrationSpec) -> Iterator[tuple[Table, SearchStore]]:
    for t in spec.tables:
        for s in t.search:
            yield t, s


def label(table: Table, store: SearchStore) -> str:
    return f"{table.schema_}.{table.name}.{store.column or 'fts(' + ','.join(store.source_columns) + ')'}"


def document_expr(store: SearchStore, config: str) -> sql.Composable:
    """to_tsvector(config, a || ' ' || b): IMMUTABLE (concat_ws is not), so it can back a GIN index."""
    parts = sql.SQL(" || ' ' || ").join(
        sql.SQL("coalesce({}, '')").format(sql.Identifier(c)) for c in store.source_columns)
    return sql.SQL("to_tsvector({}::regconfig, {})").format(sql.Literal(config), parts)


def tsv_expr(store: SearchStore, side: str) -> sql.Composable:
    """The searched tsvector on one side: the column, or the expression over source_columns."""
    config = store.source_config if side == "source" else store.config
    if store.column is not None:
        return sql.Identifier(store.column)
    return document_expr(store, config)


def transforms_column(store: SearchStore) -> bool:
    return store.column is not None and store.source_config != store.config and bool(store.source_columns)


def store_for(table: Table, column: str) -> SearchStore | None:
    return next((s for s in table.search if s.column == column), None)


def source_expr(table: Table, store: SearchStore) -> sql.Composable:
    """What the backfill SELECTs for the tsvector column: rebuilt with the target analyzer when it changes."""
    if transforms_column(store):
        return document_expr(store, store.config)
    return sql.Identifier(store.column)


def checksum_expr(table: Table, store: SearchStore, side: str) -> sql.Composable:
    if side not in ("source", "target"):
        raise ValueError(f"side must be 'source' or 'target', got {side!r}")
    expr = source_expr(table, store) if side == "source" else sql.Identifier(store.column)
    return sql.SQL("({})::text").format(expr)  # tsvector text is sorted and canonical


def query_sql(table: Table, store: SearchStore, side: str, k: int, embedding: sql.Composable | None) -> sql.Composed:
    """websearch_to_tsquery + ts_rank with the side's analyzer; ties broken by key."""
    config = store.source_config if side == "source" else store.config
    schema, name = (table.schema_, table.name) if side == "source" else (table.target_schema, table.target_name)
    key = sql.Identifier(table.key[0])
    tsv = tsv_expr(store, side)
    return sql.SQL(
        "SELECT {key}::text, ts_rank({tsv}, q) AS r, {emb} FROM {t}, websearch_to_tsquery({cfg}::regconfig, %s) q "
        "WHERE {tsv} @@ q ORDER BY r DESC, {key} LIMIT {k}").format(
        key=key, tsv=tsv, t=qname(schema, name), cfg=sql.Literal(config), k=sql.Literal(k),
        emb=embedding if embedding is not None else sql.SQL("NULL::bytea"))


def manifest(table: Table, store: SearchStore) -> dict[str, Any]:
    return {"ANALYZER_CONF": store.config, "SOURCE_ANALYZER_CONF": store.source_config}


_CONFIG_IN_TEXT = re.compile(r"to_tsvector\('([^']+)'::regconfig")


def check_target(conn: psycopg.Connection, table: Table, store: SearchStore) -> list[str]:
    """Refuse a target whose text-search configuration differs from the spec, naming both."""
    where = f"target {table.target_schema}.{table.target_name} search store {store.column or store.source_columns}"
    problems = []
    if conn.execute("SELECT 1 FROM pg_ts_config WHERE cfgname = %s", (store.config,)).fetchone() is None:
        problems.append(f"{where}: text-search configuration {store.config!r} (ANALYZER_CONF) does not exist on the "
                        "target; create it or change search.config")
    # Whatever on the target builds this tsvector (a generated column, an expression index)
    # must use the spec's configuration.
    rows = conn.execute(
        """SELECT 'index ' || i.relname, pg_get_indexdef(i.oid)
           FROM pg_index x JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_namespace n ON n.oid = i.relnamespace
           JOIN pg_class t ON t.oid = x.indrelid
           WHERE n.nspname = %s AND t.relname = %s
           UNION ALL
           SELECT 'generated column ' || a.attname, pg_get_expr(d.adbin, d.adrelid)
           FROM pg_attrdef d JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum
           JOIN pg_class t ON t.oid = d.adrelid JOIN pg_namespace n ON n.oid = t.relnamespace
           WHERE n.nspname = %s AND t.relname = %s""",
        (table.target_schema, table.target_name, table.target_schema, table.target_name)).fetchall()
    for what, text in rows:
        for cfg in _CONFIG_IN_TEXT.findall(text or ""):
            if cfg.split(".")[-1] != store.config:
                problems.append(f"target {what} on {table.target_schema}.{table.target_name} uses text-search "
                                f"configuration {cfg!r} but the spec says {store.config!r} (ANALYZER_CONF)")
    return problems


def index_name(table: Table, store: SearchStore) -> str:
    base = store.column or "fts"
    return store.index_name or f"{table.target_name}_{base}_gin_idx"[:63]


def index_ddl(table: Table, store: SearchStore, name: str) -> sql.Composed:
    return sql.SQL("CREATE INDEX CONCURRENTLY {} ON {} USING gin (({}))").format(
        sql.Identifier(name), qname(table.target_schema, table.target_name), tsv_expr(store, "target"))


def build_index(conn: psycopg.Connection, table: Table, store: SearchStore) -> dict[str, Any]:
    """Create the GIN index if missing (autocommit connection); an invalid leftover is rebuilt and swapped."""
    name = index_name(table, store)
    row = conn.execute(
        """SELECT x.indisvalid, pg_get_indexdef(i.oid) FROM pg_class i JOIN pg_index x ON x.indexrelid = i.oid
           JOIN pg_namespace n ON n.oid = i.relnamespace WHERE n.nspname = %s AND i.relname = %s""",
        (table.target_schema, name)).fetchone()
    matches = None if row is None else bool(
        row[0] and all(c.split(".")[-1] == store.config for c in _CONFIG_IN_TEXT.findall(row[1])))
    return build_or_swap(conn, table.target_schema, name, matches, lambda n: index_ddl(table, store, n))
