"""retrieval_gate: pass / wait / fail from the last shadow reads in the target ledger."""
from __future__ import annotations

import datetime as dt

import psycopg

from .. import db, ledger
from ..spec import MigrationSpec
from .scores import CHAOTIC, CONVERGENT, DIVERGENT, NOISE, SPLIT
from .shadow import ensure_shadow_table

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
    cleared when drift drops); or no pass within retrieval.gate_timeout_minutes of
    `first_seen_at` (the sensor's first poke; None = now).
    wait: anything else (the sensor re-measures on its next poke).
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
            return "fail", (f"retrieval gate failed: no usable gold query for store(s) {m['unmeasured_stores']}: "
                            "a vector store needs gold vectors of its dimension, a search store gold text; "
                            f"extend {spec.gold}")
        if not problems:
            return "pass", "retrieval gate passed: " + summary
        window = dt.timedelta(minutes=g.escalate_after_minutes)
        elapsed = now - dt.datetime.fromisoformat(since) if since else None
        failing = _failing_queries(conn, spec, run_id)
        detail = "\n".join(["  - " + p for p in problems] + ["failing queries:"] + ["  " + q for q in failing])
        if chaotic:
            return "fail", (f"retrieval gate failed: × (chaotic, no overlap at all) for seed(s) {chaotic}; "
                            f"{summary}\n{detail}")
        waited = now - first_seen_at if first_seen_at else dt.timedelta(0)
        timeout = dt.timedelta(minutes=spec.retrieval.gate_timeout_minutes)
        if elapsed is not None and elapsed >= window:
            return "fail", (f"retrieval gate failed: delta_s_diff {drift:.4f} has stayed above delta_s_escalate "
                            f"{g.delta_s_escalate} for {elapsed.total_seconds() / 60:.1f} min (window "
                            f"{g.escalate_after_minutes} min); {summary}\n{detail}")
        if waited >= timeout:
            return "fail", (f"retrieval gate failed: no pass within gate_timeout_minutes "
                            f"{spec.retrieval.gate_timeout_minutes} (waited {waited.total_seconds() / 60:.1f} min); "
                            f"{summary}\n{detail}")
        return "wait", f"retrieval gate waiting (re-measuring): {summary}\n{detail}"
