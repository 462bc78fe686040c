"""A Qdrant collection as the SOURCE (issue 17): Qdrant -> Qdrant (a new collection beside the live one,
swapped by alias) and Qdrant -> pgvector, on qdrant-client's local mode (in memory) and the embedded
PostgreSQL target: the spec and preflight refuse mistakes before anything is written, the collection's
configuration is recreated, every range is proven, an altered point is found and repaired, an
interrupted copy resumes, the alias swap and its rollback, the retrieval gate on both shapes."""
from __future__ import annotations

import os

import numpy as np
import pytest
from psycopg import sql

from dbguard import collection_stages as cs
from dbguard.errors import PreflightError, SpecError
from dbguard.spec import parse_spec
from dbguard.stores import qdrant, qdrant_clone, qdrant_payload, qdrant_source
from dbguard.stores.qdrant_book import COLLECTION as BOOK
from test_qdrant import PAYLOAD_TYPES
from test_vector_store import DIM, clustered, write_gold

LIVE, NEW = "items_live", "items_v2"


@pytest.fixture
def qd(monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_QDRANT_DEFAULT", "qdrant://?location=%3Amemory%3A")
    qdrant.close_all()
    yield qdrant.client("qdrant_default")
    qdrant.close_all()


def q2q(gold="g.jsonl", source=None, **target) -> dict:
    src = {"collection": LIVE, "alias": "items", "vector_name": "dense", "dim": DIM, "metric": "cosine",
           "batch_points": 50, **(source or {})}
    move = {"source": src, "qdrant": {"collection": NEW, **target.pop("qdrant", {})}, **target}
    return {"name": "q2q", "collections": [move], "gold": gold,
            "retrieval": {"k": 10, "recall_queries": 20, "latency_floor_ms": 10_000.0}}


def q2pg(payload, gold="g.jsonl", key_type="bigint", **kw) -> dict:
    move = {"source": {"collection": LIVE, "dim": DIM, "metric": "cosine", "batch_points": 50},
            "pgvector": {"schema": "vs", "table": "items", "key_type": key_type, "payload": payload}, **kw}
    return {"name": "q2pg", "target": {"conn_id": "dbguard_target"}, "collections": [move], "gold": gold,
            "retrieval": {"k": 10, "recall_queries": 20, "latency_floor_ms": 10_000.0}}


def live(c, vecs: np.ndarray, *, named=True, payload=None, ids=None, metric="Cosine", name=LIVE):
    """The live collection: a named dense vector with its own HNSW and quantization, a second dense vector
    and a sparse one (named=True); or one unnamed vector."""
    from qdrant_client import models as m

    d = m.Distance(metric)
    if named:
        cfg = {"dense": m.VectorParams(size=DIM, distance=d, hnsw_config=m.HnswConfigDiff(m=8, ef_construct=64),
                                       quantization_config=m.ScalarQuantization(scalar=m.ScalarQuantizationConfig(
                                           type=m.ScalarType.INT8, quantile=0.95))),
               "thumb": m.VectorParams(size=2, distance=m.Distance.DOT)}
        c.create_collection(name, vectors_config=cfg,
                            sparse_vectors_config={"kw": m.SparseVectorParams(modifier=m.Modifier.IDF)})
    else:
        c.create_collection(name, vectors_config=m.VectorParams(size=DIM, distance=d))
    ids = ids or list(range(1, len(vecs) + 1))
    pts = []
    for i, v in zip(ids, vecs):
        vec = ({"dense": v.tolist(), "thumb": [float(i), 0.5], "kw": m.SparseVector(indices=[i % 7 + 1, 0],
                                                                                     values=[0.5, 1.5])}
               if named else v.tolist())
        pts.append(m.PointStruct(id=i, vector=vec, payload=payload(i) if payload else {"title": f"item {i}"}))
    c.upsert(name, pts, wait=True)
    return ids


def run_to_reconcile(spec) -> dict:
    cs.preflight(spec, "r1")
    items = cs.plan_ranges(spec, "r1")
    for i in range(len(spec.collections)):
        cs.copy(spec, "r1", i)
    return {"ranges": items, "reconcile": cs.reconcile(spec, "r1")}


# ---- spec and preflight ------------------------------------------------------------------------

@pytest.mark.parametrize("edit, words", [
    (lambda d: d["collections"][0].update(pgvector={"table": "t"}), "give exactly one target"),
    (lambda d: d["collections"][0]["qdrant"].update(collection=LIVE), "is the source collection"),
    (lambda d: d["collections"][0]["qdrant"].update(drop_vectors=["dense"]), "drops the gated vector"),
    (lambda d: d["collections"][0]["source"].update(alias=LIVE), "is the collection's own name"),
    (lambda d: d["collections"][0].update(normalize=True) or d["collections"][0]["source"].update(normalized=True),
     "already"),
    (lambda d: d.update(tables=[{"name": "t", "key": ["id"]}]), "tables or Qdrant collections, not both"),
    (lambda d: d["collections"][0]["source"].update(metric="dot"), "'l2', 'cosine' or 'ip'"),
])
def test_spec_refuses_a_wrong_collection_move_naming_the_field(edit, words):
    d = q2q()
    edit(d)
    with pytest.raises(SpecError, match=words):
        parse_spec(d)


def test_spec_refuses_a_pgvector_target_without_a_database_and_an_unencodable_column():
    d = q2pg([{"name": "title", "type": "text"}])
    del d["target"]
    with pytest.raises(SpecError, match=r"collections\[0\]\.pgvector.*needs target"):
        parse_spec(d)
    with pytest.raises(SpecError, match="'interval', which has no exact payload encoding"):
        parse_spec(q2pg([{"name": "span", "type": "interval"}]))


def test_preflight_refuses_an_unknown_collection_a_wrong_dim_or_metric_and_infinite_vectors_before_writing(qd):
    with pytest.raises(PreflightError, match=r"source.collection 'items_live' does not exist"):
        cs.preflight(parse_spec(q2q()), "r")
    vecs = clustered(40, 1)
    vecs[7, 3] = np.inf  # Qdrant refuses NaN at write time (server and local mode), not infinity
    live(qd, vecs)
    with pytest.raises(PreflightError) as e:
        cs.preflight(parse_spec(q2q(source={"dim": DIM + 1, "metric": "l2"})), "r")
    assert "source.dim = 17 but 'items_live' holds vectors of size 16" in str(e.value)
    assert "source.metric = l2 (Euclid) but 'items_live' searches by Cosine; set source.metric: cosine" in str(e.value)
    with pytest.raises(PreflightError, match="point 8's vector 'dense' holds NaN or infinite components"):
        cs.preflight(parse_spec(q2q()), "r")
    assert not qd.collection_exists(NEW) and not qd.collection_exists(BOOK)  # nothing written


# ---- Qdrant -> Qdrant ----------------------------------------------------------------------------

def test_a_point_hashes_as_qdrant_point_hash_and_every_named_and_sparse_vector_counts():
    """One unnamed vector: exactly qdrant.point_hash (the pgvector -> Qdrant checksum); more vectors: each
    name, dense bytes and sparse indices and values change the hash."""
    v = clustered(1, 16)[0]
    assert qdrant_source.SPoint("7", {"a": 1}, {"": v}).digest() == qdrant.point_hash("7", {"a": 1}, v)
    sp = (np.array([1, 4], np.uint32), np.array([0.5, 0.25], np.float32))
    base = qdrant_source.SPoint("7", {"a": 1}, {"dense": v, "kw": sp}).digest()
    variants = [{"dense": v, "kw": (sp[0], np.array([0.5, 0.2500001], np.float32))},
                {"dense": v, "kw": (np.array([1, 5], np.uint32), sp[1])},
                {"other": v, "kw": sp}, {"dense": v}]
    assert all(qdrant_source.SPoint("7", {"a": 1}, x).digest() != base for x in variants)


def test_the_new_collection_recreates_named_and_sparse_vectors_and_per_vector_settings_except_the_changes(qd):
    live(qd, clustered(30, 2))
    spec = parse_spec(q2q(qdrant={"hnsw": {"m": 32}}, metric="ip"))
    cs.plan_ranges(spec, "r1")
    new = qd.get_collection(NEW).config.params
    dense, sparse = new.vectors, new.sparse_vectors
    assert set(dense) == {"dense", "thumb"} and sparse["kw"].modifier.value == "idf"
    assert dense["dense"].distance.value == "Dot" and dense["thumb"].distance.value == "Dot"  # the change
    assert dense["dense"].hnsw_config.m == 32 and dense["dense"].hnsw_config.ef_construct == 64  # m changed only
    assert dense["dense"].quantization_config.scalar.quantile == 0.95  # kept
    assert dense["thumb"].size == 2


def test_collection_level_hnsw_quantization_and_payload_indexes_are_recreated_as_a_server_reports_them(qd):
    """Local mode keeps no collection-level HNSW, quantization or payload index, so the source's info comes
    as a server answers GET /collections/{name}; the plan (what `create` sends and records) carries each."""
    from qdrant_client import models as m

    live(qd, clustered(10, 3))
    info = qd.get_collection(LIVE).model_dump(mode="json")
    info["config"]["hnsw_config"].update(m=24, ef_construct=300)
    info["config"]["quantization_config"] = {"product": {"compression": "x16", "always_ram": True}}
    info["payload_schema"] = {"title": {"data_type": "keyword", "points": 10},
                              "body": {"data_type": "text", "params": {"type": "text", "tokenizer": "word",
                                                                       "lowercase": True}, "points": 10},
                              "old": {"data_type": "integer", "points": 10}}
    info = m.CollectionInfo.model_validate(info)
    spec = parse_spec(q2q(qdrant={"hnsw": {"ef_construct": 400}, "payload_indexes": {"old": None, "at": "datetime"}}))
    p = qdrant_clone.plan(info, spec.collections[0])
    assert p["hnsw"]["m"] == 24 and p["hnsw"]["ef_construct"] == 400
    assert p["quantization"] == {"product": {"compression": "x16", "always_ram": True}}
    assert p["payload_indexes"] == {"at": "datetime", "body": {"type": "text", "tokenizer": "word", "lowercase": True},
                                    "title": "keyword"}
    qdrant_clone.create(qd, NEW, p, migration="q2q", source=LIVE)
    assert qdrant_clone.recorded_plan(qd, NEW)["plan"] == p


def test_q2q_copies_every_range_proven_and_an_altered_point_is_found_and_repaired(qd):
    live(qd, clustered(230, 4))
    spec = parse_spec(q2q())
    out = run_to_reconcile(spec)
    r = out["reconcile"][spec.collections[0].label]
    assert len(out["ranges"]) == 5 and r["checksum_ok"] and r["points"] == 230 and r["repaired"] == 0
    from qdrant_client import models as m

    rec = qd.retrieve(NEW, [17, 120], with_vectors=True, with_payload=True)
    v = list(rec[0].vector["dense"])
    v[3] += 0.25  # one vector component
    qd.update_vectors(NEW, [m.PointVectors(id=17, vector={"dense": v})], wait=True)
    qd.set_payload(NEW, {"title": "tampered"}, points=[120], wait=True)  # one payload field
    r2 = cs.reconcile(spec, "r2")[spec.collections[0].label]
    assert r2["differing"] == 2 and r2["repaired"] == 2 and r2["checksum_ok"]
    assert qd.retrieve(NEW, [120], with_payload=True)[0].payload["title"] == "item 120"
    assert cs.reconcile(spec, "r3")[spec.collections[0].label]["repaired"] == 0
    assert r2["index_hash"] == r["index_hash"]  # the repaired collection is the one the first reconcile proved


def test_a_cosine_collection_reconciles_without_bisecting_when_nothing_differs(qd):
    """The source's unit vectors are sent as they are and normalised once, by the store, so both sides'
    sums agree exactly and no range is bisected (normalising before sending made every range differ
    by an ulp and bisect down to its points: 111 s for 10,000 points)."""
    live(qd, clustered(400, 19))
    spec = parse_spec(q2q(source={"batch_points": 200}))
    r = run_to_reconcile(spec)["reconcile"][spec.collections[0].label]
    assert r["checksum_ok"] and r["bisected"] == 0 and r["checksum"] == r["source_checksum"], r


def test_an_interrupted_copy_resumes_at_the_first_range_not_recorded(qd):
    live(qd, clustered(260, 5))
    spec = parse_spec(q2q())
    cs.preflight(spec, "r1")
    assert len(cs.plan_ranges(spec, "r1")) == 6

    def die_after_two(i, r):
        if i == 1:
            raise KeyboardInterrupt("worker killed")
    with pytest.raises(KeyboardInterrupt):
        cs.copy(spec, "r1", 0, on_range=die_after_two)
    assert qd.count(NEW, exact=True).count == 100
    assert len(cs.plan_ranges(spec, "r2")) == 6  # a new run keeps the plan of the built collection
    again = cs.copy(spec, "r2", 0)
    assert again["skipped_ranges"] == 2 and again["copied_ranges"] == 4 and again["points"] == 160
    r = cs.reconcile(spec, "r2")[spec.collections[0].label]
    assert r["checksum_ok"] and r["points"] == 260 and r["repaired"] == 0


def test_a_copy_interrupted_on_persistent_local_mode_resumes_in_a_new_client(monkeypatch, tmp_path):
    """The bookkeeping and the new collection's recorded plan survive the client (a new worker process
    opens the directory again): the re-run copies only the ranges not recorded."""
    monkeypatch.delenv("AIRFLOW_CONN_QDRANT_DEFAULT", raising=False)
    monkeypatch.setenv("DBGUARD_QDRANT_DIR", str(tmp_path / "qd"))
    qdrant.close_all()
    try:
        live(qdrant.client("qdrant_default"), clustered(160, 17), named=False)
        spec = parse_spec(q2q(source={"vector_name": None, "alias": None}))
        cs.preflight(spec, "r1")
        cs.plan_ranges(spec, "r1")

        def die(i, r):
            if i == 0:
                raise KeyboardInterrupt("worker killed")
        with pytest.raises(KeyboardInterrupt):
            cs.copy(spec, "r1", 0, on_range=die)
        qdrant.close_all()  # the worker is gone
        cs.preflight(spec, "r2")  # the half-built collection is this migration's: not refused
        assert len(cs.plan_ranges(spec, "r2")) == 4
        again = cs.copy(spec, "r2", 0)
        assert again["skipped_ranges"] == 1 and again["copied_ranges"] == 3
        r = cs.reconcile(spec, "r2")[spec.collections[0].label]
        assert r["checksum_ok"] and r["points"] == 160 and r["repaired"] == 0
    finally:
        qdrant.close_all()


def test_q2q_payload_of_every_type_is_copied_exactly(qd):
    payload = {n: qdrant_payload.encoder(t)(v) for n, t, v in PAYLOAD_TYPES}
    live(qd, clustered(20, 18), payload=lambda i: {**payload, "title": f"item {i}"})
    spec = parse_spec(q2q())
    assert run_to_reconcile(spec)["reconcile"][spec.collections[0].label]["checksum_ok"]
    got = qd.retrieve(NEW, [9], with_payload=True)[0].payload
    assert qdrant_payload.canonical(got) == qdrant_payload.canonical({**payload, "title": "item 9"})


def test_alias_cutover_moves_readers_to_the_new_collection_and_rollback_moves_them_back(qd):
    live(qd, clustered(120, 6))
    qdrant.swap_alias(qd, "items", LIVE)
    spec = parse_spec(q2q(qdrant={"hnsw": {"m": 40}}))
    run_to_reconcile(spec)
    m_of = lambda: qd.get_collection("items").config.params.vectors["dense"].hnsw_config.m  # noqa: E731
    assert m_of() == 8  # readers on the live collection
    out = cs.cutover(spec, "r1")
    assert out["aliases"]["items"] == {"previous": LIVE, "current": NEW} and m_of() == 40
    assert qd.collection_exists(LIVE)  # kept until finish
    assert cs.rollback(spec)["items"]["state"] == "rolled_back" and m_of() == 8
    assert qdrant.alias_target(qd, "items") == LIVE and qd.count("items", exact=True).count == 120
    cs.cutover(spec, "r1")
    assert cs.finish(spec)["items"]["dropped"] == LIVE and not qd.collection_exists(LIVE) and m_of() == 40


@pytest.mark.parametrize("stamp", ["epoch", "rfc3339"])
def test_cutover_is_refused_when_the_source_was_written_after_reconcile(qd, stamp):
    import datetime as dt
    import time

    from qdrant_client import models as m

    at = (lambda t: t) if stamp == "epoch" else (  # noqa: E731
        lambda t: dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat().replace("+00:00", "Z"))
    live(qd, clustered(60, 7), payload=lambda i: {"title": f"item {i}", "updated": at(1.0)})
    spec = parse_spec(q2q(source={"updated_field": "updated"}))
    run_to_reconcile(spec)
    qd.set_payload(LIVE, {"updated": at(time.time() + 1)}, points=[5], wait=True)  # an update: the count stays
    with pytest.raises(cs.CollectionFailed, match="1 point\\(s\\) have updated after reconcile began"):
        cs.cutover(spec, "r1")
    qd.upsert(LIVE, [m.PointStruct(id=999, vector={"dense": [0.1] * DIM, "thumb": [1, 1]}, payload={})], wait=True)
    with pytest.raises(cs.CollectionFailed, match="holds 61 points, 60 when reconcile began"):
        cs.cutover(spec, "r1")
    assert qdrant.alias_target(qd, "items") is None  # not moved
    cs.reconcile(spec, "r2")  # the write copied: now it may cut over
    qd.set_payload(LIVE, {"updated": at(1.0)}, points=[5], wait=True)
    assert cs.cutover(spec, "r2")["aliases"]["items"]["current"] == NEW


def test_q2q_passes_the_retrieval_gate_and_a_dot_collection_on_raw_lengths_fails_it(qd, tmp_path):
    vecs = clustered(400, 8, norm_spread=0.9)
    live(qd, vecs, named=False, metric="Euclid")
    gold = write_gold(tmp_path / "g.jsonl", vecs[::23])
    good = parse_spec(q2q(gold=gold, source={"vector_name": None, "metric": "l2", "alias": None}))
    run_to_reconcile(good)
    m = cs.shadow_reads(good, "r1")
    assert m["lambda_state"] == "convergent" and m["delta_s_diff"] <= 0.02, m
    assert m["store_kinds"] == {good.collections[0].label: "qdrant → qdrant"}
    bad = parse_spec(q2q(gold=gold, source={"vector_name": None, "metric": "l2", "alias": None},
                         qdrant={"collection": "items_dot"}, metric="ip"))
    run_to_reconcile(bad)
    with pytest.raises(cs.CollectionFailed, match=r"likely cause: .*metric l2 -> ip \(Qdrant distance Dot\)"):
        cs.shadow_reads(bad, "r1")


# ---- Qdrant -> pgvector --------------------------------------------------------------------------

def test_q2pg_payload_of_every_supported_type_round_trips_into_typed_columns(dbpair, qd):
    """Payload values as pgvector -> Qdrant writes them (qdrant_payload encodings) land in typed columns
    holding the original values, and the proof reads them back through the same encoders."""
    import datetime as dt
    from decimal import Decimal

    types = [*PAYLOAD_TYPES, ("f_nan2", "double precision", float("nan"))]
    payload = {n: qdrant_payload.encoder(t)(v) for n, t, v in types}
    live(qd, clustered(3, 9), named=False, payload=lambda i: payload)
    spec = parse_spec(q2pg([{"name": n, "type": t} for n, t, _ in types]))
    r = run_to_reconcile(spec)["reconcile"][spec.collections[0].label]
    assert r["checksum_ok"] and r["points"] == 3
    with dbpair.tgt() as c:
        row = c.execute(sql.SQL("SELECT {} FROM vs.items WHERE id = 2").format(
            sql.SQL(", ").join(sql.Identifier(n) for n, _, _ in types))).fetchone()
    for (n, t, v), got in zip(types, row):
        if isinstance(v, float) and v != v:
            assert got != got, n
        else:
            assert got == v and type(got) is type(v), (n, t, got, v)
    assert isinstance(row[[n for n, *_ in types].index("num")], Decimal)
    assert row[[n for n, *_ in types].index("tstz")].tzinfo is not None and dt


def test_q2pg_an_altered_row_is_found_by_the_checksum_and_repaired(dbpair, qd):
    live(qd, clustered(150, 10), named=False, ids=[str(__import__("uuid").UUID(int=i * 7919 + 1)) for i in range(150)])
    spec = parse_spec(q2pg([{"name": "title", "type": "text"}], key_type="uuid"))
    run_to_reconcile(spec)
    with dbpair.tgt() as c:
        keys = [r[0] for r in c.execute("SELECT id FROM vs.items ORDER BY id LIMIT 2 OFFSET 70").fetchall()]
        c.execute("UPDATE vs.items SET embedding = (SELECT ('[' || array_to_string((embedding::real[])[1:3] || "
                  "((embedding::real[])[4] + 0.5)::real || (embedding::real[])[5:], ',') || ']')::vector) "
                  "WHERE id = %s", (keys[0],))
        c.execute("UPDATE vs.items SET title = 'tampered' WHERE id = %s", (keys[1],))
        c.execute("INSERT INTO vs.items (id, title, embedding) SELECT gen_random_uuid(), 'extra', embedding "
                  "FROM vs.items LIMIT 1")
    r = cs.reconcile(spec, "r2")[spec.collections[0].label]
    assert (r["differing"], r["extra"], r["repaired"], r["checksum_ok"]) == (2, 1, 3, True), r
    with dbpair.tgt() as c:
        assert c.execute("SELECT count(*), count(*) FILTER (WHERE title = 'tampered') FROM vs.items").fetchone() == (150, 0)


def test_q2pg_preflight_refuses_a_value_its_column_would_change_and_ids_of_the_other_kind(dbpair, qd):
    live(qd, clustered(5, 11), named=False, payload=lambda i: {"score": 0.123456789, "price": "0.7"})
    bad = parse_spec(q2pg([{"name": "score", "type": "real"}, {"name": "price", "type": "numeric(12,2)"}],
                          key_type="uuid"))
    with pytest.raises(PreflightError) as e:
        cs.preflight(bad, "r")
    msg = str(e.value)
    assert "payload 'score' = 0.123456789 is not an exact real" in msg and "payload 'price' = '0.7' is not an exact numeric" in msg
    assert "point id 1 does not fit pgvector.key_type uuid" in msg
    with dbpair.tgt() as c:
        assert c.execute("SELECT to_regclass('vs.items')").fetchone()[0] is None  # nothing written
    ok = parse_spec(q2pg([{"name": "score", "type": "double precision"}, {"name": "price", "type": "numeric"}]))
    assert run_to_reconcile(ok)["reconcile"][ok.collections[0].label]["checksum_ok"]


def test_q2pg_passes_the_retrieval_gate_on_both_stores(dbpair, qd, tmp_path):
    vecs = clustered(400, 12, norm_spread=0.9)
    live(qd, vecs, named=False)
    gold = write_gold(tmp_path / "g.jsonl", vecs[::23])
    spec = parse_spec(q2pg([{"name": "title", "type": "text"}], gold=gold))
    run_to_reconcile(spec)
    cs.build_pg_indexes(spec)
    m = cs.shadow_reads(spec, "r1")
    assert m["lambda_state"] == "convergent" and m["delta_s_diff"] <= 0.02, m
    assert m["recall_pre"] is not None and m["recall_post"] is not None
    assert m["store_kinds"] == {spec.collections[0].label: "qdrant → pgvector"}


# ---- the DAG --------------------------------------------------------------------------------------

def _dag_run(raw: dict, tmp_path, monkeypatch):
    """The spec's DAG from dags/ (DBGUARD_SPECS), through dag.test()."""
    import yaml

    from dbguard.airflow import env as afenv
    from test_dag import dagbag

    path = tmp_path / f"{raw['name']}.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    monkeypatch.setenv("DBGUARD_REPORT_DIR", str(tmp_path / "reports"))
    bag = dagbag()
    dag = bag.dags[f"dbguard_{raw['name']}"]
    run = dag.test()
    return bag, dag, run, afenv.run_result(run)


def test_q2q_dag_copies_gates_and_moves_the_alias_and_its_rollback_dag_moves_it_back(airflow_db, qd, tmp_path,
                                                                                      monkeypatch):
    vecs = clustered(300, 13, norm_spread=0.9)
    live(qd, vecs)
    qdrant.swap_alias(qd, "items", LIVE)
    raw = q2q(gold=write_gold(tmp_path / "g.jsonl", vecs[::23]), qdrant={"hnsw": {"m": 40}})
    raw.update(name="q2q_dag", run_cutover=True)
    bag, dag, run, result = _dag_run(raw, tmp_path, monkeypatch)
    assert {t.task_id for t in dag.tasks} == {"preflight", "plan_ranges", "copy_range", "reconcile", "shadow_reads",
                                              "cutover", "finalize"}  # no PostgreSQL capture, schema or table gates
    assert run.state == "success", result
    assert result["status"] == "cutover" and result["checksum_ok"] is True and result["migrated_rows"] == 300
    assert result["lambda_state"] == "convergent" and result["delta_s_diff"] <= 0.02 and result["points_per_s"]
    assert result["aliases"]["items"] == {"previous": LIVE, "current": NEW}
    assert qdrant.alias_target(qd, "items") == NEW and qd.collection_exists(LIVE)
    page = open(result["report"]).read()  # the stores side by side
    assert "qdrant <b>items_live</b> (cosine, 16)" in page and "qdrant <b>items_v2</b> (cosine)" in page
    back = bag.dags["dbguard_q2q_dag_rollback"].test()
    assert back.state == "success" and qdrant.alias_target(qd, "items") == LIVE


def test_q2pg_dag_copies_indexes_and_gates_and_a_failed_gate_fails_the_run_naming_the_metric(airflow_db, dbpair, qd,
                                                                                            tmp_path, monkeypatch):
    vecs = clustered(300, 14, norm_spread=0.9)
    live(qd, vecs, named=False)
    gold = write_gold(tmp_path / "g.jsonl", vecs[::23])
    raw = q2pg([{"name": "title", "type": "text"}], gold=gold)
    raw["name"] = "q2pg_dag"
    _, dag, run, result = _dag_run(raw, tmp_path, monkeypatch)
    assert "build_indexes" in {t.task_id for t in dag.tasks} and "cutover" not in {t.task_id for t in dag.tasks}
    assert run.state == "success", result
    assert result["target_store"] == "pgvector" and result["checksum_ok"] and result["migrated_rows"] == 300
    assert result["lambda_state"] == "convergent"
    with dbpair.tgt() as c:
        assert c.execute("SELECT count(*) FROM pg_indexes WHERE tablename = 'items' AND indexdef LIKE '%hnsw%'"
                         ).fetchone()[0] == 1
    # Euclid on raw lengths (a Cosine collection stores unit vectors, where ip ranks as cosine does)
    live(qd, vecs, named=False, metric="Euclid", name="items_l2")
    raw["name"] = "q2pg_dag_bad"
    raw["collections"][0].update(metric="ip")
    raw["collections"][0]["source"].update(collection="items_l2", metric="l2")
    raw["collections"][0]["pgvector"]["table"] = "items_ip"
    _, _, run, result = _dag_run(raw, tmp_path, monkeypatch)
    assert run.state == "failed" and result["status"] == "failed" and result["checksum_ok"] is True
    assert "metric l2 -> ip" in result["reason"], result["reason"]


def test_validate_names_each_collection_move_and_no_postgresql_connection(tmp_path, capsys):
    import yaml

    from dbguard import cli

    raw = q2q(gold=write_gold(tmp_path / "g.jsonl", clustered(3, 15)))
    path = tmp_path / "q2q.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert cli.main(["validate", str(path)]) == 0
    assert "collections: qdrant items_live -> qdrant items_v2" in capsys.readouterr().out


def test_dbguard_run_migrates_a_persistent_local_collection_and_moves_the_alias(airflow_db, tmp_path, monkeypatch):
    """`dbguard run` on a Qdrant -> Qdrant spec, in another process, on local mode under a directory:
    one JSON line, status cutover, the alias on the new collection."""
    import json
    import subprocess
    import sys

    import yaml

    qdir = tmp_path / "qd"
    monkeypatch.delenv("AIRFLOW_CONN_QDRANT_DEFAULT", raising=False)
    monkeypatch.setenv("DBGUARD_QDRANT_DIR", str(qdir))
    qdrant.close_all()
    vecs = clustered(200, 20, norm_spread=0.9)
    c = qdrant.client("qdrant_default")
    live(c, vecs)
    qdrant.swap_alias(c, "items", LIVE)
    qdrant.close_all()  # the directory's lock goes to the run
    raw = q2q(gold=write_gold(tmp_path / "g.jsonl", vecs[::19]))
    raw.update(name="q2q_cli", run_cutover=True)
    path = tmp_path / "q2q_cli.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "DBGUARD_REPORT_DIR": str(tmp_path / "reports")}
    proc = subprocess.run([sys.executable, "-m", "dbguard.cli", "run", str(path)], capture_output=True, text=True,
                          env=env, timeout=500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (result["status"], result["checksum_ok"], result["migrated_rows"]) == ("cutover", True, 200), result
    try:
        assert qdrant.alias_target(qdrant.client("qdrant_default"), "items") == NEW
    finally:
        qdrant.close_all()
