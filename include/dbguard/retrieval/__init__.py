"""Gold sets, shadow reads, ΔS, λ, latency and the retrieval gate (DESIGN.md: ΔS, λ).

ΔS = 1 − cos(I, G) for a retrieved item I and the anchor G (the gold answer's
embedding, else the query embedding); ΔS_side(q) is its mean over the side's
top-k. Per gold query and seed the post (target) top-k is compared with the pre
(source) top-k: overlap@k (distance-tolerant) and the ΔS drift give a λ class;
a seed is `convergent` when ≥ 80 % of queries are `→`, none `×`, ≤ 10 % `<>`.

Modules: `gold` (gold sets), `scores` (ΔS / overlap / λ math), `exact` (exact
top-k over streamed vectors, for the recall probes), `shadow` (measurement),
`gate` (the verdict), `manifest` (version pins, target checks, indexes).
Stage-shaped entry points: `preflight`, `check_target`, `scan_vectors`,
`build_indexes`, `shadow_reads`, `retrieval_gate`.
"""
from .gate import diagnosis, gate_poke, next_poke_seconds, retrieval_gate
from .gold import GoldQuery, GoldSetError, Paraphrase, gold_path, load_gold
from .manifest import build_indexes, check_target, manifest, preflight, scan_vectors, sync_collections
from .scores import (CHAOTIC, CONVERGENT, DIVERGENT, NOISE, SPLIT, STATES, delta_s, lambda_class, lambda_state,
                     overlap_at_k, p95, worst_state)
from .shadow import SHADOW_DDL, ensure_shadow_table, fingerprint, measure, record, shadow_reads, summarize

__all__ = ["CHAOTIC", "CONVERGENT", "DIVERGENT", "NOISE", "SPLIT", "STATES", "GoldQuery", "GoldSetError",
           "Paraphrase", "SHADOW_DDL", "build_indexes", "check_target", "delta_s", "diagnosis", "ensure_shadow_table",
           "fingerprint", "gate_poke", "gold_path", "lambda_class", "lambda_state", "load_gold", "manifest", "measure",
           "next_poke_seconds", "overlap_at_k", "p95", "preflight", "record", "retrieval_gate", "scan_vectors",
           "shadow_reads", "summarize", "sync_collections", "worst_state"]
