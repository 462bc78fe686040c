"""retrieval_gate: pass / wait / fail from the last shadow reads in the target ledger."""
from __future__ import annotations

import datetime as dt
import time

import psycopg

from .. import db, ledger
from ..spec import QDRANT_DISTANCE, MigrationSpec
from ..stores import search as search_store
from ..stores import vector as vector_store
from .scores import CHAOTIC, CONVERGENT, DIVERGENT, NOISE, SPLIT
from .shadow import ensure_shadow_table, shadow_reads

_OVER_SINCE = "delta_s_over_escalate_since"


def _r(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def _failing_queries(conn: psycopg.Connection, spec: MigrationSpec, run_id: str) -> list[str]:
    """Every (store, query) that is not → or drifted beyond delta_s_max in some seed, with its values."""
    rows = conn.execute(
        """SELECT store, query_id, seed, delta_s_pre, delta_s_post, drift, overlap, lambda, error
           FROM dbguard.shadow_reads
           WHERE run_id = %s AND seed <> 0 AND (lambda NOT IN ('→', '~') OR abs(coalesce(drift, 0)) > %s)
           ORDER BY store, query_id, seed""",
        (run_id, spec.gates.delta_s_max)).fetchall()

    def f(x):
        return "n/a" if x is None else f"{x:.4f}"

    grouped: dict[tuple[str, str], list[str]] = {}
    worst: dict[tuple[str, str], float] = {}
    for store, qid, seed, a, b, d, ov, lam, err in rows:
        grouped.setdefault((store, qid), []).append(
            f"seed {seed}: λ {lam}, overlap@{spec.retrieval.k} {ov:.2f}, ΔS pre {f(a)} post {f(b)} drift {f(d)}"
            + (f", error: {err}" if err else ""))
        worst[(store, qid)] = max(worst.get((store, qid), 0.0), abs(d or 0.0))
    order = sorted(grouped, key=lambda key: (key[0], -worst[key], key[1]))
    return [f"{store} {qid}: " + "; ".join(grouped[(store, qid)]) for store, qid in order]


def retrieval_gate(spec: MigrationSpec, run_id: str, *, first_seen_at: dt.datetime | None,
                   now: dt.datetime) -> tuple[str, str]:
    """("pass" | "wait" | "fail", message) from the last shadow reads in the target ledger.

    pass: delta_s_diff ≤ delta_s_max, λ convergent for every seed, latency p95 within bound.
    fail: any ×; a store without usable gold queries; drift > delta_s_escalate for longer than
    escalate_after_minutes (counted from the first gate call that saw it, kept in the ledger and
    cleared when drift drops); a quality problem that the last re-measurement reproduced exactly
    (same fingerprint twice: waiting cannot help); or no pass within
    retrieval.gate_timeout_minutes of `first_seen_at` (the sensor's first poke; None = now).
    wait: anything else (the sensor re-measures and asks again).
    """
    g = spec.gates
    with db.target(spec) as conn:
        ensure_shadow_table(conn)
        m = ledger.metrics(conn, run_id)
        if m.get("delta_s_diff") is None and m.get("lambda_state") is None:
            return "wait", "no shadow reads measured yet for this run"
        drift, seeds = m.get("delta_s_diff"), list(spec.retrieval.seeds)
        seed_states = {s: m.get(f"lambda_state_seed_{s}") for s in seeds}
        chaotic = [s for s, st in seed_states.items() if st == "chaotic"]
        problems: list[str] = []
        if drift is not None and drift > g.delta_s_max:
            problems.append(f"delta_s_diff {drift:.4f} > delta_s_max {g.delta_s_max} "
                            f"(p95 {m.get('delta_s_diff_p95') or 0:.4f})")
        for s, st in seed_states.items():
            if st != "convergent":
                problems.append(f"lambda_state for seed {s} is {st}")
        for store, per_seed in sorted((m.get("stores") or {}).items()):
            for seed_key, v in sorted(per_seed.items()):
                d = v.get("delta_s_diff")
                if v.get("lambda_state") != "convergent" or (d is not None and d > g.delta_s_max):
                    c = v.get("lambda_counts") or {}
                    problems.append(f"{store} {seed_key.replace('_', ' ')}: lambda_state {v.get('lambda_state')} "
                                    f"(→ {c.get(CONVERGENT, 0)}, <> {c.get(SPLIT, 0)}, ← {c.get(DIVERGENT, 0)}, "
                                    f"× {c.get(CHAOTIC, 0)}, ~ {c.get(NOISE, 0)}), delta_s_diff {d if d is None else round(d, 4)}")
        change, pre_ms, post_ms = m.get("latency_p95_change"), m.get("latency_p95_pre_ms"), m.get("latency_p95_post_ms")
        if change is not None and change > g.latency_p95_change and \
                (post_ms - pre_ms) > spec.retrieval.latency_floor_ms:
            problems.append(f"latency p95 {pre_ms:.2f} ms -> {post_ms:.2f} ms ({change:+.0%}) exceeds "
                            f"+{g.latency_p95_change:.0%}")
        over = drift is not None and drift > g.delta_s_escalate
        since = m.get(_OVER_SINCE)
        if over and since is None:
            since = now.isoformat()
            ledger.set_metric(conn, run_id, spec.name, _OVER_SINCE, since)
        elif not over and since is not None:
            conn.execute("DELETE FROM dbguard.metrics WHERE run_id = %s AND name = %s", (run_id, _OVER_SINCE))
            conn.commit()
            since = None
        summary = (f"delta_s_diff {drift if drift is None else round(drift, 4)} (max {g.delta_s_max}, escalate "
                   f"{g.delta_s_escalate}), lambda_state {m.get('lambda_state')} "
                   f"({', '.join(f'seed {s}: {st}' for s, st in seed_states.items())}), "
                   f"~ (index noise) {m.get('lambda_noise', 0)}, recall pre {_r(m.get('recall_pre'))} post "
                   f"{_r(m.get('recall_post'))} (tolerance {spec.retrieval.recall_tolerance}), noise floor "
                   f"{m.get('noise_floor')}")
        if m.get("unmeasured_stores"):
            return _fail(conn, spec, run_id, "unmeasured", (
                f"retrieval gate failed: no usable gold query for store(s) {m['unmeasured_stores']}: "
                "a vector store needs gold vectors of its dimension, a search store gold text; "
                f"extend {spec.gold}"))
        if not problems:
            return "pass", "retrieval gate passed: " + summary
        window = dt.timedelta(minutes=g.escalate_after_minutes)
        elapsed = now - dt.datetime.fromisoformat(since) if since else None
        failing = _failing_queries(conn, spec, run_id)
        detail = "\n".join(["  - " + p for p in problems] + ["failing queries:"] + ["  " + q for q in failing])
        if chaotic:
            return _fail(conn, spec, run_id, "chaotic", (
                f"retrieval gate failed: × (chaotic, no overlap at all) for seed(s) {chaotic}; likely cause: "
                f"{'; '.join(diagnosis(spec, m))}; {summary}\n{detail}"))
        waited = now - first_seen_at if first_seen_at else dt.timedelta(0)
        timeout = dt.timedelta(minutes=spec.retrieval.gate_timeout_minutes)
        if elapsed is not None and elapsed >= window:
            return _fail(conn, spec, run_id, "escalation", (
                f"retrieval gate failed (escalation): delta_s_diff {drift:.4f} has stayed above delta_s_escalate "
                f"{g.delta_s_escalate} for {elapsed.total_seconds() / 60:.1f} min (window "
                f"{g.escalate_after_minutes} min); {summary}\n{detail}"))
        quality = [p for p in problems if not p.startswith("latency")]
        fp, prev = m.get("shadow_reads_fingerprint"), m.get("shadow_reads_previous_fingerprint")
        if quality and fp is not None and fp == prev:
            return _fail(conn, spec, run_id, "unfixable", (
                f"retrieval gate failed: re-measuring gave exactly the same results ({m.get('shadow_reads_measurements')} "
                f"measurements: same top-k lists, λ classes and ΔS for every query), so waiting cannot help; "
                f"likely cause: {'; '.join(diagnosis(spec, m))}; {summary}\n{detail}"))
        if waited >= timeout:
            return _fail(conn, spec, run_id, "timeout", (
                f"retrieval gate failed: no pass within gate_timeout_minutes {spec.retrieval.gate_timeout_minutes} "
                f"(waited {waited.total_seconds() / 60:.1f} min); {summary}\n{detail}"))
        return "wait", f"retrieval gate waiting (re-measuring): {summary}\n{detail}"


def _fail(conn: psycopg.Connection, spec: MigrationSpec, run_id: str, reason: str, message: str) -> tuple[str, str]:
    """A fail verdict, with its reason in the ledger (`retrieval_gate_failure`: chaotic | escalation |
    unfixable | timeout | unmeasured) for failure routing and the incident note."""
    ledger.set_metric(conn, run_id, spec.name, "retrieval_gate_failure", reason)
    return "fail", message


def diagnosis(spec: MigrationSpec, m: dict) -> list[str]:
    """What the spec changes between the sides of each failing store (analyzer, metric, normalisation),
    with the recall that shows it; or, when nothing changes, where else to look."""
    failing = {store for store, per_seed in (m.get("stores") or {}).items()
               if any(v.get("lambda_state") != "convergent" or (v.get("delta_s_diff") or 0) > spec.gates.delta_s_max
                      for v in per_seed.values())}
    out = []
    for t, st in search_store.stores(spec):
        if search_store.label(t, st) in failing and st.source_config != st.config:
            out.append(f"{search_store.label(t, st)}: the analyzer changes {st.source_config} -> {st.config} "
                       "(ANALYZER_CONF); full-text hits change with it")
    for t, v in vector_store.stores(spec):
        label = vector_store.label(t, v)
        if label not in failing:
            continue
        changes = []
        if v.source_metric != v.metric:
            where = f" (Qdrant distance {QDRANT_DISTANCE[v.metric]})" if v.qdrant is not None else ""
            changes.append(f"metric {v.source_metric} -> {v.metric}{where}")
        if v.source_normalized != v.target_normalized:
            changes.append(f"NORM {'l2' if v.source_normalized else 'none'} -> {'l2' if v.target_normalized else 'none'}")
        rp, rq = m.get("recall_pre"), m.get("recall_post")
        rec = f"; recall against exact search in the source's metric: pre {_r(rp)}, post {_r(rq)}"
        if changes:
            out.append(f"{label}: {', '.join(changes)}{rec} (the target ranks by something else)")
        else:
            out.append(f"{label}: metric and normalisation are the same on both sides{rec}; compare the index "
                       "parameters (ef_search, m, lists/probes) and the copied vectors")
    return out or [f"stores {sorted(failing)}: the spec declares the same configuration on both sides; compare "
                   "the target's indexes and data with the source's"]


def gate_poke(spec: MigrationSpec, run_id: str, *, first_seen_at: dt.datetime | None,
              now: dt.datetime) -> tuple[str, str]:
    """One poke of the retrieval gate sensor: judge the last shadow reads; on "wait", re-measure and
    judge the fresh numbers at once. So a mismatch that re-measuring reproduces exactly fails on the
    first poke, and an escalation window that has run out fails on the poke that sees it, not at the
    sensor's timeout."""
    status, message = retrieval_gate(spec, run_id, first_seen_at=first_seen_at, now=now)
    if status != "wait":
        return status, message
    t0 = time.monotonic()
    shadow_reads(spec, run_id)
    later = now + dt.timedelta(seconds=time.monotonic() - t0)
    return retrieval_gate(spec, run_id, first_seen_at=first_seen_at, now=later)


def next_poke_seconds(spec: MigrationSpec, run_id: str, *, now: dt.datetime, default: float) -> float:
    """How long the sensor should sleep before its next poke: `default`, or less when an escalation
    streak's window runs out sooner, so the escalation fails when its condition is met (to within
    a second), not up to a poke interval later."""
    with db.target(spec) as conn:
        ledger.ensure(conn)
        since = ledger.metrics(conn, run_id).get(_OVER_SINCE)
    if since is None:
        return default
    deadline = dt.datetime.fromisoformat(since) + dt.timedelta(minutes=spec.gates.escalate_after_minutes)
    return max(1.0, min(default, (deadline - now).total_seconds()))
