"""Qdrant collections as a vector store (DESIGN.md "Stores beyond PostgreSQL").

The store's small interface: `read_range` (points of an id range, in id order), `write_batch`
(an idempotent upsert that waits for the write), `point_hash` / `RangeSum` (count and checksum,
computed the same way for what the source sends and what the store returns), `search` (one gold
query), `swap_alias` / its undo. Copy, verify and reconcile live in `qdrant_copy`, which only
talks to this interface.

Connections are Airflow connections of the provider's `qdrant` type (apache-airflow-providers-qdrant):
AIRFLOW_CONN_<ID> as a URI (`qdrant://:API_KEY@host:6333?https=true`) or JSON, or Airflow's
connection store; the fields mean what QdrantHook.get_conn makes of them (host, port, password =
API key, extras url, grpc_port, prefer_gprc, https, prefix). Two extras select the client's local
mode: `path` (a directory) or `location=:memory:`. An undefined connection is local mode under
.qdrant/<conn_id>/ (DBGUARD_QDRANT_DIR moves it). Local mode searches exactly (no HNSW).
"""
from __future__ import annotations

import atexit
import contextlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import parse_qsl, unquote, urlsplit

import numpy as np
import xxhash

from .. import db
from ..errors import ConnectionFailed
from ..spec import QDRANT_DISTANCE, VectorStore
from . import qdrant_payload

REPO = Path(__file__).resolve().parents[3]
_clients: dict[tuple[int, str], Any] = {}
MASK64 = (1 << 64) - 1


# ---- connections ------------------------------------------------------------------------------

def local_dir() -> Path:
    return Path(os.environ.get("DBGUARD_QDRANT_DIR") or REPO / ".qdrant")


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


def client_kwargs(conn_id: str) -> dict[str, Any]:
    """QdrantClient arguments for a conn id, as QdrantHook.get_conn builds them (plus local mode)."""
    uri = os.environ.get(db.env_var(conn_id)) or (db._resolver(conn_id) if db._resolver else None)
    if not uri:
        return {"path": str(local_dir() / conn_id)}
    if uri.lstrip().startswith("{"):
        c = json.loads(uri)
        extra = c.get("extra") or {}
        extra = json.loads(extra) if isinstance(extra, str) else extra
        scheme, host, port, password = c.get("conn_type", "qdrant"), c.get("host"), c.get("port"), c.get("password")
    else:
        u = urlsplit(uri)
        scheme, host, password = u.scheme, u.hostname, unquote(u.password) if u.password else None
        port = u.port
        extra = dict(parse_qsl(u.query, keep_blank_values=True))
        if "__extra__" in extra:
            extra = json.loads(extra["__extra__"])
    if scheme.replace("-", "_") != "qdrant":
        raise ConnectionFailed(f"connection {conn_id!r} has type {scheme!r}; a Qdrant store needs a connection of "
                               f"type qdrant (e.g. {db.env_var(conn_id)}=qdrant://:API_KEY@host:6333)")
    if extra.get("location") == ":memory:":
        return {"location": ":memory:"}
    if extra.get("path"):
        return {"path": str(extra["path"])}
    kw: dict[str, Any] = {"host": host or None, "port": int(port or 6333), "url": extra.get("url"),
                          "api_key": password or None, "grpc_port": int(extra.get("grpc_port", 6334)),
                          "prefer_grpc": _as_bool(extra.get("prefer_gprc", False))}
    if extra.get("https") is not None:
        kw["https"] = _as_bool(extra["https"])
    if extra.get("prefix"):
        kw["prefix"] = extra["prefix"]
    if password and db._masker is not None:
        db._masker(password)
    return kw


def client(conn_id: str):
    """One client per conn id and process (local mode allows one client per directory, and an
    in-memory store lives only as long as its client)."""
    from qdrant_client import QdrantClient

    key = (os.getpid(), conn_id)
    if key not in _clients:
        kw = client_kwargs(conn_id)
        if "path" in kw:
            Path(kw["path"]).mkdir(parents=True, exist_ok=True)
        if not _clients:
            atexit.register(close_all)  # before interpreter teardown, when the local store can still flush
        try:
            _clients[key] = QdrantClient(**kw)
            tune_local_storage(_clients[key])
        except Exception as e:  # portalocker: another process holds the local directory
            where = kw.get("path") or kw.get("url") or kw.get("host") or kw.get("location")
            raise ConnectionFailed(f"cannot open Qdrant connection {conn_id!r} ({where}): {e}; stop the other "
                                   f"process or point {db.env_var(conn_id)} at a server") from None
    return _clients[key]


def close_all() -> None:
    for key in [k for k in _clients if k[0] == os.getpid()]:
        with contextlib.suppress(Exception):
            _clients.pop(key).close()


def drop_collections(spec) -> list[str]:
    """Drop the collections a spec's Qdrant stores name (a demo starts empty); returns their names."""
    dropped = []
    for t in spec.tables:
        for v in t.vector:
            if v.qdrant is not None:
                c = client(v.qdrant.conn_id)
                if c.collection_exists(v.qdrant.collection):
                    c.delete_collection(v.qdrant.collection)
                    dropped.append(v.qdrant.collection)
    return dropped


def is_local(c) -> bool:
    return type(c._client).__name__ == "QdrantLocal"


def tune_local_storage(c) -> None:
    """Persistent local mode writes each point in its own SQLite transaction, and the default journal
    syncs every commit to disk: ~300 points/s here, 11.7 of 17.6 s of the docs demo's collection build.
    WAL with synchronous=NORMAL keeps every commit atomic and durable across a crash of the process
    (not of the machine), which is what a local development store needs; a server is unaffected.
    Reaches into the client's local storage (private): when that changes, this does nothing."""
    if not is_local(c):
        return
    for coll in getattr(c._client, "collections", {}).values():
        con = getattr(getattr(coll, "storage", None), "storage", None)
        if con is not None:
            with contextlib.suppress(Exception):
                con.execute("PRAGMA journal_mode=WAL")
                con.execute("PRAGMA synchronous=NORMAL")


# ---- the collection ---------------------------------------------------------------------------

def distance(store: VectorStore) -> str:
    return QDRANT_DISTANCE[store.metric]


def collection_params(store: VectorStore) -> dict[str, Any]:
    """What the collection is, as the manifest's INDEX and the index_hash record it."""
    q = store.qdrant
    return {"store": "qdrant", "collection": q.collection, "vector_name": q.vector_name, "size": store.dim,
            "distance": distance(store), "hnsw_m": q.hnsw.m, "hnsw_ef_construct": q.hnsw.ef_construct,
            "quantization": q.quantization.model_dump() if q.quantization else None, "payload": list(q.payload)}


def create_collection(c, name: str, store: VectorStore) -> None:
    from qdrant_client import models as m

    q = store.qdrant
    hnsw = m.HnswConfigDiff(m=q.hnsw.m, ef_construct=q.hnsw.ef_construct)
    quant = None
    if q.quantization is not None:
        quant = m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(
            type=m.ScalarType.INT8, quantile=q.quantization.quantile, always_ram=q.quantization.always_ram))
    params = m.VectorParams(size=store.dim, distance=m.Distance(distance(store)), hnsw_config=hnsw)
    c.create_collection(name, vectors_config={q.vector_name: params} if q.vector_name else params,
                        hnsw_config=hnsw, quantization_config=quant)
    tune_local_storage(c)


def describe(c, name: str, vector_name: str | None) -> dict[str, Any] | None:
    """size and distance of an existing collection's vector (None: no such collection or alias)."""
    if not c.collection_exists(name):
        return None
    vectors = c.get_collection(name).config.params.vectors
    if isinstance(vectors, dict):
        vp = vectors.get(vector_name or "")
        if vp is None:
            return {"vectors": sorted(vectors)}
    else:
        if vector_name:
            return {"vectors": [""]}
        vp = vectors
    return {"size": vp.size, "distance": vp.distance.value}


def check(store: VectorStore, label: str) -> list[str]:
    """Preflight: the connection works and an existing collection has the spec's size and distance."""
    q = store.qdrant
    try:
        c = client(q.conn_id)
        have = describe(c, q.collection, q.vector_name)
    except ConnectionFailed as e:
        return [str(e)]
    except Exception as e:
        return [f"{label}: Qdrant connection {q.conn_id!r} does not answer: {str(e).splitlines()[0]}; check "
                f"{db.env_var(q.conn_id)}"]
    if have is None:
        return []
    want = {"size": store.dim, "distance": distance(store)}
    if "vectors" in have:
        return [f"{label}: collection {q.collection!r} has vectors {have['vectors']} but the spec names vector "
                f"{q.vector_name!r}; fix qdrant.vector_name or choose another collection"]
    if have != want:
        return [f"{label}: collection {q.collection!r} exists with size {have['size']} / {have['distance']} but the "
                f"spec says size {store.dim} / {want['distance']} (metric {store.metric}); drop the collection or "
                "name another in qdrant.collection"]
    return []


# ---- points: canonical form, hash, range sums ---------------------------------------------------

@dataclass(frozen=True)
class Point:
    id: str                 # the key as text (integer or UUID), as PostgreSQL prints it
    payload: dict[str, Any]
    vector: np.ndarray      # float32

    def digest(self) -> int:
        return point_hash(self.id, self.payload, self.vector)


def point_hash(pid: str, payload: dict[str, Any], vector: np.ndarray) -> int:
    """64-bit XXH3 over the length-prefixed id, canonical payload and float32 little-endian bytes (a
    checksum against corruption, not an adversary: ~30x cheaper than blake2b per 1.5 KB vector, which
    was a fifth of the verify)."""
    return framed_hash((pid.encode(), qdrant_payload.canonical(payload).encode(),
                        np.ascontiguousarray(vector, dtype="<f4").tobytes()))


def framed_hash(parts) -> int:
    """XXH3-64 over each part prefixed by its length (so no two different splits hash alike)."""
    h = xxhash.xxh3_64()
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.intdigest()


def diff_points(want: list, have: list, same) -> dict[str, list[str]]:
    """Point by point by id: missing on the target, extra on the target, differing (`same(a, b)` false)."""
    w, h = {p.id: p for p in want}, {p.id: p for p in have}
    return {"missing": sorted(w.keys() - h.keys()), "extra": sorted(h.keys() - w.keys()),
            "differing": sorted(i for i in w.keys() & h.keys() if not same(w[i], h[i]))}


@dataclass(frozen=True)
class RangeSum:
    count: int
    checksum: int   # sum of point hashes mod 2^64: order-independent

    def __add__(self, other: "RangeSum") -> "RangeSum":
        """Sums of disjoint ranges add up to the sum of their union."""
        return RangeSum(self.count + other.count, (self.checksum + other.checksum) & MASK64)

    @classmethod
    def of(cls, points: Iterator[Point] | list[Point]) -> "RangeSum":
        """Any points with a digest() (Point, qdrant_source.SPoint)."""
        n, s = 0, 0
        for p in points:
            n, s = n + 1, (s + p.digest()) & MASK64
        return cls(n, s)

    @classmethod
    def of_batch(cls, points: list[Point], vectors: np.ndarray | None = None) -> "RangeSum":
        """`of(points)` in bulk (the same hashes): the vectors as one float32 byte string, one hash call
        per point. `vectors` (n, dim) replaces the points' own when given."""
        if vectors is None:
            try:
                vectors = np.array([p.vector for p in points], dtype=np.float32)
            except ValueError:  # vectors of different lengths
                return cls.of(points)
        if vectors.ndim != 2 or len(vectors) != len(points):
            return cls.of(points)
        raw = memoryview(np.ascontiguousarray(vectors, dtype="<f4").tobytes())
        step = vectors.shape[1] * 4
        vlen = step.to_bytes(8, "little")
        s = 0
        for i, p in enumerate(points):
            a, b = p.id.encode(), qdrant_payload.canonical(p.payload).encode()
            h = xxhash.xxh3_64(len(a).to_bytes(8, "little") + a + len(b).to_bytes(8, "little") + b + vlen)
            h.update(raw[i * step:(i + 1) * step])
            s += h.intdigest()
        return cls(len(points), s & MASK64)


def stored_vector(store: VectorStore, v: np.ndarray) -> np.ndarray:
    """The float32 vector as the collection stores it: a Cosine collection keeps the unit vector,
    normalised in float32 (as Qdrant's insert path does); other distances keep it as sent."""
    v = np.asarray(v, dtype=np.float32)
    if distance(store) == "Cosine":
        n = np.linalg.norm(v)
        return v / n if n > 1e-16 else v
    return v


def stored_vectors(store: VectorStore, vectors: np.ndarray) -> np.ndarray:
    """`stored_vector` of each row, bit for bit: each norm is the row's own float32 dot product (as
    np.linalg.norm computes it for one vector), the division elementwise."""
    v = np.asarray(vectors, dtype=np.float32)
    if distance(store) != "Cosine" or not len(v):
        return v
    norms = np.sqrt(np.array([r.dot(r) for r in v], dtype=np.float32))
    return np.where((norms > 1e-16)[:, None], v / np.where(norms > 1e-16, norms, 1)[:, None], v)


def point_id(key: str) -> int | str:
    """The point id of a key's text: an integer, else the UUID text."""
    try:
        return int(key)
    except ValueError:
        return key


# ---- read, write, search, swap ----------------------------------------------------------------

def _vector_of(record, vector_name: str | None) -> np.ndarray:
    v = record.vector
    if isinstance(v, dict):
        v = v.get(vector_name or "")
    return np.asarray(v if v is not None else [], dtype=np.float32)


def _to_point(record, vector_name: str | None) -> Point:
    return Point(str(record.id), record.payload or {}, _vector_of(record, vector_name))


def retrieve(c, name: str, store: VectorStore, keys: list[str]) -> list[Point]:
    """The points of these keys that exist (per-batch verify reads only what the batch wrote)."""
    recs = c.retrieve(name, [point_id(k) for k in keys], with_payload=True,
                      with_vectors=[store.qdrant.vector_name] if store.qdrant.vector_name else True)
    return [_to_point(r, store.qdrant.vector_name) for r in recs]


def read_range(c, name: str, store: VectorStore, lo: str | None, hi: str | None, *,
               page: int = 1024, vectors: bool = True) -> Iterator[Point]:
    """Points with lo <= id < hi (None: unbounded), in id order (Qdrant scrolls by id)."""
    vn = store.qdrant.vector_name
    offset = None if lo is None else point_id(lo)
    bound = None if hi is None else point_id(hi)
    while True:
        recs, offset = c.scroll(name, offset=offset, limit=page, with_payload=vectors,
                                with_vectors=([vn] if vn else True) if vectors else False)
        for r in recs:
            if bound is not None and _order(r.id) >= _order(bound):
                return
            yield _to_point(r, vn) if vectors else Point(str(r.id), {}, np.zeros(0, np.float32))
        if offset is None:
            return


def _order(a: int | str) -> tuple[int, int, str]:
    """Qdrant's id order: integers before UUIDs, UUIDs by their text (the same as by value)."""
    return (0, a, "") if isinstance(a, int) else (1, 0, str(a))


def transient(e: BaseException) -> bool:
    """An error a retry can cure: the server unreachable or timing out, overloaded (429) or failing (5xx).
    Not a refused request (4xx: a wrong size, a missing collection) and not local mode's errors."""
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(e, UnexpectedResponse):
        return e.status_code == 429 or e.status_code >= 500
    if isinstance(e, (ResponseHandlingException, ConnectionError, TimeoutError)):
        return True
    try:
        import httpx
        if isinstance(e, httpx.TransportError):
            return True
    except ImportError:  # pragma: no cover
        pass
    code = getattr(e, "code", None)  # grpc.RpcError
    if callable(code):
        with contextlib.suppress(Exception):
            return code().name in ("UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED")
    return False


def retrying(fn, *, retries: int = 3, delay: float = 0.5, max_delay: float = 30.0, on_retry=None):
    """fn(), again after a transient error (see `transient`) up to `retries` times, with exponential
    back-off from `delay` seconds; any other error, and the last transient one, is raised."""
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if attempt == retries or not transient(e):
                raise
            if on_retry is not None:
                on_retry(e)
            time.sleep(min(delay * 2 ** attempt, max_delay))


def write_batch(c, name: str, store: VectorStore, points: list[Point], *, retries: int = 3,
                delay: float = 0.5, max_delay: float = 30.0, on_retry=None) -> None:
    """Upsert (idempotent: the same id overwrites) and wait until the write is applied; transient
    errors retried (`retrying`)."""
    from qdrant_client import models as m

    if not points:
        return
    vn = store.qdrant.vector_name
    # PointStructs, as upload_points sends them: a Batch is turned into PointStructs client-side anyway
    # (measured: 1,000-point Batches 4.5 s, PointStruct lists 3.5 s per 10,000 x 384 in local mode).
    # model_construct: the fields are well-typed by construction (int/UUID text, float list, JSON
    # payload); pydantic's validation of 384 floats per point was a tenth of the copy.
    batch = [m.PointStruct.model_construct(id=point_id(p.id), payload=p.payload,
                                           vector={vn: p.vector.tolist()} if vn else p.vector.tolist())
             for p in points]
    retrying(lambda: c.upsert(name, points=batch, wait=True), retries=retries, delay=delay, max_delay=max_delay,
             on_retry=on_retry)


def delete_points(c, name: str, keys: list[str]) -> None:
    from qdrant_client import models as m

    if keys:
        c.delete(name, points_selector=m.PointIdsList(points=[point_id(k) for k in keys]), wait=True)


def search(c, name: str, store: VectorStore, query: np.ndarray, k: int) -> tuple[list[str], np.ndarray]:
    """Top-k ids and their stored vectors for one query (hnsw_ef from the spec on a server)."""
    from qdrant_client import models as m

    q = store.qdrant
    kw: dict[str, Any] = {}
    if not is_local(c):
        kw["search_params"] = m.SearchParams(hnsw_ef=max(q.hnsw.ef or 128, k))
    res = c.query_points(name, query=np.asarray(query, dtype=np.float32).tolist(), using=q.vector_name, limit=k,
                         with_payload=False, with_vectors=[q.vector_name] if q.vector_name else True, **kw).points
    vecs = [_vector_of(p, q.vector_name) for p in res]
    return [str(p.id) for p in res], (np.stack(vecs) if vecs else np.zeros((0, store.dim), np.float32))


def chunks(c, name: str, store: VectorStore, page: int = 5000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(keys, float32 vectors) pages of the whole collection, for exact search (recall probes)."""
    vn = store.qdrant.vector_name
    offset = None
    while True:
        recs, offset = c.scroll(name, offset=offset, limit=page, with_payload=False,
                                with_vectors=[vn] if vn else True)
        if recs:
            yield (np.array([str(r.id) for r in recs], dtype=object),
                   np.stack([_vector_of(r, vn) for r in recs]))
        if offset is None:
            return


def alias_target(c, alias: str) -> str | None:
    return next((a.collection_name for a in c.get_aliases().aliases if a.alias_name == alias), None)


def swap_alias(c, alias: str, collection: str) -> str | None:
    """Point `alias` at `collection` in one request (readers see the old or the new, never none);
    returns the collection it named before, which `swap_alias(c, alias, previous)` restores."""
    from qdrant_client import models as m

    previous = alias_target(c, alias)
    ops: list[Any] = []
    if previous is not None:
        ops.append(m.DeleteAliasOperation(delete_alias=m.DeleteAlias(alias_name=alias)))
    ops.append(m.CreateAliasOperation(create_alias=m.CreateAlias(collection_name=collection, alias_name=alias)))
    c.update_collection_aliases(change_aliases_operations=ops)
    return previous
