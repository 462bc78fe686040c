"""A run onto the target of an earlier, aborted run: the foreign keys finish_schema left there do not stop
the range copies (they write as replicas, like the applier) and the result still verifies."""
from dbguard import backfill, catalog, cli, demo, stages
from dbguard.ranges import KeyRange
from dbguard.spec import load_spec


def test_copying_again_over_a_target_with_foreign_keys_works(dbpair):
    demo.load_shop(dbpair.source, customers=300, orders=1200)
    spec = load_spec(cli.DEMO_SPEC).model_copy(update={"schema_freeze": False})
    stages.preflight(spec, "first")
    for t in ("customers", "orders"):
        for r in stages.plan_ranges(spec, "first", t):
            stages.copy_range(spec, "first", r)
    stages.finish_schema(spec, "first")  # the foreign key orders -> customers now exists on the target
    with dbpair.tgt() as c:
        assert c.execute("SELECT count(*) FROM pg_constraint WHERE contype = 'f'").fetchone()[0] >= 1
    spec = catalog.resolve(spec)
    # The next run copies the parent table again: its DELETE of the range must not trip the foreign key.
    res = backfill.copy_range(spec, "second", KeyRange("customers", 0, None, None))
    assert res.ok and res.rows == 300 and res.orphans == 0
    with dbpair.src() as a, dbpair.tgt() as b:
        q = "SELECT count(*), md5(string_agg(c::text, ',' ORDER BY id)) FROM shop.customers c"
        assert a.execute(q).fetchone() == b.execute(q).fetchone()
