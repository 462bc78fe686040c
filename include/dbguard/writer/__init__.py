"""One application writer for the tests, the round-trip demo, the benches and the fault scenarios.

`Writer(workload, source, target, migration=..., follow=True, rate=200, seed=5).start()` writes in a
background thread the way an application does, following dbguard's pointer or to a fixed DSN; `stop()`
returns its stats and the writer keeps what was acknowledged (`rows`, `side_of`, `after_back`) so a caller
can prove nothing was lost (`check(dsn)`). A workload says what to write (ShopWorkload, OrdersWorkload, or
a test's own Workload subclass for its tables).
"""
from .core import Op, Workload, Writer, classify
from .shop import OrdersWorkload, ShopWorkload, orders_writer, shop_writer

__all__ = ["Op", "OrdersWorkload", "ShopWorkload", "Workload", "Writer", "classify", "orders_writer", "shop_writer"]
