"""The stages of a migration whose source is a Qdrant collection (`collections:` in the spec), one
function per DAG task, each of them usable without Airflow:

    preflight -> plan_ranges -> copy_range[...] -> reconcile -> shadow_reads (gate)
      -> [cutover: the alias, Qdrant -> Qdrant with run_cutover] -> finalize
    rollback (the alias back)   finish (drop the old collection)

Qdrant has no change capture: during the run the application writes both collections or freezes
writes (docs/qdrant.md, "A Qdrant source"). Reconcile re-reads the whole source, so a write before
it is copied; `cutover` refuses when the source changed after reconcile began (its point count, or
points whose `updated_field` is later). Results travel as task return values (XCom); the range
bookkeeping and the alias state live in the source Qdrant's `dbguard_ranges` (qdrant_book).
"""
from __future__ import annotations

import datetime as dt
import time
from contextlib import contextmanager
from typing import Any, Iterator

from . import db
from .errors import DbguardError, PreflightError
from .spec import CollectionMove, MigrationSpec
from .stores import qdrant, qdrant_clone, qdrant_move, qdrant_source, qdrant_to_pg
from .stores.qdrant_book import Book


class CollectionFailed(DbguardError):
    """A collection's copy could not be proven, its gate failed, or its cutover was refused."""


def _tol(spec: MigrationSpec) -> float:
    return max(spec.gates.float_tolerance, 1e-6)


def _src(move: CollectionMove):
    return qdrant.client(move.source.conn_id)


def book(spec: MigrationSpec, move: CollectionMove) -> Book:
    return Book(_src(move), spec.name, move)


@contextmanager
def side(spec: MigrationSpec, move: CollectionMove) -> Iterator[Any]:
    """The move's target side; for Qdrant -> Qdrant the plan the new collection was built from."""
    if move.qdrant is not None:
        c = qdrant.client(move.target_conn_id)
        rec = qdrant_clone.recorded_plan(c, move.qdrant.collection)
        yield qdrant_clone.Side(c, move.qdrant.collection, rec["plan"]), qdrant_clone.expecter(move, rec["plan"])
        return
    with db.target(spec) as conn:
        yield qdrant_to_pg.Side(conn, move), qdrant_to_pg.expecter(move)


def _where(i: int, move: CollectionMove) -> str:
    return f"collections[{i}] ({move.label})"


def preflight(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Reads only: the source collection and its gated vector as the spec says; the target free (or built
    by this migration from this source, to resume); one full read of the source finds missing, wrong-size
    or NaN vectors and payload values a declared column cannot hold exactly. Raises PreflightError."""
    problems: list[str] = []
    out = {}
    for i, mv in enumerate(spec.collections):
        where = _where(i, mv)
        try:
            c = _src(mv)
            found = qdrant_source.source_problems(c, mv, where)
        except Exception as e:  # noqa: BLE001  the server does not answer
            problems.append(f"{where}: Qdrant connection {mv.source.conn_id!r} does not answer: "
                            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}; check {db.env_var(mv.source.conn_id)}")
            continue
        problems += found
        if found:
            continue
        decoders = None
        if mv.qdrant is not None:
            t = qdrant.client(mv.target_conn_id)
            if t.collection_exists(mv.qdrant.collection):
                rec = qdrant_clone.recorded_plan(t, mv.qdrant.collection)
                if not rec or rec.get("migration") != spec.name or rec.get("source") != mv.source.collection:
                    problems.append(f"{where}: qdrant.collection {mv.qdrant.collection!r} exists and was not built by "
                                    f"migration {spec.name!r} from {mv.source.collection!r}; drop it or name another")
        else:
            decoders = qdrant_to_pg.decoders(mv)
            try:
                with db.target(spec) as conn:
                    problems += qdrant_to_pg.table_problems(conn, mv, where)
            except Exception as e:  # noqa: BLE001
                problems.append(f"{where}: target {spec.target.conn_id!r}: {str(e).splitlines()[0]}")
        scan, n = qdrant_source.scan_problems(c, mv, where, decoders,
                                              key_type=mv.pgvector.key_type if mv.pgvector else None)
        problems += scan
        out[mv.label] = {"source_points": n}
    if problems:
        raise PreflightError(problems)
    return out


def plan_ranges(spec: MigrationSpec, run_id: str) -> list[dict[str, Any]]:
    """Create each target (collection from the source's plan, or table) and plan its id ranges; a plan
    recorded by an earlier, interrupted run over the same built target is kept (its copied ranges are
    skipped). Returns one item per range for the mapped copy tasks."""
    items = []
    for i, mv in enumerate(spec.collections):
        c, b = _src(mv), book(spec, mv)
        if mv.qdrant is not None:
            t = qdrant.client(mv.target_conn_id)
            created = not t.collection_exists(mv.qdrant.collection)
            if created:
                p = qdrant_clone.plan(c.get_collection(mv.source.collection), mv)
                qdrant_clone.create(t, mv.qdrant.collection, p, migration=spec.name, source=mv.source.collection)
        else:
            with db.target(spec) as conn:
                created = qdrant_to_pg.create_table(conn, mv)
        old = b.plan()
        if created or not old or old.get("batch_points") != mv.source.batch_points:
            ranges, n = qdrant_source.plan_ranges(c, mv.source.collection, mv.source.batch_points)
            b.set_plan(ranges, n, run_id, batch_points=mv.source.batch_points)
        for j, (lo, hi) in enumerate(b.plan()["ranges"]):
            items.append({"move": i, "index": j, "lo": lo, "hi": hi, "label": f"{i}:[{lo or ''},{hi or ''})"})
    return items


def copy(spec: MigrationSpec, run_id: str, move: int, only: int | None = None, on_range=None) -> dict[str, Any]:
    """Copy (and prove) the ranges of one move not yet recorded as copied (`only`: one range)."""
    mv = spec.collections[move]
    with side(spec, mv) as (s, expect):
        return qdrant_move.copy(_src(mv), mv.source.collection, s, expect, book(spec, mv), tol=_tol(spec),
                                only=only, on_range=on_range)


def copy_range(spec: MigrationSpec, run_id: str, crange: dict[str, Any]) -> dict[str, Any]:
    out = copy(spec, run_id, crange["move"], only=crange["index"])
    if out["mismatched"]:
        raise CollectionFailed(f"{spec.collections[crange['move']].label}: range {crange['label']} still differs "
                               "after a repair; see the task log")
    return out


def _now_epoch() -> float:
    return time.time()


def reconcile(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Every range of every move summed on both sides, bisected, repaired; index_hash of each target.
    Records when it began and the source's point count (cutover compares them)."""
    out = {}
    for i, mv in enumerate(spec.collections):
        c, b = _src(mv), book(spec, mv)
        began = _now_epoch()
        with side(spec, mv) as (s, expect):
            r = qdrant_move.reconcile(c, mv.source.collection, s, expect, b.plan()["ranges"], tol=_tol(spec))
        src_count = c.count(mv.source.collection, exact=True).count
        if mv.qdrant is not None:
            p = qdrant_clone.recorded_plan(qdrant.client(mv.target_conn_id), mv.qdrant.collection)["plan"]
            # the proven content's sum as the source side computes it: a Cosine vector re-stored by a repair may
            # come back an ulp apart (Qdrant's update path), the expected vector does not
            r["index_hash"] = qdrant_clone.index_hash(p, mv.qdrant.collection, r["source_points"], r["source_checksum"])
            r["index"] = p
        else:
            t = mv.pgvector
            r["index_hash"] = qdrant_clone.index_hash({"table": f"{t.schema_}.{t.table}", "column": t.column,
                                                       "index": t.index.model_dump(mode="json")},
                                                      t.table, r["source_points"], r["source_checksum"])
        r["manifest"] = {"EMBED_MODEL_VER": mv.embed_model, "EMBED_DIM": mv.source.dim,
                         "NORM": "l2" if mv.target_normalized else "none", "METRIC": mv.target_metric,
                         "INDEX_HASH": r["index_hash"], "TARGET_STORE": mv.kind, "SOURCE_STORE": "qdrant"}
        b.put("reconcile", began=began, source_points=src_count, run_id=run_id, checksum_ok=r["checksum_ok"])
        r["checksum"] = str(r["checksum"])
        r["source_checksum"] = str(r["source_checksum"])
        out[mv.label] = r
        if not r["checksum_ok"]:
            raise CollectionFailed(f"{mv.label}: reconcile could not repair id range(s) {r['unresolved']}")
    return out


def build_pg_indexes(spec: MigrationSpec) -> None:
    """Qdrant -> pgvector: the declared ANN index on the vector column, after the copy."""
    from .stores import vector as vector_store

    for mv in spec.collections:
        if mv.pgvector is None:
            continue
        table, store = qdrant_to_pg.table_spec(mv)
        with db.target(spec, autocommit=True) as conn:
            vector_store.build_index(conn, table, store.model_copy(update={"qdrant": None}))


def shadow_reads(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """The gold set on both sides of every move, judged at once; raises CollectionFailed when the gate fails."""
    from .retrieval import collection_shadow

    if any(mv.pgvector is not None for mv in spec.collections):
        with db.target(spec, autocommit=True) as conn:
            m = collection_shadow.shadow_reads(spec, conn)
    else:
        m = collection_shadow.shadow_reads(spec)
    ok, msg = collection_shadow.verdict(spec, m)
    m["retrieval_gate"] = msg
    if not ok:
        raise CollectionFailed(msg)
    return m


def writes_since_reconcile(spec: MigrationSpec, mv: CollectionMove) -> list[str]:
    """What shows the source was written after reconcile began: its point count changed, or (with
    source.updated_field) points carry a later update time."""
    from qdrant_client import models as m

    c, rec = _src(mv), book(spec, mv).get("reconcile")
    if rec is None:
        return [f"{mv.label}: no reconcile recorded; run the migration through reconcile first"]
    out = []
    now = c.count(mv.source.collection, exact=True).count
    if now != rec["source_points"]:
        out.append(f"{mv.label}: the source holds {now} points, {rec['source_points']} when reconcile began")
    f = mv.source.updated_field
    if f:
        began = rec["began"]
        iso = dt.datetime.fromtimestamp(began, dt.timezone.utc).isoformat()
        flt = m.Filter(should=[m.FieldCondition(key=f, range=m.Range(gt=began)),
                               m.FieldCondition(key=f, range=m.DatetimeRange(gt=iso))])
        n = c.count(mv.source.collection, count_filter=flt, exact=True).count
        if n:
            out.append(f"{mv.label}: {n} point(s) have {f} after reconcile began ({iso})")
    return out


def cutover(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Qdrant -> Qdrant: move each alias to the new collection in one update_collection_aliases request,
    unless the source was written since reconcile (refused: re-run, with writes frozen or written to both)."""
    from .stores import qdrant_alias

    moves = [mv for mv in spec.collections if mv.qdrant is not None and mv.source.alias]
    problems = [p for mv in moves for p in writes_since_reconcile(spec, mv)]
    if problems:
        raise CollectionFailed("cutover refused, the source collection was written during the run (Qdrant has no "
                               "change capture: freeze writes or write both collections, then run again so "
                               "reconcile copies them): " + "; ".join(problems))
    out = {}
    t0 = time.perf_counter()
    for mv in moves:
        out[mv.source.alias] = qdrant_alias.cut_over(_src(mv), book(spec, mv), mv.source.alias, mv.qdrant.collection,
                                                    run_id)
    return {"aliases": out, "cutover_ms": round((time.perf_counter() - t0) * 1000, 3)}


def rollback(spec: MigrationSpec) -> dict[str, Any]:
    from .stores import qdrant_alias

    return {mv.source.alias: qdrant_alias.roll_back(_src(mv), book(spec, mv), mv.source.alias)
            for mv in spec.collections if mv.qdrant is not None and mv.source.alias}


def finish(spec: MigrationSpec) -> dict[str, Any]:
    from .stores import qdrant_alias

    return {mv.source.alias: qdrant_alias.finish(_src(mv), book(spec, mv), mv.source.alias)
            for mv in spec.collections if mv.qdrant is not None and mv.source.alias}


def finalize(spec: MigrationSpec, run_id: str, status: str, results: dict[str, Any]) -> dict[str, Any]:
    """The run's result line: status, points, checksum_ok, delta_s_diff, lambda_state, index hashes."""
    rec, sh, cut = results.get("reconcile") or {}, results.get("shadow_reads") or {}, results.get("cutover") or {}
    copied = results.get("copy") or []
    secs = sum(c.get("seconds") or 0 for c in copied)
    pts = sum(c.get("points") or 0 for c in copied)
    return {"migration": spec.name, "run_id": run_id, "status": status, "source_store": "qdrant",
            "target_store": ",".join(sorted({mv.kind for mv in spec.collections})),
            "migrated_rows": sum(r.get("points", 0) for r in rec.values()) if rec else None,
            "checksum_ok": all(r.get("checksum_ok") for r in rec.values()) if rec else None,
            "points_per_s": round(pts / secs, 1) if secs else None,
            "delta_s_diff": sh.get("delta_s_diff"), "lambda_state": sh.get("lambda_state"),
            "index_hash": {k: r.get("index_hash") for k, r in rec.items()},
            "aliases": cut.get("aliases"), "cutover_ms": cut.get("cutover_ms"),
            "reason": results.get("reason")}
