"""Thin tasks of a migration whose source is a Qdrant collection (dbguard.collection_stages): no
PostgreSQL capture, no schema work; the run's numbers travel as XCom.

    preflight -> plan_ranges -> copy_range.expand(crange) -> reconcile -> [build_indexes] -> shadow_reads
      -> [cutover: the alias] -> finalize
"""
from __future__ import annotations

import json
from typing import Any

from airflow.sdk import BaseOperator, SkipMixin
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from .. import collection_stages as cs
from ..errors import DbguardError
from ..ledger import result_line
from . import env

ERROR_XCOM_KEY = "dbguard_error"


class CollectionOperator(BaseOperator):
    """Knows the spec path; `run(spec, context)` calls one stage. A dbguard error fails the task without
    retries and is kept as XCom `dbguard_error`, so finalize can name it as the run's reason."""

    ui_color = "#e6f4ea"

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.spec_path = spec_path

    def execute(self, context):
        env.install_resolver()
        spec = env.spec_at(self.spec_path)
        try:
            return self.run(spec, context)
        except DbguardError as e:
            context["ti"].xcom_push(key=ERROR_XCOM_KEY, value=f"{self.task_id}: {e}")
            raise AirflowFailException(str(e)) from e

    def run(self, spec, context):
        raise NotImplementedError


class CollectionPreflight(CollectionOperator, SkipMixin):
    """Reads only. With Param dry_run every later stage is skipped (finalize still runs)."""

    def run(self, spec, context):
        result = cs.preflight(spec, context["run_id"])
        if context["params"].get("dry_run"):
            context["ti"].xcom_push(key="return_value", value=result)
            self.skip(ti=context["ti"], tasks=self.get_direct_relatives(upstream=False))
        return result


class CollectionPlan(CollectionOperator):
    def run(self, spec, context):
        return cs.plan_ranges(spec, context["run_id"])


class CollectionCopyRange(CollectionOperator):
    """One id range (mapped over plan_ranges' output; map_index_template shows its label)."""

    def __init__(self, *, crange: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.crange = crange

    def run(self, spec, context):
        return cs.copy_range(spec, context["run_id"], self.crange)


class CollectionReconcile(CollectionOperator):
    def run(self, spec, context):
        return cs.reconcile(spec, context["run_id"])


class CollectionIndexes(CollectionOperator):
    def run(self, spec, context):
        cs.build_pg_indexes(spec)
        return {"built": [mv.label for mv in spec.collections if mv.pgvector is not None]}


class CollectionShadowReads(CollectionOperator):
    """Shadow reads of the gold set on both stores and the retrieval gate's verdict (fails the task)."""

    def run(self, spec, context):
        return cs.shadow_reads(spec, context["run_id"])


class CollectionCutover(CollectionOperator):
    def run(self, spec, context):
        if context["params"].get("skip_cutover"):
            raise AirflowSkipException("skip_cutover: copied and verified, the alias stays on the live collection")
        return cs.cutover(spec, context["run_id"])


class CollectionRollback(CollectionOperator):
    """The rollback DAG's task: each alias back to the collection it named before the cutover."""

    def run(self, spec, context):
        return cs.rollback(spec)


class CollectionFinish(CollectionOperator):
    """The finish DAG's task: drop the collections the aliases named before (rollback no longer offered)."""

    def run(self, spec, context):
        return cs.finish(spec)


class CollectionFinalize(CollectionOperator):
    """The run's result (XCom `dbguard_result`, one JSON line in the log); fails the run if a task failed."""

    def run(self, spec, context):
        ti = context["ti"]
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
        states.pop(ti.task_id, None)
        failed = sorted(t for t, s in states.items() if s in ("failed", "upstream_failed"))
        pull = lambda task, key="return_value": ti.xcom_pull(task_ids=task, key=key)  # noqa: E731
        errors = [e for t in sorted(states) for e in _as_list(pull(t, ERROR_XCOM_KEY)) if e]
        copies = _as_list(pull("copy_range"))
        status = "failed" if failed else ("cutover" if states.get("cutover") == "success" else
                                          "dry_run" if context["params"].get("dry_run") else "success")
        result = cs.finalize(spec, context["run_id"], status, {
            "reconcile": pull("reconcile"), "shadow_reads": pull("shadow_reads"), "cutover": pull("cutover"),
            "copy": [c for c in copies if isinstance(c, dict)], "reason": "\n".join(errors) or None})
        try:
            from ..report import collections as report

            result["report"] = str(report.write(spec, context["run_id"], result, pull("reconcile"),
                                                pull("shadow_reads")))
        except Exception as e:  # noqa: BLE001  the result line still goes out
            self.log.warning("could not write the report: %s", e)
        ti.xcom_push(key=env.RESULT_XCOM_KEY, value=result)
        self.log.info("dbguard result: %s", result_line(result))
        if failed:
            raise AirflowFailException(f"migration {spec.name!r} failed; failed tasks: {json.dumps(failed)}")
        return result


def _as_list(v) -> list:
    if v is None:
        return []
    return list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "LazyXComSequence" else [v]
