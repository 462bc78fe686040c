"""The migration spec: one YAML file, one pydantic model, the single source of truth.

`load_spec(path)` returns a `MigrationSpec` or raises `SpecError` listing every
problem as (field path, how to fix it). Nothing here touches a database.
Identifiers are restricted to plain lower-case SQL names so a spec value can
never carry SQL; they are still quoted with `psycopg.sql.Identifier` wherever used.
"""
from __future__ import annotations

import datetime as dt
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
    ValidationError,
    model_validator,
)

from .errors import SpecError

_IDENT = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
# A column type as written in DDL: words, digits, one (p[,s]) modifier, array brackets.
_TYPE = re.compile(r"^[a-z][a-z0-9_ ]*(\(\s*\d+\s*(,\s*\d+\s*)?\))?( [a-z ]+)?(\[\])*$")
_HHMM = re.compile(r"^([01]\d|2[0-3]):[0-5]\d$")


def _ident(v: str) -> str:
    if not isinstance(v, str) or not _IDENT.match(v):
        raise ValueError(
            f"{v!r} is not a plain SQL identifier; use lower-case letters, digits and _ "
            "(at most 63 characters, not starting with a digit)"
        )
    return v


def _sql_type(v: str) -> str:
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
SqlType = Annotated[str, AfterValidator(_sql_type)]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class Endpoint(_Model):
    """One side of the migration: an Airflow connection id (AIRFLOW_CONN_<ID> works too)."""

    conn_id: Ident


class TargetEndpoint(Endpoint):
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
                raise ValueError(f"{name} {v!r} is not a valid encoding/locale name")
        return self


class Column(_Model):
    name: Ident
    type: SqlType = Field(description="type on the source (the contract checks it)")
    target_type: SqlType | None = Field(None, description="type on the target, when it changes")
    nullable: bool = True
    collation: Ident | None = Field(None, description="target collation of a text column (default target.collation)")

    @property
    def tgt_type(self) -> str:
        return self.target_type or self.type


class Index(_Model):
    columns: list[Ident] = Field(min_length=1)
    method: Literal["btree", "hash", "gin", "gist", "brin", "hnsw", "ivfflat"] = "btree"
    unique: bool = False
    opclass: Ident | None = None
    name: Ident | None = None
    with_: dict[Ident, int | float] = Field(default_factory=dict, alias="with")


class ForeignKey(_Model):
    columns: list[Ident] = Field(min_length=1)
    references: Ident = Field(description="name of another table in this spec")
    ref_columns: list[Ident] = Field(min_length=1)

    @model_validator(mode="after")
    def _check(self) -> "ForeignKey":
        if len(self.columns) != len(self.ref_columns):
            raise ValueError("columns and ref_columns must have the same length")
        return self


class TableTarget(_Model):
    schema_: Ident | None = Field(None, alias="schema", description="target schema (default: the source schema)")
    name: Ident | None = Field(None, description="target table name (default: the source name)")
    indexes: list[Index] = Field(default_factory=list)


class Table(_Model):
    name: Ident
    schema_: Ident = Field("public", alias="schema")
    key: list[Ident] = Field(min_length=1, description="primary-key columns; ranges are planned on them")
    columns: list[Column] = Field(min_length=1, description="the contract: every column that is migrated")
    foreign_keys: list[ForeignKey] = Field(default_factory=list)
    target: TableTarget = Field(default_factory=TableTarget)

    @property
    def target_schema(self) -> str:
        return self.target.schema_ or self.schema_

    @property
    def target_name(self) -> str:
        return self.target.name or self.name

    def column(self, name: str) -> Column:
        return next(c for c in self.columns if c.name == name)

    @model_validator(mode="after")
    def _check(self) -> "Table":
        names = [c.name for c in self.columns]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"column(s) {dupes} declared twice")
        missing = [k for k in self.key if k not in names]
        if missing:
            raise ValueError(f"key column(s) {missing} are not in columns; declare them under columns")
        for fk in self.foreign_keys:
            bad = [c for c in fk.columns if c not in names]
            if bad:
                raise ValueError(f"foreign key column(s) {bad} are not in columns")
        for ix in self.target.indexes:
            bad = [c for c in ix.columns if c not in names]
            if bad:
                raise ValueError(f"index column(s) {bad} are not in columns")
        return self


class Backfill(_Model):
    batch_rows: int = Field(50_000, ge=100, le=10_000_000, description="rows per key range")
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
    max_lag_ops: int = Field(0, ge=0, description="drain gate: unapplied change ops allowed")
    delta_s_max: float = Field(0.02, ge=0, le=2)
    delta_s_escalate: float = Field(0.05, ge=0, le=2)
    escalate_after_minutes: float = Field(15, ge=0)
    latency_p95_change: float = Field(0.15, ge=0)
    float_tolerance: float = Field(1e-6, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "Gates":
        if self.delta_s_escalate < self.delta_s_max:
            raise ValueError("delta_s_escalate must be >= delta_s_max")
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
                raise ValueError(f"{name} {getattr(self, name)!r} must be HH:MM (24-hour), e.g. '02:00'")
        if self.start == self.end:
            raise ValueError("start and end are equal: the window would be empty")
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


class MigrationSpec(_Model):
    name: Ident = Field(description="the DAG id is dbguard_<name>")
    description: str = ""
    source: Endpoint
    target: TargetEndpoint
    tables: list[Table] = Field(min_length=1)
    backfill: Backfill = Field(default_factory=Backfill)
    gates: Gates = Field(default_factory=Gates)
    window: Window | None = None
    schedule: str | None = Field(None, description="cron expression or preset such as '@daily'; null = manual")
    schema_freeze: bool = Field(True, description="block DDL on migrated source tables during the run")
    rollback_ttl_minutes: float = Field(60, gt=0)
    tags: list[str] = Field(default_factory=list)

    @property
    def dag_id(self) -> str:
        return f"dbguard_{self.name}"

    def table(self, name: str) -> Table:
        for t in self.tables:
            if t.name == name:
                return t
        raise KeyError(name)

    def table_order(self) -> list[Table]:
        """Parents before children (foreign keys), stable otherwise."""
        done: list[Table] = []
        pending = list(self.tables)
        while pending:
            for t in pending:
                if all(fk.references == t.name or fk.references in {d.name for d in done} for fk in t.foreign_keys):
                    done.append(t)
                    pending.remove(t)
                    break
        return done

    @model_validator(mode="after")
    def _check(self) -> "MigrationSpec":
        names = [t.name for t in self.tables]
        if len(set(names)) != len(names):
            raise ValueError(f"table names must be unique, got {names}")
        targets = [(t.target_schema, t.target_name) for t in self.tables]
        if len(set(targets)) != len(targets):
            raise ValueError("two tables map to the same target table")
        for t in self.tables:
            for fk in t.foreign_keys:
                if fk.references not in names:
                    raise ValueError(
                        f"table {t.name!r}: foreign key references {fk.references!r}, which is not in tables {names}"
                    )
                parent = self.table(fk.references)
                bad = [c for c in fk.ref_columns if c not in {c.name for c in parent.columns}]
                if bad:
                    raise ValueError(f"table {t.name!r}: foreign key ref_columns {bad} are not columns of {parent.name!r}")
        # A foreign-key cycle would make the load order undefined.
        graph = {t.name: {fk.references for fk in t.foreign_keys if fk.references != t.name} for t in self.tables}
        seen: set[str] = set()
        while len(seen) < len(graph):
            ready = [n for n, deps in graph.items() if n not in seen and deps <= seen]
            if not ready:
                raise ValueError(f"foreign keys form a cycle among {sorted(set(graph) - seen)}; break it")
            seen.update(ready)
        return self


def _field_path(loc: tuple[Any, ...], raw: Any) -> str:
    """Turn a pydantic location into 'tables[orders].columns[2].type'."""
    parts: list[str] = []
    node = raw
    for item in loc:
        if isinstance(item, int):
            label = str(item)
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) and "name" in node[item]:
                label = str(node[item]["name"])
            parts[-1:] = [f"{parts[-1] if parts else ''}[{label}]"]
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


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
            if err["type"] == "extra_forbidden":
                msg = f"unknown field {loc[-1]!r}; check the spelling against docs/spec.md"
            elif err["type"] == "missing":
                msg = "required field is missing"
            problems.append((_field_path(loc, raw), msg))
        raise SpecError(path, problems) from None


def load_spec(path: str | Path) -> MigrationSpec:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(str(p), [("(file)", "no such file; pass the path of a migration YAML")]) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "(file)"
        raise SpecError(str(p), [(where, f"not valid YAML: {getattr(e, 'problem', e)}")]) from None
    return parse_spec(raw, str(p))
