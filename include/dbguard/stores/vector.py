"""pgvector stores: transform, checksum, version pins, source scan, target checks, index build.

The declared transform (L2 normalisation) runs inside the source SELECT, so the
target receives exactly the vectors the checksum of the source side describes.
Vector checksums round each component to the spec's float tolerance after the
transform: both sides print the same canonical text.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterator

import psycopg
from psycopg import sql

from ..db import qname
from . import build_or_swap
from ..spec import MigrationSpec, Table, VectorStore, vector_type_dim

OPCLASS = {"l2": "vector_l2_ops", "cosine": "vector_cosine_ops", "ip": "vector_ip_ops"}
OPERATOR = {"l2": "<->", "cosine": "<=>", "ip": "<#>"}
METRIC_OF_OPCLASS = {v: k for k, v in OPCLASS.items()}


def stores(spec: MigrationSpec) -> Iterator[tuple[Table, VectorStore]]:
    for t in spec.tables:
        for v in t.vector:
            yield t, v


def store_for(table: Table, column: str) -> VectorStore | None:
    return next((v for v in table.vector if v.column == column), None)


def label(table: Table, store: VectorStore) -> str:
    return f"{table.schema_}.{table.name}.{store.column}"


def index_name(table: Table, store: VectorStore) -> str:
    return store.index.name or f"{table.target_name}_{store.column}_{store.index.type}_idx"[:63]


def as_vector(table: Table, store: VectorStore) -> sql.Composable:
    """The source column as a pgvector value (real[] sources are cast)."""
    col = sql.Identifier(store.column)
    if table.column(store.column).type.startswith("vector"):
        return col
    return sql.SQL("{}::vector({})").format(col, sql.Literal(store.dim))


def source_expr(table: Table, store: VectorStore) -> sql.Composable:
    """What the backfill SELECTs on the source for this column: the declared transform applied."""
    expr = as_vector(table, store)
    if store.normalize:
        expr = sql.SQL("l2_normalize({})").format(expr)
    return expr


def _decimals(tolerance: float) -> int | None:
    return None if tolerance <= 0 else max(0, min(15, round(-math.log10(tolerance))))


def checksum_expr(table: Table, store: VectorStore, side: str, tolerance: float) -> sql.Composable:
    """Canonical text of the vector after the transform, each component rounded to the tolerance."""
    if side not in ("source", "target"):
        raise ValueError(f"side must be 'source' or 'target', got {side!r}")
    expr = source_expr(table, store) if side == "source" else sql.Identifier(store.column)
    d = _decimals(tolerance)
    comp = sql.SQL("u.x::text") if d is None else sql.SQL("round(u.x::numeric, {})::text").format(sql.Literal(d))
    return sql.SQL("(SELECT string_agg({comp}, ',' ORDER BY u.i) FROM unnest(({expr})::real[]) "
                   "WITH ORDINALITY AS u(x, i))").format(comp=comp, expr=expr)


# ---- version pins -------------------------------------------------------------------------

def manifest(table: Table, store: VectorStore) -> dict[str, Any]:
    return {
        "EMBED_MODEL_VER": store.embed_model,
        "EMBED_DIM": store.dim,
        "NORM": "l2" if store.target_normalized else "none",
        "metric": store.metric,
        "SOURCE_METRIC": store.source_metric,
        "INDEX": json.dumps(index_params(store), sort_keys=True),
    }


def index_params(store: VectorStore) -> dict[str, Any]:
    ix = store.index
    if ix.type == "hnsw":
        return {"type": "hnsw", "opclass": OPCLASS[store.metric], "m": ix.m_, "ef_construction": ix.ef_construction_}
    return {"type": "ivfflat", "opclass": OPCLASS[store.metric], "lists": ix.lists_}


# ---- source scan: NaN / zero / wrong dimension ---------------------------------------------

def scan_source(conn: psycopg.Connection, table: Table, store: VectorStore) -> list[str]:
    """Count bad vectors server-side; returns one problem per kind, with up to 5 example keys."""
    col = sql.Identifier(store.column)
    src_type = table.column(store.column).type
    key = _key_expr(table)
    is_vec = src_type.startswith("vector")
    # real[] can hold NaN, infinities, NULL components and any length; vector(N) can hold only
    # finite values of one length, but zero vectors (undefined under cosine) are legal.
    if is_vec:
        checks = {
            "zero vectors (cosine is undefined for them)": sql.SQL("vector_norm({c}) = 0").format(c=col),
            "wrong dimension": sql.SQL("vector_dims({c}) <> {d}").format(c=col, d=sql.Literal(store.dim)),
        }
    else:
        checks = {
            "NaN or infinite components": sql.SQL(
                "EXISTS (SELECT 1 FROM unnest({c}) x WHERE x = 'NaN' OR x IN ('Infinity', '-Infinity'))").format(c=col),
            "NULL components": sql.SQL("array_position({c}, NULL) IS NOT NULL").format(c=col),
            "zero vectors (cosine is undefined for them)": sql.SQL(
                "NOT EXISTS (SELECT 1 FROM unnest({c}) x WHERE x <> 0 OR x IS NULL)").format(c=col),
            "wrong dimension": sql.SQL("coalesce(cardinality({c}), 0) <> {d}").format(c=col, d=sql.Literal(store.dim)),
        }
    needs_nonzero = store.normalize or store.metric == "cosine" or store.source_metric == "cosine"
    problems = []
    for what, cond in checks.items():
        if what.startswith("zero") and not needs_nonzero:
            continue
        q = sql.SQL("SELECT count(*), (array_agg({k} ORDER BY {k}) FILTER (WHERE true))[1:5] "
                    "FROM {t} WHERE {c} IS NOT NULL AND ({cond})").format(
            k=key, t=qname(table.schema_, table.name), c=col, cond=cond)
        n, examples = conn.execute(q).fetchone()
        if n:
            problems.append(f"source {label(table, store)}: {n} row(s) with {what} (dim {store.dim} expected), "
                            f"e.g. keys {examples}; fix or delete them on the source before copying")
    return problems


def _key_expr(table: Table) -> sql.Composable:
    if len(table.key) == 1:
        return sql.SQL("{}::text").format(sql.Identifier(table.key[0]))
    return sql.SQL("jsonb_build_array({})::text").format(sql.SQL(", ").join(map(sql.Identifier, table.key)))


# ---- target checks (preflight) -------------------------------------------------------------

_INDEXES_ON_COLUMN = """
SELECT i.relname, am.amname, oc.opcname, pg_get_indexdef(i.oid), x.indisvalid
FROM pg_index x
JOIN pg_class i ON i.oid = x.indexrelid
JOIN pg_am am ON am.oid = i.relam
JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
JOIN pg_opclass oc ON oc.oid = x.indclass[0]
WHERE x.indrelid = %s::regclass AND a.attname = %s AND am.amname IN ('hnsw', 'ivfflat')
ORDER BY i.relname
"""


def _regclass(conn: psycopg.Connection, schema: str, name: str) -> int | None:
    row = conn.execute("SELECT c.oid FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                       "WHERE n.nspname = %s AND c.relname = %s", (schema, name)).fetchone()
    return row[0] if row else None


def check_target(conn: psycopg.Connection, table: Table, store: VectorStore, tolerance: float) -> list[str]:
    """Problems with the target for this store, each naming the spec's value and the target's."""
    where = f"target {table.target_schema}.{table.target_name}.{store.column}"
    if conn.execute("SELECT 1 FROM pg_available_extensions WHERE name = 'vector'").fetchone() is None:
        return [f"{where}: pgvector is not available on the target server; install pgvector "
                "(the spec needs the 'vector' extension)"]
    oid = _regclass(conn, table.target_schema, table.target_name)
    if oid is None:
        return []  # preflight creates it from the spec
    problems = []
    row = conn.execute("SELECT format_type(atttypid, atttypmod) FROM pg_attribute "
                       "WHERE attrelid = %s AND attname = %s AND NOT attisdropped", (oid, store.column)).fetchone()
    if row is None:
        return [f"{where}: column is missing on the target; the spec declares vector({store.dim})"]
    tgt_dim = vector_type_dim(row[0])
    if tgt_dim != store.dim:
        problems.append(f"{where}: target column type is {row[0]} but the spec says vector({store.dim}) "
                        f"(EMBED_DIM {store.dim})")
    want = OPCLASS[store.metric]
    for name, am, opc, _def, _valid in conn.execute(_INDEXES_ON_COLUMN, (oid, store.column)).fetchall():
        if opc != want:
            problems.append(f"target index {name} on {table.target_schema}.{table.target_name}.{store.column} uses "
                            f"{opc} ({METRIC_OF_OPCLASS.get(opc, '?')}) but the spec says {store.metric} ({want})")
    if store.target_normalized and tgt_dim is not None:
        q = sql.SQL("SELECT count(*) FROM {t} WHERE {c} IS NOT NULL AND abs(vector_norm({c}) - 1) > {tol}").format(
            t=qname(table.target_schema, table.target_name), c=sql.Identifier(store.column),
            tol=sql.Literal(max(tolerance, 1e-4)))
        n = conn.execute(q).fetchone()[0]
        if n:
            problems.append(f"{where}: {n} target vector(s) are not unit length but the spec says NORM l2 "
                            "(normalize or source_normalized); re-copy them with the normalising transform")
    return problems


# ---- index build + INDEX_HASH --------------------------------------------------------------

def index_ddl(table: Table, store: VectorStore, name: str, *, concurrently: bool = True) -> sql.Composed:
    p = index_params(store)
    params = {k: v for k, v in p.items() if k not in ("type", "opclass")}
    with_ = sql.SQL(", ").join(sql.SQL("{} = {}").format(sql.Identifier(k), sql.Literal(v)) for k, v in params.items())
    return sql.SQL("CREATE INDEX {conc} {name} ON {t} USING {am} ({col} {opc}) WITH ({with_})").format(
        conc=sql.SQL("CONCURRENTLY") if concurrently else sql.SQL(""), name=sql.Identifier(name),
        t=qname(table.target_schema, table.target_name), am=sql.Identifier(p["type"]),
        col=sql.Identifier(store.column), opc=sql.Identifier(p["opclass"]), with_=with_)


def _index_matches(conn: psycopg.Connection, table: Table, store: VectorStore, name: str) -> bool | None:
    """None: no such index; True: valid and as the spec says; False: differs or invalid."""
    row = conn.execute(
        """SELECT am.amname, oc.opcname, coalesce(i.reloptions, '{}'), x.indisvalid, a.attname
           FROM pg_class i JOIN pg_index x ON x.indexrelid = i.oid JOIN pg_am am ON am.oid = i.relam
           JOIN pg_namespace n ON n.oid = i.relnamespace JOIN pg_opclass oc ON oc.oid = x.indclass[0]
           JOIN pg_attribute a ON a.attrelid = x.indrelid AND a.attnum = x.indkey[0]
           WHERE n.nspname = %s AND i.relname = %s""", (table.target_schema, name)).fetchone()
    if row is None:
        return None
    am, opc, opts, valid, col = row
    p = index_params(store)
    want = {f"{k}={v}" for k, v in p.items() if k not in ("type", "opclass")}
    return bool(valid and am == p["type"] and opc == p["opclass"] and col == store.column and set(opts) == want)


def build_index(conn: psycopg.Connection, table: Table, store: VectorStore) -> dict[str, Any]:
    """Build (or keep) the ANN index; a rebuild builds under a temporary name, then swaps in one transaction.

    `conn` must be in autocommit mode (CREATE INDEX CONCURRENTLY cannot run in a transaction).
    """
    if not conn.autocommit:
        raise ValueError("build_index needs an autocommit connection (CREATE INDEX CONCURRENTLY)")
    name = index_name(table, store)
    return build_or_swap(conn, table.target_schema, name, _index_matches(conn, table, store, name),
                         lambda n: index_ddl(table, store, n))


def vectors_digest(conn: psycopg.Connection, table: Table, store: VectorStore) -> tuple[int, str]:
    """Order-independent digest of the target vectors: count and sum of 60-bit md5 prefixes."""
    q = sql.SQL("SELECT count({c}), coalesce(sum(('x' || substr(md5({c}::text), 1, 15))::bit(60)::bigint::numeric), 0) "
                "FROM {t}").format(c=sql.Identifier(store.column), t=qname(table.target_schema, table.target_name))
    n, s = conn.execute(q).fetchone()
    return int(n), str(s)


def index_hash(conn: psycopg.Connection, table: Table, store: VectorStore) -> str:
    n, s = vectors_digest(conn, table, store)
    payload = json.dumps({"manifest": manifest(table, store), "count": n, "sum": s}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]
