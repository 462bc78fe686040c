"""`dbguard demo round_trip`: migrate the shop under a live writer that follows the pointer, cut over,
keep writing to the new primary, roll back, compare both sides row for row.

PointerWriter is the application pattern from the README: every transaction reads
dbguard.control.write_target FOR SHARE on the source, then writes to that side. The cutover's freeze holds
that row, so the writer waits (its longest stall is reported) instead of writing to the wrong side.
"""
from __future__ import annotations

import random
import threading
import time
from typing import Any

import psycopg
from psycopg import sql

from . import db, stages
from .errors import DbguardError
from .spec import MigrationSpec


class PointerWriter:
    """Inserts, updates and deletes its own shop.orders rows at `rate` ops/s on whichever side the
    pointer names; remembers every committed row (id -> amount, or None when deleted)."""

    def __init__(self, spec: MigrationSpec, rate: float = 200, table: tuple[str, str] = ("shop", "orders"),
                 id_base: int = 700_000_000, seed: int = 5):
        self.spec, self.rate, self.rel = spec, rate, sql.Identifier(*table)
        self.rows: dict[int, int | None] = {}
        self.sides: dict[str, int] = {"source": 0, "target": 0}
        self.after_back: set[int] = set()  # rows written to the source after a flip back
        self.errors: list[str] = []
        self.max_stall_ms = 0.0
        self.ops = 0
        self.next_id, self.rng = id_base, random.Random(seed)
        self._stop = threading.Event()

    def start(self) -> "PointerWriter":
        self.ptr = db.source(self.spec)
        self.conns = {"source": db.source(self.spec, autocommit=True), "target": db.target(self.spec, autocommit=True)}
        for c in self.conns.values():
            c.execute("SET synchronous_commit = off")
        self.customer = self.conns["source"].execute("SELECT min(id) FROM shop.customers").fetchone()[0]
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._run, name="pointer-writer", daemon=True)
        self.thread.start()
        return self

    def _one(self, conn: psycopg.Connection) -> None:
        live = [k for k, v in self.rows.items() if v is not None]
        kind = self.rng.choices(["insert", "update", "delete"], [5, 4, 1])[0] if live else "insert"
        if kind == "insert":
            self.next_id += 1
            k, amount = self.next_id, self.rng.randint(1, 9999)
            conn.execute(sql.SQL("INSERT INTO {} (id, customer_id, placed_at, amount, status) "
                                 "VALUES (%s, %s, now(), %s, 'placed')").format(self.rel), (k, self.customer, amount))
            return k, amount
        k = self.rng.choice(live)
        if kind == "update":
            amount = self.rng.randint(1, 9999)
            conn.execute(sql.SQL("UPDATE {} SET amount = %s WHERE id = %s").format(self.rel), (amount, k))
            return k, amount
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(self.rel), (k,))
        return k, None

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            t = time.monotonic()
            try:
                side = self.ptr.execute("SELECT write_target FROM dbguard.control WHERE migration = %s AND "
                                        "direction = 'forward' FOR SHARE", (self.spec.name,)).fetchone()[0]
                k, v = self._one(self.conns[side])
                self.ptr.commit()
                self.rows[k] = v
                self.sides[side] += 1
                if side == "source" and self.sides["target"]:
                    self.after_back.add(k)
                self.ops += 1
            except psycopg.Error as e:
                self.ptr.rollback()
                self.errors.append((str(e).strip().splitlines() or ["?"])[0])
                if len(self.errors) > 50:
                    return
            self.max_stall_ms = max(self.max_stall_ms, (time.monotonic() - t) * 1000)
            n += 1
            ahead = n / self.rate - (time.monotonic() - self.t0)
            if ahead > 0:
                time.sleep(ahead)

    def stop(self) -> dict[str, Any]:
        self._stop.set()
        self.thread.join(30)
        secs = time.monotonic() - self.t0
        for c in [self.ptr, *self.conns.values()]:
            c.close()
        return {"ops": self.ops, "ops_per_s": round(self.ops / secs, 1), "max_stall_ms": round(self.max_stall_ms, 1),
                "by_side": dict(self.sides), "errors": len(self.errors), "first_error": self.errors[:1]}

    def missing_on(self, conn: psycopg.Connection) -> int:
        """Rows whose last committed state is not what `conn`'s side holds (lost or stale writes)."""
        got = dict(conn.execute(sql.SQL("SELECT id, amount::int FROM {} WHERE id = ANY(%s)").format(self.rel),
                                (list(self.rows),)).fetchall())
        return sum(1 for k, v in self.rows.items() if got.get(k) != v)


def differing_rows(spec: MigrationSpec) -> list[tuple[str, tuple]]:
    """(table, key) of every row that differs between source and target (missing, extra or changed)."""
    from . import catalog
    from .checksum import Hashing, relation, row_hash
    from .ranges import key_text

    spec = catalog.resolve(spec)  # every migrated column, as the checksums compare them
    out = []
    with db.source(spec) as s, db.target(spec) as t:
        h = Hashing.between(spec, s, t)
        for tb in spec.tables:
            q = lambda side: sql.SQL("SELECT {k}, {h} FROM {r}").format(  # noqa: E731
                k=key_text(tb), h=row_hash(tb, side, h), r=relation(tb, side))
            a = {tuple(r[:-1]): r[-1] for r in s.execute(q("source"))}
            b = {tuple(r[:-1]): r[-1] for r in t.execute(q("target"))}
            out += [(tb.name, k) for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    return out


def migrate(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """The library stages of a run up to the flip (what the DAG's tasks call, in order, through the gate)."""
    stages.preflight(spec, run_id)
    stages.capture_on(spec, run_id)
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, run_id, t.name):
            stages.copy_range(spec, run_id, r)
    rec = stages.reconcile(spec, run_id)
    stages.finish_schema(spec, run_id)
    passed, message = stages.checksum_gate(spec, run_id)  # under its freeze; sets the verified watermark
    if not passed:
        raise DbguardError(message)
    return rec


def round_trip(spec: MigrationSpec, run_id: str, *, seconds: float = 3.0, rate: float = 200,
               say=print) -> dict[str, Any]:
    from .cutover import cutover, rollback

    w = PointerWriter(spec, rate=rate)
    with db.source(spec) as src:  # the pointer the writer reads exists before capture starts
        from .cutover import pointer
        pointer.prepare(src, spec)
        src.commit()
    w.start()
    say("migrating the shop under a live writer that follows the pointer")
    rec = migrate(spec, run_id)
    say(f"copied and verified ({rec['migrated_rows']} rows); cutting over")
    c = cutover(spec, run_id)
    say(f"cut over in {c['cutover_ms']} ms of write freeze; writing to the target for {seconds:g} s")
    time.sleep(seconds)
    r = rollback(spec, run_id)
    say(f"rolled back in {r['rollback_ms']} ms; the writer follows the pointer back to the source")
    time.sleep(0.5)
    ws = w.stop()
    with db.source(spec) as s:
        lost_writes = w.missing_on(s)  # the writer's last committed state of each of its rows, on the source
    # rows differing between the sides, except the writer's rows written to the source after the flip back
    # (those are on the new-old primary only, as they should be: reverse capture ended with the rollback)
    diff = [d for d in differing_rows(spec) if not (d[0] == "orders" and int(d[1][0]) in w.after_back)]
    say(f"writer: {ws}")
    return {"status": "rolled_back" if r["status"] == "rolled_back" else "failed", "cutover_ms": c["cutover_ms"],
            "rollback_ms": r["rollback_ms"], "writes_after_cutover": r["writes_after_cutover"],
            "lost": lost_writes + len(diff), "differing_rows": [f"{t}:{','.join(k)}" for t, k in diff[:10]],
            "writer_max_stall_ms": ws["max_stall_ms"], "writer_errors": ws["errors"]}
