"""Collections as the source of a migration (issue 17): a Qdrant collection moves to a new collection
(Qdrant -> Qdrant, built offline beside the live one, swapped by alias) or into a pgvector table
(Qdrant -> pgvector). One entry of the spec's `collections:` list per collection; a spec migrates
either tables or collections."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .fields import Ident, Name, SqlType, _Model
from .stores import _COLLECTION, Metric, QdrantHnsw, QdrantQuantization, VectorIndex

PayloadIndexType = Literal["keyword", "integer", "float", "bool", "geo", "datetime", "text", "uuid"]


def _qname(field: str, v: str | None) -> None:
    if v is not None and not _COLLECTION.match(v):
        raise ValueError(f"{field} {v!r} is not a name Qdrant accepts everywhere; use letters, digits, _ and - "
                         "(1..255 characters)")


class QdrantSource(_Model):
    """The live collection: what readers search today (through `alias` when given)."""

    conn_id: Ident = Field("qdrant_default", description="Airflow connection of type qdrant (AIRFLOW_CONN_<ID>); "
                                                         "undefined = local mode under .qdrant/")
    collection: str = Field(description="the live collection (a collection name, not an alias)")
    alias: str | None = Field(None, description="the alias readers search; Qdrant -> Qdrant's cutover moves it to "
                                                "the new collection (created there when it does not exist)")
    vector_name: str | None = Field(None, description="the vector the gold set is searched with (None: unnamed)")
    dim: int = Field(ge=1, le=65536, description="its size; preflight compares it with the collection")
    metric: Metric = Field(description="its distance (l2 = Euclid, cosine = Cosine, ip = Dot); checked likewise")
    normalized: bool = Field(False, description="the stored vectors are unit length (a Cosine collection's are)")
    updated_field: str | None = Field(None, description="a payload field the application sets on every write "
                                                        "(epoch seconds or RFC 3339): cutover refuses when a point "
                                                        "was written after reconcile began")
    batch_points: int = Field(1000, ge=1, le=100_000, description="points per id range (one verified batch)")

    @model_validator(mode="after")
    def _check(self) -> "QdrantSource":
        for f in ("collection", "alias", "vector_name"):
            _qname(f"source.{f}", getattr(self, f))
        if self.alias is not None and self.alias == self.collection:
            raise ValueError(f"source.alias {self.alias!r} is the collection's own name; readers must search an "
                             "alias (another name) for a swap to move them")
        return self


class QdrantTarget(_Model):
    """Qdrant -> Qdrant: the new collection, a copy of the source's configuration except for what is set here."""

    conn_id: Ident | None = Field(None, description="default: the source's connection (an alias only spans one)")
    collection: str = Field(description="the new collection, built offline beside the live one")
    hnsw: QdrantHnsw | None = Field(None, description="HNSW m / ef_construct (unset fields: as the source); "
                                                      "ef = hnsw_ef of the gold queries")
    quantization: QdrantQuantization | None = Field(None, description="scalar int8 (unset: as the source)")
    payload_indexes: dict[str, PayloadIndexType | None] = Field(
        default_factory=dict, description="payload field -> index type to add or change; null drops the source's")
    drop_vectors: list[str] = Field(default_factory=list, description="named or sparse vectors left out")

    @model_validator(mode="after")
    def _check(self) -> "QdrantTarget":
        _qname("qdrant.collection", self.collection)
        return self


class PayloadColumn(_Model):
    """One payload field as a typed column of the target table (encodings: docs/qdrant.md)."""

    name: Name = Field(description="the column")
    type: SqlType = Field(description="its PostgreSQL type (text, bigint, numeric, timestamptz, jsonb, ...)")
    field: str | None = Field(None, description="the payload key (default: the column's name)")

    @property
    def key(self) -> str:
        return self.field or self.name


class PgvectorTarget(_Model):
    """Qdrant -> pgvector: one row per point in the spec's target database."""

    schema_: Name = Field("public", alias="schema")
    table: Name
    key: Name = Field("id", description="the key column: the point id")
    key_type: Literal["bigint", "uuid"] = Field("bigint", description="bigint for integer ids, uuid for UUID ids")
    column: Name = Field("embedding", description="the vector(dim) column")
    payload: list[PayloadColumn] = Field(default_factory=list, description="payload fields as typed columns")
    index: VectorIndex = Field(default_factory=VectorIndex, description="the ANN index built after the copy")

    @model_validator(mode="after")
    def _check(self) -> "PgvectorTarget":
        from ..stores import qdrant_payload

        names = [self.key, self.column, *(p.name for p in self.payload)]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pgvector: column(s) {dup} named twice (key, column and payload columns must differ)")
        for i, p in enumerate(self.payload):
            if not qdrant_payload.supported(p.type):
                raise ValueError(f"pgvector.payload[{i}] ({p.name}): " + qdrant_payload.unsupported_message(
                    p.key, p.type).replace("qdrant.payload", "pgvector.payload"))
        keys = [p.key for p in self.payload]
        if len(set(keys)) != len(keys):
            raise ValueError(f"pgvector.payload maps a payload field to two columns: {keys}")
        return self


class CollectionMove(_Model):
    """One collection: its source, and either a new `qdrant` collection or a `pgvector` table."""

    source: QdrantSource
    qdrant: QdrantTarget | None = None
    pgvector: PgvectorTarget | None = None
    metric: Metric | None = Field(None, description="the target's distance for the gated vector (default: the "
                                                    "source's)")
    normalize: bool = Field(False, description="L2-normalise the gated vector while copying")
    embed_model: str = Field("unknown", description="EMBED_MODEL_VER pinned in the manifest")

    @property
    def kind(self) -> str:
        return "qdrant" if self.qdrant is not None else "pgvector"

    @property
    def target_metric(self) -> str:
        return self.metric or self.source.metric

    @property
    def target_normalized(self) -> bool:
        return self.normalize or self.source.normalized or (self.kind == "qdrant" and self.target_metric == "cosine")

    @property
    def target_conn_id(self) -> str:
        return (self.qdrant.conn_id or self.source.conn_id) if self.qdrant is not None else ""

    @property
    def label(self) -> str:
        dest = (f"qdrant {self.qdrant.collection}" if self.qdrant is not None
                else f"pgvector {self.pgvector.schema_}.{self.pgvector.table}")
        return f"qdrant {self.source.collection} -> {dest}"

    @model_validator(mode="after")
    def _check(self) -> "CollectionMove":
        if (self.qdrant is None) == (self.pgvector is None):
            raise ValueError("give exactly one target: qdrant (a new collection) or pgvector (a table)")
        if self.normalize and self.source.normalized:
            raise ValueError("normalize is true but source.normalized says the vectors are unit length already; "
                             "drop one")
        if self.qdrant is not None:
            if self.target_conn_id == self.source.conn_id and self.qdrant.collection == self.source.collection:
                raise ValueError(f"qdrant.collection {self.qdrant.collection!r} is the source collection; name the "
                                 "new collection (e.g. <name>_v2)")
            if self.source.alias and self.target_conn_id != self.source.conn_id:
                raise ValueError("qdrant.conn_id differs from source.conn_id but an alias only moves within one "
                                 "Qdrant; drop qdrant.conn_id or source.alias")
            if self.source.alias == self.qdrant.collection:
                raise ValueError(f"qdrant.collection {self.qdrant.collection!r} is the readers' alias; pick "
                                 "another name")
            if (self.source.vector_name or "") in self.qdrant.drop_vectors:
                raise ValueError(f"qdrant.drop_vectors drops the gated vector {self.source.vector_name!r}")
        elif self.pgvector is not None and self.source.alias:
            raise ValueError("source.alias: Qdrant -> pgvector moves no alias (readers switch to the table); "
                             "drop source.alias")
        return self
