"""A background application writer for the demo shop schema (`shop.customers`, `shop.orders`).

`BackgroundWriter(dsn, seed=7, rate=300).start()` runs a thread that inserts,
updates and deletes rows, one short autocommit transaction per operation, at
`rate` operations per second (None = as fast as it can). The sequence of
operations is fixed by the seed; `stop()` returns the counts. It mimics an
application: it keeps foreign keys valid (deletes a customer's orders with
the customer, orders reference live customers), changes order keys now and
then (key changes), and writes the awkward types (NULLs, unicode, numeric,
real, jsonb, arrays, bytea).
"""
from __future__ import annotations

import random
import threading
import time
from collections import Counter

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

_NAMES = ["Zoë Ødegaard", "José Núñez", "李 王小明", "O'Brien", "Lee 🚀", "", None, "tab\there", "back\\slash"]
_TAGS = [None, [], ["vip"], ["a,b", "\"quoted\""], ["🎁 gift", "返品", None]]
_STATUS = ["placed", "paid", "shipped", "delivered", "cancelled", "refunded"]


class BackgroundWriter:
    def __init__(self, dsn: str, *, seed: int = 7, rate: float | None = 300, schema: str = "shop",
                 id_base: int = 900_000_000, weights: dict[str, int] | None = None, sample: int = 5000,
                 max_ops: int | None = None, synchronous_commit: str = "off", honour_flag: str | None = None):
        # honour_flag=<migration>: like an application that dual-writes through dbguard's switch, each
        # operation first reads dbguard.control FOR SHARE in its own transaction and the writer stops
        # for good once dual_write is false (the run ended; writes go elsewhere now).
        self.honour_flag = honour_flag
        # synchronous_commit=off: commits do not wait for the WAL flush, so the rate measures the
        # database work (and capture's share of it), not the disk's fsync latency.
        self.max_ops, self.synchronous_commit = max_ops, synchronous_commit
        self.dsn, self.seed, self.rate, self.schema = dsn, seed, rate, schema
        self.id_base, self.sample = id_base, sample
        self.weights = weights or {"insert_customer": 10, "update_customer": 20, "delete_customer": 3,
                                   "insert_order": 25, "update_order": 30, "delete_order": 7, "rekey_order": 5}
        self.counts: Counter = Counter()
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.started = self.stopped = 0.0

    # -- control --------------------------------------------------------------------------------
    def start(self) -> "BackgroundWriter":
        self._conn = psycopg.connect(self.dsn, autocommit=True)
        self._conn.execute("SELECT set_config('synchronous_commit', %s, false)", (self.synchronous_commit,))
        self._load_ids()
        self._thread = threading.Thread(target=self._run, name="background-writer", daemon=True)
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.stopped = self.stopped or time.monotonic()
        self._conn.close()
        return self.stats()

    def wait(self, timeout: float | None = None) -> dict:
        """With max_ops: block until the writer has done them, then stop."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.stop()

    def run_for(self, seconds: float) -> dict:
        self.start()
        time.sleep(seconds)
        return self.stop()

    def _x(self, text: str, params=None):
        q = sql.SQL(text).format(c=sql.Identifier(self.schema, "customers"), o=sql.Identifier(self.schema, "orders"))
        return self._conn.execute(q, params)

    @property
    def ops(self) -> int:
        return sum(self.counts.values())

    def stats(self) -> dict:
        secs = (self.stopped or time.monotonic()) - self.started
        return {"ops": self.ops, "seconds": round(secs, 3), "ops_per_second": round(self.ops / secs, 1) if secs else None,
                "by_kind": dict(self.counts), "errors": len(self.errors), "first_error": self.errors[:1]}

    def _may_write(self) -> bool:
        if self._conn.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is None:
            return True  # capture not set up yet: plain writes
        row = self._conn.execute("SELECT dual_write FROM dbguard.control WHERE migration = %s FOR SHARE",
                                 (self.honour_flag,)).fetchone()
        return row is None or row[0]

    # -- state ------------------------------------------------------------------------------------
    def _load_ids(self) -> None:
        self.customers = [r[0] for r in self._x("SELECT id FROM {c} ORDER BY id LIMIT %s", (self.sample,)).fetchall()]
        self.orders = {r[0]: r[1] for r in
                       self._x("SELECT id, customer_id FROM {o} ORDER BY id LIMIT %s", (self.sample,)).fetchall()}
        self.order_ids = list(self.orders)
        self.next_id = self.id_base + self.seed * 10_000_000

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    # -- the loop ------------------------------------------------------------------------------
    def _run(self) -> None:
        rng = random.Random(self.seed)
        kinds, weights = zip(*self.weights.items())
        n = 0
        while not self._stop.is_set():
            kind = rng.choices(kinds, weights)[0]
            try:
                with self._conn.transaction():
                    if self.honour_flag and not self._may_write():
                        self.stopped = time.monotonic()
                        return
                    if getattr(self, "_" + kind)(rng):
                        self.counts[kind] += 1
            except psycopg.Error as e:
                self.errors.append(f"{kind}: {e}")
                if len(self.errors) > 100:
                    return
            n += 1
            if self.max_ops is not None and self.ops >= self.max_ops:
                self.stopped = time.monotonic()
                return
            if self.rate:
                ahead = n / self.rate - (time.monotonic() - self.started)
                if ahead > 0:
                    time.sleep(ahead)

    def _customer_row(self, rng: random.Random, cid: int) -> tuple:
        return (cid, f"writer.{self.seed}.{cid}@example.com", rng.choice(_NAMES),
                rng.choice([None, "DE", "JP", "NO"]),
                rng.choice([None, 0, 0.71, -0.7, round(rng.uniform(-5000, 5000), 2)]),
                f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} 1{rng.randint(0, 9)}:00:00.{rng.randint(0, 999999):06d}+0{rng.randint(0, 9)}",
                rng.choice([None, Jsonb({}), Jsonb({"lang": "ja", "score": rng.random(), "n": [1, None, "x"]})]),
                rng.choice(_TAGS), rng.choice([None, b"", bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))]))

    def _insert_customer(self, rng):
        cid = self._new_id()
        self._x("INSERT INTO {c} (id, email, full_name, country, balance, created_at, "
                           "prefs, tags, avatar) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                           self._customer_row(rng, cid))
        self.customers.append(cid)
        return True

    def _update_customer(self, rng):
        if not self.customers:
            return False
        cid = rng.choice(self.customers)
        row = self._customer_row(rng, cid)
        self._x("UPDATE {c} SET full_name = %s, balance = %s, prefs = %s, tags = %s, "
                           "avatar = %s WHERE id = %s", (row[2], row[4], row[6], row[7], row[8], cid))
        return True

    def _delete_customer(self, rng):
        if len(self.customers) < 10:
            return False
        cid = self.customers.pop(rng.randrange(len(self.customers)))
        with self._conn.transaction():
            self._x("DELETE FROM {o} WHERE customer_id = %s", (cid,))
            self._x("DELETE FROM {c} WHERE id = %s", (cid,))
        gone = [o for o, c in self.orders.items() if c == cid]
        for o in gone:
            del self.orders[o]
        if gone:
            self.order_ids = list(self.orders)
        return True

    def _order_values(self, rng):
        return (round(rng.uniform(-100, 1000), 2), rng.choice([None, 0.001, rng.uniform(0, 40)]),
                rng.choice(_STATUS), rng.choice([None, Jsonb([{"sku": "MUG-☕", "qty": rng.randint(1, 5)}])]),
                rng.choice([None, "", "ring the bell; don't knock", "請放在門口", "line\nbreak"]))

    def _insert_order(self, rng):
        if not self.customers:
            return False
        oid, cid = self._new_id(), rng.choice(self.customers)
        amount, weight, status, items, note = self._order_values(rng)
        self._x("INSERT INTO {o} (id, customer_id, placed_at, amount, weight_kg, status, "
                           "items, note) VALUES (%s, %s, clock_timestamp(), %s, %s, %s, %s, %s)",
                           (oid, cid, amount, weight, status, items, note))
        self.orders[oid] = cid
        self.order_ids.append(oid)
        return True

    def _pick_order(self, rng):
        while self.order_ids:
            oid = rng.choice(self.order_ids)
            if oid in self.orders:
                return oid
            self.order_ids = list(self.orders)
        return None

    def _update_order(self, rng):
        oid = self._pick_order(rng)
        if oid is None:
            return False
        amount, weight, status, items, note = self._order_values(rng)
        self._x("UPDATE {o} SET amount = %s, weight_kg = %s, status = %s, items = %s, "
                           "note = %s WHERE id = %s", (amount, weight, status, items, note, oid))
        return True

    def _delete_order(self, rng):
        oid = self._pick_order(rng)
        if oid is None:
            return False
        self._x("DELETE FROM {o} WHERE id = %s", (oid,))
        del self.orders[oid]
        return True

    def _rekey_order(self, rng):
        """A key change: the order gets a new id (the applier must delete the old key and insert the new)."""
        oid = self._pick_order(rng)
        if oid is None:
            return False
        new = self._new_id()
        self._x("UPDATE {o} SET id = %s WHERE id = %s", (new, oid))
        self.orders[new] = self.orders.pop(oid)
        self.order_ids.append(new)
        return True
