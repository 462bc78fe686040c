"""Reconciliation: whole-table count+checksum on both sides at once, then
bisection of mismatching ranges down to rows, repair by re-copying those rows,
and verification again.

Bisection splits a range on real keys of whichever side holds more rows in
it, so extra rows in the target are located as surely as missing ones.
Leaves (at most `gates.bisect_leaf_rows` rows per side) are compared row by
row: key -> row hash, both sides, in memory bounded by the leaf size.
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

from . import db
from .backfill import Throttle, copy_format, fence, orphan_count, stream_rows
from .checksum import Checksum, Hashing, checksum, relation, row_hash
from .ranges import KeyRange, key_text, order_by, plan, predicate
from .spec import MigrationSpec, Table


@dataclass
class RowDiff:
    missing: list[tuple[str, ...]] = field(default_factory=list)  # in source, not in target
    extra: list[tuple[str, ...]] = field(default_factory=list)  # in target, not in source
    changed: list[tuple[str, ...]] = field(default_factory=list)  # both, different content
    ranges: list[str] = field(default_factory=list)  # labels of the leaf ranges that differ

    @property
    def total(self) -> int:
        return len(self.missing) + len(self.extra) + len(self.changed)

    def merge(self, other: "RowDiff") -> None:
        self.missing += other.missing
        self.extra += other.extra
        self.changed += other.changed
        self.ranges += other.ranges

    def summary(self, limit: int = 10) -> dict:
        show = lambda keys: [",".join(k) for k in keys[:limit]]  # noqa: E731
        return {"missing": len(self.missing), "extra": len(self.extra), "changed": len(self.changed),
                "missing_keys": show(self.missing), "extra_keys": show(self.extra),
                "changed_keys": show(self.changed), "ranges": self.ranges[:limit]}


class Sides:
    """One open connection per side, plus a thread to run both sides at once."""

    def __init__(self, spec: MigrationSpec):
        self.spec = spec
        self.src = db.source(spec, autocommit=True)
        self.tgt = db.target(spec, autocommit=True)
        self.hashing = Hashing.between(spec, self.src, self.tgt)
        self.pool = ThreadPoolExecutor(2)

    def both(self, fn, *args) -> tuple:
        a = self.pool.submit(fn, self.src, *args[0]) if args else self.pool.submit(fn, self.src)
        b = self.pool.submit(fn, self.tgt, *args[1]) if args else self.pool.submit(fn, self.tgt)
        return a.result(), b.result()

    def checksums(self, table: Table, r: KeyRange | None) -> tuple[Checksum, Checksum]:
        return self.both(checksum, (table, "source", r, self.hashing), (table, "target", r, self.hashing))

    def close(self) -> None:
        self.pool.shutdown()
        self.src.close()
        self.tgt.close()


def _leaf_rows(conn: psycopg.Connection, table: Table, side: str, r: KeyRange, h: Hashing) -> dict[tuple, int]:
    q = sql.SQL("SELECT {kt}, {h} FROM {t} WHERE {p} ORDER BY {ob}").format(
        kt=key_text(table), h=row_hash(table, side, h), t=relation(table, side), p=predicate(table, r),
        ob=order_by(table))
    n = len(table.key)
    return {tuple(row[:n]): row[n] for row in conn.execute(q)}


def locate(sides: Sides, table: Table, r: KeyRange, src_ck: Checksum, tgt_ck: Checksum, leaf: int) -> RowDiff:
    """Bisect a mismatching range down to the differing rows."""
    diff = RowDiff()
    if src_ck == tgt_ck:
        return diff
    if max(src_ck.count, tgt_ck.count) <= leaf:
        s, t = sides.both(_leaf_rows, (table, "source", r, sides.hashing), (table, "target", r, sides.hashing))
        diff.missing = [k for k in s if k not in t]
        diff.extra = [k for k in t if k not in s]
        diff.changed = [k for k in s if k in t and s[k] != t[k]]
        if diff.total:
            diff.ranges.append(r.label)
        return diff
    bigger, side = (sides.src, "source") if src_ck.count >= tgt_ck.count else (sides.tgt, "target")
    step = max(leaf, max(src_ck.count, tgt_ck.count) // 4 + 1)
    name = (table.schema_, table.name) if side == "source" else (table.target_schema, table.target_name)
    subs = plan(bigger, table, step, within=r, schema=name[0], name=name[1])
    for i, sub in enumerate(subs):
        sub = KeyRange(r.table, r.range_id * 10 + i, sub.lo, sub.hi)
        s, t = sides.checksums(table, sub)
        diff.merge(locate(sides, table, sub, s, t, leaf))
    return diff


def keys_filter(table: Table, keys: list[tuple[str, ...]]) -> sql.Composable:
    """`(k1, k2) IN (SELECT * FROM unnest($1::t1[], $2::t2[]))` with the keys as literals."""
    cols = sql.SQL(", ").join(sql.Identifier(k) for k in table.key)
    arrays = sql.SQL(", ").join(
        sql.SQL("{}::{}[]").format(sql.Literal([k[i] for k in keys]), sql.SQL(table.column(col).type))
        for i, col in enumerate(table.key))
    return sql.SQL("({}) IN (SELECT * FROM unnest({}))").format(cols, arrays)


def repair(spec: MigrationSpec, table: Table, diff: RowDiff, batch: int = 5_000) -> int:
    """Delete every differing key in the target, re-copy the source's rows for them."""
    keys = diff.missing + diff.extra + diff.changed
    copied = 0
    with db.source(spec) as src, db.target(spec) as tgt:
        fence(tgt, spec)
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        for i in range(0, len(keys), batch):
            part = keys[i:i + batch]
            tgt.execute(sql.SQL("DELETE FROM {} WHERE {}").format(relation(table, "target"),
                                                                    keys_filter(table, part)))
            copied += stream_rows(src, tgt, table, keys_filter(table, part), copy_format(spec, table),
                                  Throttle(None))
        tgt.commit()
        src.rollback()
    return copied


def planned_ranges(spec: MigrationSpec, run_id: str, table: Table) -> list[KeyRange]:
    with db.target(spec) as tgt:
        rows = tgt.execute("SELECT range_id, lo, hi FROM dbguard.ranges WHERE run_id = %s AND table_name = %s "
                           "ORDER BY range_id", (run_id, table.ref)).fetchall()
    ranges = [KeyRange(table.ref, rid, tuple(lo) if lo is not None else None,
                       tuple(hi) if hi is not None else None) for rid, lo, hi in rows]
    return ranges or [KeyRange(table.ref, 0, None, None)]


def reconcile_table(spec: MigrationSpec, run_id: str, table: Table) -> dict:
    """Verify one table; locate, repair and re-verify up to `gates.repair_attempts` times."""
    t0 = time.monotonic()
    sides = Sides(spec)
    rounds = []
    try:
        for attempt in range(spec.gates.repair_attempts + 1):
            src_ck, tgt_ck = sides.checksums(table, None)
            if src_ck == tgt_ck:
                break
            diff = RowDiff()
            for r in planned_ranges(spec, run_id, table):
                s, t = sides.checksums(table, r)
                diff.merge(locate(sides, table, r, s, t, spec.gates.bisect_leaf_rows))
            round_ = {"attempt": attempt + 1, "source": src_ck.to_dict(), "target": tgt_ck.to_dict(),
                      **diff.summary()}
            rounds.append(round_)
            if attempt == spec.gates.repair_attempts or diff.total > spec.gates.max_repair_rows:
                break
            try:
                round_["repaired"] = repair(spec, table, diff)
            except psycopg.Error as e:  # the target refuses source rows: a real difference, reported
                round_["repair_error"] = (str(e).strip().splitlines() or [type(e).__name__])[0]
                src_ck, tgt_ck = sides.checksums(table, None)
                break
        orphans = orphan_count(sides.tgt, spec, table, None)
    finally:
        sides.close()
    return {"table": table.ref, "source": src_ck.to_dict(), "target": tgt_ck.to_dict(),
            "equal": src_ck == tgt_ck, "orphans": orphans, "rounds": rounds,
            "repaired_rows": sum(r.get("repaired", 0) for r in rounds),
            "seconds": round(time.monotonic() - t0, 3)}
