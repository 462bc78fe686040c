"""Copy, verify and reconcile a Qdrant SOURCE collection into a target side (a new collection, or a
pgvector table), by id range, with resume.

The target side is a small interface (`write`, `read` by ids, `scan` an id range in Qdrant's id
order, `delete`, `stored`: a sent point as the side will hold it, `cosine`: the vector names it
stores as unit vectors); `qdrant_clone.Side` and `qdrant_to_pg.Side` implement it. `expect` turns a
source point into the point sent (the declared transform, the payload fields carried); the proof
compares the side's points with `stored(sent)`. A Cosine vector is sent as it is and normalised once,
by the store: normalising it before sending made the store normalise a unit vector again, an ulp
apart, and every range of a Cosine collection was bisected down to its points.

copy: the plan's ranges in order; a range already marked `copied` in the book (`qdrant_book`) is
skipped, so a run interrupted anywhere resumes at the first range not recorded (a range is recorded
only after its batch was written, read back and proven: count and checksum equal on both sides,
repaired once when not). reconcile: every range summed on both sides; a differing one is bisected on
its source ids down to `leaf` points, compared point by point, repaired (write the expected point,
delete extras) and summed again.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

from . import qdrant, qdrant_copy, qdrant_payload
from .qdrant_book import Book
from .qdrant_source import SPoint, scan

Expect = Callable[[SPoint], SPoint]


def same_point(a: SPoint, b: SPoint, cosine: set[str], tol: float) -> bool:
    """Equal hashes; or, where a digest differs only because a Cosine vector was renormalised (an ulp, or
    local mode returning the raw vector after a reload), the same id, payload and directions."""
    if a.digest() == b.digest():
        return True
    if qdrant_payload.canonical(a.payload) != qdrant_payload.canonical(b.payload) or set(a.vectors) != set(b.vectors):
        return False
    for n, va in a.vectors.items():
        vb = b.vectors[n]
        if isinstance(va, tuple) or isinstance(vb, tuple):
            if not (isinstance(va, tuple) and isinstance(vb, tuple) and np.array_equal(va[0], vb[0])
                    and np.array_equal(va[1], vb[1])):
                return False
        elif not (np.array_equal(va, vb) or (n in cosine and qdrant_copy._same_direction(va, vb, tol))):
            return False
    return True


def diff(want: list[SPoint], have: list[SPoint], cosine: set[str], tol: float) -> dict[str, list[str]]:
    return qdrant.diff_points(want, have, lambda a, b: same_point(a, b, cosine, tol))


def repair(side, sent: list[SPoint], d: dict[str, list[str]]) -> int:
    fix = set(d["missing"]) | set(d["differing"])
    side.write([p for p in sent if p.id in fix])
    side.delete(d["extra"])
    return len(fix) + len(d["extra"])


def copy_range(src_c, source: str, side, expect: Expect, lo: str | None, hi: str | None,
               tol: float) -> dict[str, Any]:
    """One range: read, write, read back, prove (count + checksum); repair once on a mismatch."""
    sent = [expect(p) for p in scan(src_c, source, lo, hi)]
    side.write(sent)
    t0 = time.perf_counter()
    want = [side.stored(p) for p in sent]
    ids = [p.id for p in want]
    have = side.read(ids)
    out = {"count": len(want), "sum": qdrant.RangeSum.of(want), "repaired": 0, "mismatch": False}
    if qdrant.RangeSum.of(have) != out["sum"]:
        d = diff(want, have, side.cosine, tol)
        if any(d.values()):
            out["repaired"] = repair(side, sent, d)
            out["mismatch"] = any(diff(want, side.read(ids), side.cosine, tol).values())
    out["verify_seconds"] = time.perf_counter() - t0
    return out


def copy(src_c, source: str, side, expect: Expect, book: Book, *, tol: float, only: int | None = None,
         on_range: Callable[[int, dict], None] | None = None) -> dict[str, Any]:
    """Every range of the book's plan not yet recorded as copied (`only`: that range alone)."""
    ranges = book.plan()["ranges"]
    res = {"ranges": len(ranges), "copied_ranges": 0, "skipped_ranges": 0, "points": 0, "repaired": 0,
           "mismatched": [], "verify_seconds": 0.0}
    t0 = time.perf_counter()
    for i, (lo, hi) in enumerate(ranges):
        if only is not None and i != only:
            continue
        st = book.range_state(i)
        if st and st.get("status") == "copied":
            res["skipped_ranges"] += 1
            continue
        r = copy_range(src_c, source, side, expect, lo, hi, tol)
        if r["mismatch"]:
            res["mismatched"].append([lo, hi])
        book.set_range(i, lo, hi, status="mismatch" if r["mismatch"] else "copied", count=r["count"],
                       checksum=r["sum"].checksum)
        res["copied_ranges"] += 1
        res["points"] += r["count"]
        res["repaired"] += r["repaired"]
        res["verify_seconds"] += r["verify_seconds"]
        if on_range:
            on_range(i, r)
    res["seconds"] = time.perf_counter() - t0
    res["points_per_s"] = round(res["points"] / res["seconds"], 1) if res["seconds"] and res["points"] else None
    return res


def reconcile(src_c, source: str, side, expect: Expect, ranges: list[list[str | None]], *, tol: float,
              leaf: int = 64) -> dict[str, Any]:
    """Sum each range on both sides; bisect a differing one down to `leaf` points; repair; sum again."""
    found = {"missing": 0, "extra": 0, "differing": 0}
    out: dict[str, Any] = {"ranges": len(ranges), "bisected": 0, "repaired": 0, "unresolved": []}
    t0 = time.perf_counter()

    def walk(lo, hi) -> tuple[Any, Any]:
        """(source sum, target sum after any repair) of [lo, hi)."""
        sent = [expect(p) for p in scan(src_c, source, lo, hi)]
        want = [side.stored(p) for p in sent]
        have = list(side.scan(lo, hi))
        ws, hs = qdrant.RangeSum.of(want), qdrant.RangeSum.of(have)
        if ws == hs:
            return ws, hs
        if len(want) > leaf:
            out["bisected"] += 1
            mid = want[len(want) // 2].id
            a, b = walk(lo, mid), walk(mid, hi)
            return a[0] + b[0], a[1] + b[1]
        d = diff(want, have, side.cosine, tol)
        if not any(d.values()):
            return ws, hs
        for k in found:
            found[k] += len(d[k])
        out["repaired"] += repair(side, sent, d)
        after = list(side.scan(lo, hi))
        if any(diff(want, after, side.cosine, tol).values()):
            out["unresolved"].append([lo, hi])
        return ws, qdrant.RangeSum.of(after)

    from .qdrant import RangeSum

    src_total, tgt_total = RangeSum(0, 0), RangeSum(0, 0)
    for lo, hi in ranges:
        s, t = walk(lo, hi)
        src_total, tgt_total = src_total + s, tgt_total + t
    out.update(found, source_points=src_total.count, points=tgt_total.count, checksum=tgt_total.checksum,
               source_checksum=src_total.checksum, checksum_ok=not out["unresolved"],
               seconds=round(time.perf_counter() - t0, 3))
    return out
