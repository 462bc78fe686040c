"""Version pins (the manifest), target checks, the source vector scan, and the index build that
adds INDEX_HASH to the manifest."""
from __future__ import annotations

import json
import time
from typing import Any

import psycopg

from .. import db, ledger
from ..errors import DbguardError, PreflightError
from ..spec import MigrationSpec
from ..stores import qdrant, qdrant_copy, qdrant_sync
from ..stores import search as search_store
from ..stores import vector as vector_store

def manifest(spec: MigrationSpec) -> dict[str, Any]:
    """EMBED_MODEL_VER, EMBED_DIM, NORM, metric, ANALYZER_CONF (keys qualified when a spec has several stores)."""
    pins: dict[str, Any] = {}
    vs, ss = list(vector_store.stores(spec)), list(search_store.stores(spec))
    for t, v in vs:
        store_pins = vector_store.manifest(t, v)
        if v.qdrant is not None:  # the collection's parameters are the index
            store_pins.update(TARGET_STORE="qdrant", INDEX=json.dumps(qdrant.collection_params(v), sort_keys=True))
        for k, val in store_pins.items():
            pins[k if len(vs) == 1 else f"{k}[{vector_store.label(t, v)}]"] = val
    for t, s in ss:
        for k, val in search_store.manifest(t, s).items():
            pins[k if len(ss) == 1 else f"{k}[{search_store.label(t, s)}]"] = val
    return pins


def check_target(spec: MigrationSpec, conn: psycopg.Connection) -> list[str]:
    """Every disagreement between the target and the spec's stores (operator class, dim, NORM, analyzer)."""
    problems: list[str] = []
    for t, v in vector_store.stores(spec):
        problems += vector_store.check_target(conn, t, v, spec.gates.float_tolerance)
        if v.qdrant is not None:
            problems += qdrant.check(v, vector_store.label(t, v))
    for t, s in search_store.stores(spec):
        problems += search_store.check_target(conn, t, s)
    conn.rollback()
    return problems


def scan_vectors(spec: MigrationSpec, conn: psycopg.Connection) -> list[str]:
    """NaN / NULL-component / zero / wrong-dimension vectors in the SOURCE (server-side counts)."""
    problems: list[str] = []
    for t, v in vector_store.stores(spec):
        problems += vector_store.scan_source(conn, t, v)
        if v.qdrant is not None:
            problems += qdrant_copy.source_problems(conn, t, v)
    conn.rollback()
    return problems


def preflight(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Stage: scan the source, check the target, record the manifest; raises PreflightError listing all."""
    with db.source(spec) as src, db.target(spec) as tgt:
        problems = scan_vectors(spec, src) + check_target(spec, tgt)
        if problems:
            raise PreflightError(problems)
        ledger.ensure(tgt)
        pins = manifest(spec)
        ledger.set_manifest(tgt, spec.name, run_id, pins)
    return {"manifest": pins}


QDRANT_SNAPSHOT = qdrant_sync.SNAPSHOT["forward"]


def sync_collections(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Dual writes into the Qdrant collections built in this run: one forward pass of
    `qdrant_sync.sync` (the change-ledger window since the last pass; the copy's snapshot at first).
    Safe inside a write freeze held by another session. Returns per store what was applied, and
    `dual_write_fail` (writes Qdrant refused in this pass, recorded in dbguard.apply_failures)."""
    return qdrant_sync.sync(spec, run_id, "forward")


def target_store(spec: MigrationSpec) -> str:
    """What readers search after the migration: "qdrant" when a vector store goes to a collection."""
    return "qdrant" if any(v.qdrant is not None for _, v in vector_store.stores(spec)) else "postgresql"


# ---- indexes -----------------------------------------------------------------------------------------

def build_indexes(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Stage: ANN + GIN indexes on the target (CONCURRENTLY, swap on rebuild), INDEX_HASH into the manifest."""
    out: dict[str, Any] = {"indexes": [], "index_hash": {}}
    with db.target(spec, autocommit=True) as conn:
        conn.execute("SET maintenance_work_mem = '256MB'")
        vs = list(vector_store.stores(spec))
        for t, v in vs:
            t0 = time.perf_counter()
            if v.qdrant is not None:  # the collection is built (copied, verified, reconciled) offline
                r = qdrant_copy.build(spec, t, v)
                out["index_hash"][vector_store.label(t, v)] = r["index_hash"]
                out.setdefault("qdrant", []).append(r)
                out["indexes"].append({"index": r["collection"], "action": "copied", "seconds": r["seconds"]})
                continue
            r = vector_store.build_index(conn, t, v)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            out["indexes"].append(r)
            out["index_hash"][vector_store.label(t, v)] = vector_store.index_hash(conn, t, v)
        for t, s in search_store.stores(spec):
            t0 = time.perf_counter()
            r = search_store.build_index(conn, t, s)
            r["seconds"] = round(time.perf_counter() - t0, 3)
            out["indexes"].append(r)
    with db.target(spec) as conn:
        ledger.ensure(conn)
        pins = manifest(spec)
        hashes = out["index_hash"]
        if len(hashes) == 1:
            pins["INDEX_HASH"] = next(iter(hashes.values()))
        else:
            pins.update({f"INDEX_HASH[{k}]": h for k, h in hashes.items()})
        ledger.set_manifest(conn, spec.name, run_id, pins)
        ledger.set_metric(conn, run_id, spec.name, "target_store", target_store(spec))
        if out.get("qdrant"):  # where each collection's dual writes start: the snapshot its copy read
            ledger.set_metric(conn, run_id, spec.name, QDRANT_SNAPSHOT,
                              {r["store"]: r["snapshot"] for r in out["qdrant"]})
        ledger.event(conn, run_id, spec.name, "build_indexes", out)
        bad = [r for r in out.get("qdrant", []) if not r["checksum_ok"]]
        if bad:
            ledger.set_metric(conn, run_id, spec.name, "checksum_ok", False)
            raise DbguardError("Qdrant collection(s) differ from the source after repair: " + "; ".join(
                f"{r['collection']}: unresolved ranges {r['reconcile']['unresolved']}" for r in bad)
                + "; look for a writer on the collection, then re-run")
    return out
