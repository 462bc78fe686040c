"""Vector and search stores: spec validation, transforms + checksums, version pins, source scans,
target checks, index builds, and retrieval on small synthetic stores (real PostgreSQL + pgvector)."""
from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from psycopg import sql

from dbguard import ledger, retrieval
from dbguard.errors import SpecError
from dbguard.spec import parse_spec
from dbguard.transforms import checksum_exprs
from test_retrieval import NO_LATENCY_FLOOR_MS, T0, simulate_backfill

DIM = 16


def spec_dict(col_type: str = f"vector({DIM})", gold: str = "g.jsonl", **store) -> dict:
    vs = {"column": "emb", "dim": DIM, "source_metric": "l2", "metric": "cosine", "normalize": True} | store
    return {"name": "vs", "source": {"conn_id": "dbguard_source"}, "target": {"conn_id": "dbguard_target"},
            "tables": [{"name": "items", "schema": "vs", "key": ["id"],
                        "columns": [{"name": "id", "type": "bigint", "nullable": False},
                                    {"name": "body", "type": "text"},
                                    {"name": "emb", "type": col_type, "target_type": f"vector({DIM})"}],
                        "vector": [vs]}],
            "gold": gold, "retrieval": {"k": 10, "recall_queries": 20, "latency_floor_ms": NO_LATENCY_FLOOR_MS}}


def vtext(v) -> str:
    return "[" + ",".join(repr(float(x)) for x in v) + "]"


def load_items(pair, vectors: np.ndarray, col_type: str = f"vector({DIM})", ids=None) -> None:
    ids = list(range(1, len(vectors) + 1)) if ids is None else ids
    with pair.src() as c:
        c.execute("CREATE EXTENSION IF NOT EXISTS vector")
        c.execute("CREATE SCHEMA IF NOT EXISTS vs")
        c.execute(sql.SQL("CREATE TABLE vs.items (id bigint PRIMARY KEY, body text, emb {})").format(sql.SQL(col_type)))
        with c.cursor().copy("COPY vs.items (id, body, emb) FROM STDIN") as cp:
            for i, v in zip(ids, vectors):
                cp.write_row((i, f"item {i}", vtext(v) if "vector" in col_type else "{" + vtext(v)[1:-1] + "}"))


def write_gold(path, queries: np.ndarray, anchors=None) -> str:
    with open(path, "w") as f:
        for i, q in enumerate(queries):
            line = {"id": f"q{i}", "vector": [float(x) for x in q]}
            if anchors is not None:
                line["anchor"] = [float(x) for x in anchors[i]]
            f.write(json.dumps(line) + "\n")
    return str(path)


def clustered(n: int, seed: int, norm_spread: float = 0.02, spread: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(20, DIM))
    v = centers[rng.integers(0, 20, n)] + spread * rng.normal(size=(n, DIM))
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return (v * (1 + norm_spread * rng.uniform(-1, 1, size=(n, 1)))).astype(np.float32)


# ---- spec ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, field, words", [
    ({"metric": "dot"}, "vector[emb].metric", "'l2', 'cosine' or 'ip'"),
    ({"index": {"type": "hnsw", "m": 1}}, "vector[emb].index", "index.m = 1 is out of range; pgvector accepts 2..100"),
    ({"index": {"type": "hnsw", "m": 32, "ef_construction": 40}}, "vector[emb].index", "must be >= 2 * m = 64"),
    ({"index": {"type": "ivfflat", "m": 8}}, "vector[emb].index", "ivfflat index does not take ['m']"),
    ({"dim": 8}, "tables[items]", "vector[0].dim = 8 but column 'emb' type is vector(16)"),
    ({"column": "body"}, "tables[items]", "has type 'text'; a vector store needs"),
])
def test_store_spec_errors_name_the_field(change, field, words):
    with pytest.raises(SpecError) as e:
        parse_spec(spec_dict(**change))
    assert any(field in f and words in msg for f, msg in e.value.problems), e.value.problems


def test_search_store_with_analyzer_change_needs_source_columns():
    raw = spec_dict()
    raw["tables"][0]["columns"].append({"name": "tsv", "type": "tsvector"})
    raw["tables"][0]["search"] = [{"column": "tsv", "source_config": "english", "config": "simple"}]
    with pytest.raises(SpecError, match="english -> simple.*list source_columns"):
        parse_spec(raw)
    raw["tables"][0]["search"][0]["source_columns"] = ["body"]
    assert parse_spec(raw).tables[0].search[0].config == "simple"
    del raw["gold"]
    with pytest.raises(SpecError, match="needs a gold set"):
        parse_spec(raw)


# ---- transform + checksum -----------------------------------------------------------------------

@pytest.mark.parametrize("col_type", [f"vector({DIM})", "real[]"])
def test_normalising_copy_checksums_equal_after_the_transform(dbpair, col_type):
    vecs = clustered(50, 1, norm_spread=0.5)
    load_items(dbpair, vecs, col_type)
    spec = parse_spec(spec_dict(col_type=col_type))
    simulate_backfill(spec, dbpair)
    t = spec.tables[0]
    col = t.column("emb")

    def sums(conn, side, schema_table):
        q = sql.SQL("SELECT id, {} FROM {} ORDER BY id").format(checksum_exprs(t, col, side, 1e-6)[0], schema_table)
        return conn.execute(q).fetchall()

    with dbpair.src() as s, dbpair.tgt() as g:
        src = sums(s, "source", sql.SQL("vs.items"))
        tgt = sums(g, "target", sql.SQL("vs.items"))
        assert src == tgt
        norms = [r[0] for r in g.execute("SELECT vector_norm(emb) FROM vs.items").fetchall()]
        assert np.allclose(norms, 1, atol=1e-5)
        # Without the transform the source would not match: the raw vectors are not unit length.
        raw = s.execute(sql.SQL("SELECT id, {} FROM vs.items ORDER BY id").format(
            checksum_exprs(t, col, "target", 1e-6)[0])).fetchall() if col_type.startswith("vector") else None
        if raw is not None:
            assert raw != tgt
        g.execute("UPDATE vs.items SET emb = l2_normalize(emb + %s::vector) WHERE id = 7",
                  (vtext(np.full(DIM, 1e-3)),))
        assert sums(g, "target", sql.SQL("vs.items")) != src


# ---- version pins, source scan, target checks -------------------------------------------------------

def test_scan_finds_nan_null_zero_and_wrong_dimension_in_a_real_array_source(dbpair):
    vecs = clustered(10, 2)
    load_items(dbpair, vecs, "real[]")
    with dbpair.src() as c:
        c.execute("UPDATE vs.items SET emb[3] = 'NaN' WHERE id = 2")
        c.execute("UPDATE vs.items SET emb[1] = NULL WHERE id = 3")
        c.execute("UPDATE vs.items SET emb = array_fill(0::real, ARRAY[16]) WHERE id = 4")
        c.execute("UPDATE vs.items SET emb = emb[1:15] WHERE id = 5")
        c.commit()
        problems = retrieval.scan_vectors(parse_spec(spec_dict(col_type="real[]")), c)
    text = "\n".join(problems)
    assert "1 row(s) with NaN or infinite components" in text and "keys ['2']" in text
    assert "NULL components" in text and "keys ['3']" in text
    assert "zero vectors" in text and "keys ['4']" in text
    assert "wrong dimension" in text and "keys ['5']" in text
    assert all("source vs.items.emb" in p for p in problems)


def test_scan_finds_zero_vectors_in_a_vector_source_only_when_cosine_needs_them(dbpair):
    vecs = clustered(10, 3)
    vecs[6] = 0
    load_items(dbpair, vecs)
    with dbpair.src() as c:
        assert "keys ['7']" in "".join(retrieval.scan_vectors(parse_spec(spec_dict()), c))
        plain = parse_spec(spec_dict(metric="l2", normalize=False))
        assert retrieval.scan_vectors(plain, c) == []


def test_target_checks_name_both_values(dbpair):
    spec = parse_spec(spec_dict())
    with dbpair.tgt() as c:
        c.execute("CREATE EXTENSION vector")
        c.execute("CREATE SCHEMA vs")
        c.execute("CREATE TABLE vs.items (id bigint PRIMARY KEY, body text, emb vector(12))")
        c.execute("CREATE INDEX old_l2 ON vs.items USING hnsw (emb vector_l2_ops)")
        c.execute("INSERT INTO vs.items VALUES (1, 'x', array_fill(2::real, ARRAY[12])::vector)")
        c.commit()
        problems = retrieval.check_target(spec, c)
    text = "\n".join(problems)
    assert "target index old_l2 on vs.items.emb uses vector_l2_ops (l2) but the spec says cosine " \
           "(vector_cosine_ops)" in text
    assert "target column type is vector(12) but the spec says vector(16)" in text
    assert "not unit length but the spec says NORM l2" in text


def test_analyzer_mismatch_on_the_target_is_refused(dbpair):
    raw = spec_dict()
    raw["tables"][0]["columns"].append({"name": "tsv", "type": "tsvector"})
    raw["tables"][0]["search"] = [{"column": "tsv", "source_columns": ["body"], "config": "english"}]
    spec = parse_spec(raw)
    with dbpair.tgt() as c:
        c.execute("CREATE EXTENSION vector")
        c.execute("CREATE SCHEMA vs")
        c.execute("CREATE TABLE vs.items (id bigint PRIMARY KEY, body text, emb vector(16), tsv tsvector "
                  "GENERATED ALWAYS AS (to_tsvector('simple', coalesce(body, ''))) STORED)")
        c.execute("CREATE INDEX body_fts ON vs.items USING gin (to_tsvector('simple'::regconfig, body))")
        c.commit()
        text = "\n".join(retrieval.check_target(spec, c))
        assert "target generated column tsv on vs.items uses text-search configuration 'simple' but the spec " \
               "says 'english' (ANALYZER_CONF)" in text
        assert "target index body_fts on vs.items uses text-search configuration 'simple'" in text
    raw["tables"][0]["search"][0]["config"] = "klingon"
    raw["tables"][0]["search"][0]["source_config"] = "klingon"
    with dbpair.tgt() as c:
        assert "configuration 'klingon' (ANALYZER_CONF) does not exist on the target" in \
               "\n".join(retrieval.check_target(parse_spec(raw), c))


# ---- indexes ----------------------------------------------------------------------------------------

def test_index_build_is_idempotent_swaps_on_change_and_hashes_the_vectors(dbpair):
    load_items(dbpair, clustered(300, 4))
    spec = parse_spec(spec_dict())
    simulate_backfill(spec, dbpair)
    first = retrieval.build_indexes(spec, "r")
    assert first["indexes"][0] == {"index": "items_emb_hnsw_idx", "action": "created", "seconds": pytest.approx(
        first["indexes"][0]["seconds"])}
    again = retrieval.build_indexes(spec, "r")
    assert again["indexes"][0]["action"] == "kept" and again["index_hash"] == first["index_hash"]
    spec2 = parse_spec(spec_dict(index={"type": "hnsw", "m": 8, "ef_construction": 32}))
    swapped = retrieval.build_indexes(spec2, "r")
    assert swapped["indexes"][0]["action"] == "rebuilt"
    with dbpair.tgt() as c:
        idx = c.execute("SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = 'vs' AND indexdef LIKE "
                        "'%hnsw%'").fetchall()
        assert len(idx) == 1 and "vector_cosine_ops" in idx[0][1] and "m='8'" in idx[0][1]
        assert ledger.manifest(c, "vs", "r")["INDEX_HASH"] == swapped["index_hash"]["vs.items.emb"]
        assert swapped["index_hash"] != first["index_hash"]  # the manifest (index params) changed
        c.execute("UPDATE vs.items SET emb = l2_normalize(emb + emb) WHERE id = 1")  # same direction
        c.execute("UPDATE vs.items SET emb = l2_normalize(%s::vector) WHERE id = 2", (vtext(np.arange(1, 17)),))
        c.commit()
    assert retrieval.build_indexes(spec2, "r")["index_hash"] != swapped["index_hash"]


# ---- retrieval on synthetic stores --------------------------------------------------------------------

def test_hnsw_results_that_differ_between_builds_still_pass(dbpair, tmp_path):
    # Loose clusters: with tight, far-apart ones a sparse HNSW graph can miss a whole cluster
    # (zero overlap, ×): a real ANN failure that the gate is right to refuse.
    vecs = clustered(4000, 5, spread=1.0)
    order = np.random.default_rng(9).permutation(len(vecs))
    load_items(dbpair, vecs[order], ids=[int(i) + 1 for i in order])  # source built in another order
    idx = {"type": "hnsw", "m": 8, "ef_construction": 32, "ef_search": 16}
    near = vecs[::67] + 0.05 * np.random.default_rng(6).normal(size=(60, DIM)).astype(np.float32)
    gold = write_gold(tmp_path / "g.jsonl", near)
    spec = parse_spec(spec_dict(gold=gold, metric="l2", normalize=False, index=idx, source_index=idx))
    with dbpair.src() as c:
        c.execute("CREATE INDEX ON vs.items USING hnsw (emb vector_l2_ops) WITH (m = 8, ef_construction = 32)")
        c.commit()
    simulate_backfill(spec, dbpair)
    retrieval.build_indexes(spec, "h")
    m = retrieval.shadow_reads(spec, "h")
    with dbpair.tgt() as c:
        differ = c.execute("SELECT count(*) FROM dbguard.shadow_reads WHERE run_id = 'h' AND seed > 0 "
                           "AND NOT (pre_ids @> post_ids AND post_ids @> pre_ids)").fetchone()[0]
    print("queries whose top-k sets differ:", differ, "recall", m["recall_pre"], m["recall_post"])
    assert differ > 0, "the two HNSW builds returned identical sets; the test needs them to differ"
    status, msg = retrieval.retrieval_gate(spec, "h", first_seen_at=T0, now=T0)
    assert status == "pass", msg


def test_metric_mistake_inner_product_on_unnormalised_vectors_is_caught(dbpair, tmp_path):
    vecs = clustered(1500, 7, norm_spread=0.9)  # lengths from 0.1 to 1.9
    load_items(dbpair, vecs)
    queries = vecs[::37] / np.linalg.norm(vecs[::37], axis=1, keepdims=True)
    gold = write_gold(tmp_path / "g.jsonl", queries)
    good = parse_spec(spec_dict(gold=gold, metric="l2", normalize=False))
    bad = parse_spec(spec_dict(gold=gold, metric="ip", normalize=False))  # mistake: <#> on raw lengths
    simulate_backfill(bad, dbpair)
    retrieval.build_indexes(bad, "bad")
    m = retrieval.shadow_reads(bad, "bad")
    assert m["delta_s_diff"] > bad.gates.delta_s_max and m["lambda_state"] != "convergent", m
    status, msg = retrieval.retrieval_gate(bad, "bad", first_seen_at=T0, now=T0)
    assert status == "wait" and "vs.items.emb seed 1: lambda_state" in msg, msg
    later = T0 + dt.timedelta(minutes=bad.retrieval.gate_timeout_minutes)
    status, msg = retrieval.retrieval_gate(bad, "bad", first_seen_at=T0, now=later)
    assert status == "fail" and "vs.items.emb q" in msg, msg
    # Re-measuring reproduces it exactly: one sensor poke fails at once, naming the metric change, and
    # the recall against exact search in the source's metric shows the target ranking by something else.
    status, msg = retrieval.gate_poke(bad, "bad", first_seen_at=T0, now=T0)
    assert status == "fail" and "waiting cannot help" in msg, msg
    assert "vs.items.emb: metric l2 -> ip; recall against exact search in the source's metric: pre 1.000" in msg
    assert m["recall_post"] < m["recall_pre"] - bad.retrieval.recall_tolerance, m
    # The same data queried with the source's metric passes.
    retrieval.build_indexes(good, "good")
    assert retrieval.shadow_reads(good, "good")["lambda_state"] == "convergent"
