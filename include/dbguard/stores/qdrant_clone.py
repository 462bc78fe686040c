"""Qdrant -> Qdrant: a new collection recreated from the live one's configuration, except for what the
spec changes, built offline beside it.

`plan` reads the source's CollectionInfo and returns the new collection's configuration as data:
every dense vector (size, distance, its own HNSW / quantization / on_disk / datatype / multivector
settings) and sparse vector (modifier, index), the collection's HNSW, quantization, optimizer and WAL
settings, on_disk_payload, shards and replication, and the payload indexes; then the spec's changes:
the gated vector's distance (`metric`), `hnsw`, `quantization`, `payload_indexes` (null drops one),
`drop_vectors`. `create` makes the collection from the plan and records the plan (and the source)
in the collection's metadata, which is how a later run recognises its own half-built collection.
Local mode keeps per-vector settings but not the collection-level HNSW / quantization or payload
indexes (its search is exact): the plan still carries them, and a server applies them.
"""
from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import numpy as np

from ..spec import QDRANT_DISTANCE, CollectionMove
from . import qdrant
from .qdrant_source import SPoint, retrieve, scan, to_struct, transform, vector_params

_VECTOR_FIELDS = ("size", "distance", "hnsw_config", "quantization_config", "on_disk", "datatype",
                  "multivector_config")
_HNSW_FIELDS = ("m", "ef_construct", "full_scan_threshold", "max_indexing_threads", "on_disk", "payload_m")


def _dump(x) -> Any:
    return None if x is None else x.model_dump(mode="json", exclude_none=True)


def plan(info, move: CollectionMove) -> dict[str, Any]:
    """The new collection's configuration (JSON data), from the source's CollectionInfo and the spec."""
    t, gated = move.qdrant, move.source.vector_name or ""
    dense, sparse = vector_params(info)
    vectors = {}
    for name, vp in dense.items():
        if name in t.drop_vectors:
            continue
        v = {f: _dump(getattr(vp, f)) if hasattr(getattr(vp, f), "model_dump") else getattr(vp, f)
             for f in _VECTOR_FIELDS if getattr(vp, f, None) is not None}
        v["distance"] = vp.distance.value
        if name == gated:
            v["distance"] = QDRANT_DISTANCE[move.target_metric]
            if v.get("hnsw_config") and t.hnsw:
                v["hnsw_config"].update({k: val for k, val in (("m", t.hnsw.m), ("ef_construct", t.hnsw.ef_construct))
                                         if val is not None})
        vectors[name] = v
    cfg = info.config
    hnsw = {f: getattr(cfg.hnsw_config, f) for f in _HNSW_FIELDS if getattr(cfg.hnsw_config, f, None) is not None}
    if t.hnsw:
        hnsw.update({k: v for k, v in (("m", t.hnsw.m), ("ef_construct", t.hnsw.ef_construct)) if v is not None})
    quant = _dump(cfg.quantization_config)
    if t.quantization is not None:
        quant = {"scalar": {"type": "int8", **({"quantile": t.quantization.quantile} if t.quantization.quantile else {}),
                            **({"always_ram": t.quantization.always_ram} if t.quantization.always_ram is not None
                               else {})}}
    indexes = {f: (_dump(i.params) if i.params is not None else i.data_type.value)
               for f, i in (info.payload_schema or {}).items()}
    for f, typ in t.payload_indexes.items():
        if typ is None:
            indexes.pop(f, None)
        else:
            indexes[f] = typ
    p = cfg.params
    return {"vectors": vectors,
            "sparse_vectors": {n: _dump(s) or {} for n, s in sparse.items() if n not in t.drop_vectors},
            "hnsw": hnsw, "quantization": quant,
            "optimizers": {k: v for k, v in (_dump(cfg.optimizer_config) or {}).items()},
            "wal": _dump(cfg.wal_config), "on_disk_payload": p.on_disk_payload,
            "shard_number": p.shard_number, "replication_factor": p.replication_factor,
            "write_consistency_factor": p.write_consistency_factor, "payload_indexes": dict(sorted(indexes.items())),
            "hnsw_ef": t.hnsw.ef if t.hnsw else None}


def cosine_names(p: dict[str, Any]) -> set[str]:
    return {n for n, v in p["vectors"].items() if v["distance"] == "Cosine"}


def create(c, name: str, p: dict[str, Any], *, migration: str, source: str) -> None:
    """Create the collection from the plan, payload indexes included, with the plan in its metadata."""
    from qdrant_client import models as m

    vectors = {n: m.VectorParams(**v) for n, v in p["vectors"].items()}
    kw: dict[str, Any] = {
        "vectors_config": vectors[""] if set(vectors) == {""} else vectors,
        "sparse_vectors_config": {n: m.SparseVectorParams(**s) for n, s in p["sparse_vectors"].items()} or None,
        "hnsw_config": m.HnswConfigDiff(**p["hnsw"]) if p["hnsw"] else None,
        "optimizers_config": m.OptimizersConfigDiff(**{k: v for k, v in p["optimizers"].items()
                                                        if k in m.OptimizersConfigDiff.model_fields}) or None,
        "wal_config": m.WalConfigDiff(**p["wal"]) if p["wal"] else None,
        "on_disk_payload": p["on_disk_payload"], "shard_number": p["shard_number"],
        "replication_factor": p["replication_factor"], "write_consistency_factor": p["write_consistency_factor"],
        "metadata": {"dbguard": {"migration": migration, "source": source, "plan": json.dumps(p, sort_keys=True)}},
    }
    if p["quantization"]:
        q = p["quantization"]
        kind = next(iter(q))
        cls = {"scalar": m.ScalarQuantization, "product": m.ProductQuantization, "binary": m.BinaryQuantization}[kind]
        kw["quantization_config"] = cls(**q)
    c.create_collection(name, **{k: v for k, v in kw.items() if v is not None})
    with warnings.catch_warnings():  # local mode: "Payload indexes have no effect in the local Qdrant"
        warnings.simplefilter("ignore")
        for f, schema in p["payload_indexes"].items():
            c.create_payload_index(name, f, field_schema=schema if isinstance(schema, str) else _index_params(schema))
    qdrant.tune_local_storage(c)


def _index_params(d: dict[str, Any]):
    from pydantic import TypeAdapter
    from qdrant_client import models as m

    return TypeAdapter(m.PayloadSchemaParams).validate_python(d)


def recorded_plan(c, name: str) -> dict[str, Any] | None:
    """What `create` recorded in a collection's metadata (None: not built by dbguard)."""
    meta = (c.get_collection(name).config.metadata or {}).get("dbguard")
    return {**meta, "plan": json.loads(meta["plan"])} if meta else None


def index_hash(p: dict[str, Any], collection: str, count: int, checksum: int) -> str:
    payload = json.dumps({"collection": collection, "plan": p, "count": count, "sum": str(checksum)}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v)
    return v / n if n > 1.1920929e-7 else v  # Qdrant's EPSILON (f32::EPSILON)


def expecter(move: CollectionMove, p: dict[str, Any]):
    """Source point -> the point sent to the new collection: dropped vectors left out, the gated vector
    transformed (`Side.stored` is what the collection then holds)."""
    gated, keep = move.source.vector_name or "", set(p["vectors"]) | set(p["sparse_vectors"])

    def expect(pt: SPoint) -> SPoint:
        out = {}
        for n, v in pt.vectors.items():
            if n not in keep:
                continue
            out[n] = transform(move, v) if n == gated else v
        return SPoint(pt.id, pt.payload, out)
    return expect


class Side:
    """The new collection as the target side of `qdrant_move`."""

    kind = "qdrant"

    def __init__(self, c, name: str, p: dict[str, Any], retries: int = 3):
        self.c, self.name, self.cosine, self.retries = c, name, cosine_names(p), retries

    def write(self, points: list[SPoint]) -> None:
        """Upsert, waiting for the write; transient errors retried (qdrant.retrying), a refusal raised."""
        if points:
            batch = [to_struct(p) for p in points]
            qdrant.retrying(lambda: self.c.upsert(self.name, points=batch, wait=True), retries=self.retries)

    def stored(self, p: SPoint) -> SPoint:
        """A sent point as the collection holds it: Cosine vectors normalised in float32, as Qdrant's
        insert path does (qdrant-client local mode: the same numpy expression)."""
        if not self.cosine & set(p.vectors):
            return p
        return SPoint(p.id, p.payload, {n: _unit(np.asarray(v, dtype=np.float32))
                                        if n in self.cosine and not isinstance(v, tuple) else v
                                        for n, v in p.vectors.items()})

    def read(self, ids: list[str]) -> list[SPoint]:
        return retrieve(self.c, self.name, ids)

    def scan(self, lo, hi):
        return scan(self.c, self.name, lo, hi)

    def delete(self, ids: list[str]) -> None:
        qdrant.delete_points(self.c, self.name, ids)
