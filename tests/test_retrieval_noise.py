"""λ calibrated to the index's own noise (DESIGN.md "λ"): exact search over streamed vectors, the `~`
class, and HNSW noise told apart from a real mistake. Real PostgreSQL + pgvector, small sizes."""
from __future__ import annotations

import numpy as np
import pytest

from dbguard import retrieval
from dbguard.retrieval import CHAOTIC, CONVERGENT, NOISE, SPLIT, exact, lambda_class, lambda_state
from dbguard.spec import parse_spec
from test_retrieval import NO_LATENCY_FLOOR_MS, T0, simulate_backfill
from test_vector_store import DIM, load_items, spec_dict, write_gold


def test_disjoint_lists_are_noise_only_when_post_recall_holds():
    # Disjoint, post recall as good as pre (within the tolerance): the index's own miss, not the migration's.
    assert lambda_class(0.0, 0.0, True, 0.02, recall_pre=0.9, recall_post=0.85, tolerance=0.1) == NOISE
    assert lambda_class(0.0, 0.0, True, 0.02, recall_pre=0.0, recall_post=0.0, tolerance=0.1) == NOISE
    # Post recall fell by more than the tolerance: chaotic.
    assert lambda_class(0.0, 0.0, True, 0.02, recall_pre=0.9, recall_post=0.7, tolerance=0.1) == CHAOTIC
    assert lambda_class(0.0, 0.0, True, 0.02, recall_pre=1.0, recall_post=0.5, tolerance=0.6) == NOISE
    # Without a probe a disjoint list stays ×; recall does not touch lists that overlap.
    assert lambda_class(0.0, 0.0, True, 0.02) == CHAOTIC
    assert lambda_class(0.5, 0.0, True, 0.02, recall_pre=1.0, recall_post=1.0) == SPLIT
    # `~` is neither held against nor credited to the migration.
    assert lambda_state([CONVERGENT] * 8 + [NOISE] * 2) == "convergent"
    assert lambda_state([CONVERGENT] * 8 + [SPLIT] + [NOISE] * 30) == "split"   # 1 of 9 judged is <>
    assert lambda_state([NOISE] * 3 + [CHAOTIC]) == "chaotic"


@pytest.mark.parametrize("metric", ["l2", "cosine", "ip"])
def test_exact_top_k_over_streamed_chunks_equals_brute_force(dbpair, metric):
    rng = np.random.default_rng(11)
    vecs = (rng.normal(size=(503, DIM)) * rng.uniform(0.2, 2.0, size=(503, 1))).astype(np.float32)
    load_items(dbpair, vecs)
    with dbpair.src() as c:
        c.execute("UPDATE vs.items SET emb = NULL WHERE id = 5")   # NULL vectors are skipped
        c.commit()
    spec = parse_spec(spec_dict())
    t, v = spec.tables[0], spec.tables[0].vector[0]
    queries = rng.normal(size=(7, DIM)).astype(np.float32)
    with dbpair.src() as c:
        # 50-row chunks and a 10-row k: the running top-k is merged across 11 chunks.
        res = exact.top_k(c, t, v, "source", queries, metric, 10, chunk_rows=50)
    assert res.error is None and res.rows == 502
    keep = np.array([i != 4 for i in range(503)])
    ids = np.arange(1, 504)[keep]
    for qi, q in enumerate(queries):
        d = exact.distances(vecs[keep], q, metric)
        want = [str(i) for i in ids[np.argsort(d, kind="stable")[:10]]]
        assert res.ids[qi] == want, (metric, qi)
        assert np.allclose(res.dist[qi], np.sort(d)[:10], atol=1e-4)


def _noisy_store(pair, tmp_path, **store):
    """Tight, far-apart clusters of exactly k vectors and a very sparse HNSW graph (m 2): a search
    either finds its cluster (the whole top-k) or gets stuck in another one (a disjoint top-k). The source's graph is built over rows in
    another order than the target's, so each side misses its own queries: index noise. Far-apart
    clusters make one missed neighbour move ΔS by ~0.04, so this store's drift bound is 0.1."""
    rng = np.random.default_rng(21)
    centers = rng.normal(size=(200, DIM))
    vecs = np.repeat(centers, 10, axis=0) + 0.01 * rng.normal(size=(2000, DIM))   # clusters of exactly k
    vecs = (vecs / np.linalg.norm(vecs, axis=1, keepdims=True)).astype(np.float32)
    vecs *= rng.uniform(0.3, 1.7, size=(2000, 1)).astype(np.float32)   # raw lengths vary
    order = rng.permutation(len(vecs))
    load_items(pair, vecs[order], ids=[int(i) + 1 for i in order])
    idx = {"type": "hnsw", "m": 16, "ef_construction": 32, "ef_search": 1}
    gold = write_gold(tmp_path / "g.jsonl", vecs[::4] + 0.01 * rng.normal(size=(500, DIM)).astype(np.float32))
    spec = parse_spec(spec_dict(gold=gold, index=idx, source_index=idx, source_metric="cosine",
                                **{"metric": "ip", "normalize": True} | store)
                      | {"retrieval": {"k": 10, "recall_queries": None, "jitter_sigma": 0.0,
                                     "latency_floor_ms": NO_LATENCY_FLOOR_MS},
                         "gates": {"delta_s_max": 0.1, "delta_s_escalate": 0.5}})
    with pair.src() as c:
        c.execute("CREATE INDEX ON vs.items USING hnsw (emb vector_cosine_ops) WITH (m = 16, ef_construction = 32)")
        c.commit()
    simulate_backfill(spec, pair)
    return spec


def test_hnsw_noise_is_not_held_against_a_correct_migration(dbpair, tmp_path):
    spec = _noisy_store(dbpair, tmp_path)          # cosine on raw -> ip on normalised: the same ranking
    for attempt in range(3):  # HNSW builds are random: rebuild until the target misses some queries
        retrieval.build_indexes(spec, "noise")
        m = retrieval.shadow_reads(spec, "noise")
        if m["lambda_noise"]:
            break
        with dbpair.tgt() as c:
            c.execute("DROP INDEX vs.items_emb_hnsw_idx")
            c.commit()
    print({k: m[k] for k in ("lambda_state", "lambda_counts_seed_1", "lambda_noise", "recall_pre", "recall_post",
                             "noise_floor", "delta_s_diff")})
    # The premise: both indexes really miss (disjoint from exact search), and pre/post lists really are
    # disjoint for some queries. Without the recall probes each of these would be ×.
    assert m["noise_floor"]["disjoint_from_exact"] > 0, m["noise_floor"]
    assert m["lambda_noise"] > 0, m
    assert abs(m["recall_post"] - m["recall_pre"]) <= spec.retrieval.recall_tolerance
    assert all(m[f"lambda_counts_seed_{s}"][CHAOTIC] == 0 for s in (1, 2)), m
    assert m["lambda_state"] == "convergent", m
    status, msg = retrieval.retrieval_gate(spec, "noise", first_seen_at=T0, now=T0)
    assert status == "pass" and "~ (index noise)" in msg, msg


def test_a_real_mistake_on_the_same_noisy_index_still_fails(dbpair, tmp_path):
    spec = _noisy_store(dbpair, tmp_path, normalize=False)   # inner product on raw lengths: wrong metric
    retrieval.build_indexes(spec, "bad")
    m = retrieval.shadow_reads(spec, "bad")
    print({k: m[k] for k in ("lambda_state", "lambda_counts_seed_1", "lambda_noise", "recall_pre", "recall_post")})
    assert m["recall_post"] < m["recall_pre"] - spec.retrieval.recall_tolerance, m
    assert m["lambda_state"] != "convergent", m
    status, msg = retrieval.retrieval_gate(spec, "bad", first_seen_at=T0, now=T0)
    assert status in ("wait", "fail") and "vs.items.emb seed 1: lambda_state" in msg, msg


def test_exact_top_k_reads_a_real_array_source_and_composite_keys(dbpair):
    rng = np.random.default_rng(12)
    vecs = rng.normal(size=(120, DIM)).astype(np.float32)
    load_items(dbpair, vecs, "real[]")
    spec = parse_spec(spec_dict(col_type="real[]"))
    t, v = spec.tables[0], spec.tables[0].vector[0]
    q = rng.normal(size=(1, DIM)).astype(np.float32)
    with dbpair.src() as c:
        res = exact.top_k(c, t, v, "source", q, "cosine", 5, chunk_rows=16)
    want = [str(i + 1) for i in np.argsort(exact.distances(vecs, q[0], "cosine"), kind="stable")[:5]]
    assert res.error is None and res.ids[0] == want
    raw = spec_dict(col_type="real[]")
    raw["tables"][0]["key"] = ["id", "body"]
    with dbpair.src() as c:
        res = exact.top_k(c, parse_spec(raw).tables[0], v, "source", q, "cosine", 2)
    assert res.ids[0] == [f'[{w}, "item {w}"]' for w in want[:2]]
