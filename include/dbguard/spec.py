"""The migration spec: one YAML file, one pydantic model, the single source of truth.

`load_spec(path)` returns a `MigrationSpec` or raises `SpecError` listing every
problem as (field path, how to fix it). Nothing here touches a database.
Table, column, schema and index names may be any PostgreSQL identifier (ORM names such as
"OrderItems"); they are matched exactly against the catalog and always quoted with
`psycopg.sql.Identifier`, so a spec value never becomes SQL. The migration name and conn ids stay
plain lower-case names (they become DAG ids and environment variable names).
"""
from __future__ import annotations

import datetime as dt
import difflib
import re
import zoneinfo
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    model_validator,
)

from .errors import SpecError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A column type as written in DDL: words, digits, one (p[,s]) modifier, array brackets.
_TYPE = re.compile(r"^([a-z_][a-z0-9_$]*\.)?[a-z_][a-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?( [a-z ]+)?(\[\])*$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _ident(v: str) -> str:
    if not isinstance(v, str) or not _IDENT.match(v):
        raise ValueError(
            f"{v!r} is not a plain SQL identifier; use lower-case letters, digits and _ "
            "(at most 63 characters, not starting with a digit)"
        )
    return v


# A user-defined type as format_type() prints it when its name needs quotes: "OrderStatus", "s"."T"[].
_QUOTED_PART = r'(?:"(?:[^"\x00]|"")+"|[a-z_][a-z0-9_$]*)'
_QUOTED_TYPE = re.compile(rf"^{_QUOTED_PART}(?:\.{_QUOTED_PART})?(\[\])*$")


def _sql_type(v: str) -> str:
    if isinstance(v, str) and '"' in v:
        if not _QUOTED_TYPE.match(v):
            raise ValueError(f"{v!r} is not a type name dbguard accepts; quote a user-defined type's name as "
                             'format_type() prints it, e.g. \'"OrderStatus"\' or \'shop."Mood"[]\'')
        return v
    norm = " ".join(str(v).lower().split())
    if not _TYPE.match(norm):
        raise ValueError(
            f"{v!r} is not a column type dbguard accepts; write it as in DDL, "
            "for example 'bigint', 'numeric(12,2)', 'timestamp with time zone', 'text[]', 'vector(384)'"
        )
    return norm


def _timezone(v: str) -> str:
    try:
        zoneinfo.ZoneInfo(v)
    except Exception:
        raise ValueError(f"unknown time zone {v!r}; use an IANA name such as 'UTC' or 'Europe/Berlin'") from None
    return v


Ident = Annotated[str, AfterValidator(_ident)]


def _name(v: str) -> str:
    """Table, column, schema and index names: any PostgreSQL identifier ORMs use ("OrderItems", "createdAt",
    "_prisma_migrations", spaces, quotes, unicode). Safe because every use quotes it (sql.Identifier) and
    the catalog matches it exactly; the migration name and conn ids stay plain (DAG ids, env var names)."""
    if not isinstance(v, str) or v == "":
        raise ValueError(f"{v!r} is not a name; give the table/column name exactly as the database spells it")
    if "\x00" in v:
        raise ValueError(f"{v!r} contains a NUL byte, which no PostgreSQL identifier can hold")
    if len(v.encode("utf-8")) > 63:
        raise ValueError(f"{v!r} is {len(v.encode('utf-8'))} bytes; PostgreSQL identifiers are at most 63 bytes")
    return v


Name = Annotated[str, AfterValidator(_name)]


def _locale(v: str) -> str:
    if not re.match(r"^[A-Za-z0-9_.@-]{1,63}$", v):
        raise ValueError(f"{v!r} is not a valid collation/locale name, e.g. 'C', 'POSIX', 'en_US.UTF-8', 'und-x-icu'")
    return v


LocaleName = Annotated[str, AfterValidator(_locale)]
SqlType = Annotated[str, AfterValidator(_sql_type)]


class _At(ValueError):
    """A model-level check that knows which field is wrong: `loc` is appended to the
    model's location, so the error names e.g. tables[orders].key, not tables[orders]."""

    def __init__(self, loc: tuple[Any, ...] | str, msg: str):
        super().__init__(msg)
        self.loc = (loc,) if isinstance(loc, str) else tuple(loc)


class _Model(BaseModel):
    # strict: YAML `concurrency: true` or `batch_rows: "5"` is refused, not coerced to 1 or 5
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, strict=True)


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



# ---- vector and search stores (retrieval) ---------------------------------------------

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


class Backfill(_Model):
    batch_rows: int = Field(250_000, ge=100, le=10_000_000, description="rows per key range (250k keeps Airflow's "
                                                                       "per-task cost under 10 % of a run: bench airflow_overhead)")
    concurrency: int = Field(4, ge=1, le=64, description="Airflow pool slots = parallel range copies")
    max_rows_per_second: int | None = Field(None, ge=1, description="throttle per range copy")
    retries: int = Field(3, ge=0, le=20)
    retry_delay_seconds: float = Field(5, gt=0, le=3600)
    max_retry_delay_seconds: float = Field(300, gt=0, le=86400)
    copy_format: Literal["auto", "binary", "text"] = "auto"


class Gates(_Model):
    repair_attempts: int = Field(2, ge=0, le=10, description="reconcile -> repair -> verify rounds")
    max_repair_rows: int = Field(100_000, ge=0, description="above this many differing rows, fail instead of repairing")
    bisect_leaf_rows: int = Field(2_000, ge=10, description="ranges this small are compared row by row")
    checksum_timeout_minutes: float = Field(30, gt=0)
    max_lag_ops: int = Field(1_000, ge=0, description="drain gate: unapplied change ops allowed after a drain pass "
                                                       "(the final verification drains to 0 under a write freeze)")
    delta_s_max: float = Field(0.02, ge=0, le=2)
    delta_s_escalate: float = Field(0.05, ge=0, le=2)
    escalate_after_minutes: float = Field(15, ge=0)
    latency_p95_change: float = Field(0.15, ge=0)
    float_tolerance: float = Field(1e-6, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "Gates":
        if self.delta_s_escalate < self.delta_s_max:
            raise _At("delta_s_escalate", f"{self.delta_s_escalate} is below delta_s_max ({self.delta_s_max}); "
                                          "the escalation threshold must be >= the pass threshold")
        return self


class Window(_Model):
    start: str = Field(description="HH:MM, inclusive")
    end: str = Field(description="HH:MM, exclusive; may be past midnight (end < start)")
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Window":
        for name in ("start", "end"):
            if not _HHMM.match(getattr(self, name)):
                raise _At(name, f"{getattr(self, name)!r} must be HH:MM (24-hour, 00:00..23:59), e.g. '02:00'")
        if self.start == self.end:
            raise _At("end", "start and end are equal: the window would be empty; "
                             "for a window past midnight give an end before the start")
        return self

    def contains(self, when: dt.datetime) -> bool:
        local = when.astimezone(zoneinfo.ZoneInfo(self.timezone))
        t = local.strftime("%H:%M")
        if self.start < self.end:
            inside, day = self.start <= t < self.end, local
        else:  # past midnight: the part after midnight belongs to the previous day's window
            inside = t >= self.start or t < self.end
            day = local if t >= self.start else local - dt.timedelta(days=1)
        return inside and (self.days is None or day.strftime("%a").lower() in self.days)

    def next_open(self, after: dt.datetime) -> dt.datetime:
        """The first instant >= `after` that is inside the window (`after` itself when it is inside), as an
        aware UTC datetime. Openings are at `start` local time on the window's days; any window opens
        within 8 days. A `start` that does not exist on a DST day (a gap) opens at the first valid minute."""
        if self.contains(after):
            return after.astimezone(dt.timezone.utc)
        tz = zoneinfo.ZoneInfo(self.timezone)
        local = after.astimezone(tz)
        h, m = (int(x) for x in self.start.split(":"))
        for d in range(0, 9):
            day = (local + dt.timedelta(days=d)).date()
            # wall-clock start on that day, normalised through UTC (a DST gap moves it forward)
            opening = dt.datetime(day.year, day.month, day.day, h, m, tzinfo=tz).astimezone(dt.timezone.utc)
            if opening >= after and self.contains(opening):
                return opening
        raise ValueError(f"window {self.describe()} never opens")  # unreachable: validated non-empty

    def describe(self) -> str:
        days = ",".join(self.days) if self.days else "daily"
        return f"{self.start}-{self.end} {self.timezone} ({days})"

    def cron(self) -> str:
        """Cron expression for the window's openings (minute hour * * days), in `timezone`."""
        h, m = (int(x) for x in self.start.split(":"))
        return f"{m} {h} * * {','.join(self.days) if self.days else '*'}"


class Capture(_Model):
    """Change capture (dual writes): source triggers -> change ledger -> idempotent applier."""

    enabled: bool = Field(True, description="capture source writes during the run (off = snapshot-only migration)")
    batch_ops: int = Field(2_000, ge=1, le=100_000, description="ledger ops applied per target transaction")
    ddl_lock_timeout_ms: int = Field(5_000, ge=1, description="lock_timeout while creating/dropping the triggers")
    stop_on_error: bool = Field(False, description="stop draining after a batch with failed ops "
                                                   "(they are recorded either way; dual_write_fail must be 0)")


class PgBouncer(_Model):
    """Where the PgBouncer that applications connect through is, for `cutover.pointer: pgbouncer`."""

    config: str = Field(description="path of the pgbouncer ini file whose [databases] entry is rewritten")
    database: Ident = Field(description="the alias applications connect to (a key of [databases])")
    host: str = Field("127.0.0.1", description="admin console host (or unix socket directory)")
    port: int = Field(6432, ge=1, le=65535, description="admin console port")
    user: str = Field("pgbouncer", description="a user listed in admin_users")


class Cutover(_Model):
    """How the flip moves the application and how long writers may be frozen for it."""

    pointer: Literal["control_table", "pgbouncer"] = Field(
        "control_table", description="control_table: applications read dbguard.control.write_target on the source; "
                                     "pgbouncer: the alias in the pgbouncer ini is rewritten and reloaded")
    lock_timeout_ms: int = Field(3_000, ge=1, description="bound on each attempt to take the write freeze")
    retries: int = Field(3, ge=0, le=100, description="attempts after the first when the freeze lock times out")
    pgbouncer: PgBouncer | None = Field(None, description="required with pointer: pgbouncer")

    @model_validator(mode="after")
    def _pgbouncer_needs_settings(self) -> "Cutover":
        if self.pointer == "pgbouncer" and self.pgbouncer is None:
            raise ValueError("pgbouncer: pointer 'pgbouncer' needs cutover.pgbouncer {config, database, host, "
                             "port, user}")
        return self


class MigrationSpec(_Model):
    name: Ident = Field(description="the DAG id is dbguard_<name>")
    description: str = ""
    source: Endpoint
    target: TargetEndpoint
    tables: list[Table] = Field(min_length=1)
    backfill: Backfill = Field(default_factory=Backfill)
    gates: Gates = Field(default_factory=Gates)
    capture: Capture = Field(default_factory=Capture)
    cutover: Cutover = Field(default_factory=Cutover)
    window: Window | None = None
    schedule: str | None = Field(None, description="cron expression or preset such as '@daily'; null = manual")
    schema_freeze: bool = Field(True, description="block DDL on migrated source tables during the run")
    rollback_ttl_minutes: float = Field(60, gt=0)
    run_cutover: bool = Field(False, description="after the gates, flip the application to the target inside the "
                                                 "window (false: copy, verify and release; the source stays primary)")
    soak_minutes: float = Field(0, ge=0, le=1440, description="gates must stay green this long before the flip")
    approval: bool = Field(False, description="a human approves the flip in the UI (CLI: dbguard run --approve)")
    window_deadline_minutes: float | None = Field(
        None, gt=0, description="fail when the window does not open within this many minutes after the run reaches "
                                "wait_for_window; null = wait for the next opening (at most 8 days)")
    tags: list[str] = Field(default_factory=list)
    gold: str | None = Field(None, description="gold set (JSONL) for shadow reads; relative paths resolve "
                                               "against the working directory, then the project root")
    retrieval: RetrievalSettings = Field(default_factory=RetrievalSettings)

    @property
    def dag_id(self) -> str:
        return f"dbguard_{self.name}"

    @property
    def has_stores(self) -> bool:
        """Vector or search stores: the retrieval stages (indexes, shadow reads, gate) apply."""
        return any(t.vector or t.search for t in self.tables)

    def table(self, ref: str) -> Table:
        """The table named by its ref: the bare name (when unique in the spec) or "schema.name"."""
        for t in self.tables:
            if t.ref == ref:
                return t
        hits = [t for t in self.tables if f"{t.schema_}.{t.name}" == ref] or \
            [t for t in self.tables if t.name == ref]
        if len(hits) == 1:
            return hits[0]
        raise KeyError(ref)

    def table_order(self) -> list[Table]:
        """Parents before children (foreign keys), stable otherwise."""
        done: list[Table] = []
        pending = list(self.tables)
        while pending:
            for t in pending:
                if all(any(self.table(fk.references) is d for d in [t, *done]) for fk in t.foreign_keys):
                    done.append(t)
                    pending.remove(t)
                    break
        return done

    @model_validator(mode="after")
    def _check(self) -> "MigrationSpec":
        names = [t.name for t in self.tables]
        qualified = [(t.schema_, t.name) for t in self.tables]
        for i, n in enumerate(qualified):
            if n in qualified[:i]:
                raise _At(("tables", i), f"table {n[1]!r} (schema {n[0]!r}) is listed twice; list each table once")
        for t in self.tables:  # same name in two schemas: both are referred to as schema.name
            t._ref = f"{t.schema_}.{t.name}" if names.count(t.name) > 1 else None
        targets = [(t.target_schema, t.target_name) for t in self.tables]
        for i, tg in enumerate(targets):
            if tg in targets[:i]:
                raise _At(("tables", i, "target"), f"maps to target table {'.'.join(tg)}, like an earlier table; "
                                                   "set target.schema or target.name")
        for ti, t in enumerate(self.tables):
            for fi, fk in enumerate(t.foreign_keys):
                try:
                    parent = self.table(fk.references)
                except KeyError:
                    raise _At(("tables", ti, "foreign_keys", fi, "references"),
                              f"{fk.references!r} is not a table of this spec {[t.ref for t in self.tables]}; "
                              "add that table or drop the foreign key (write schema.name when two tables share "
                              "a name)") from None
                bad = [c for c in fk.ref_columns if parent.columns and c not in {c.name for c in parent.columns}]
                if bad:
                    raise _At(("tables", ti, "foreign_keys", fi, "ref_columns"),
                              f"{bad} are not columns of {parent.name!r}")
        # A foreign-key cycle would make the load order undefined.
        graph = {t.ref: {self.table(fk.references).ref for fk in t.foreign_keys} - {t.ref} for t in self.tables}
        seen: set[str] = set()
        while len(seen) < len(graph):
            ready = [n for n, deps in graph.items() if n not in seen and deps <= seen]
            if not ready:
                raise _At("tables", f"foreign keys form a cycle among {sorted(set(graph) - seen)}; "
                                    "migrate the cycle's tables without one of its foreign keys")
            seen.update(ready)
        if any(t.vector or t.search for t in self.tables) and self.gold is None:
            raise _At("gold", "a spec with vector or search stores needs a gold set (include/gold/<name>.jsonl) "
                              "for the retrieval gate")
        return self


def _field_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Turn a pydantic location into 'tables[orders].columns[amount].type'.

    List items are named by their `name` (or, for stores, their `column`), else by index."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            label = str(item)
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict):
                for key in ("name", "column"):
                    if isinstance(node[item].get(key), (str, int)) and node[item][key] != "":
                        label = str(node[item][key])
                        break
            parts[-1:] = [f"{parts[-1] if parts else ''}[{label}]"]
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The spec model class found at a location (to suggest field names)."""
    model: Any = MigrationSpec
    for item in loc:
        if isinstance(item, int):
            continue
        fields = {(f.alias or n): f for n, f in model.model_fields.items()}
        field = fields.get(item)
        if field is None:
            return None
        stack, model = [field.annotation], None
        while stack:
            t = stack.pop()
            if isinstance(t, type) and issubclass(t, BaseModel):
                model = t
                break
            stack.extend(getattr(t, "__args__", ()))
        if model is None:
            return None
    return model


def _unknown_field(loc: tuple[Any, ...]) -> str:
    msg = f"unknown field {loc[-1]!r}"
    model = _model_at(tuple(x for x in loc[:-1]))
    if model is not None:
        known = [f.alias or n for n, f in model.model_fields.items()]
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        if close:
            return f"{msg}; did you mean {close[0]!r}? (fields here: {', '.join(known)})"
        return f"{msg}; fields here: {', '.join(known)} (see docs/spec.md)"
    return f"{msg}; check the spelling against docs/spec.md"


def _friendly(err: dict, msg: str) -> str:
    """Pydantic's built-in messages, reworded to say what to write instead."""
    ctx, kind, got = err.get("ctx") or {}, err["type"], err.get("input")
    if kind == "missing":
        return "required field is missing; add it (see docs/spec.md)"
    if kind == "too_short":
        return f"needs at least {ctx.get('min_length')} item(s), got {ctx.get('actual_length', 0)}; add more"
    bounds = {"less_than_equal": ("<=", "le"), "less_than": ("<", "lt"),
              "greater_than_equal": (">=", "ge"), "greater_than": (">", "gt")}
    if kind in bounds:
        op, key = bounds[kind]
        return f"{got!r} is out of range; use a value {op} {ctx.get(key)}"
    if kind != "value_error" and got is not None and not isinstance(got, (dict, list)):
        return f"got {got!r}; {msg[:1].lower()}{msg[1:]}"
    return msg


def parse_spec(raw: Any, path: str = "<spec>") -> MigrationSpec:
    if not isinstance(raw, dict):
        raise SpecError(path, [("(top level)", "the spec must be a YAML mapping with name, source, target, tables")])
    try:
        return MigrationSpec.model_validate(raw)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _At):
                loc += cause.loc
            if err["type"] == "extra_forbidden":
                msg = _unknown_field(loc)
            else:
                msg = _friendly(err, msg)
            problems.append((_field_path(loc, raw), msg))
        raise SpecError(path, problems) from None


MAX_SPEC_BYTES = 1 << 20
MAX_SPEC_NODES = 100_000  # YAML values after expanding aliases; a real spec has a few thousand


def _expanded_nodes(text: str) -> int:
    """How many values the YAML holds once aliases are expanded, counted without expanding them
    (a "billion laughs" file is a few lines that expand to 10^9 values)."""
    root = yaml.compose(text, Loader=yaml.SafeLoader)
    sizes: dict[int, int] = {}

    def size(node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = 1  # a cycle counts once
        kids = node.value if isinstance(node, yaml.SequenceNode) else \
            [x for kv in node.value for x in kv] if isinstance(node, yaml.MappingNode) else []
        n = 1 + sum(size(k) for k in kids)
        sizes[id(node)] = n
        return n

    return size(root) if root is not None else 0


def load_spec(path: str | Path) -> MigrationSpec:
    p = Path(path)
    if p.is_dir():
        raise SpecError(str(p), [("(file)", "is a directory; pass the path of one migration YAML file, "
                                            "e.g. include/migrations/demo_shop.yaml")])
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SpecError(str(p), [("(file)", "no such file; pass the path of a migration YAML")]) from None
    except OSError as e:
        raise SpecError(str(p), [("(file)", f"cannot read it ({e.strerror}); check the path and permissions")]) from None
    if len(data) > MAX_SPEC_BYTES:
        raise SpecError(str(p), [("(file)", f"{len(data)} bytes is not a migration spec (limit {MAX_SPEC_BYTES}); "
                                            "pass the YAML spec, not a data file")])
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise SpecError(str(p), [(f"line {line}", f"not UTF-8 (byte 0x{data[e.start]:02x} at offset {e.start}); "
                                                  "save the spec as UTF-8")]) from None
    try:
        if (n := _expanded_nodes(text)) > MAX_SPEC_NODES:
            raise SpecError(str(p), [("(file)", f"expands to {n:,} values through YAML aliases (*name), more than "
                                                f"{MAX_SPEC_NODES:,}: an alias bomb, not a spec; write values out")])
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(str(p), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    return parse_spec(raw, str(p))
