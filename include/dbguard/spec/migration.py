"""The whole migration: one MigrationSpec, checked as a whole (names, foreign keys, their order)."""
from __future__ import annotations

from pydantic import Field, model_validator

from .fields import Ident, _At, _Model
from .settings import Backfill, Capture, Cutover, Gates, Window
from .collections import CollectionMove
from .stores import RetrievalSettings
from .tables import Endpoint, Table, TargetEndpoint


class MigrationSpec(_Model):
    name: Ident = Field(description="the DAG id is dbguard_<name>")
    description: str = ""
    source: Endpoint | None = Field(None, description="the PostgreSQL source (a spec of tables needs it)")
    target: TargetEndpoint | None = Field(None, description="the PostgreSQL target (tables; a pgvector collection "
                                                            "target)")
    tables: list[Table] = Field(default_factory=list)
    collections: list[CollectionMove] = Field(default_factory=list, description="Qdrant collections as the source "
                                                                                "(docs/qdrant.md)")
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
    acknowledge: list[str] = Field(
        default_factory=list,
        description="what preflight named and you accept, each entry exactly as preflight prints it: "
                    "'referenced_by schema.table' (a table that is not migrated references a migrated one), "
                    "'not_reproduced <kind> <name>' (a source object the target will not have)")

    @property
    def dag_id(self) -> str:
        return f"dbguard_{self.name}"

    @property
    def has_stores(self) -> bool:
        """Vector or search stores: the retrieval stages (indexes, shadow reads, gate) apply."""
        return any(t.vector or t.search for t in self.tables) or bool(self.collections)

    def acknowledged(self, entry: str) -> bool:
        """Preflight's refusals that the spec accepts (`acknowledge:`), compared without case or extra spaces."""
        norm = " ".join(entry.split()).lower()
        return any(" ".join(a.split()).lower() == norm for a in self.acknowledge)

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
        _check_shape(self)
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
        if self.has_stores and self.gold is None:
            raise _At("gold", "a spec with vector or search stores needs a gold set (include/gold/<name>.jsonl) "
                              "for the retrieval gate")
        return self


def _check_shape(s: MigrationSpec) -> None:
    """Tables (PostgreSQL source and target) or collections (a Qdrant source), each with what it needs."""
    if not s.tables and not s.collections:
        raise _At("tables", "needs at least 1 item(s), got 0: list the tables to migrate (or, for a Qdrant "
                            "source, the collections)")
    if s.tables and s.collections:
        raise _At("collections", "a spec migrates tables or Qdrant collections, not both; write two specs")
    for f in ("source", "target"):
        if s.tables and getattr(s, f) is None:
            raise _At(f, f"a spec of tables needs {f}: {{conn_id: ...}} (a PostgreSQL connection)")
    if s.collections and s.source is not None:
        raise _At("source", "the source of a collection is its collections[].source (a Qdrant connection); drop "
                            "the top-level source")
    for i, c in enumerate(s.collections):
        if c.pgvector is not None and s.target is None:
            raise _At(("collections", i, "pgvector"), "a pgvector target table needs target: {conn_id: ...} (the "
                                                      "PostgreSQL database it goes into)")
    targets = [(c.target_conn_id, c.qdrant.collection) if c.qdrant else (c.pgvector.schema_, c.pgvector.table)
               for c in s.collections]
    for i, t in enumerate(targets):
        if t in targets[:i]:
            raise _At(("collections", i), f"targets {t[1]!r} like an earlier entry; give each its own")
