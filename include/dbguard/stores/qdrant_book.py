"""Bookkeeping of a migration whose source is a Qdrant collection: its id ranges (planned, copied with
their count and checksum), the source's point count at reconcile, and the alias it moved.

It lives where every such migration has a store: a collection `dbguard_ranges` (no vectors, payload
only) on the SOURCE's Qdrant connection, beside the data. So it needs no PostgreSQL (Qdrant -> Qdrant
has none), survives a worker's restart, and every Airflow worker that reaches the source sees it (a
server; local mode is one process). One point per record, its id a UUID5 of (migration, target,
record), so writing a record twice overwrites it. `dbguard.ranges` plays this part for tables.
"""
from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from ..spec import CollectionMove

COLLECTION = "dbguard_ranges"
_NS = uuid.UUID("6b7c1f2e-9a52-4e0b-8f1e-2d5b0c3a7e11")


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat()


class Book:
    def __init__(self, c, migration: str, move: CollectionMove):
        self.c, self.migration = c, migration
        self.target = move.label
        if not c.collection_exists(COLLECTION):
            c.create_collection(COLLECTION, vectors_config={})

    def _id(self, record: str) -> str:
        return str(uuid.uuid5(_NS, f"{self.migration}\x00{self.target}\x00{record}"))

    def put(self, record: str, **payload: Any) -> None:
        from qdrant_client import models as m

        self.c.upsert(COLLECTION, [m.PointStruct(id=self._id(record), vector={}, payload={
            "migration": self.migration, "target": self.target, "record": record, "at": _now(), **payload})],
            wait=True)

    def get(self, record: str) -> dict[str, Any] | None:
        got = self.c.retrieve(COLLECTION, [self._id(record)], with_payload=True, with_vectors=False)
        if not got:
            return None
        return {k: v for k, v in got[0].payload.items() if k not in ("migration", "target", "record", "at")}

    def delete(self, records: list[str]) -> None:
        from qdrant_client import models as m

        if records:
            self.c.delete(COLLECTION, points_selector=m.PointIdsList(points=[self._id(r) for r in records]),
                          wait=True)

    # ranges: "plan" holds the list; "range:<i>" each range's state
    def plan(self) -> dict[str, Any] | None:
        return self.get("plan")

    def set_plan(self, ranges: list[list[str | None]], source_points: int, run_id: str, **extra: Any) -> None:
        old = self.plan()
        if old:  # a new plan: forget the old one's range states
            self.delete([f"range:{i}" for i in range(len(old["ranges"]))])
        self.put("plan", ranges=ranges, source_points=source_points, run_id=run_id, **extra)

    def range_state(self, i: int) -> dict[str, Any] | None:
        return self.get(f"range:{i}")

    def set_range(self, i: int, lo: str | None, hi: str | None, *, status: str, count: int, checksum: int,
                  **extra: Any) -> None:
        self.put(f"range:{i}", lo=lo, hi=hi, status=status, count=count, checksum=str(checksum), **extra)
