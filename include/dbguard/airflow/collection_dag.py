"""The DAG of a spec whose source is a Qdrant collection (`collections:`): no PostgreSQL capture,
schema or table gates; the collection's own stages (dbguard.collection_stages), then finalize."""
from __future__ import annotations

import datetime as dt

from . import env
from .collection_ops import (CollectionCopyRange, CollectionCutover, CollectionFinalize, CollectionFinish,
                             CollectionIndexes, CollectionPlan, CollectionPreflight, CollectionReconcile,
                             CollectionRollback, CollectionShadowReads)


def has_alias(spec) -> bool:
    return any(mv.qdrant is not None and mv.source.alias for mv in spec.collections)


def stages(b) -> None:
    """preflight -> plan_ranges -> copy_range[range...] (pool-capped) -> reconcile -> [build_indexes]
    -> shadow_reads (the gate) -> [cutover: the alias, with run_cutover] -> finalize (all_done)."""
    s, path = b.spec, b.spec_path
    b.then(CollectionPreflight(task_id="preflight", spec_path=path, retries=0,
                               doc_md="Reads only: source collection, vector size and distance, the target free; "
                                      "one full read for missing or infinite vectors and payload values."))
    plan = CollectionPlan(task_id="plan_ranges", spec_path=path)
    b.then(plan)
    copy = CollectionCopyRange.partial(
        task_id="copy_range", spec_path=path, pool=env.pool_name(s), retries=s.backfill.retries,
        retry_delay=dt.timedelta(seconds=s.backfill.retry_delay_seconds), retry_exponential_backoff=True,
        map_index_template="{{ task.crange['label'] }}").expand(crange=plan.output)
    b.then(copy)
    b.then(CollectionReconcile(task_id="reconcile", spec_path=path, retries=0))
    if any(mv.pgvector is not None for mv in s.collections):
        b.then(CollectionIndexes(task_id="build_indexes", spec_path=path))
    b.then(CollectionShadowReads(task_id="shadow_reads", spec_path=path, retries=0,
                                 doc_md="The gold set on the source collection and on the target; the retrieval "
                                        "gate (delta_s_max, λ convergent on every seed) fails this task."))
    if s.run_cutover and has_alias(s):
        b.then(CollectionCutover(task_id="cutover", spec_path=path, retries=0,
                                 doc_md="Refused when the source was written after reconcile began; else each "
                                        "alias moves to its new collection in one update_collection_aliases "
                                        "request. Rollback: the rollback DAG; the old collection is kept until "
                                        "the finish DAG."))


def close(b) -> None:
    finalize = CollectionFinalize(task_id=env.FINALIZE_TASK_ID, spec_path=b.spec_path, trigger_rule="all_done",
                                  retries=0)
    for t in b.tail:
        t >> finalize


def doc_md(spec, path: str) -> str:
    rows = "\n".join(f"| `{mv.source.conn_id}` `{mv.source.collection}` | {mv.label.split(' -> ')[1]} | "
                     f"{mv.source.alias or '-'} |" for mv in spec.collections)
    return (f"# dbguard migration `{spec.name}` (Qdrant source)\n\n{spec.description}\n\nSpec: `{path}`.\n\n"
            f"| source | target | alias |\n|---|---|---|\n{rows}\n\nQdrant has no change capture: the "
            "application freezes writes to the source collection or writes both during the run.")


ROLLBACK = (CollectionRollback, "Moves each alias back to the collection it named before the cutover.")
FINISH = (CollectionFinish, "Drops the collections the aliases named before the cutover; rollback is no longer "
                            "offered.")
