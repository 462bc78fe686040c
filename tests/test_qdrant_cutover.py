"""pgvector -> Qdrant through the cutover (issue 17, items 4 and 6): dual writes reach the collection
throughout the run (each soak poke), exactly once, deletes included; a write the collection refuses is
counted in dual_write_fail; the reader pointer moves readers to Qdrant at the flip and back to pgvector at
rollback, and the tail keeps the collection current so that every write made after the cutover is on both
sides at rollback. Embedded PostgreSQL and qdrant-client's local mode (in memory); DAGs from dags/."""
from __future__ import annotations

import threading
import time
from collections import Counter

import numpy as np

from dbguard import capture, catalog, flow, ledger
from dbguard.stores import qdrant, qdrant_copy
from test_qdrant import COLL, _migrate, load, qd, qspec  # noqa: F401  (fixture)
from test_vector_store import DIM, clustered, write_gold

RUN = "qcut"


def _vec(rng, dim: int = DIM) -> str:
    return "[" + ",".join(repr(float(x)) for x in rng.normal(size=dim)) + "]"


def _unit(rng, dim: int = 128) -> str:
    """A unit vector the declared transform (normalize) leaves exactly as it is: what an application writing
    the target after the flip must send (the target holds normalised vectors; rollback's verify compares the
    source's rows through the transform)."""
    v = ["0"] * dim
    v[int(rng.integers(dim))] = "1"
    return "[" + ",".join(v) + "]"


def _sync_events(pair, run_id: str, stage: str = "qdrant_sync") -> list[dict]:
    with pair.tgt() as c:
        return [r[0] for r in c.execute("SELECT detail FROM dbguard.events WHERE run_id = %s AND stage = %s "
                                        "ORDER BY id", (run_id, stage)).fetchall()]


def _reconcile(spec, pair, c) -> dict:
    t, v = spec.tables[0], spec.tables[0].vector[0]
    with pair.src() as src:
        return qdrant_copy.reconcile(spec, t, v, src, c, COLL, [[None, None]])


def test_soak_applies_dual_writes_under_a_live_writer_exactly_once(dbpair, qd, tmp_path):
    """Each soak poke carries the writes made since the last one into the collection: a writer inserts,
    updates and deletes (an update right before each delete, the race a re-read outside the window's
    snapshot gets wrong) while the soak is measured; every deleted key is deleted by exactly one pass, and
    after the last pass the collection equals the source (reconcile finds nothing to repair)."""
    from dbguard.spec import parse_spec

    vecs = clustered(300, 21)
    load(dbpair, vecs)
    spec = catalog.resolve(parse_spec(qspec(gold=write_gold(tmp_path / "g.jsonl", vecs[::30]), metric="l2",
                                            normalize=False)))
    capture.capture_on(spec, RUN)
    _migrate(spec, dbpair, RUN)
    with dbpair.tgt() as c:
        ledger.set_metric(c, RUN, spec.name, "checksum_ok", True)  # what the checksum gate left
    stop, deleted, inserted = threading.Event(), [], []

    def writer():
        rng = np.random.default_rng(5)
        alive = list(range(1, 301))
        rng.shuffle(alive)
        with dbpair.src(autocommit=True) as w:
            i = 0
            while not stop.is_set() and alive:
                i += 1
                if i % 3 == 0:  # update, then delete the same row in the next transaction
                    k = alive.pop()
                    w.execute("UPDATE vs.items SET body = 'doomed', emb = %s WHERE id = %s", (_vec(rng), k))
                    w.execute("DELETE FROM vs.items WHERE id = %s", (k,))
                    deleted.append(k)
                elif i % 3 == 1:
                    w.execute("UPDATE vs.items SET body = body || '+', emb = %s WHERE id = %s",
                              (_vec(rng), alive[int(rng.integers(len(alive)))]))
                else:
                    w.execute("INSERT INTO vs.items VALUES (%s, 'new', %s)", (5000 + i, _vec(rng)))
                    inserted.append(5000 + i)
                time.sleep(0.004)

    th = threading.Thread(target=writer)
    th.start()
    pokes = []
    try:
        for _ in range(3):
            pokes.append(flow.soak_measure(spec, RUN))
            time.sleep(0.5)
    finally:
        stop.set()
        th.join()
    pokes.append(flow.soak_measure(spec, RUN))  # the writer stopped: this pass is the last window
    assert all(v is not False for v, _ in pokes), pokes
    assert "collections vs.items.emb" in pokes[0][1], pokes[0]
    events = _sync_events(dbpair, RUN)
    per_key = Counter(k for e in events for k in e["deleted_keys"])
    assert len(deleted) > 10 and len(events) >= 2, (len(deleted), len(events))
    assert per_key == Counter(str(k) for k in deleted), (per_key - Counter(map(str, deleted)),
                                                          Counter(map(str, deleted)) - per_key)
    assert all(e["first_op"] is not None and e["last_op"] >= e["first_op"] for e in events if e["ops"])
    c = qd()
    rc = _reconcile(spec, dbpair, c)
    assert (rc["missing"], rc["extra"], rc["differing"], rc["repaired"]) == (0, 0, 0, 0), rc
    assert rc["points"] == 300 - len(deleted) + len(inserted)
    assert c.retrieve(COLL, deleted) == []
    again = flow.soak_measure(spec, RUN)  # nothing new: a pass over an empty window writes nothing
    assert again[0] is not False and "+0 -0" in again[1], again


def test_a_write_the_collection_refuses_is_counted_in_dual_write_fail(dbpair, qd, tmp_path):
    """A row whose vector has another dimension (the source column is untyped `vector`) cannot become a
    point: the collection refuses it, the other changes of the window still arrive, the refusal is recorded
    with its op_id (dual_write_fail = 1) and not counted again by the next pass."""
    from dbguard.spec import parse_spec

    vecs = clustered(50, 22)
    with dbpair.src() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE SCHEMA vs")
        c.execute("CREATE TABLE vs.items (id bigint PRIMARY KEY, body text, emb vector)")
        for i, v in enumerate(vecs, 1):
            c.execute("INSERT INTO vs.items VALUES (%s, %s, %s)", (i, f"item {i}", "[" + ",".join(map(str, v)) + "]"))
    spec = parse_spec(qspec(metric="l2", normalize=False))
    capture.capture_on(spec, RUN)
    t, v = spec.tables[0], spec.tables[0].vector[0]
    qdrant.create_collection(qd(), COLL, v)
    with dbpair.src() as src:
        snap = qdrant_copy.copy(spec, t, v, src, qd(), COLL)["snapshot"]
    with dbpair.tgt() as c:
        ledger.ensure(c)
        ledger.set_metric(c, RUN, spec.name, "qdrant_snapshot", {"vs.items.emb": snap})
    with dbpair.src() as w:
        w.execute("INSERT INTO vs.items VALUES (900, 'short', '[1,2,3]')")  # 3 dimensions, the collection has 16
        w.execute("INSERT INTO vs.items VALUES (901, 'fine', %s)", ("[" + ",".join(["0.5"] * DIM) + "]",))
        w.execute("DELETE FROM vs.items WHERE id = 7")
        bad_op = w.execute("SELECT op_id FROM dbguard.change_ledger WHERE key = '[\"900\"]'").fetchone()[0]
    from dbguard import retrieval

    r = retrieval.sync_collections(spec, RUN)
    s = r["stores"]["vs.items.emb"]
    assert (r["dual_write_fail"], s["upserted"], s["deleted"]) == (1, 1, 1), s
    assert "dimension" in s["refused"][0]["error"] and s["refused"][0]["key"] == "900"
    assert capture.dual_write_fail(spec, RUN) == (1, [bad_op])
    with dbpair.tgt() as c:
        assert ledger.metrics(c, RUN)["dual_write_fail"] == 1
    c = qd()
    assert c.retrieve(COLL, [900, 7]) == [] and len(c.retrieve(COLL, [901])) == 1
    assert retrieval.sync_collections(spec, RUN)["dual_write_fail"] == 0  # the window moved on
    assert capture.dual_write_fail(spec, RUN)[0] == 1
