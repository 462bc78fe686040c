"""A Qdrant collection as the target of a vector store (issue 17), on qdrant-client's local mode
(in memory) and the real embedded PostgreSQL source: payload types round-trip, every batch is
verified, an altered point is found by the checksum and repaired, the gate catches a wrong metric."""
from __future__ import annotations

import datetime as dt
import uuid
from decimal import Decimal

import numpy as np
import pytest
from psycopg import sql
from psycopg.types.json import Jsonb

from dbguard import ledger, retrieval
from dbguard.errors import SpecError
from dbguard.spec import QdrantHnsw, parse_spec
from dbguard.stores import qdrant, qdrant_copy, qdrant_payload
from test_retrieval import T0, simulate_backfill
from test_vector_store import DIM, clustered, write_gold

COLL = "items_v1"


@pytest.fixture
def qd(monkeypatch):
    """The spec's Qdrant connection (qdrant_default) as an in-memory local store, fresh per test."""
    monkeypatch.setenv("AIRFLOW_CONN_QDRANT_DEFAULT", "qdrant://?location=%3Amemory%3A")
    qdrant.close_all()
    yield lambda: qdrant.client("qdrant_default")
    qdrant.close_all()


def qspec(gold: str = "g.jsonl", key_type: str = "bigint", metric: str = "cosine", normalize: bool = True,
          source_metric: str = "l2", payload=("body",), columns=(), **qdrant_kw) -> dict:
    store = {"column": "emb", "dim": DIM, "source_metric": source_metric, "metric": metric, "normalize": normalize,
             "qdrant": {"collection": COLL, "payload": list(payload), "batch_points": 100, **qdrant_kw}}
    return {"name": "qd", "source": {"conn_id": "dbguard_source"}, "target": {"conn_id": "dbguard_target"},
            "tables": [{"name": "items", "schema": "vs", "key": ["id"],
                        "columns": [{"name": "id", "type": key_type, "nullable": False},
                                    {"name": "body", "type": "text"}, *columns,
                                    {"name": "emb", "type": f"vector({DIM})"}],
                        "vector": [store]}],
            "gold": gold, "retrieval": {"k": 10, "recall_queries": 20, "latency_floor_ms": 10_000.0},
            "backfill": {"batch_rows": 250_000}}


def load(pair, vectors: np.ndarray, ids=None, key_type: str = "bigint") -> list:
    ids = list(range(1, len(vectors) + 1)) if ids is None else ids
    with pair.src() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE SCHEMA IF NOT EXISTS vs")
        c.execute(sql.SQL("CREATE TABLE vs.items (id {} PRIMARY KEY, body text, emb vector({}))").format(
            sql.SQL(key_type), sql.Literal(DIM)))
        with c.cursor().copy("COPY vs.items (id, body, emb) FROM STDIN") as cp:
            for i, v in zip(ids, vectors):
                cp.write_row((i, f"item {i}", "[" + ",".join(repr(float(x)) for x in v) + "]"))
    return ids


def test_spec_refuses_a_payload_column_it_does_not_declare_and_a_composite_key():
    with pytest.raises(SpecError, match=r"qdrant.payload: column\(s\) \['nope'\] are not in columns"):
        parse_spec(qspec(payload=["nope"]))
    d = qspec()
    d["tables"][0]["key"] = ["id", "body"]
    with pytest.raises(SpecError, match="point id is one value"):
        parse_spec(d)


def test_connection_is_the_providers_qdrant_type(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_QD_SERVER", "qdrant://:s3cret@qdrant.example:6333?https=true&grpc_port=6335")
    kw = qdrant.client_kwargs("qd_server")
    assert kw["host"] == "qdrant.example" and kw["port"] == 6333 and kw["api_key"] == "s3cret"
    assert kw["https"] is True and kw["grpc_port"] == 6335
    monkeypatch.setenv("AIRFLOW_CONN_QD_SERVER", '{"conn_type": "qdrant", "host": "h", "extra": {"url": "http://h:1"}}')
    assert qdrant.client_kwargs("qd_server")["url"] == "http://h:1"
    monkeypatch.delenv("AIRFLOW_CONN_QD_SERVER")
    assert qdrant.client_kwargs("qd_server")["path"].endswith(".qdrant/qd_server")  # embedded default
    monkeypatch.setenv("AIRFLOW_CONN_QD_SERVER", "postgresql://u@h/db")
    with pytest.raises(Exception, match="needs a connection of type qdrant"):
        qdrant.client_kwargs("qd_server")


PAYLOAD_TYPES = [
    ("n_int", "integer", 2147483647), ("n_big", "bigint", -9007199254740993), ("n_small", "smallint", -7),
    ("f4", "real", 0.1), ("f8", "double precision", 1e-310), ("f_nan", "double precision", float("inf")),
    ("num", "numeric(12,2)", Decimal("0.70")), ("num_big", "numeric", Decimal("123456789012345678901234567890.000001")),
    ("t", "text", "O'Reilly \"quoted\" \\ 🚀 請"), ("vc", "varchar(20)", ""), ("b", "boolean", False),
    ("u", "uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
    ("d", "date", dt.date(1999, 12, 31)),
    ("ts", "timestamp without time zone", dt.datetime(2024, 2, 29, 23, 59, 59, 999999)),
    ("tstz", "timestamp with time zone", dt.datetime(2024, 1, 1, 0, 0, 0, 1, tzinfo=dt.timezone.utc)),
    ("j", "jsonb", {"a": [1, 2.5, None, "x"], "n": {"deep": True}}),
    ("by", "bytea", b"\x00\x89PNG\xff"), ("arr", "text[]", ["a", None, "c,d"]), ("iarr", "bigint[]", [1, -2, None]),
    ("nul", "text", None),
]


def test_payload_of_every_supported_type_round_trips(dbpair, qd):
    """Each supported column type goes into the payload and decodes back to the value PostgreSQL holds."""
    cols = [{"name": n, "type": t} for n, t, _ in PAYLOAD_TYPES]
    spec = parse_spec(qspec(payload=[n for n, _, _ in PAYLOAD_TYPES], columns=cols))
    t, v = spec.tables[0], spec.tables[0].vector[0]
    with dbpair.src() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE SCHEMA vs")
        c.execute(sql.SQL("CREATE TABLE vs.items (id bigint PRIMARY KEY, body text, {}, emb vector({}))").format(
            sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(n), sql.SQL(ty)) for n, ty, _ in PAYLOAD_TYPES),
            sql.Literal(DIM)))
        c.execute(sql.SQL("INSERT INTO vs.items VALUES (7, 'x', {}, %s)").format(
            sql.SQL(", ").join(sql.Placeholder() for _ in PAYLOAD_TYPES)),
            [Jsonb(val) if isinstance(val, dict) else val for _, _, val in PAYLOAD_TYPES]
            + ["[" + ",".join(["0.5"] * DIM) + "]"])
        c.execute("UPDATE vs.items SET f_nan = 'NaN' WHERE id = 7")
    out = qdrant_copy.build(spec, t, v)
    assert out["checksum_ok"] and out["points"] == 1
    rec = qd().retrieve(COLL, [7], with_payload=True)[0]
    assert rec.payload["num"] == "0.70" and rec.payload["tstz"] == "2024-01-01T00:00:00.000001Z"
    with dbpair.src() as c:
        row = c.execute(sql.SQL("SELECT {} FROM vs.items").format(
            sql.SQL(", ").join(sql.Identifier(n) for n, _, _ in PAYLOAD_TYPES))).fetchone()
    for (name, typ, _), want in zip(PAYLOAD_TYPES, row):
        got = qdrant_payload.decoder(typ)(rec.payload[name])
        if name == "f_nan":
            assert np.isnan(got)
        else:
            assert got == want and type(got) is type(want), (name, got, want)


def test_payload_type_without_an_encoding_is_refused_before_anything_is_written(dbpair, qd):
    spec = parse_spec(qspec(payload=["body", "span"], columns=[{"name": "span", "type": "interval"}]))
    with dbpair.src() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE SCHEMA vs")
        c.execute(f"CREATE TABLE vs.items (id bigint PRIMARY KEY, body text, span interval, emb vector({DIM}))")
    with dbpair.src() as c:
        problems = qdrant_copy.source_problems(c, spec.tables[0], spec.tables[0].vector[0])
    assert len(problems) == 1 and "'span' has type 'interval'" in problems[0] and "qdrant.payload" in problems[0]
    assert not qd().collection_exists(COLL)


@pytest.mark.parametrize("key_type", ["bigint", "uuid"])
def test_copy_verifies_every_batch_and_point_ids_follow_the_key(dbpair, qd, key_type):
    vecs = clustered(250, 3)
    ids = None if key_type == "bigint" else sorted(str(uuid.UUID(int=(i * 7919) << 64 | i)) for i in range(250))
    ids = load(dbpair, vecs, ids, key_type)
    spec = parse_spec(qspec(key_type=key_type))
    out = qdrant_copy.build(spec, spec.tables[0], spec.tables[0].vector[0])
    assert out["checksum_ok"] and out["points"] == 250 and out["batches"] == 3 and out["repaired"] == 0
    got = qd().retrieve(COLL, [qdrant.point_id(str(ids[5]))], with_vectors=True, with_payload=True)[0]
    assert str(got.id) == str(ids[5]) and got.payload == {"body": f"item {ids[5]}"}
    unit = vecs[5] / np.linalg.norm(vecs[5])
    assert np.allclose(got.vector, unit, atol=1e-6)  # normalize: true, Cosine collection


def test_a_point_altered_on_the_target_is_found_by_the_checksum_and_repaired(dbpair, qd):
    """One vector component and one payload field changed, one point deleted, one extra point:
    reconcile bisects to exactly those points, repairs them, and the sums agree again."""
    load(dbpair, clustered(400, 4))
    spec = parse_spec(qspec(metric="l2", normalize=False))
    t, v = spec.tables[0], spec.tables[0].vector[0]
    first = qdrant_copy.build(spec, t, v)
    c = qd()
    p = c.retrieve(COLL, [123], with_vectors=True, with_payload=True)[0]
    vec = list(p.vector)
    vec[3] = float(np.nextafter(np.float32(vec[3]), np.float32(1)))  # one ulp: the smallest change there is
    from qdrant_client import models as m
    c.upsert(COLL, [m.PointStruct(id=123, vector=vec, payload=p.payload)], wait=True)
    c.set_payload(COLL, {"body": "item 300 (edited)"}, points=[300], wait=True)
    c.delete(COLL, points_selector=m.PointIdsList(points=[42]), wait=True)
    c.upsert(COLL, [m.PointStruct(id=100000, vector=[0.1] * DIM, payload={"body": "ghost"})], wait=True)
    with dbpair.src() as src:
        rc = qdrant_copy.reconcile(spec, t, v, src, c, COLL, [[None, "200"], ["200", None]], leaf=16)
    assert (rc["missing"], rc["extra"], rc["differing"]) == (1, 1, 2) and rc["repaired"] == 4
    assert rc["bisected"] > 0 and rc["checksum_ok"] and rc["points"] == 400
    assert qdrant_copy.index_hash(v, rc["points"], rc["checksum"]) == first["index_hash"]
    assert c.retrieve(COLL, [300], with_payload=True)[0].payload == {"body": "item 300"}
    assert c.retrieve(COLL, [100000]) == []



def _migrate(spec, pair, run_id: str) -> dict:
    """The stages before the retrieval gate: the table to the PostgreSQL target, the collection built."""
    simulate_backfill(spec, pair)
    retrieval.preflight(spec, run_id)
    return retrieval.build_indexes(spec, run_id)


def test_pgvector_to_qdrant_passes_the_retrieval_gate_and_pins_the_collection(dbpair, qd, tmp_path):
    vecs = clustered(600, 8, norm_spread=0.9)
    load(dbpair, vecs)
    gold = write_gold(tmp_path / "g.jsonl", vecs[::29])
    spec = parse_spec(qspec(gold=gold, source_metric="cosine", metric="cosine", normalize=False,
                            hnsw={"m": 16, "ef_construct": 100}, quantization={"quantile": 0.99}))
    out = _migrate(spec, dbpair, "good")
    assert out["qdrant"][0]["checksum_ok"] and out["qdrant"][0]["points"] == 600
    m = retrieval.shadow_reads(spec, "good")
    assert m["lambda_state"] == "convergent" and m["delta_s_diff"] <= 0.02, m
    status, msg = retrieval.retrieval_gate(spec, "good", first_seen_at=T0, now=T0)
    assert status == "pass", msg
    with dbpair.tgt() as c:
        row = c.execute("SELECT value FROM dbguard.metrics WHERE run_id = 'good' AND name = 'target_store'").fetchone()
    assert row[0] == "qdrant"
    assert len(out["index_hash"]["vs.items.emb"]) == 32


def test_dot_on_unnormalised_vectors_where_the_source_used_cosine_is_caught_by_the_gate(dbpair, qd, tmp_path):
    """The collection is Dot (metric ip) and the vectors keep their lengths: long vectors win whatever
    their direction. The copy is exact (checksums agree), so only the retrieval gate can see it."""
    vecs = clustered(600, 9, norm_spread=0.9)
    load(dbpair, vecs)
    gold = write_gold(tmp_path / "g.jsonl", vecs[::29])
    bad = parse_spec(qspec(gold=gold, source_metric="cosine", metric="ip", normalize=False))
    out = _migrate(bad, dbpair, "bad")
    assert out["qdrant"][0]["checksum_ok"]
    m = retrieval.shadow_reads(bad, "bad")
    assert m["lambda_state"] != "convergent" and m["recall_post"] < m["recall_pre"] - 0.1, m
    status, msg = retrieval.gate_poke(bad, "bad", first_seen_at=T0, now=T0)
    assert status == "fail" and "likely cause: vs.items.emb: metric cosine -> ip (Qdrant distance Dot)" in msg, msg


def _docs_dag(which: str, tmp_path, monkeypatch, **retrieval_kw):
    """A Qdrant demo spec's DAG through dag.test(), its collection in memory, on the docs corpus whose
    vector lengths vary with the document (as `dbguard demo docs_qdrant` loads it)."""
    import yaml

    from dbguard import corpus
    from dbguard.airflow import env as afenv
    from test_dag import dagbag

    raw = yaml.safe_load((afenv.SPECS_FOLDER / f"demo_{which}.yaml").read_text())
    raw["name"] = f"{which}_t"
    raw["retrieval"].update(retrieval_kw)
    path = tmp_path / f"{which}_t.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    monkeypatch.setenv("DBGUARD_REPORT_DIR", str(tmp_path / "reports"))
    corpus.load_docs("dbguard_source", norm_spread=0.9)
    dag_run = dagbag().dags[f"dbguard_{which}_t"].test()
    return dag_run, afenv.run_result(dag_run)


def test_docs_into_qdrant_pass_every_gate_in_a_dag_run(airflow_db, dbpair, qd, tmp_path, monkeypatch):
    dag_run, result = _docs_dag("docs_qdrant", tmp_path, monkeypatch, latency_floor_ms=10_000.0)
    assert dag_run.state == "success", result
    assert result["target_store"] == "qdrant" and result["checksum_ok"] is True
    assert result["lambda_state"] == "convergent" and result["delta_s_diff"] <= 0.02
    assert qd().count("docs_v1", exact=True).count == result["migrated_rows"] == 2086
    with dbpair.tgt() as c:
        pins = dict(c.execute("SELECT key, value FROM dbguard.manifest WHERE run_id = %s",
                              (dag_run.run_id,)).fetchall())
    assert (pins["TARGET_STORE"], pins["EMBED_MODEL_VER"], pins["EMBED_DIM"], pins["NORM"]) == (
        "qdrant", "tfidf-svd-stdlib-v1", "128", "l2"), pins
    assert '"distance": "Cosine"' in pins["INDEX"] and len(pins["INDEX_HASH"]) == 32
    with dbpair.tgt() as c:  # where the dual writes into the collection start (release applies them)
        ev = c.execute("SELECT detail FROM dbguard.events WHERE run_id = %s AND stage = 'build_indexes'",
                       (dag_run.run_id,)).fetchone()[0]
        snap = c.execute("SELECT value #>> '{vs}' FROM dbguard.metrics WHERE run_id = %s AND name = "
                         "'qdrant_snapshot'".replace("{vs}", "{docs.documents.embedding}"), (dag_run.run_id,)).fetchone()
    assert snap and snap[0] and ev["qdrant"][0]["snapshot"], (snap, ev["qdrant"][0])
    from pathlib import Path
    assert "pgvector → qdrant" in Path(result["report"]).read_text()  # the report names the store kinds


def test_dot_on_raw_lengths_fails_the_dag_run_naming_the_metric(airflow_db, dbpair, qd, tmp_path, monkeypatch):
    dag_run, result = _docs_dag("docs_qdrant_bad_metric", tmp_path, monkeypatch)
    assert dag_run.state == "failed" and result["status"] == "failed"
    assert result["checksum_ok"] is True and result["target_store"] == "qdrant"  # intact data, changed meaning
    assert "metric cosine -> ip (Qdrant distance Dot)" in result["reason"], result["reason"][:2000]


def test_alias_swap_moves_readers_in_one_request_and_rollback_moves_them_back(dbpair, qd):
    """Qdrant -> Qdrant's swap (store level): readers search the alias; the swap points it at the new
    collection in one update_collection_aliases request, the undo points it back, the old collection is kept."""
    load(dbpair, clustered(120, 5))
    spec = parse_spec(qspec())
    t, v = spec.tables[0], spec.tables[0].vector[0]
    qdrant_copy.build(spec, t, v)  # items_v1, the live collection
    c = qd()
    assert qdrant.swap_alias(c, "items", COLL) is None  # readers start on v1
    v2 = v.model_copy(update={"qdrant": v.qdrant.model_copy(update={"collection": "items_v2",
                                                                      "hnsw": QdrantHnsw(m=32)})})
    qdrant.create_collection(c, "items_v2", v2)
    with dbpair.src() as src:
        cp = qdrant_copy.copy(spec, t, v2, src, c, "items_v2")
    assert cp["points"] == 120 and not cp["mismatched_batches"]
    qdrant.delete_points(c, "items_v2", ["7"])  # so the test can tell the two collections apart
    previous = qdrant.swap_alias(c, "items", "items_v2")
    assert previous == COLL and qdrant.alias_target(c, "items") == "items_v2"
    assert c.count("items", exact=True).count == 119  # readers see the new collection through the alias
    assert qdrant.swap_alias(c, "items", previous) == "items_v2"  # rollback: one request back
    assert qdrant.alias_target(c, "items") == COLL and c.count("items", exact=True).count == 120
    assert c.collection_exists("items_v2")  # kept until finish


def test_deletes_and_updates_under_a_live_writer_are_applied_once(dbpair, qd):
    """Dual writes into the collection: a writer inserts, updates and deletes while the copy runs and
    while windows of the change ledger are applied; after the last window the collection equals the
    source (reconcile finds nothing to repair), every deleted key is gone, and replaying every window
    from the copy's snapshot changes nothing."""
    import threading
    import time

    from dbguard import capture
    from dbguard.stores import qdrant_sync

    load(dbpair, clustered(300, 6))
    spec = parse_spec(qspec(metric="l2", normalize=False))
    t, v = spec.tables[0], spec.tables[0].vector[0]
    capture.capture_on(spec, "dw")
    stop, deleted, ops = threading.Event(), set(), [0]

    def writer():
        rng = np.random.default_rng(11)
        with dbpair.src(autocommit=True) as w:
            i = 0
            while not stop.is_set():
                i += 1
                k = int(rng.integers(1, 300))
                vec = "[" + ",".join(repr(float(x)) for x in rng.normal(size=DIM)) + "]"
                if i % 3 == 0:
                    w.execute("DELETE FROM vs.items WHERE id = %s", (k,))
                    deleted.add(k)
                elif i % 3 == 1:
                    w.execute("UPDATE vs.items SET body = body || '+', emb = %s WHERE id = %s", (vec, k))
                else:
                    w.execute("INSERT INTO vs.items VALUES (%s, 'new', %s)", (1000 + i, vec))
                ops[0] += 1
                time.sleep(0.005)

    c = qd()
    qdrant.create_collection(c, COLL, v)
    th = threading.Thread(target=writer)
    th.start()
    try:
        with dbpair.src() as src:
            cp = qdrant_copy.copy(spec, t, v, src, c, COLL)
            prev, passes = cp["snapshot"], 0
            while passes < 4:
                out = qdrant_sync.apply_window(spec, t, v, src, c, COLL, prev)
                assert out["dual_write_fail"] == 0
                prev, passes = out["snapshot"], passes + 1
                time.sleep(0.3)
    finally:
        stop.set()
        th.join()
    with dbpair.src() as src:
        last = qdrant_sync.apply_window(spec, t, v, src, c, COLL, prev)
        rc = qdrant_copy.reconcile(spec, t, v, src, c, COLL, [[None, None]])
        n_src = src.execute("SELECT count(*) FROM vs.items").fetchone()[0]
        gone = {k for (k,) in src.execute("SELECT k FROM unnest(%s::bigint[]) k WHERE NOT EXISTS "
                                          "(SELECT 1 FROM vs.items WHERE id = k)", (sorted(deleted),)).fetchall()}
        before = qdrant.RangeSum.of(qdrant.read_range(c, COLL, v, None, None))
        replay = qdrant_sync.apply_window(spec, t, v, src, c, COLL, cp["snapshot"])  # every window again
    assert ops[0] > 30 and gone and last["keys"] >= 0
    assert (rc["missing"], rc["extra"], rc["differing"], rc["repaired"]) == (0, 0, 0, 0), rc
    assert rc["points"] == n_src
    assert c.retrieve(COLL, sorted(gone)) == []
    assert replay["keys"] > 0 and qdrant.RangeSum.of(qdrant.read_range(c, COLL, v, None, None)) == before


def test_persistent_local_mode_keeps_every_point_after_the_client_closes(dbpair, monkeypatch, tmp_path):
    """The embedded default: local mode in a directory (SQLite in WAL mode). A new client on the same
    directory (as the next task's process would open it) finds the collection whole: reconcile finds
    nothing to repair. qdrant-client 1.20 reloads a Cosine collection's vectors as they were sent (raw
    lengths), not as the unit vectors it returned before: the point compare takes them as directions."""
    monkeypatch.setenv("AIRFLOW_CONN_QDRANT_DEFAULT", f"qdrant://?path={tmp_path / 'qd'}")
    qdrant.close_all()
    load(dbpair, clustered(300, 12, norm_spread=0.5))
    spec = parse_spec(qspec(normalize=False))  # Cosine collection, raw vectors sent
    t, v = spec.tables[0], spec.tables[0].vector[0]
    assert qdrant_copy.build(spec, t, v)["checksum_ok"]
    qdrant.close_all()
    c = qdrant.client("qdrant_default")
    try:
        assert c.count(COLL, exact=True).count == 300
        with dbpair.src() as src:
            rc = qdrant_copy.reconcile(spec, t, v, src, c, COLL, [[None, None]])
        assert (rc["missing"], rc["extra"], rc["differing"], rc["repaired"]) == (0, 0, 0, 0), rc
        assert rc["points"] == 300 and rc["checksum_ok"]
    finally:
        qdrant.close_all()


def test_a_named_vector_is_copied_verified_and_searched_by_its_name(dbpair, qd):
    vecs = clustered(150, 13)
    load(dbpair, vecs)
    spec = parse_spec(qspec(metric="l2", normalize=False, vector_name="emb_v1"))
    t, v = spec.tables[0], spec.tables[0].vector[0]
    out = qdrant_copy.build(spec, t, v)
    assert out["checksum_ok"] and out["points"] == 150
    c = qd()
    assert qdrant.describe(c, COLL, "emb_v1") == {"size": DIM, "distance": "Euclid"}
    ids, got = qdrant.search(c, COLL, v, vecs[41], 3)
    assert ids[0] == "42" and np.array_equal(got[0], vecs[41].astype(np.float32))  # Euclid keeps the bytes
    other = v.model_copy(update={"qdrant": v.qdrant.model_copy(update={"vector_name": "emb_v2"})})
    assert "has vectors ['emb_v1'] but the spec names vector 'emb_v2'" in qdrant.check(other, "vs.items.emb")[0]


def test_an_existing_collection_of_another_distance_is_refused_before_anything_is_written(dbpair, qd):
    from dbguard.errors import PreflightError

    load(dbpair, clustered(50, 14))
    dot = parse_spec(qspec(metric="ip", normalize=False))
    qdrant.create_collection(qd(), COLL, dot.tables[0].vector[0])
    spec = parse_spec(qspec())  # cosine
    with pytest.raises(PreflightError, match=r"exists with size 16 / Dot but the spec says size 16 / Cosine"):
        qdrant_copy.build(spec, spec.tables[0], spec.tables[0].vector[0])
    assert qd().count(COLL, exact=True).count == 0


def test_writes_after_the_collection_is_built_reach_it_at_release(dbpair, qd, tmp_path):
    """The stage path: capture on, the collection built (its copy's snapshot kept in the ledger), then
    the application inserts, updates and deletes; the next sync (release runs it under the write
    freeze) applies exactly those keys, deletes included, and the one after finds nothing new."""
    from dbguard import capture

    vecs = clustered(200, 15)
    load(dbpair, vecs)
    gold = write_gold(tmp_path / "g.jsonl", vecs[::20])
    spec = parse_spec(qspec(gold=gold, metric="l2", normalize=False))
    t, v = spec.tables[0], spec.tables[0].vector[0]
    capture.capture_on(spec, "rel")
    _migrate(spec, dbpair, "rel")
    with dbpair.src() as w:
        w.execute("DELETE FROM vs.items WHERE id IN (3, 4)")
        w.execute("UPDATE vs.items SET body = 'edited' WHERE id = 5")
        w.execute(f"INSERT INTO vs.items VALUES (500, 'new', '[{','.join(['0.25'] * DIM)}]')")
    first = retrieval.sync_collections(spec, "rel")
    r = first["stores"]["vs.items.emb"]
    assert (r["keys"], r["upserted"], r["deleted"], first["dual_write_fail"]) == (4, 2, 2, 0), r
    assert retrieval.sync_collections(spec, "rel")["stores"]["vs.items.emb"]["keys"] == 0
    c = qd()
    assert c.retrieve(COLL, [3, 4]) == [] and c.retrieve(COLL, [5], with_payload=True)[0].payload == {"body": "edited"}
    with dbpair.src() as src:
        rc = qdrant_copy.reconcile(spec, t, v, src, c, COLL, [[None, None]])
    assert (rc["repaired"], rc["points"]) == (0, 199), rc


class ServerLike:
    """A real local store behind a client that, like a server's, accepts concurrent calls (executed one
    at a time here): counts the batches in flight (from a batch's upsert to the end of its read-back),
    can hold the first upserts until `meet` of them are in flight at once, and can fail the first
    `fail` upserts with `error` before they reach the store."""

    _client = None  # not local mode: copy does not serialise the calls itself

    def __init__(self, real, meet: int = 1, fail: int = 0, error: Exception | None = None):
        import threading
        self.real, self.fail, self.error = real, fail, error
        self.lock, self.state = threading.Lock(), threading.Lock()
        self.meet = threading.Barrier(meet, timeout=30) if meet > 1 else None
        self.upserts = self.in_flight = self.max_in_flight = 0

    def upsert(self, name, points, wait):
        with self.state:
            self.upserts += 1
            failing = self.fail > 0
            self.fail -= failing
            if not failing:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
            meet = self.meet if self.meet is not None and self.upserts <= self.meet.parties else None
        if failing:
            raise self.error
        if meet is not None:
            meet.wait()  # the first upserts wait for each other: `meet` batches in flight at once
        with self.lock:
            return self.real.upsert(name, points=points, wait=wait)

    def retrieve(self, name, ids, **kw):
        with self.lock:
            got = self.real.retrieve(name, ids, **kw)
        with self.state:
            self.in_flight -= 1
        return got


def test_concurrent_batches_never_exceed_the_pools_concurrency(dbpair, qd):
    """backfill.concurrency caps the batches in flight (written, not yet verified): two are seen in
    flight at once, never three; every point arrives verified."""
    load(dbpair, clustered(700, 5))
    d = qspec()
    d["backfill"]["concurrency"] = 2
    spec = parse_spec(d)
    t, v = spec.tables[0], spec.tables[0].vector[0]
    c = qd()
    qdrant.create_collection(c, COLL, v)
    server = ServerLike(c, meet=2)
    with dbpair.src() as src:
        out = qdrant_copy.copy(spec, t, v, src, server, COLL)
    assert out["batches"] == 7 and not out["mismatched_batches"] and out["repaired"] == 0
    assert server.max_in_flight == 2 and out["max_in_flight"] <= 2
    assert c.count(COLL).count == 700


def test_a_transient_store_error_is_retried_and_a_refused_write_is_not(dbpair, qd):
    """The error a client raises when the server is unreachable is retried (backfill.retries, with
    back-off) and the copy completes verified; a write the store refuses is raised at once."""
    from qdrant_client import QdrantClient
    from qdrant_client.http.exceptions import UnexpectedResponse

    unreachable = QdrantClient(url="http://127.0.0.1:9", timeout=2, check_compatibility=False)  # nothing listens on port 9
    with pytest.raises(Exception) as refused:
        unreachable.get_collections()
    unreachable.close()
    assert qdrant.transient(refused.value)
    assert qdrant.transient(UnexpectedResponse(503, "Service Unavailable", b"", None))
    assert not qdrant.transient(UnexpectedResponse(400, "Bad Request", b"wrong vector size", None))

    load(dbpair, clustered(300, 6))
    d = qspec()
    d["backfill"].update(retries=2, retry_delay_seconds=0.01, concurrency=1)
    spec = parse_spec(d)
    t, v = spec.tables[0], spec.tables[0].vector[0]
    c = qd()
    qdrant.create_collection(c, COLL, v)
    server = ServerLike(c, fail=2, error=refused.value)
    with dbpair.src() as src:
        out = qdrant_copy.copy(spec, t, v, src, server, COLL)
    assert out["retries"] == 2 and server.upserts == 3 + 2 and not out["mismatched_batches"]
    assert c.count(COLL).count == 300

    server = ServerLike(c, fail=3, error=refused.value)  # one more failure than retries: raised
    with dbpair.src() as src, pytest.raises(type(refused.value)):
        qdrant_copy.copy(spec, t, v, src, server, COLL)
    assert server.upserts == 3

    # a refused write (a vector of the wrong size for the collection: local mode's ValueError) is not retried
    c.create_collection("other_size", vectors_config=__import__("qdrant_client").models.VectorParams(
        size=DIM + 1, distance="Cosine"))
    server = ServerLike(c)
    with dbpair.src() as src, pytest.raises(ValueError):
        qdrant_copy.copy(spec, t, v, src, server, "other_size")
    assert server.upserts == 1


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_bulk_checksum_and_normalisation_are_the_per_point_ones_bit_for_bit(metric):
    """The copy's verify hashes a batch at once (RangeSum.of_batch, stored_vectors); reconcile and the
    index_hash use the per-point functions: both must give the same sums, or every batch would fall
    back to the point-by-point compare and a collection's index_hash would depend on the path."""
    v = parse_spec(qspec(metric=metric, source_metric=metric)).tables[0].vector[0]
    rng = np.random.default_rng(7)
    vecs = (rng.normal(size=(50, DIM)) * rng.uniform(0.1, 9, size=(50, 1))).astype(np.float32)
    vecs[3] = 0  # a zero vector stays as it is
    pts = [qdrant.Point(str(i), {"body": f"ü {i}", "n": i * 0.1, "none": None}, vecs[i]) for i in range(50)]
    bulk = qdrant.stored_vectors(v, vecs)
    for i in range(50):
        assert bulk[i].tobytes() == qdrant.stored_vector(v, vecs[i]).tobytes(), i
    stored = [qdrant.Point(p.id, p.payload, qdrant.stored_vector(v, p.vector)) for p in pts]
    assert qdrant.RangeSum.of_batch(pts, bulk) == qdrant.RangeSum.of(stored)
    assert qdrant.RangeSum.of_batch(stored) == qdrant.RangeSum.of(stored)
    stored[7] = qdrant.Point("7", {**stored[7].payload, "n": 0.7}, stored[7].vector)
    assert qdrant.RangeSum.of_batch(stored) != qdrant.RangeSum.of_batch(pts, bulk)
