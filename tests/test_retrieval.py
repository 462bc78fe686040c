"""Retrieval quality survives the migration: ΔS / λ math, gold sets, shadow reads and the gate.

Stores are real (two embedded PostgreSQL + pgvector servers). `simulate_backfill`
stands in for the backfill stage: it creates the target table from the spec and
copies every declared column through the declared transforms with COPY.
"""
from __future__ import annotations

import datetime as dt
import json
import math
from pathlib import Path

import numpy as np
import pytest
from psycopg import sql

from dbguard import corpus, ledger, retrieval
from dbguard.db import qname
from dbguard.retrieval import (CHAOTIC, CONVERGENT, DIVERGENT, SPLIT, GoldSetError, delta_s, lambda_class,
                               lambda_state, load_gold, overlap_at_k)
from dbguard.spec import MigrationSpec, load_spec, parse_spec
from dbguard.transforms import source_expr

ROOT = Path(__file__).resolve().parent.parent
T0 = dt.datetime(2026, 1, 1, 3, 0, tzinfo=dt.timezone.utc)


def simulate_backfill(spec: MigrationSpec, pair) -> None:
    """Create each target table from the spec and COPY source -> target through the declared transforms."""
    with pair.src() as src, pair.tgt() as tgt:
        tgt.execute("CREATE EXTENSION IF NOT EXISTS vector")
        for t in spec.tables:
            tgt.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(t.target_schema)))
            cols = sql.SQL(", ").join(sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.tgt_type))
                                      for c in t.columns)
            tgt.execute(sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY ({}))").format(
                qname(t.target_schema, t.target_name), cols, sql.SQL(", ").join(map(sql.Identifier, t.key))))
            select = sql.SQL("COPY (SELECT {} FROM {}) TO STDOUT").format(
                sql.SQL(", ").join(source_expr(t, c) for c in t.columns), qname(t.schema_, t.name))
            load = sql.SQL("COPY {} ({}) FROM STDIN").format(
                qname(t.target_schema, t.target_name), sql.SQL(", ").join(sql.Identifier(c.name) for c in t.columns))
            with src.cursor().copy(select) as out, tgt.cursor().copy(load) as into:
                for chunk in out:
                    into.write(chunk)
            tgt.execute(sql.SQL("ANALYZE {}").format(qname(t.target_schema, t.target_name)))
        tgt.commit()


# Latency is measured on a machine shared with other tests: a p95 slow-down of a few ms is load, not
# the migration. Tests that are not about latency judge it only above this floor.
NO_LATENCY_FLOOR_MS = 10_000.0


def demo_spec(name: str = "demo_docs", **changes) -> MigrationSpec:
    spec = load_spec(ROOT / "include" / "migrations" / f"{name}.yaml")
    raw = spec.model_dump(by_alias=True, exclude_none=True)
    raw["gold"] = str(ROOT / "include" / "gold" / "demo_docs.jsonl")
    raw["retrieval"]["latency_floor_ms"] = NO_LATENCY_FLOOR_MS
    for path, value in changes.items():
        node = raw
        *head, last = path.split("__")
        for h in head:
            node = node[int(h)] if isinstance(node, list) else node[h]
        node[last] = value
    return parse_spec(raw)


@pytest.fixture
def docs_pair(dbpair):
    corpus.load_docs(dbpair.source)
    return dbpair


# ---- ΔS and λ, by hand ------------------------------------------------------------------------

def test_delta_s_is_one_minus_cosine_averaged_over_items():
    anchor = np.array([1.0, 0.0])
    # cos = 1 (same direction, any length), 0 (orthogonal), -1 (opposite): ΔS 0, 1, 2 -> mean 1.0
    items = np.array([[3.0, 0.0], [0.0, 2.0], [-1.0, 0.0]])
    assert delta_s(items, anchor) == pytest.approx(1.0)
    # 45 degrees: 1 - 1/sqrt(2)
    assert delta_s(np.array([[1.0, 1.0]]), anchor) == pytest.approx(1 - 1 / math.sqrt(2))
    assert math.isnan(delta_s(np.zeros((0, 2)), anchor))
    # A zero item vector has no direction: counted as cos = 0.
    assert delta_s(np.array([[0.0, 0.0]]), anchor) == pytest.approx(1.0)


def test_delta_s_matches_pgvector_cosine_distance(dbpair):
    rng = np.random.default_rng(7)
    items, anchor = rng.normal(size=(5, 16)), rng.normal(size=16)
    lit = lambda v: "[" + ",".join(map(repr, v.tolist())) + "]"  # noqa: E731
    with dbpair.src() as c:
        c.execute("CREATE EXTENSION vector")
        d = [c.execute("SELECT %s::vector <=> %s::vector", (lit(i), lit(anchor))).fetchone()[0] for i in items]
    assert delta_s(items, anchor) == pytest.approx(float(np.mean(d)), abs=1e-6)


def test_overlap_counts_ids_and_distance_ties():
    assert overlap_at_k([1, 2, 3, 4], None, [4, 3, 2, 1], None, 4) == 1.0
    assert overlap_at_k([1, 2, 3, 4], None, [1, 2, 9, 8], None, 4) == 0.5
    # 9 is as close as the farthest pre item (a tie, ann-benchmarks style): it counts; 8 is farther.
    assert overlap_at_k([1, 2, 3, 4], [0.1, 0.2, 0.3, 0.4], [1, 2, 9, 8], [0.1, 0.2, 0.4, 0.5], 4) == 0.75
    assert overlap_at_k([1, 2], None, [], None, 2) == 0.0
    assert overlap_at_k([], None, [], None, 10) == 1.0
    assert overlap_at_k([1, 2, 3], None, [7, 8, 9], None, 3) == 0.0


def test_lambda_classes_and_state():
    assert lambda_class(0.9, 0.01, True, 0.02) == CONVERGENT
    assert lambda_class(0.9, -0.03, True, 0.02) == SPLIT      # overlap fine but meaning drifted
    assert lambda_class(0.5, 0.0, True, 0.02) == SPLIT
    assert lambda_class(0.0, 0.0, True, 0.02) == CHAOTIC
    assert lambda_class(1.0, 0.0, False, 0.02) == DIVERGENT
    assert lambda_state([CONVERGENT] * 9 + [SPLIT]) == "convergent"          # 90 % →, 10 % <>
    assert lambda_state([CONVERGENT] * 8 + [SPLIT] * 2) == "split"           # 20 % <>
    assert lambda_state([CONVERGENT] * 8 + [DIVERGENT] * 2) == "convergent"  # ≥ 80 % →, no ×, ≤ 10 % <>
    assert lambda_state([CONVERGENT] * 7 + [DIVERGENT] * 3) == "divergent"
    assert lambda_state([CONVERGENT] * 99 + [CHAOTIC]) == "chaotic"
    assert lambda_state([]) == "divergent"


# ---- gold sets ---------------------------------------------------------------------------------

@pytest.mark.parametrize("line, field", [
    ('{"id": "a", "vector": [1, 2]}', "'vector' has 2 dimensions"),
    ('{"id": "a", "vector": [0, 0, 0]}', "zero vector"),
    ('{"id": "a", "text": "x", "anchor": "no"}', "'anchor' must be a non-empty list"),
    ('{"id": "a"}', "give field 'text' or field 'vector'"),
    ('{"id": "a", "text": "x", "colour": 1}', "unknown field(s) ['colour']"),
    ('{"id": "a", "text": "x", "paraphrases": [{"lang": "en"}]}', "'paraphrases[0]'"),
    ('{"id": "a", "text": "x", "expected_ids": 5}', "'expected_ids' must be a list"),
    ('{"id": "a", "text": x}', "not valid JSON"),
])
def test_gold_set_errors_name_line_and_field(tmp_path, line, field):
    p = tmp_path / "gold.jsonl"
    p.write_text('{"id": "ok", "text": "fine", "vector": [1, 0, 0]}\n\n' + line + "\n")
    with pytest.raises(GoldSetError) as e:
        load_gold(p, dim=3)
    assert f"{p}:3:" in str(e.value) and field in str(e.value)


def test_gold_set_rejects_nan_and_repeated_ids(tmp_path):
    p = tmp_path / "g.jsonl"
    p.write_text('{"id": "a", "vector": [1, 0]}\n{"id": "a", "vector": [0, 1]}\n')
    with pytest.raises(GoldSetError, match=r":2: field 'id' 'a' repeats"):
        load_gold(p, dim=2)
    p.write_text('{"id": "a", "vector": [NaN, 1]}\n')
    with pytest.raises(GoldSetError, match=r":1: field 'vector' holds NaN"):
        load_gold(p, dim=2)


def test_demo_gold_set_loads_and_points_at_real_documents():
    gold = load_gold(ROOT / "include" / "gold" / "demo_docs.jsonl", dim=128)
    assert len(gold) >= 150
    assert all(q.text and q.anchor is not None and len(q.paraphrases) == 2 for q in gold)
    docs, emb = corpus.corpus()
    q = gold[0]
    doc = docs[int(q.expected_ids[0]) - 1]
    # The anchor is the gold answer's own vector (rounded to 5 decimals in the file).
    assert np.allclose(q.anchor, emb.doc_vectors[doc.id - 1], atol=1e-4)


# ---- the whole path on the demo store ------------------------------------------------------------

def test_demo_migration_passes_the_gate(docs_pair):
    spec = demo_spec()
    simulate_backfill(spec, docs_pair)
    assert retrieval.check_target(spec, docs_pair.tgt()) == []
    built = retrieval.build_indexes(spec, "r1")
    assert {i["action"] for i in built["indexes"]} == {"created"}
    m = retrieval.shadow_reads(spec, "r1")
    print(json.dumps(m, indent=1, default=str))
    assert m["delta_s_diff"] <= 0.02, m
    assert m["lambda_state"] == "convergent", m
    assert m["noise_floor"]["delta_s_diff"] == 0.0 and m["noise_floor"]["overlap"] == 1.0
    assert m["recall_post"] >= 0.9
    status, msg = retrieval.retrieval_gate(spec, "r1", first_seen_at=T0, now=T0)
    assert status == "pass", msg
    with docs_pair.tgt() as c:
        n = c.execute("SELECT count(*) FROM dbguard.shadow_reads WHERE run_id = 'r1'").fetchone()[0]
        pins = ledger.manifest(c, "demo_docs", "r1")
    assert n == 2 * 199 * 3  # two stores x gold queries x (A/A + two seeds)
    assert pins["metric"] == "cosine" and pins["NORM"] == "l2" and pins["ANALYZER_CONF"] == "english"
    assert len(pins["INDEX_HASH"]) == 32


def test_analyzer_mistake_english_to_simple_fails_the_gate_naming_queries(docs_pair):
    spec = demo_spec("demo_docs_bad_analyzer")
    simulate_backfill(spec, docs_pair)
    # The copy really rebuilt the tsvector with `simple` (stop words kept), as the spec says.
    with docs_pair.tgt() as c:
        assert c.execute("SELECT count(*) FROM docs.documents WHERE tsv @@ to_tsquery('simple', 'the')").fetchone()[0]
    retrieval.build_indexes(spec, "bad")
    m = retrieval.shadow_reads(spec, "bad")
    tsv, emb = m["stores"]["docs.documents.tsv"], m["stores"]["docs.documents.embedding"]
    # The search store is what broke; the vector store beside it still converges.
    assert all(tsv[s]["lambda_state"] != "convergent" for s in ("seed_1", "seed_2")), tsv
    assert tsv["seed_1"]["delta_s_diff"] > spec.gates.delta_s_max
    assert all(emb[s]["lambda_state"] == "convergent" for s in ("seed_1", "seed_2")), emb
    assert m["delta_s_diff"] > spec.gates.delta_s_max and m["lambda_state"] != "convergent"
    status, msg = retrieval.retrieval_gate(spec, "bad", first_seen_at=T0, now=T0)
    assert status == "wait", msg  # drift between delta_s_max and delta_s_escalate: re-measure
    later = T0 + dt.timedelta(minutes=spec.retrieval.gate_timeout_minutes)
    status, msg = retrieval.retrieval_gate(spec, "bad", first_seen_at=T0, now=later)
    print(msg[:2500])
    assert status == "fail"
    assert "no pass within gate_timeout_minutes" in msg
    assert "docs.documents.tsv seed 1: lambda_state" in msg
    with docs_pair.tgt() as c:
        bad = c.execute("SELECT DISTINCT query_id FROM dbguard.shadow_reads WHERE run_id = 'bad' AND seed > 0 "
                        "AND store = 'docs.documents.tsv' AND lambda <> '→'").fetchall()
    assert bad and all(f"docs.documents.tsv {q}:" in msg for (q,) in bad)  # every failing query is named
    assert "docs.documents.embedding q" not in msg or "embedding" in msg.split("failing queries:")[1]
    # Re-measuring reproduces exactly the same numbers: the sensor's poke re-measures once and fails
    # at once with the diagnosis, long before gate_timeout_minutes.
    status, msg = retrieval.gate_poke(spec, "bad", first_seen_at=T0, now=T0 + dt.timedelta(seconds=30))
    assert status == "fail", msg
    assert "re-measuring gave exactly the same results (2 measurements" in msg and "waiting cannot help" in msg
    assert "docs.documents.tsv: the analyzer changes english -> simple (ANALYZER_CONF)" in msg
    with docs_pair.tgt() as c:
        m2 = ledger.metrics(c, "bad")
    assert m2["retrieval_gate_failure"] == "unfixable"
    assert m2["shadow_reads_fingerprint"] == m2["shadow_reads_previous_fingerprint"]


def test_escalation_fails_on_the_poke_that_sees_the_window_run_out(docs_pair):
    # The analyzer mistake's drift (~0.04) is above a lowered delta_s_escalate: the streak starts at
    # the first verdict and the gate fails, as an escalation, on the first poke at the window's end.
    spec = demo_spec("demo_docs_bad_analyzer", gates__delta_s_escalate=0.03, gates__escalate_after_minutes=5)
    simulate_backfill(spec, docs_pair)
    retrieval.build_indexes(spec, "esc")
    m = retrieval.shadow_reads(spec, "esc")
    assert m["delta_s_diff"] > 0.03, m
    assert retrieval.retrieval_gate(spec, "esc", first_seen_at=T0, now=T0)[0] == "wait"
    status, msg = retrieval.gate_poke(spec, "esc", first_seen_at=T0, now=T0 + dt.timedelta(minutes=5))
    assert status == "fail" and msg.startswith("retrieval gate failed (escalation): delta_s_diff"), msg
    assert "stayed above delta_s_escalate 0.03 for 5.0 min (window 5.0 min)" in msg
    with docs_pair.tgt() as c:
        assert ledger.metrics(c, "esc")["retrieval_gate_failure"] == "escalation"


# ---- the gate, driven by ledger values --------------------------------------------------------

def _set(pair, run_id: str, **values) -> None:
    with pair.tgt() as c:
        ledger.ensure(c)
        for k, v in values.items():
            ledger.set_metric(c, run_id, "demo_docs", k, v)


def _healthy(**over):
    m = {"delta_s_diff": 0.01, "delta_s_diff_p95": 0.03, "lambda_state": "convergent",
         "lambda_state_seed_1": "convergent", "lambda_state_seed_2": "convergent",
         "latency_p95_pre_ms": 10.0, "latency_p95_post_ms": 10.5, "latency_p95_change": 0.05}
    return m | over


def test_gate_passes_waits_and_escalates_after_the_window(dbpair):
    spec = demo_spec()
    gate = lambda run, minutes, first=T0: retrieval.retrieval_gate(  # noqa: E731
        spec, run, first_seen_at=first, now=T0 + dt.timedelta(minutes=minutes))
    assert gate("none", 0) == ("wait", "no shadow reads measured yet for this run")
    _set(dbpair, "ok", **_healthy())
    assert gate("ok", 0)[0] == "pass"
    # Drift between delta_s_max and delta_s_escalate: keep re-measuring, even after the escalation window.
    _set(dbpair, "mid", **_healthy(delta_s_diff=0.03))
    status, msg = gate("mid", 30)
    assert status == "wait" and "delta_s_diff 0.0300 > delta_s_max 0.02" in msg
    # Above delta_s_escalate: wait inside the window, fail once it has lasted longer than 15 minutes.
    _set(dbpair, "high", **_healthy(delta_s_diff=0.07))
    assert gate("high", 0, first=None)[0] == "wait"      # first seen now: the streak starts at T0
    assert gate("high", 14, first=None)[0] == "wait"
    # The sensor sleeps less when the window runs out before its next poke (then fails on time).
    nxt = lambda run, minutes: retrieval.next_poke_seconds(  # noqa: E731
        spec, run, now=T0 + dt.timedelta(minutes=minutes), default=30.0)
    assert nxt("high", 14) == 30.0 and nxt("high", 14.9) == pytest.approx(6.0) and nxt("high", 16) == 1.0
    assert nxt("mid", 14.9) == 30.0                        # no streak: the spec's poke interval
    status, msg = gate("high", 15, first=None)
    assert status == "fail" and "stayed above delta_s_escalate 0.05 for 15.0 min" in msg
    # The streak resets when drift drops back below delta_s_escalate.
    _set(dbpair, "high", delta_s_diff=0.03)
    assert gate("high", 16, first=None)[0] == "wait"
    _set(dbpair, "high", delta_s_diff=0.07)
    assert gate("high", 20, first=None)[0] == "wait"      # a new streak, started at minute 20
    assert gate("high", 36, first=None)[0] == "fail"


def test_gate_fails_at_once_on_chaotic_and_waits_on_latency(dbpair):
    spec = demo_spec(retrieval__latency_floor_ms=2.0)
    _set(dbpair, "x", **_healthy(lambda_state="chaotic", lambda_state_seed_2="chaotic"))
    status, msg = retrieval.retrieval_gate(spec, "x", first_seen_at=T0, now=T0)
    assert status == "fail" and "× (chaotic, no overlap at all) for seed(s) [2]" in msg
    _set(dbpair, "slow", **_healthy(latency_p95_post_ms=14.0, latency_p95_change=0.4))
    status, msg = retrieval.retrieval_gate(spec, "slow", first_seen_at=T0, now=T0)
    assert status == "wait" and "latency p95 10.00 ms -> 14.00 ms (+40%) exceeds +15%" in msg
    # Sub-millisecond jitter on a fast store is noise, not a regression (latency_floor_ms).
    _set(dbpair, "fast", **_healthy(latency_p95_pre_ms=0.5, latency_p95_post_ms=0.8, latency_p95_change=0.6))
    assert retrieval.retrieval_gate(spec, "fast", first_seen_at=T0, now=T0)[0] == "pass"
    status, msg = retrieval.retrieval_gate(spec, "slow", first_seen_at=T0, now=T0 + dt.timedelta(minutes=60))
    assert status == "fail" and "no pass within gate_timeout_minutes 60" in msg
