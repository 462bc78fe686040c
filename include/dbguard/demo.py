"""Deterministic demo data, generated inside the server.

`load_shop` builds the `shop.customers` / `shop.orders` source of
include/migrations/demo_shop.yaml; `load_wide` builds the benchmark table.
Every value is derived from the row number through md5 (no random(), no
server-version-dependent hash), so two loads, on any two servers, hold the
same rows. Generation is one INSERT ... SELECT generate_series per table:
250k shop rows load in a few seconds, with nothing streamed through Python.
"""
from __future__ import annotations

from psycopg import sql

from .db import connect, qname

# `u(n)` in the templates below: a deterministic integer in [0, 2^28) from
# row number i and salt n, i.e. 7 hex digits of md5(i:n).
_U = "(('x' || substr(md5({i} || ':' || {n}), 1, 7))::bit(28)::int)"


def _u(i: str, n: int) -> str:
    return _U.format(i=i, n=n)


def _pick(arr: str, i: str, n: int) -> str:
    """An element of a SQL array literal chosen deterministically."""
    return f"({arr})[1 + {_u(i, n)} % cardinality({arr})]"


_FIRST = ("ARRAY['Ana','José','Zoë','Łukasz','Søren','Ingrid','Mehmet','Aoife','François','Nguyễn',"
          "'Ólafur','Chloé','Björn','Dvořák','Renée','Ahmed','Priya','Kenji','Olga','Mia']::text[]")
_LAST = ("ARRAY['García','Müller','O''Brien','Nakamura','Ødegaard','Kowalski','Smith','Дмитриев',"
         "'李','王小明','田中','Papadopoulos','van der Berg','Núñez','Jørgensen','Lee 🚀','Škoda',"
         "'Ben-David','Dubois','Al-Farsi']::text[]")
_COUNTRY = "ARRAY['DE','FR','US','GB','JP','CN','BR','IN','PL','NO','ES','VN','IE','IS','GR']::text[]"
_DOMAIN = "ARRAY['example.com','mail.example.org','bücher.example','example.co.jp','shop.example']::text[]"
_TAG = ("ARRAY['vip','newsletter','café','b2b','返品','early-adopter','a,b','\"quoted\"','🎁 gift',"
        "'back\\slash','wholesale']::text[]")
_LANG = "ARRAY['de','fr','en','ja','zh','pt','pl','nb','es','vi']::text[]"
_STATUS = "ARRAY['placed','paid','shipped','delivered','delivered','delivered','cancelled','refunded']::text[]"
_SKU = "ARRAY['TEE-BLK-M','MUG-☕','BOOK-978-3','SOCK-RED','LAMP-ÉTÉ','CABLE-USB-C','POSTER-東京']::text[]"
_NOTE = ("ARRAY['Leave at the door', 'He said \"fragile\" twice', 'O''Reilly, 2nd floor', "
         "E'line one\\nline two', E'path C:\\\\orders\\\\new', E'tab\\there', 'gift 🎁 — no invoice', "
         "'請放在門口', '', '   ', 'ring the bell; don''t knock', E'quote \\' and backslash \\\\ end']::text[]")

# Customer i (1..n): ids rise by 3..11 with a jump of 10,000,000 half-way,
# so ranges planned on id meet small gaps and one huge one.
_CUSTOMER_ID = "({i}::bigint * 7 + {u} % 5 + CASE WHEN {i} > {half} THEN 10000000 ELSE 0 END)"

_CUSTOMERS_DDL = """
CREATE TABLE shop.customers (
    id          bigint NOT NULL PRIMARY KEY,
    email       text NOT NULL,
    full_name   text,
    country     char(2),
    balance     numeric(12,2),
    created_at  timestamp with time zone NOT NULL,
    prefs       jsonb,
    tags        text[],
    avatar      bytea
)"""

_ORDERS_DDL = """
CREATE TABLE shop.orders (
    id           bigint NOT NULL PRIMARY KEY,
    customer_id  bigint NOT NULL REFERENCES shop.customers (id),
    placed_at    timestamp with time zone NOT NULL,
    amount       numeric(12,2) NOT NULL,
    weight_kg    real,
    status       text NOT NULL,
    items        jsonb,
    note         text
)"""


def _customers_insert() -> str:
    i = "g.i"
    u = lambda n: _u(i, n)  # noqa: E731
    cid = _CUSTOMER_ID.format(i=i, u=u(1), half=":HALF:")
    return f"""
INSERT INTO shop.customers (id, email, full_name, country, balance, created_at, prefs, tags, avatar)
SELECT
    {cid},
    lower(translate({_pick(_FIRST, i, 2)}, ' ', '')) || '.' || {i} || '@' || {_pick(_DOMAIN, i, 3)},
    CASE WHEN {u(4)} % 100 < 6 THEN NULL
         WHEN {u(4)} % 100 = 6 THEN ''
         ELSE {_pick(_FIRST, i, 2)} || ' ' || {_pick(_LAST, i, 5)} END,
    CASE WHEN {u(6)} % 100 < 5 THEN NULL ELSE {_pick(_COUNTRY, i, 6)} END,
    CASE WHEN {u(7)} % 100 < 7 THEN NULL
         WHEN {u(7)} % 100 = 7 THEN 0.71
         WHEN {u(7)} % 100 = 8 THEN 0.00
         WHEN {u(7)} % 100 = 9 THEN -0.70
         ELSE (({u(8)} % 2000000) - 500000) / 100.0 END,
    timestamptz '2016-01-01 00:00:00+00'
        + make_interval(secs => ({u(9)} % 283996800) + ({u(10)} % 1000000) / 1000000.0),
    CASE WHEN {u(11)} % 100 < 8 THEN NULL
         WHEN {u(11)} % 100 = 8 THEN '{{}}'::jsonb
         ELSE jsonb_build_object(
             'lang', {_pick(_LANG, i, 12)},
             'newsletter', {u(13)} % 2 = 0,
             'theme', CASE WHEN {u(14)} % 3 = 0 THEN 'dark' ELSE 'light' END,
             'notify', jsonb_build_object('email', {u(15)} % 2 = 0, 'sms', {u(15)} % 5 = 0,
                                          'quiet_hours', jsonb_build_array('22:00', '07:00')),
             'score', ({u(16)} % 10000) / 100.0,
             'referrer', CASE WHEN {u(17)} % 4 = 0 THEN NULL ELSE 'ref-' || {u(17)} % 997 END)
    END,
    CASE WHEN {u(18)} % 100 < 7 THEN NULL
         WHEN {u(18)} % 100 < 17 THEN '{{}}'::text[]
         WHEN {u(18)} % 100 < 60 THEN ARRAY[{_pick(_TAG, i, 19)}]
         ELSE ARRAY[{_pick(_TAG, i, 19)}, {_pick(_TAG, i, 20)}, {_pick(_TAG, i, 21)}] END,
    CASE WHEN {u(22)} % 100 < 10 THEN NULL
         WHEN {u(22)} % 100 < 15 THEN ''::bytea
         ELSE '\\x89504e470d0a1a0a'::bytea || decode(md5({i} || ':a1') || md5({i} || ':a2'), 'hex') END
FROM generate_series(1, :N:) AS g(i)"""


def _orders_insert() -> str:
    i = "g.i"
    u = lambda n: _u(i, n)  # noqa: E731
    return f"""
WITH c AS (SELECT id, created_at, row_number() OVER (ORDER BY id) AS rn FROM shop.customers),
o AS (
    -- skewed: low-numbered customers place most orders (u^2 on [0, 1))
    SELECT {i} AS i, 1 + floor(:CUSTOMERS: * power({u(30)} / 268435456.0, 2))::bigint AS rn
    FROM generate_series(1, :N:) AS g(i)
)
INSERT INTO shop.orders (id, customer_id, placed_at, amount, weight_kg, status, items, note)
SELECT
    500000 + g.i::bigint * 4 + {u(31)} % 4,
    c.id,
    c.created_at + make_interval(secs => ({u(32)} % 63072000) + ({u(33)} % 1000000) / 1000000.0),
    CASE WHEN {_pick(_STATUS, i, 34)} = 'refunded' THEN -(({u(35)} % 50000) / 100.0)
         WHEN {u(36)} % 200 = 0 THEN 0.71
         WHEN {u(36)} % 200 = 1 THEN 0.00
         ELSE (({u(35)} % 99900) + 100) / 100.0 END,
    CASE WHEN {u(37)} % 100 < 9 THEN NULL
         WHEN {u(37)} % 100 = 9 THEN 0.001::real
         ELSE (({u(38)} % 4000000) / 99991.0)::real END,
    {_pick(_STATUS, i, 34)},
    CASE WHEN {u(39)} % 100 < 5 THEN NULL
         ELSE jsonb_build_array(
             jsonb_build_object('sku', {_pick(_SKU, i, 40)}, 'qty', 1 + {u(41)} % 5,
                                'price', (({u(42)} % 20000) + 1) / 100.0,
                                'options', jsonb_build_object('gift_wrap', {u(43)} % 7 = 0,
                                                              'size', CASE WHEN {u(43)} % 3 = 0 THEN NULL ELSE 'M' END)),
             jsonb_build_object('sku', {_pick(_SKU, i, 44)}, 'qty', 1, 'price', 0.71))
    END,
    CASE WHEN {u(45)} % 100 < 8 THEN NULL ELSE {_pick(_NOTE, i, 46)} END
FROM o AS g JOIN c ON c.rn = g.rn"""


def _fill(template: str, **ints: int) -> str:
    """Put integer sizes into a template (ints only; the SQL holds % operators, so no driver params)."""
    for k, v in ints.items():
        template = template.replace(f":{k}:", str(int(v)))
    return template


def load_shop(conn_id_or_dsn: str, *, customers: int = 50_000, orders: int = 200_000) -> dict[str, int]:
    """(Re)create schema `shop` with `customers` and `orders` as demo_shop.yaml declares them.

    Drops and recreates both tables (primary keys, orders.customer_id -> customers.id
    foreign key), fills them deterministically and returns {"customers": n, "orders": m}.
    """
    if customers < 1 or orders < 0:
        raise ValueError("load_shop needs customers >= 1 and orders >= 0")
    with connect(conn_id_or_dsn) as conn:
        with conn.cursor() as cur:
            cur.execute("CREATE SCHEMA IF NOT EXISTS shop")
            cur.execute("DROP TABLE IF EXISTS shop.orders, shop.customers CASCADE")
            cur.execute(_CUSTOMERS_DDL)
            cur.execute(_ORDERS_DDL)
            cur.execute(_fill(_customers_insert(), N=customers, HALF=customers // 2))
            cur.execute(_fill(_orders_insert(), N=orders, CUSTOMERS=customers))
            cur.execute("ANALYZE shop.customers")
            cur.execute("ANALYZE shop.orders")
            cur.execute("SELECT (SELECT count(*) FROM shop.customers), (SELECT count(*) FROM shop.orders)")
            n_customers, n_orders = cur.fetchone()
        conn.commit()
    return {"customers": n_customers, "orders": n_orders}


# 4096 base vectors, computed once; row i takes base vector i % 4096 with its
# first component replaced by i / 4096, so every vector is distinct while the
# expensive trigonometry runs 4096 times, not a million.
_WIDE_BASE = """
CREATE TEMPORARY TABLE dbguard_wide_base AS
SELECT k, ARRAY(SELECT sin(k * 0.37 + j * 1.7)::real FROM generate_series(1, 64) AS j) AS v
FROM generate_series(0, 4095) AS k"""

_WIDE_INSERT = """
INSERT INTO {table} (id, title, body, vec, created_at)
SELECT
    g.i,
    'Item ' || g.i || ' — ' || substr(md5(g.i || ':t'), 1, 20),
    repeat(md5(g.i || ':b1') || ' ' || md5(g.i || ':b2') || ' ', 3),
    ((g.i / 4096) * 0.001)::real || b.v[2:64],
    timestamptz '2020-01-01 00:00:00+00' + make_interval(secs => g.i * 37)
FROM generate_series({first}, {last}) AS g(i)
JOIN pg_temp.dbguard_wide_base AS b ON b.k = g.i % 4096
ORDER BY g.i"""

_WIDE_CHUNK = 250_000  # one transaction per chunk keeps WAL and locks bounded


def load_wide(conn_id_or_dsn: str, table: str = "bench.items", rows: int = 1_000_000) -> int:
    """(Re)create the benchmark table (id bigint pk, title, body, vec real[64], created_at).

    About 600 bytes per row on disk; `table` is 'schema.name' (plain identifiers).
    Returns the row count.
    """
    schema, _, name = table.rpartition(".")
    schema = schema or "public"
    target = qname(schema, name)
    with connect(conn_id_or_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema)))
        conn.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(target))
        conn.execute(sql.SQL(
            "CREATE TABLE {} (id bigint PRIMARY KEY, title text NOT NULL, body text NOT NULL, "
            "vec real[] NOT NULL, created_at timestamp with time zone NOT NULL)").format(target))
        conn.execute("DROP TABLE IF EXISTS pg_temp.dbguard_wide_base")
        conn.execute(_WIDE_BASE)
        for first in range(1, rows + 1, _WIDE_CHUNK):
            last = min(first + _WIDE_CHUNK - 1, rows)
            conn.execute(sql.SQL(_WIDE_INSERT).format(table=target, first=sql.Literal(first), last=sql.Literal(last)))
        conn.execute("DROP TABLE pg_temp.dbguard_wide_base")
        conn.execute(sql.SQL("ANALYZE {}").format(target))
        return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()[0]
