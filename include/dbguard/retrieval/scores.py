"""ΔS, overlap@k and λ: the math of the retrieval gate (pure, vectorised; DESIGN.md "ΔS", "λ")."""
from __future__ import annotations

import math
from typing import Iterable

import numpy as np

CONVERGENT, SPLIT, DIVERGENT, CHAOTIC = "→", "<>", "←", "×"
NOISE = "~"  # disjoint lists, but the target's recall against exact search is as good as the source's
STATES = ("convergent", "split", "divergent", "chaotic")  # best to worst

def delta_s(items: np.ndarray, anchor: np.ndarray) -> float:
    """Mean of 1 − cos(I, G) over the rows I of `items`; nan for no items. Zero vectors count as cos = 0."""
    items = np.asarray(items, dtype=np.float64).reshape(-1, np.asarray(anchor).shape[-1])
    if items.shape[0] == 0:
        return float("nan")
    g = np.asarray(anchor, dtype=np.float64)
    gn = np.linalg.norm(g)
    n = np.linalg.norm(items, axis=1)
    denom = n * gn
    cos = np.divide(items @ g, denom, out=np.zeros(items.shape[0]), where=denom > 0)
    return float(np.mean(1.0 - cos))


def overlap_at_k(pre_ids: list, pre_dist: Iterable[float] | None, post_ids: list, post_dist: Iterable[float] | None,
                 k: int, eps: float = 1e-3) -> float:
    """Share of the pre top-k that the post top-k reproduces, counting ties as ann-benchmarks does.

    A post item counts when its id is in the pre top-k, or when its distance is within
    `eps` of the pre top-k's largest distance (an equally close neighbour; distances must
    be comparable on both sides). Both empty: 1.0; pre non-empty, post empty: 0.0.
    """
    pre_ids, post_ids = list(pre_ids)[:k], list(post_ids)[:k]
    if not pre_ids:
        return 1.0 if not post_ids else 0.0
    pre_set = set(pre_ids)
    threshold = None
    if pre_dist is not None and post_dist is not None:
        pd = [d for d in list(pre_dist)[:k] if d is not None and not math.isnan(d)]
        threshold = max(pd) + eps if pd else None
    post_d = list(post_dist)[:k] if post_dist is not None else [None] * len(post_ids)
    hits = sum(1 for i, d in zip(post_ids, post_d)
               if i in pre_set or (threshold is not None and d is not None and d <= threshold))
    return min(hits, len(pre_ids)) / len(pre_ids)


def lambda_class(overlap: float, drift: float | None, post_ok: bool, threshold: float, *,
                 recall_pre: float | None = None, recall_post: float | None = None, tolerance: float = 0.1) -> str:
    """→ convergent, <> split, ← divergent (post returned nothing / errored / timed out), × chaotic,
    ~ index noise: no overlap, but post recall (against exact search) is within `tolerance` of pre
    recall, so the disjoint list is the ANN index's own miss, not the migration's. Without both
    recalls a disjoint list stays ×."""
    if not post_ok:
        return DIVERGENT
    if overlap <= 0.0:
        if recall_pre is not None and recall_post is not None and recall_post >= recall_pre - tolerance:
            return NOISE
        return CHAOTIC
    if overlap >= 0.8 and (drift is None or math.isnan(drift) or abs(drift) <= threshold):
        return CONVERGENT
    return SPLIT


def lambda_state(classes: Iterable[str]) -> str:
    """`convergent` when ≥ 80 % are →, no ×, and ≤ 10 % are <>; else the worst state present.
    `~` (index noise) is left out of the count: it is neither held against nor credited to the migration."""
    cs = [c for c in classes if c != NOISE]
    if not cs:
        return "divergent"
    n = len(cs)
    if cs.count(CHAOTIC):
        return "chaotic"
    if cs.count(CONVERGENT) >= 0.8 * n and cs.count(SPLIT) <= 0.1 * n:
        return "convergent"
    return "divergent" if cs.count(DIVERGENT) > cs.count(SPLIT) else "split"


def worst_state(states: Iterable[str]) -> str:
    return max(states, key=STATES.index, default="divergent")


def p95(values: Iterable[float]) -> float | None:
    v = [x for x in values if x is not None and not math.isnan(x)]
    return float(np.percentile(v, 95)) if v else None
