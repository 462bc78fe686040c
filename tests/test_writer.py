"""The one application writer (dbguard.writer): what it remembers is what was committed, so its check finds a
lost, stale or resurrected row; a fenced write is counted as fenced; the dual_write switch stops or pauses it."""
from __future__ import annotations

import time

import psycopg
import pytest

from dbguard import capture
from dbguard.cutover import fence, pointer
from dbguard.demo import load_shop
from dbguard.writer import OrdersWorkload, Writer, orders_writer

from test_cutover import shop_spec


@pytest.fixture
def shop(dbpair):
    load_shop(dbpair.src_dsn, customers=20, orders=50)
    return shop_spec()


def test_check_finds_a_lost_a_stale_and_a_resurrected_row(dbpair, shop):
    w = Writer(OrdersWorkload(), dbpair.src_dsn, rate=None, seed=4, max_ops=300)
    stats = w.start().wait(60)
    assert stats["ops"] == 300 and stats["errors"] == 0, stats
    assert w.check(dbpair.src_dsn) == {"rows": len(w.rows), "lost": 0, "resurrected": 0}
    live = [k for k, v in w.rows.items() if v is not None]
    gone = [k for k, v in w.rows.items() if v is None]
    assert len(live) > 2 and gone, (len(live), len(gone))  # deletes and key changes happened
    with dbpair.src(autocommit=True) as c:
        c.execute("DELETE FROM shop.orders WHERE id = %s", (live[0],))
        c.execute("UPDATE shop.orders SET amount = amount + 1 WHERE id = %s", (live[1],))
        c.execute("INSERT INTO shop.orders (id, customer_id, placed_at, amount, status) "
                  "SELECT %s, min(id), now(), 1, 'placed' FROM shop.customers", (gone[0],))
    assert w.check(dbpair.src_dsn) == {"rows": len(w.rows), "lost": 2, "resurrected": 1}


def test_a_write_the_fence_refuses_is_counted_as_fenced_and_not_remembered(dbpair, shop):
    with dbpair.src() as c:
        fence.install(c, shop, "source")
        c.commit()
    w = Writer(OrdersWorkload(), dbpair.src_dsn, rate=None, max_ops=20, max_errors=10)
    stats = w.start().wait(30)
    assert stats["ops"] == 0 and w.rows == {} and stats["error_kinds"] == {"fenced": 11}, stats


def test_following_the_pointer_the_switch_pauses_or_stops_the_writer(dbpair, shop):
    with dbpair.src() as c:
        pointer.prepare(c, shop)
        c.commit()
    paused = orders_writer(dbpair.src_dsn, dbpair.tgt_dsn, shop.name, rate=100, switch="pause").start()
    stopped = Writer(OrdersWorkload(id_base=810_000_000), dbpair.src_dsn, migration=shop.name, switch="stop",
                     rate=100).start()
    time.sleep(0.5)
    assert capture.flags(shop)["dual_write"] is False  # the control row says: no dual writes yet
    assert not stopped.running and stopped.ops == 0
    assert paused.running and paused.ops == 0 and paused.paused > 0
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        c.execute("UPDATE dbguard.control SET dual_write = true WHERE migration = %s", (shop.name,))
    time.sleep(0.5)
    stats = paused.stop()
    assert stats["ops"] > 0 and stats["by_side"] == {"source": stats["ops"]} and stats["errors"] == 0, stats
    assert paused.check(dbpair.src_dsn)["lost"] == 0
