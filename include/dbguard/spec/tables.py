"""Endpoints and tables: columns (the contract), keys, foreign keys, target names and indexes, stores."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, PrivateAttr, model_validator

from .fields import Ident, LocaleName, Name, SqlType, _At, _Model
from .stores import _FLOAT_ARRAY, SearchStore, VectorStore, vector_type_dim


class Endpoint(_Model):
    """One side of the migration: an Airflow connection id (AIRFLOW_CONN_<ID> works too)."""

    conn_id: Ident


class TargetEndpoint(Endpoint):
    database: Ident | None = Field(
        None, description="target database name (default: the one in the connection); see create_database"
    )
    encoding: str = Field("UTF8", description="required server encoding of the target database")
    collation: str = Field("C", description="LC_COLLATE of the target database, and the default column collation")
    ctype: str = Field("C", description="LC_CTYPE of the target database")
    create_database: bool = Field(
        False, description="create the target database (with encoding/collation above) when it does not exist"
    )

    @model_validator(mode="after")
    def _check(self) -> "TargetEndpoint":
        for name in ("encoding", "collation", "ctype"):
            v = getattr(self, name)
            if not re.match(r"^[A-Za-z0-9_.@-]{1,63}$", v):
                raise _At(name, f"{v!r} is not a valid encoding/locale name; use e.g. 'UTF8', 'C', 'en_US.UTF-8'")
        return self


class Column(_Model):
    name: Name
    type: SqlType = Field(description="type on the source (the contract checks it)")
    target_type: SqlType | None = Field(None, description="type on the target, when it changes")
    nullable: bool = True
    collation: LocaleName | None = Field(None, description="target collation of a text column (default target.collation)")
    generated: bool = Field(False, description="a generated column: re-generated on the target, never copied "
                                               "(set from the source catalog; no need to write it)")

    @property
    def tgt_type(self) -> str:
        return self.target_type or self.type


class Index(_Model):
    columns: list[Name] = Field(min_length=1)
    method: Literal["btree", "hash", "gin", "gist", "brin", "hnsw", "ivfflat"] = "btree"
    unique: bool = False
    opclass: Ident | None = None
    name: Name | None = None
    with_: dict[Ident, int | float] = Field(default_factory=dict, alias="with")


class ForeignKey(_Model):
    columns: list[Name] = Field(min_length=1)
    references: Name = Field(description="name of another table in this spec")
    ref_columns: list[Name] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ForeignKey":
        if len(self.columns) != len(self.ref_columns):
            raise _At("ref_columns", f"{len(self.ref_columns)} ref_columns for {len(self.columns)} columns; "
                                     "list one referenced column per foreign key column")
        return self


class TableTarget(_Model):
    schema_: Name | None = Field(None, alias="schema", description="target schema (default: the source schema)")
    name: Name | None = Field(None, description="target table name (default: the source name)")
    indexes: list[Index] = Field(default_factory=list)


class Table(_Model):
    name: Name
    schema_: Name = Field("public", alias="schema")
    key: list[Name] = Field(min_length=1, description="primary-key columns; ranges are planned on them")
    columns: list[Column] = Field(default_factory=list, description="the contract: declared columns are checked "
                                  "against the source; undeclared source columns are migrated with their source type")
    exclude_columns: list[Name] = Field(default_factory=list, description="source columns NOT migrated "
                                         "(listed in the run report as excluded_columns)")
    foreign_keys: list[ForeignKey] = Field(default_factory=list)
    target: TableTarget = Field(default_factory=TableTarget)
    vector: list[VectorStore] = Field(default_factory=list, description="pgvector stores in this table")
    search: list[SearchStore] = Field(default_factory=list, description="full-text search stores in this table")

    @property
    def target_schema(self) -> str:
        return self.target.schema_ or self.schema_

    @property
    def target_name(self) -> str:
        return self.target.name or self.name

    _ref: str | None = PrivateAttr(default=None)

    @property
    def ref(self) -> str:
        """How the rest of dbguard names this table (ledger, ranges, capture, task groups): the bare name, or
        "schema.name" when another table of the spec has the same name (set by MigrationSpec)."""
        return self._ref or self.name

    @property
    def copy_columns(self) -> list[Column]:
        """Columns the copy carries: generated columns are re-generated on the target, never copied."""
        return [c for c in self.columns if not c.generated]

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @model_validator(mode="after")
    def _check(self) -> "Table":
        names = [c.name for c in self.columns]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise _At(("columns", i), f"column {n!r} is declared twice; keep one declaration")
        for i, x in enumerate(self.exclude_columns):
            if x in self.key:
                raise _At(("exclude_columns", i), f"{x!r} is a key column; a key column cannot be excluded")
            if x in names:
                raise _At(("exclude_columns", i), f"{x!r} is declared under columns; drop one of the two")
        if not names:  # columns come from the source catalog (catalog.resolve checks the names then)
            return self
        missing = [k for k in self.key if k not in names]
        if missing:
            raise _At("key", f"key column(s) {missing} are not in columns; declare them under columns "
                             "or fix the key")
        if len(set(self.key)) != len(self.key):
            raise _At("key", f"key {self.key} names a column twice")
        for i, fk in enumerate(self.foreign_keys):
            bad = [c for c in fk.columns if c not in names]
            if bad:
                raise _At(("foreign_keys", i, "columns"),
                          f"foreign key column(s) {bad} are not in columns; declare them under columns")
        for i, ix in enumerate(self.target.indexes):
            bad = [c for c in ix.columns if c not in names]
            if bad:
                raise _At(("target", "indexes", i, "columns"),
                          f"index column(s) {bad} are not in columns; index only declared columns")
        _check_stores(self, names)
        return self


def _check_stores(t: "Table", names: list[str]) -> None:
    """Stores refer to declared columns of the right types (errors name the field)."""
    for i, v in enumerate(t.vector):
        where = f"vector[{i}]"
        if v.column not in names:
            raise ValueError(f"{where}.column {v.column!r} is not in columns; declare it under columns")
        col = t.column(v.column)
        src_dim, tgt_dim = vector_type_dim(col.type), vector_type_dim(col.tgt_type)
        if src_dim is None and col.type not in _FLOAT_ARRAY and col.type != "vector":
            raise ValueError(f"{where}.column {v.column!r} has type {col.type!r}; a vector store needs "
                             f"vector({v.dim}) or real[] on the source")
        if tgt_dim is None:
            raise ValueError(f"{where}.column {v.column!r} has target type {col.tgt_type!r}; "
                             f"set target_type: vector({v.dim})")
        for label, d in (("type", src_dim), ("target type", tgt_dim)):
            if d is not None and d != v.dim:
                raise ValueError(f"{where}.dim = {v.dim} but column {v.column!r} {label} is vector({d}); "
                                 "make them equal")
        if v.qdrant is not None:
            bad = [c for c in v.qdrant.payload if c not in names]
            if bad:
                raise ValueError(f"{where}.qdrant.payload: column(s) {bad} are not in columns; declare them "
                                 "under columns")
            if len(t.key) != 1:
                raise ValueError(f"{where}.qdrant: a Qdrant point id is one value (integer or UUID) but the key is "
                                 f"{t.key}; give the table a one-column key")
            if v.column in v.qdrant.payload:
                raise ValueError(f"{where}.qdrant.payload lists the vector column {v.column!r}; it is the point's "
                                 "vector already")
        if v.normalize and v.source_normalized:
            raise ValueError(f"{where}: normalize is true but source_normalized says the vectors are "
                             "already unit length; drop one")
    if len({v.column for v in t.vector}) != len(t.vector):
        raise ValueError("vector: a column is declared as a vector store twice")
    for i, s in enumerate(t.search):
        where = f"search[{i}]"
        for c in [s.column, s.embedding_column, *s.source_columns]:
            if c is not None and c not in names:
                raise ValueError(f"{where}: column {c!r} is not in columns; declare it under columns")
        if s.column is not None and t.column(s.column).tgt_type != "tsvector":
            raise ValueError(f"{where}.column {s.column!r} has target type {t.column(s.column).tgt_type!r}; "
                             "a search column must be tsvector")
        if s.embedding_column is not None and s.embedding_column not in {v.column for v in t.vector}:
            raise ValueError(f"{where}.embedding_column {s.embedding_column!r} is not a vector store of this table")
