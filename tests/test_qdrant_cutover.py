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
import psycopg

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


# ---- the reader pointer through a DAG run, its tail and the rollback DAG -------------------------

class DocsWriter:
    """An application on docs.documents that follows the write pointer (dbguard.control.write_target FOR
    SHARE on the source) and inserts, updates and deletes rows with their vectors. Remembers what it did
    and on which side."""

    def __init__(self, src_dsn: str, tgt_dsn: str, migration: str, rate: float = 25):
        self.dsns = {"source": src_dsn, "target": tgt_dsn}
        self.migration, self.rate = migration, rate
        self.inserted: dict[int, str] = {}
        self.deleted: dict[int, str] = {}
        self.updated: dict[int, str] = {}
        self.errors: list[str] = []
        self._stop = threading.Event()

    def start(self) -> "DocsWriter":
        self.conns = {k: psycopg.connect(v, autocommit=True) for k, v in self.dsns.items()}
        self.ptr = psycopg.connect(self.dsns["source"])
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self):
        rng, i = np.random.default_rng(9), 0
        own: list[int] = []
        while not self._stop.is_set():
            i += 1
            try:
                row = self.ptr.execute("SELECT write_target FROM dbguard.control WHERE migration = %s "
                                       "AND direction = 'forward' FOR SHARE", (self.migration,)).fetchone()
                side = row[0] if row else "source"  # no row yet: the run has not started, the source it is
                c = self.conns[side]
                if i % 4 == 0 and own:
                    k = own.pop(0)
                    c.execute("DELETE FROM docs.documents WHERE id = %s", (k,))
                    self.deleted[k] = side
                elif i % 4 == 1:
                    k = 100 + int(rng.integers(1900))  # not 42, the query below
                    c.execute("UPDATE docs.documents SET title = title || '*', embedding = %s WHERE id = %s",
                              (_unit(rng), k))
                    self.updated[k] = side
                else:
                    k = 50_000_000 + i
                    c.execute("INSERT INTO docs.documents (id, title, body, embedding) VALUES (%s, 'w', 'w', %s)",
                              (k, _unit(rng)))
                    self.inserted[k] = side
                    own.append(k)
                self.ptr.commit()
            except psycopg.Error as e:  # e.g. dbguard.control does not exist yet, or the fence
                self.ptr.rollback()
                self.errors.append(str(e).splitlines()[0])
            time.sleep(1 / self.rate)

    def stop(self) -> "DocsWriter":
        self._stop.set()
        self.thread.join(30)
        for c in [*self.conns.values(), self.ptr]:
            c.close()
        return self


def _docs_cut_spec(tmp_path, monkeypatch):
    import yaml

    from dbguard.airflow import env as afenv

    raw = yaml.safe_load((afenv.SPECS_FOLDER / "demo_docs_qdrant.yaml").read_text())
    raw.update(name="docs_qcut", run_cutover=True, soak_minutes=0.05, rollback_ttl_minutes=0.12)
    raw.pop("window", None)  # the flip may happen any time (the demo's window closes at 23:59)
    raw["retrieval"].update(latency_floor_ms=10_000.0)
    path = tmp_path / "docs_qcut.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    monkeypatch.setenv("DBGUARD_REPORT_DIR", str(tmp_path / "reports"))
    return path


def _keys(dsn: str) -> set[int]:
    with psycopg.connect(dsn) as c:
        return {r[0] for r in c.execute("SELECT id FROM docs.documents")}


def test_readers_move_to_qdrant_at_cutover_and_back_at_rollback_losing_no_write(
        airflow_db, dbpair, qd, tmp_path, monkeypatch, capsys):
    """docs_qdrant with run_cutover under a writer that follows the write pointer: after the DAG run readers
    search Qdrant (the pointer says so and the reference reader gets its hits there); the tail carried the
    writes the application made on the new primary into the collection; after `dbguard rollback` readers
    search pgvector on the source again, and every write made after the cutover is on both sides."""
    from dbguard import corpus, cutover
    from dbguard.airflow import env as afenv
    from dbguard.cutover import readers
    from dbguard.spec import load_spec
    from test_dag import dagbag

    path = _docs_cut_spec(tmp_path, monkeypatch)
    corpus.load_docs("dbguard_source", norm_spread=0.9)
    spec = load_spec(path)
    label = "docs.documents.embedding"
    with dbpair.src() as c:
        query = np.array(c.execute("SELECT embedding::real[] FROM docs.documents WHERE id = 42").fetchone()[0])
    assert readers.current(spec) == {label: "pgvector"}
    w = DocsWriter(dbpair.src_dsn, dbpair.tgt_dsn, spec.name).start()
    try:
        bag = dagbag()
        dag_run = bag.dags["dbguard_docs_qcut"].test()
        result = afenv.run_result(dag_run)
        assert result["status"] == "cutover", result
        assert readers.current(spec) == {label: "qdrant"}
        hit = readers.search(spec, label, query, 5)
        assert hit["store"] == "qdrant" and "42" in hit["ids"], hit  # (docstrings repeat: ties)
        after_cut = {k for k, s in w.inserted.items() if s == "target"}
        assert after_cut, "the writer made no write on the target while the tail ran"
        time.sleep(1.5)  # writes after the tail ended: carried by the rollback's last window
    finally:
        w.stop()
    assert not [e for e in w.errors if "fenced" not in e and 'relation "dbguard.control" does not exist' not in e], \
        w.errors[:5]
    with dbpair.tgt() as c:
        tail = [e for (e,) in c.execute("SELECT detail FROM dbguard.events WHERE run_id = %s AND stage = "
                                        "'tail.collections'", (dag_run.run_id,))]
    assert tail and tail[0]["passes"] >= 2 and tail[0]["applied"] > 0, tail
    from dbguard import cli

    assert cli.main(["rollback", str(path), "--run-id", dag_run.run_id]) == 0  # `dbguard rollback`
    assert "readers search pgvector again (docs.documents.embedding)" in capsys.readouterr().err
    assert cutover.state(spec, dag_run.run_id)["phase"] == "rolled_back"
    assert readers.current(spec) == {label: "pgvector"}
    hit = readers.search(spec, label, query, 5)
    assert (hit["store"], hit["side"]) == ("pgvector", "source") and "42" in hit["ids"], hit
    on_target = {k for k, s in w.inserted.items() if s == "target"}
    deleted_on_target = {k for k, s in w.deleted.items() if s == "target"}
    src_keys, c = _keys(dbpair.src_dsn), qd()
    points = {int(p.id) for p in qdrant.read_range(c, "docs_v1", spec.tables[0].vector[0], None, None,
                                                      vectors=False)}
    assert on_target and on_target - deleted_on_target <= src_keys and on_target - deleted_on_target <= points
    assert not deleted_on_target & src_keys and not deleted_on_target & points
    with dbpair.src() as src:  # the collection equals the source, point for point: nothing to repair
        rc = qdrant_copy.reconcile(catalog.resolve(spec), spec.tables[0], spec.tables[0].vector[0], src, c,
                                   "docs_v1", [[None, None]])
    assert (rc["missing"], rc["extra"], rc["differing"], rc["repaired"]) == (0, 0, 0, 0), rc
    assert rc["points"] == len(src_keys)


def test_a_tail_pass_that_fails_is_reported_and_the_tail_goes_on(dbpair, qd):
    """The tail must not fail on a pass that cannot run (here the target table is not there):
    a failed tail task is a failure after the flip, which rolls the run back. The pass is reported and
    retried until rollback_ttl_minutes; the tail ends early once the run leaves phase cutover."""
    import time as _time

    from dbguard.cutover import readers
    from dbguard.cutover.state import ensure as ensure_state, write as write_state
    from dbguard.spec import parse_spec

    load(dbpair, clustered(20, 23))
    spec = parse_spec(qspec())
    with dbpair.tgt() as c:
        ledger.ensure(c)
        ledger.set_metric(c, RUN, spec.name, "qdrant_snapshot", {"vs.items.emb": None})
    with dbpair.src() as c:
        ensure_state(c)
        write_state(c, spec, RUN, phase="cutover", primary_side="target")
        c.commit()
    out = readers.keep_current(spec, RUN, _time.monotonic() + 3.0, every=0.1)
    assert out["passes"] == 0 and out["failed_passes"] >= 1 and "does not exist" in out["errors"][0], out
    with dbpair.src() as c:
        write_state(c, spec, RUN, phase="rolled_back", primary_side="source")
        c.commit()
    t0 = _time.monotonic()
    assert readers.keep_current(spec, RUN, t0 + 30, every=0.1)["failed_passes"] == 0
    assert _time.monotonic() - t0 < 5  # rolled back: the tail stops at once
