"""The migration spec: one YAML file, one pydantic model, the single source of truth.

`load_spec(path)` returns a `MigrationSpec` or raises `SpecError` listing every
problem as (field path, how to fix it). Nothing here touches a database.
Table, column, schema and index names may be any PostgreSQL identifier (ORM names such as
"OrderItems"); they are matched exactly against the catalog and always quoted with
`psycopg.sql.Identifier`, so a spec value never becomes SQL. The migration name and conn ids stay
plain lower-case names (they become DAG ids and environment variable names).

Modules: fields (validated names and types, the strict base model), stores (vector and search
stores, retrieval settings), tables (endpoints, columns, keys, foreign keys), settings (backfill,
gates, window, capture, cutover), migration (MigrationSpec), loading (parse_spec, load_spec).
"""
from .collections import CollectionMove, PayloadColumn, PgvectorTarget, QdrantSource, QdrantTarget  # noqa: F401
from .fields import Ident, LocaleName, Name, SqlType, _At, _ident, _Model  # noqa: F401
from .loading import MAX_SPEC_BYTES, MAX_SPEC_NODES, load_spec, parse_spec  # noqa: F401
from .migration import MigrationSpec  # noqa: F401
from .settings import Backfill, Capture, Cutover, Gates, PgBouncer, Window  # noqa: F401
from .stores import (QDRANT_DISTANCE, Metric, QdrantCollection, QdrantHnsw, QdrantQuantization,  # noqa: F401
                     RetrievalSettings, SearchStore, VectorIndex, VectorStore, vector_type_dim)
from .tables import Column, Endpoint, ForeignKey, Index, Table, TableTarget, TargetEndpoint  # noqa: F401
