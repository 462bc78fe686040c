"""A PostgreSQL 16 source migrates to a PostgreSQL 18 target: the typed row
hash is computed by two different server versions and still agrees."""
import uuid

import psycopg
import pytest

from dbguard import demo, embedded, stages
from dbguard.spec import load_spec
from conftest import ROOT, _create_db, _drop_db
from util import fingerprint


@pytest.fixture
def pg16_source(servers, monkeypatch):
    server = embedded.start(ROOT / ".pg" / "source16", version=16)
    with psycopg.connect(server) as c:
        assert c.info.server_version // 10000 == 16
    name = "x_" + uuid.uuid4().hex[:8]
    src, tgt = _create_db(server, name), _create_db(servers["target"], name)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", src)
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", tgt)
    yield src, tgt
    _drop_db(server, name)
    _drop_db(servers["target"], name)


def test_pg16_to_pg18_demo_shop_verifies(pg16_source):
    src, tgt = pg16_source
    demo.load_shop(src, customers=3000, orders=12000)
    spec = load_spec(ROOT / "include" / "migrations" / "demo_shop.yaml")
    checks = stages.preflight(spec, "x")
    assert checks["source_version"] // 10000 == 16 and checks["target_version"] // 10000 == 18
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, "x", t.name, batch_rows=5000):
            assert stages.copy_range(spec, "x", r)["ok"], r["label"]
    out = stages.reconcile(spec, "x")
    assert out["checksum_ok"] and out["migrated_rows"] == 15000
    assert all(not t["rounds"] for t in out["tables"].values())  # equal at first look, nothing to repair
    with psycopg.connect(src) as a, psycopg.connect(tgt) as b:
        for rel in ("shop.customers", "shop.orders"):
            for c in (a, b):
                c.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
            assert fingerprint(a, rel) == fingerprint(b, rel)
    stages.release(spec, "x")
