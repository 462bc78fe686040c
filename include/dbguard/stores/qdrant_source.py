"""A Qdrant collection as the SOURCE of a migration: its points with every vector (named, sparse),
their checksum, id ranges, and the checks before anything is written.

A point here (`SPoint`) carries all its vectors by name ("" = the unnamed vector; a sparse vector as
(indices, values)). Its hash extends `qdrant.point_hash`: a point with only an unnamed dense vector
hashes exactly as `point_hash` does (id text, canonical payload, float32 little-endian bytes); more
vectors add, in name order, the length-prefixed name and bytes (sparse: uint32 indices then float32
values, by index). Both sides of every comparison are reduced by this one function.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from ..spec import QDRANT_DISTANCE, CollectionMove
from . import qdrant, qdrant_payload

Sparse = tuple[np.ndarray, np.ndarray]   # (uint32 indices ascending, float32 values)


@dataclass(frozen=True)
class SPoint:
    id: str
    payload: dict[str, Any]
    vectors: dict[str, Any] = field(default_factory=dict)  # name -> float32 array | Sparse

    def digest(self) -> int:
        if set(self.vectors) == {""}:
            return qdrant.point_hash(self.id, self.payload, self.vectors[""])
        parts = [self.id.encode(), qdrant_payload.canonical(self.payload).encode()]
        for name in sorted(self.vectors):
            v = self.vectors[name]
            if isinstance(v, tuple):
                data = b"s" + np.asarray(v[0], "<u4").tobytes() + np.asarray(v[1], "<f4").tobytes()
            else:
                data = b"d" + np.ascontiguousarray(v, dtype="<f4").tobytes()
            parts += [name.encode(), data]
        return qdrant.framed_hash(parts)  # as qdrant.point_hash frames a point of one vector


def _sparse(v) -> Sparse:
    order = np.argsort(np.asarray(v.indices, dtype=np.int64), kind="stable")
    return (np.asarray(v.indices, dtype=np.uint32)[order], np.asarray(v.values, dtype=np.float32)[order])


def to_spoint(record) -> SPoint:
    """A scrolled or retrieved Record as an SPoint (every vector it returned)."""
    v = record.vector
    vectors: dict[str, Any] = {}
    if isinstance(v, dict):
        for name, x in v.items():
            vectors[name] = _sparse(x) if hasattr(x, "indices") else np.asarray(x, dtype=np.float32)
    elif v is not None:
        vectors[""] = np.asarray(v, dtype=np.float32)
    return SPoint(str(record.id), record.payload or {}, vectors)


def to_struct(p: SPoint):
    """The PointStruct an upsert sends for an SPoint."""
    from qdrant_client import models as m

    if set(p.vectors) == {""}:
        vec: Any = p.vectors[""].tolist()
    else:
        vec = {n: (m.SparseVector(indices=v[0].tolist(), values=v[1].tolist()) if isinstance(v, tuple)
                   else v.tolist()) for n, v in p.vectors.items()}
    return m.PointStruct(id=qdrant.point_id(p.id), vector=vec, payload=p.payload)


# ---- reading a collection by id range ----------------------------------------------------------

def _order(pid: str) -> tuple[int, int, str]:
    return qdrant._order(qdrant.point_id(pid))


def scan(c, name: str, lo: str | None, hi: str | None, *, page: int = 1024, vectors: bool = True,
         payload: bool = True) -> Iterator[SPoint]:
    """Points with lo <= id < hi (None: unbounded) in Qdrant's id order (integers, then UUIDs)."""
    offset = None if lo is None else qdrant.point_id(lo)
    bound = None if hi is None else _order(hi)
    while True:
        recs, offset = c.scroll(name, offset=offset, limit=page, with_payload=payload, with_vectors=vectors)
        for r in recs:
            if bound is not None and qdrant._order(r.id) >= bound:
                return
            yield to_spoint(r) if (vectors or payload) else SPoint(str(r.id), {}, {})
        if offset is None:
            return


def plan_ranges(c, name: str, batch: int) -> tuple[list[list[str | None]], int]:
    """Id ranges of about `batch` points ([first id of a page, first id of the next); the first and last
    unbounded, so points written outside the planned ids still fall in a range) and the point count."""
    firsts, n = [], 0
    offset = None
    while True:
        recs, offset = c.scroll(name, offset=offset, limit=batch, with_payload=False, with_vectors=False)
        if recs:
            firsts.append(str(recs[0].id))
            n += len(recs)
        if offset is None:
            break
    ranges = [[None if i == 0 else f, firsts[i + 1] if i + 1 < len(firsts) else None] for i, f in enumerate(firsts)]
    return ranges or [[None, None]], n


def retrieve(c, name: str, ids: list[str]) -> list[SPoint]:
    return [to_spoint(r) for r in c.retrieve(name, [qdrant.point_id(i) for i in ids], with_payload=True,
                                             with_vectors=True)]


# ---- the collection's configuration ------------------------------------------------------------

def vector_params(info) -> tuple[dict[str, Any], dict[str, Any]]:
    """(dense vectors by name, "" = unnamed; sparse vectors by name) of a CollectionInfo."""
    p = info.config.params
    dense = p.vectors if isinstance(p.vectors, dict) else ({"": p.vectors} if p.vectors is not None else {})
    return dict(dense), dict(p.sparse_vectors or {})


def source_problems(c, move: CollectionMove, where: str) -> list[str]:
    """The source collection exists (not as an alias only), has the gated vector with the spec's size and
    distance; an alias, when given, names the collection or nothing yet."""
    s = move.source
    if not c.collection_exists(s.collection):
        have = sorted(x.name for x in c.get_collections().collections)
        return [f"{where}: source.collection {s.collection!r} does not exist on Qdrant connection {s.conn_id!r} "
                f"(collections there: {have}); fix source.collection or source.conn_id"]
    dense, _ = vector_params(c.get_collection(s.collection))
    vp = dense.get(s.vector_name or "")
    out = []
    if vp is None:
        out.append(f"{where}: source.vector_name {s.vector_name!r} is not a dense vector of {s.collection!r} "
                   f"(it has {sorted(dense)}; '' = unnamed); fix source.vector_name")
    else:
        if vp.size != s.dim:
            out.append(f"{where}: source.dim = {s.dim} but {s.collection!r} holds vectors of size {vp.size}; "
                       "set source.dim to it")
        if vp.distance.value != QDRANT_DISTANCE[s.metric]:
            have = {v: k for k, v in QDRANT_DISTANCE.items()}[vp.distance.value]
            out.append(f"{where}: source.metric = {s.metric} ({QDRANT_DISTANCE[s.metric]}) but {s.collection!r} "
                       f"searches by {vp.distance.value}; set source.metric: {have}")
    if s.alias:
        at = qdrant.alias_target(c, s.alias)
        if at is not None and at != s.collection:
            out.append(f"{where}: source.alias {s.alias!r} names collection {at!r}, not {s.collection!r}; "
                       "fix source.collection (the collection readers search now)")
    return out


def scan_problems(c, move: CollectionMove, where: str, decoders: list | None = None,
                  limit: int = 20, key_type: str | None = None) -> tuple[list[str], int]:
    """One read of the whole source before anything is written: every gated vector present, of the
    spec's size and finite; with `decoders` ((column, payload key, sql type, decode, encode)) every
    payload value decodes to its column's type and back to the same JSON. Returns (problems, points)."""
    s = move.source
    vn = s.vector_name or ""
    out, n = [], 0
    for p in scan(c, s.collection, None, None):
        n += 1
        if key_type is not None and (key_type == "uuid") != ("-" in p.id):
            out.append(f"{where}: point id {p.id} does not fit pgvector.key_type {key_type}; a collection with "
                       "integer ids needs bigint, with UUID ids uuid")
        v = p.vectors.get(vn)
        if v is None or isinstance(v, tuple) or v.shape[0] != s.dim:
            out.append(f"{where}: point {p.id} has no {s.dim}-dimensional vector {vn!r} "
                       f"({'none' if v is None else getattr(v, 'shape', 'sparse')}); fix or delete the point")
        elif not np.isfinite(v).all():
            out.append(f"{where}: point {p.id}'s vector {vn!r} holds NaN or infinite components; fix or delete the "
                       "point (no search can rank it)")
        for col, key, typ, dec, enc in decoders or []:
            val = p.payload.get(key)
            try:
                back = enc(dec(val))
                same = qdrant_payload.canonical({"v": back}) == qdrant_payload.canonical({"v": val})
            except Exception:  # noqa: BLE001  any decode error is the same finding
                same = False
            if not same:
                out.append(f"{where}: point {p.id} payload {key!r} = {_short(val)} is not an exact {typ} "
                           f"(column {col!r}); declare another type for it in pgvector.payload (text, jsonb) or "
                           "fix the value")
        if len(out) >= limit:
            out.append(f"{where}: stopped after {limit} problems")
            break
    return out, n


def _short(v: Any) -> str:
    t = repr(v)
    return t if len(t) <= 60 else t[:57] + "..."


def transform(move: CollectionMove, v: np.ndarray) -> np.ndarray:
    """The declared transform of the gated vector (normalize), in float32."""
    if not move.normalize:
        return v
    n = float(np.linalg.norm(v.astype(np.float64)))
    return (v / n).astype(np.float32) if n > 0 and math.isfinite(n) else v
