"""Workloads on the demo shop schema (`shop.customers`, `shop.orders`).

ShopWorkload mimics the whole application: it keeps foreign keys valid (a customer's orders go with the
customer, orders reference live customers), changes order keys now and then, and writes the awkward types
(NULLs, unicode, numeric, real, jsonb, arrays, bytea). OrdersWorkload writes only its own shop.orders rows
and remembers each one's last committed amount, so a lost, stale or resurrected write shows.
"""
from __future__ import annotations

import random

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from .core import Op, Workload, Writer

_NAMES = ["Zoë Ødegaard", "José Núñez", "李 王小明", "O'Brien", "Lee 🚀", "", None, "tab\there", "back\\slash"]
_TAGS = [None, [], ["vip"], ["a,b", "\"quoted\""], ["🎁 gift", "返品", None]]
_STATUS = ["placed", "paid", "shipped", "delivered", "cancelled", "refunded"]


class ShopWorkload(Workload):
    """Inserts, updates and deletes customers and orders (and re-keys orders), new keys from
    `id_base + seed * 10M`; reads up to `sample` existing ids of each table at start."""

    def __init__(self, *, schema: str = "shop", seed: int = 7, id_base: int = 900_000_000, sample: int = 5000,
                 weights: dict[str, int] | None = None):
        self.schema, self.sample, self.seed = schema, sample, seed
        self.next_id = id_base + seed * 10_000_000
        self.weights = weights or {"insert_customer": 10, "update_customer": 20, "delete_customer": 3,
                                   "insert_order": 25, "update_order": 30, "delete_order": 7, "rekey_order": 5}

    def _x(self, conn: psycopg.Connection, text: str, params=None):
        q = sql.SQL(text).format(c=sql.Identifier(self.schema, "customers"), o=sql.Identifier(self.schema, "orders"))
        return conn.execute(q, params)

    def prepare(self, conn: psycopg.Connection) -> None:
        self.customers = [r[0] for r in self._x(conn, "SELECT id FROM {c} ORDER BY id LIMIT %s", (self.sample,))]
        self.orders = {r[0]: r[1] for r in
                       self._x(conn, "SELECT id, customer_id FROM {o} ORDER BY id LIMIT %s", (self.sample,))}
        self.order_ids = list(self.orders)

    def _new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def _customer_row(self, rng: random.Random, cid: int) -> tuple:
        return (cid, f"writer.{self.seed}.{cid}@example.com", rng.choice(_NAMES),
                rng.choice([None, "DE", "JP", "NO"]),
                rng.choice([None, 0, 0.71, -0.7, round(rng.uniform(-5000, 5000), 2)]),
                f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)} 1{rng.randint(0, 9)}:00:00.{rng.randint(0, 999999):06d}"
                f"+0{rng.randint(0, 9)}",
                rng.choice([None, Jsonb({}), Jsonb({"lang": "ja", "score": rng.random(), "n": [1, None, "x"]})]),
                rng.choice(_TAGS), rng.choice([None, b"", bytes(rng.randrange(256) for _ in range(rng.randint(1, 40)))]))

    def op_insert_customer(self, conn, rng):
        cid = self._new_id()
        self._x(conn, "INSERT INTO {c} (id, email, full_name, country, balance, created_at, prefs, tags, avatar) "
                      "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)", self._customer_row(rng, cid))
        self.customers.append(cid)
        return Op("insert_customer")

    def op_update_customer(self, conn, rng):
        if not self.customers:
            return None
        cid = rng.choice(self.customers)
        row = self._customer_row(rng, cid)
        self._x(conn, "UPDATE {c} SET full_name = %s, balance = %s, prefs = %s, tags = %s, avatar = %s WHERE id = %s",
                (row[2], row[4], row[6], row[7], row[8], cid))
        return Op("update_customer")

    def op_delete_customer(self, conn, rng):
        if len(self.customers) < 10:
            return None
        cid = self.customers.pop(rng.randrange(len(self.customers)))
        self._x(conn, "DELETE FROM {o} WHERE customer_id = %s", (cid,))
        self._x(conn, "DELETE FROM {c} WHERE id = %s", (cid,))
        gone = [o for o, c in self.orders.items() if c == cid]
        for o in gone:
            del self.orders[o]
        if gone:
            self.order_ids = list(self.orders)
        return Op("delete_customer")

    def _order_values(self, rng):
        return (round(rng.uniform(-100, 1000), 2), rng.choice([None, 0.001, rng.uniform(0, 40)]),
                rng.choice(_STATUS), rng.choice([None, Jsonb([{"sku": "MUG-☕", "qty": rng.randint(1, 5)}])]),
                rng.choice([None, "", "ring the bell; don't knock", "請放在門口", "line\nbreak"]))

    def op_insert_order(self, conn, rng):
        if not self.customers:
            return None
        oid, cid = self._new_id(), rng.choice(self.customers)
        amount, weight, status, items, note = self._order_values(rng)
        self._x(conn, "INSERT INTO {o} (id, customer_id, placed_at, amount, weight_kg, status, items, note) "
                      "VALUES (%s, %s, clock_timestamp(), %s, %s, %s, %s, %s)",
                (oid, cid, amount, weight, status, items, note))
        self.orders[oid] = cid
        self.order_ids.append(oid)
        return Op("insert_order")

    def _pick_order(self, rng):
        while self.order_ids:
            oid = rng.choice(self.order_ids)
            if oid in self.orders:
                return oid
            self.order_ids = list(self.orders)
        return None

    def op_update_order(self, conn, rng):
        oid = self._pick_order(rng)
        if oid is None:
            return None
        amount, weight, status, items, note = self._order_values(rng)
        self._x(conn, "UPDATE {o} SET amount = %s, weight_kg = %s, status = %s, items = %s, note = %s WHERE id = %s",
                (amount, weight, status, items, note, oid))
        return Op("update_order")

    def op_delete_order(self, conn, rng):
        oid = self._pick_order(rng)
        if oid is None:
            return None
        self._x(conn, "DELETE FROM {o} WHERE id = %s", (oid,))
        del self.orders[oid]
        return Op("delete_order")

    def op_rekey_order(self, conn, rng):
        """A key change: the order gets a new id (the applier must delete the old key and insert the new)."""
        oid = self._pick_order(rng)
        if oid is None:
            return None
        new = self._new_id()
        self._x(conn, "UPDATE {o} SET id = %s WHERE id = %s", (new, oid))
        self.orders[new] = self.orders.pop(oid)
        self.order_ids.append(new)
        return Op("rekey_order")


class OrdersWorkload(Workload):
    """Inserts, updates, deletes and re-keys its own shop.orders rows (keys from `id_base`, all of the first
    customer); it picks from the rows whose writes were acknowledged (the Writer's `rows`: key -> amount)."""

    def __init__(self, *, id_base: int = 800_000_000, weights: dict[str, int] | None = None,
                 table: tuple[str, str] = ("shop", "orders")):
        self.next_id, self.rel = id_base, sql.Identifier(*table)
        self.weights = weights or {"insert": 5, "update": 4, "delete": 1, "rekey": 1}
        self.live: dict[int, int] = {}

    def prepare(self, conn: psycopg.Connection) -> None:
        self.customer = conn.execute("SELECT min(id) FROM shop.customers").fetchone()[0]

    def run(self, kind, conn, rng):
        if not self.live:
            kind = "insert"
        if kind == "insert":
            self.next_id += 1
            k, amount = self.next_id, rng.randint(1, 9999)
            conn.execute(sql.SQL("INSERT INTO {} (id, customer_id, placed_at, amount, status) "
                                 "VALUES (%s, %s, now(), %s, 'placed')").format(self.rel), (k, self.customer, amount))
            return Op(kind, k, amount)
        k = rng.choice(list(self.live))
        if kind == "update":
            amount = rng.randint(1, 9999)
            conn.execute(sql.SQL("UPDATE {} SET amount = %s WHERE id = %s").format(self.rel), (amount, k))
            return Op(kind, k, amount)
        if kind == "rekey":
            self.next_id += 1
            conn.execute(sql.SQL("UPDATE {} SET id = %s WHERE id = %s").format(self.rel), (self.next_id, k))
            return Op(kind, self.next_id, self.live[k], old_key=k)
        conn.execute(sql.SQL("DELETE FROM {} WHERE id = %s").format(self.rel), (k,))
        return Op(kind, k, None)

    def acknowledged(self, op: Op) -> None:
        self.live.pop(op.old_key, None)
        if op.value is None:
            self.live.pop(op.key, None)
        else:
            self.live[op.key] = op.value

    def read(self, conn, keys):
        return dict(conn.execute(sql.SQL("SELECT id, amount::int FROM {} WHERE id = ANY(%s)").format(self.rel),
                                 (keys,)).fetchall())


def shop_writer(dsn: str, *, seed: int = 7, rate: float | None = 300, max_ops: int | None = None,
                synchronous_commit: str = "off", honour_flag: str | None = None, **workload) -> Writer:
    """The whole shop application on one server (no pointer), `rate` ops/s fixed by `seed`.
    honour_flag=<migration>: like an application on dbguard's switch, it stops for good once the control row's
    dual_write is false (read FOR SHARE in each write's transaction). synchronous_commit=off: commits do not
    wait for the WAL flush, so a rate measures the database's work, not the disk's fsync latency."""
    return Writer(ShopWorkload(seed=seed, **workload), dsn, migration=honour_flag, switch="stop" if honour_flag else None,
                  rate=rate, seed=seed, max_ops=max_ops, synchronous_commit=synchronous_commit, name="shop-writer")


def orders_writer(source: str, target: str, migration: str, *, rate: float = 200, seed: int = 3,
                  id_base: int = 800_000_000, weights: dict[str, int] | None = None, **kw) -> Writer:
    """An application on its own shop.orders rows that follows `migration`'s pointer (see core.Writer)."""
    return Writer(OrdersWorkload(id_base=id_base, weights=weights), source, target, migration=migration, follow=True,
                  rate=rate, seed=seed, name="orders-writer", **kw)
