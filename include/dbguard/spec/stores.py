"""Retrieval stores of a table: pgvector columns with their ANN index, full-text search, and the
settings of the shadow reads that compare them."""
from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, model_validator

from .fields import Ident, Name, _Model


Metric = Literal["l2", "cosine", "ip"]
_VECTOR_TYPE = re.compile(r"^vector\((\d+)\)$")
_FLOAT_ARRAY = {"real[]", "double precision[]", "float4[]", "float8[]"}


def vector_type_dim(sql_type: str) -> int | None:
    """N for 'vector(N)', else None."""
    m = _VECTOR_TYPE.match(sql_type)
    return int(m.group(1)) if m else None


class VectorIndex(_Model):
    """An ANN index on a pgvector column; parameters as pgvector names them."""

    type: Literal["hnsw", "ivfflat"] = "hnsw"
    m: int | None = Field(None, description="hnsw: links per node, 2..100 (default 16)")
    ef_construction: int | None = Field(None, description="hnsw: build candidate list, 4..1000, >= 2*m (default 64)")
    ef_search: int | None = Field(None, description="hnsw: query candidate list, 1..1000 (default 40)")
    lists: int | None = Field(None, description="ivfflat: inverted lists, 1..32768 (default 100)")
    probes: int | None = Field(None, description="ivfflat: lists probed per query, 1..lists (default 1)")
    name: Name | None = Field(None, description="index name (default <table>_<column>_<type>_idx)")

    @model_validator(mode="after")
    def _check(self) -> "VectorIndex":
        hnsw, ivf = ("m", "ef_construction", "ef_search"), ("lists", "probes")
        wrong = [f for f in (ivf if self.type == "hnsw" else hnsw) if getattr(self, f) is not None]
        if wrong:
            raise ValueError(f"{self.type} index does not take {wrong}; "
                             f"{self.type} takes {list(hnsw if self.type == 'hnsw' else ivf)}")
        ranges = {"m": (2, 100), "ef_construction": (4, 1000), "ef_search": (1, 1000),
                  "lists": (1, 32768), "probes": (1, 32768)}
        for f, (lo, hi) in ranges.items():
            v = getattr(self, f)
            if v is not None and not lo <= v <= hi:
                raise ValueError(f"index.{f} = {v} is out of range; pgvector accepts {lo}..{hi}")
        if self.type == "hnsw" and self.ef_construction_ < 2 * self.m_:
            raise ValueError(f"index.ef_construction = {self.ef_construction_} must be >= 2 * m = {2 * self.m_}")
        if self.type == "ivfflat" and self.probes_ > self.lists_:
            raise ValueError(f"index.probes = {self.probes_} exceeds index.lists = {self.lists_}")
        return self

    # Effective values (pgvector's defaults when not given).
    @property
    def m_(self) -> int:
        return self.m or 16

    @property
    def ef_construction_(self) -> int:
        return self.ef_construction or 64

    @property
    def ef_search_(self) -> int:
        return self.ef_search or 40

    @property
    def lists_(self) -> int:
        return self.lists or 100

    @property
    def probes_(self) -> int:
        return self.probes or 1


_COLLECTION = re.compile(r"^[A-Za-z0-9_-]{1,255}$")
QDRANT_DISTANCE = {"l2": "Euclid", "cosine": "Cosine", "ip": "Dot"}


class QdrantHnsw(_Model):
    """HNSW parameters of a Qdrant collection, as Qdrant names them (None: the server's default)."""

    m: int | None = Field(None, ge=0, le=1000, description="links per node (Qdrant default 16; 0 disables the graph)")
    ef_construct: int | None = Field(None, ge=4, le=10000, description="build candidate list (Qdrant default 100)")
    ef: int | None = Field(None, ge=1, le=10000, description="query candidate list (hnsw_ef; default max(k, 128))")


class QdrantQuantization(_Model):
    """Scalar int8 quantization; searches rescore with the original vectors, which the checksum covers."""

    type: Literal["scalar"] = "scalar"
    quantile: float | None = Field(None, gt=0.5, le=1.0)
    always_ram: bool | None = None


class QdrantCollection(_Model):
    """The target of a vector store is a Qdrant collection: one point per row, id = the table key,
    vector = the column after the declared transform, payload = the chosen columns. The distance is
    the store's `metric` (l2 -> Euclid, cosine -> Cosine, ip -> Dot)."""

    conn_id: Ident = Field("qdrant_default", description="Airflow connection of type qdrant "
                                                         "(AIRFLOW_CONN_<ID>); undefined = local mode under .qdrant/")
    collection: str = Field(description="collection name (letters, digits, _ and -)")
    vector_name: str | None = Field(None, description="a named vector; None = the collection's unnamed vector")
    payload: list[Name] = Field(default_factory=list, description="columns carried as payload (typed, see README)")
    hnsw: QdrantHnsw = Field(default_factory=QdrantHnsw)
    quantization: QdrantQuantization | None = None
    batch_points: int = Field(1000, ge=1, le=100_000, description="points per upsert (and per verified batch); "
                                                                 "a server refuses requests over 32 MB by default")

    @model_validator(mode="after")
    def _check(self) -> "QdrantCollection":
        for f in ("collection", "vector_name"):
            v = getattr(self, f)
            if v is not None and not _COLLECTION.match(v):
                raise ValueError(f"qdrant.{f} {v!r} is not a name Qdrant accepts everywhere; use letters, "
                                 "digits, _ and - (1..255 characters)")
        if len(set(self.payload)) != len(self.payload):
            raise ValueError(f"qdrant.payload {self.payload} names a column twice")
        return self


class VectorStore(_Model):
    """A pgvector column that is migrated and must keep its retrieval quality."""

    column: Name = Field(description="the vector column (declared under columns)")
    dim: int = Field(ge=1, le=16000, description="embedding dimension; must match vector(N) of the column")
    source_metric: Metric = Field("l2", description="distance the source is queried with: l2, cosine or ip")
    source_normalized: bool = Field(False, description="source vectors are already unit length")
    metric: Metric = Field(description="distance the target is queried with: l2, cosine or ip")
    normalize: bool = Field(False, description="L2-normalise each vector while copying (the declared transform)")
    index: VectorIndex = Field(default_factory=VectorIndex, description="the target ANN index")
    source_index: VectorIndex | None = Field(None, description="the source's ANN index (query-time params)")
    embed_model: str = Field("unknown", description="EMBED_MODEL_VER pinned in the manifest")
    qdrant: QdrantCollection | None = Field(None, description="the target is this Qdrant collection, not the "
                                                              "pgvector column of the target table")

    @property
    def target_normalized(self) -> bool:
        return self.normalize or self.source_normalized


class SearchStore(_Model):
    """Full-text search: a tsvector column (or an expression over text columns) with a GIN index."""

    column: Name | None = Field(None, description="tsvector column; None = search an expression over source_columns")
    source_columns: list[Name] = Field(default_factory=list,
                                        description="text columns the tsvector is built from")
    source_config: Ident = Field("english", description="text-search configuration (analyzer) on the source")
    config: Ident = Field("english", description="text-search configuration (analyzer) on the target")
    embedding_column: Name | None = Field(None, description="vector column used for ΔS of search hits "
                                                            "(default: the table's vector store)")
    index_name: Name | None = None

    @model_validator(mode="after")
    def _check(self) -> "SearchStore":
        if self.column is None and not self.source_columns:
            raise ValueError("give column (a tsvector column) or source_columns (text columns to search)")
        if self.source_config != self.config and not self.source_columns:
            raise ValueError(f"the analyzer changes ({self.source_config} -> {self.config}): list source_columns "
                             "so the tsvector can be rebuilt with the new configuration")
        return self


class RetrievalSettings(_Model):
    k: int = Field(10, ge=1, le=1000, description="top-k compared per query")
    seeds: list[int] = Field(default_factory=lambda: [1, 2], min_length=1, description="λ perturbation seeds")
    jitter_sigma: float = Field(0.01, ge=0, le=1, description="query jitter, relative to the query vector's norm")
    overlap_eps: float = Field(1e-3, ge=0, description="distance tolerance of overlap@k (ann-benchmarks style)")
    recall_queries: int | None = Field(100, ge=0, description="queries whose recall@k against exact search is "
                                                              "measured (the reported mean); None = all")
    recall_tolerance: float = Field(0.1, ge=0, le=1, description="a query whose post top-k is disjoint from its pre "
                                                                 "top-k counts as × only when post recall is below "
                                                                 "pre recall by more than this; else ~ (index noise)")
    latency_floor_ms: float = Field(2.0, ge=0, description="p95 slow-downs smaller than this are noise")
    query_timeout_ms: int = Field(10_000, ge=1)
    max_queries: int | None = Field(None, ge=1, description="use only the first N gold queries")
    poke_seconds: float = Field(30, gt=0, description="how often the retrieval gate re-measures while waiting")
    gate_timeout_minutes: float = Field(60, gt=0, description="the retrieval gate fails when it has not passed "
                                                             "this long after its first poke")
