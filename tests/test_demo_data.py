"""The demo data: the shop a user migrates with `make demo`, and the benchmark table.

Loaded on the two real servers of `dbpair`; the content digest is computed
independently of the loader (md5 over every row's text form, in key order).
"""
from __future__ import annotations

from pathlib import Path

import pytest
from psycopg import sql

from dbguard import db, demo
from dbguard.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
SPEC = ROOT / "include" / "migrations" / "demo_shop.yaml"

DIGEST = sql.SQL("SELECT md5(string_agg(t::text, '' ORDER BY id)) FROM {} AS t")


def digest(conn_id: str, table: str) -> str:
    with db.connection(conn_id) as conn:
        return conn.execute(DIGEST.format(db.qname(*table.split(".")))).fetchone()[0]


@pytest.fixture
def shop(dbpair):
    """The full-size demo shop, loaded into the source database."""
    counts = demo.load_shop(dbpair.source)
    return dbpair, counts


def test_full_shop_has_the_promised_size_and_the_same_content_on_another_server(shop):
    dbpair, counts = shop
    assert counts == {"customers": 50_000, "orders": 200_000}
    # The second load goes to the other server: same rows, byte for byte.
    assert demo.load_shop(dbpair.target) == counts
    for table in ("shop.customers", "shop.orders"):
        assert digest(dbpair.source, table) == digest(dbpair.target, table), table


def test_reloading_replaces_the_tables_with_identical_content(dbpair):
    first = demo.load_shop(dbpair.source, customers=2_000, orders=6_000)
    before = {t: digest(dbpair.source, t) for t in ("shop.customers", "shop.orders")}
    assert demo.load_shop(dbpair.source, customers=2_000, orders=6_000) == first == {"customers": 2000, "orders": 6000}
    assert {t: digest(dbpair.source, t) for t in before} == before
    # A different size is a different data set, not an append.
    assert demo.load_shop(dbpair.source, customers=1_000, orders=3_000) == {"customers": 1000, "orders": 3000}
    assert digest(dbpair.source, "shop.customers") != before["shop.customers"]


def _norm(t: str) -> str:
    return {"char(2)": "character(2)"}.get(t, t)


def test_source_tables_match_the_demo_spec_contract(shop):
    dbpair, _ = shop
    spec = load_spec(SPEC)
    with db.connection(dbpair.source) as conn:
        for table in spec.tables:
            rows = conn.execute(
                """SELECT a.attname, format_type(a.atttypid, a.atttypmod), NOT a.attnotnull
                   FROM pg_attribute a WHERE a.attrelid = %s::regclass AND a.attnum > 0 AND NOT a.attisdropped
                   ORDER BY a.attnum""",
                (f"{table.schema_}.{table.name}",),
            ).fetchall()
            assert rows == [(c.name, _norm(c.type), c.nullable) for c in table.columns], table.name
            pk = conn.execute(
                """SELECT array_agg(a.attname ORDER BY a.attnum) FROM pg_index i
                   JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                   WHERE i.indrelid = %s::regclass AND i.indisprimary""",
                (f"{table.schema_}.{table.name}",),
            ).fetchone()[0]
            assert pk == table.key, table.name
        fk = conn.execute(
            """SELECT confrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint
               WHERE conrelid = 'shop.orders'::regclass AND contype = 'f'"""
        ).fetchall()
        assert fk == [("shop.customers", "FOREIGN KEY (customer_id) REFERENCES shop.customers(id)")]


def test_every_order_has_its_customer_and_orders_are_skewed(shop):
    dbpair, _ = shop
    with db.connection(dbpair.source) as conn:
        orphans = conn.execute(
            "SELECT count(*) FROM shop.orders o LEFT JOIN shop.customers c ON c.id = o.customer_id WHERE c.id IS NULL"
        ).fetchone()[0]
        assert orphans == 0
        top, median = conn.execute(
            """SELECT max(n), percentile_disc(0.5) WITHIN GROUP (ORDER BY n)
               FROM (SELECT count(*) AS n FROM shop.orders GROUP BY customer_id) s"""
        ).fetchone()
        assert top > 10 * median  # a few heavy customers, as in a real shop
        assert conn.execute("SELECT bool_and(o.placed_at >= c.created_at) FROM shop.orders o "
                            "JOIN shop.customers c ON c.id = o.customer_id").fetchone()[0]


def test_keys_have_small_gaps_and_one_huge_gap(shop):
    dbpair, _ = shop
    with db.connection(dbpair.source) as conn:
        small, largest, contiguous = conn.execute(
            """SELECT min(gap), max(gap), count(*) FILTER (WHERE gap = 1)
               FROM (SELECT id - lag(id) OVER (ORDER BY id) AS gap FROM shop.customers) s"""
        ).fetchone()
    assert small >= 3 and contiguous == 0
    assert largest > 9_000_000


def test_customers_hold_the_awkward_values_a_migration_must_keep(shop):
    dbpair, _ = shop
    with db.connection(dbpair.source) as conn:
        r = conn.execute(
            """SELECT count(*),
                      count(*) FILTER (WHERE full_name IS NULL),
                      count(*) FILTER (WHERE full_name = ''),
                      count(*) FILTER (WHERE country IS NULL),
                      count(*) FILTER (WHERE balance IS NULL),
                      count(*) FILTER (WHERE balance < 0),
                      count(*) FILTER (WHERE balance = 0.71),
                      count(*) FILTER (WHERE prefs IS NULL),
                      count(*) FILTER (WHERE prefs = '{}'::jsonb),
                      count(*) FILTER (WHERE jsonb_typeof(prefs -> 'notify') = 'object'),
                      count(*) FILTER (WHERE tags IS NULL),
                      count(*) FILTER (WHERE tags = '{}'),
                      count(*) FILTER (WHERE avatar IS NULL),
                      count(*) FILTER (WHERE avatar = ''::bytea),
                      count(*) FILTER (WHERE full_name ~ '[^\\x01-\\x7f]'),
                      count(*) FILTER (WHERE full_name ~ '[一-龥]'),
                      count(*) FILTER (WHERE full_name LIKE '%🚀%'),
                      count(DISTINCT date_part('year', created_at)),
                      count(DISTINCT email)
               FROM shop.customers"""
        ).fetchone()
    (n, name_null, name_empty, country_null, bal_null, bal_neg, bal_071, prefs_null, prefs_empty,
     prefs_nested, tags_null, tags_empty, avatar_null, avatar_empty, non_ascii, cjk, emoji, years, emails) = r
    for label, count in [("full_name NULL", name_null), ("country NULL", country_null),
                         ("balance NULL", bal_null), ("prefs NULL", prefs_null), ("tags NULL", tags_null),
                         ("avatar NULL", avatar_null)]:
        assert 0.03 * n <= count <= 0.12 * n, (label, count)
    assert name_empty > 0 and prefs_empty > 0 and tags_empty > 0 and avatar_empty > 0
    assert bal_neg > 0 and bal_071 > 0 and prefs_nested > 0.8 * n
    assert non_ascii > 0 and cjk > 0 and emoji > 0
    assert years >= 8
    assert emails == n  # the target declares a unique index on email


def test_orders_hold_the_awkward_values_a_migration_must_keep(shop):
    dbpair, _ = shop
    with db.connection(dbpair.source) as conn:
        r = conn.execute(
            r"""SELECT count(*),
                      count(*) FILTER (WHERE amount < 0),
                      count(*) FILTER (WHERE amount = 0.71),
                      count(*) FILTER (WHERE weight_kg IS NULL),
                      count(*) FILTER (WHERE weight_kg = 'NaN' OR weight_kg IN ('Infinity', '-Infinity')),
                      count(*) FILTER (WHERE items IS NULL),
                      count(*) FILTER (WHERE jsonb_typeof(items -> 0 -> 'options') = 'object'),
                      count(*) FILTER (WHERE note IS NULL),
                      count(*) FILTER (WHERE note LIKE '%' || chr(10) || '%'),
                      count(*) FILTER (WHERE note LIKE '%\\%'),
                      count(*) FILTER (WHERE note LIKE '%"%' OR note LIKE '%''%'),
                      count(DISTINCT status)
               FROM shop.orders"""
        ).fetchone()
    n, neg, a071, w_null, w_nonfinite, items_null, nested, note_null, newline, backslash, quotes, statuses = r
    assert neg > 0 and a071 > 0
    assert 0.03 * n <= w_null <= 0.12 * n and w_nonfinite == 0
    assert 0.03 * n <= items_null <= 0.12 * n and nested > 0.8 * n
    assert 0.03 * n <= note_null <= 0.12 * n
    assert newline > 0 and backslash > 0 and quotes > 0
    assert statuses == 6


def test_wide_benchmark_table_is_deterministic_and_about_600_bytes_a_row(dbpair):
    assert demo.load_wide(dbpair.source, "bench.items", rows=20_000) == 20_000
    assert demo.load_wide(dbpair.target, "bench.items", rows=20_000) == 20_000
    assert digest(dbpair.source, "bench.items") == digest(dbpair.target, "bench.items")
    with db.connection(dbpair.source) as conn:
        per_row, dims, distinct_vecs = conn.execute(
            """SELECT pg_relation_size('bench.items') / 20000.0,
                      min(cardinality(vec)), count(DISTINCT vec) FROM bench.items"""
        ).fetchone()
        types = conn.execute(
            """SELECT string_agg(format_type(atttypid, atttypmod), ',' ORDER BY attnum) FROM pg_attribute
               WHERE attrelid = 'bench.items'::regclass AND attnum > 0"""
        ).fetchone()[0]
    assert 500 <= per_row <= 750, per_row
    assert dims == 64 and distinct_vecs == 20_000
    assert types == "bigint,text,text,real[],timestamp with time zone"
