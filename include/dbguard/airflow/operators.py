"""Thin operators: each loads the spec, calls one `dbguard.stages` function, returns its JSON value.

The run id is Airflow's `run_id`, so the ledger and the grid speak of the same run.
"""
from __future__ import annotations

import json
import logging
from typing import Any

from airflow.sdk import BaseOperator, SkipMixin
from airflow.sdk.exceptions import AirflowFailException

from .. import flow, incident, ledger, stages
from . import env
from .links import ReportLink

FAILED_STATES = {"failed", "upstream_failed"}
log = logging.getLogger(__name__)


def run_status(states: dict[str, str | None], *, dry_run: bool = False) -> str:
    """'failed' when any task failed (or could not run because one did), else 'success' ('dry_run')."""
    if any(s in FAILED_STATES for s in states.values()):
        return "failed"
    return "dry_run" if dry_run else "success"


def record_failure(context) -> None:
    """on_failure_callback of every stage task: its error becomes the run's `reason` (stages.record_task_failure);
    without it the result said "reason": null while only the Airflow log named the cause."""
    ti, error = context["ti"], context.get("exception")
    if ti.task_id == env.FINALIZE_TASK_ID or error is None:
        return
    try:
        spec = env.spec_at(context["task"].spec_path)
        stages.record_task_failure(spec, ti.run_id, ti.task_id, str(error) or type(error).__name__)
    except Exception as e:  # noqa: BLE001  the target may be what failed; the task log keeps the error
        log.warning("could not record the failure of %s in the ledger: %s", ti.task_id, e)


class StageOperator(BaseOperator):
    """Base: knows the spec path; subclasses call one stage. A failure is recorded as the run's reason."""

    ui_color = "#e8f0fe"

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        if not kwargs.get("on_failure_callback"):  # a mapped task's partial() passes []
            kwargs["on_failure_callback"] = record_failure
        super().__init__(**kwargs)
        self.spec_path = spec_path

    def spec(self):
        env.install_resolver()
        return env.spec_at(self.spec_path)


class PreflightOperator(StageOperator, SkipMixin):
    """Read-only checks, then target creation and schema freeze. With Param dry_run: checks only, then
    every later stage is skipped (release and finalize still run)."""

    def execute(self, context):
        dry_run = bool(context["params"].get("dry_run"))
        result = stages.preflight(self.spec(), context["run_id"], dry_run=dry_run)
        if dry_run:
            context["ti"].xcom_push(key="return_value", value=result)
            self.log.info("dry run: preflight checks done, skipping every later stage")
            self.skip(ti=context["ti"], tasks=self.get_direct_relatives(upstream=False))
        return result


class CaptureOnOperator(StageOperator):
    def execute(self, context):
        return stages.capture_on(self.spec(), context["run_id"])


class PlanRangesOperator(StageOperator):
    def __init__(self, *, table: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.table = table

    def execute(self, context):
        batch_rows = context["params"].get("batch_rows")
        return stages.plan_ranges(self.spec(), context["run_id"], self.table,
                                  batch_rows=int(batch_rows) if batch_rows else None)


class CopyRangeOperator(StageOperator):
    """One key range; mapped over plan_ranges' output (map_index_template shows its label)."""

    def __init__(self, *, krange: dict, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.krange = krange

    def execute(self, context):
        return stages.copy_range(self.spec(), context["run_id"], self.krange)


class ReconcileOperator(StageOperator):
    def execute(self, context):
        return stages.reconcile(self.spec(), context["run_id"])


class FinishSchemaOperator(StageOperator):
    """Foreign keys (validated) and the source's other indexes on the target, after the backfill."""

    def execute(self, context):
        return stages.finish_schema(self.spec(), context["run_id"])


class BuildIndexesOperator(StageOperator):
    def execute(self, context):
        return stages.build_indexes(self.spec(), context["run_id"])


class ShadowReadsOperator(StageOperator):
    def execute(self, context):
        return stages.shadow_reads(self.spec(), context["run_id"])


class ReleaseOperator(StageOperator):
    """Undo run-scoped holds (capture triggers after a last drain, schema freeze); runs whatever happened."""

    def execute(self, context):
        return stages.release(self.spec(), context["run_id"])


class FinalizeOperator(StageOperator):
    """Record the run's status, push the result dict, log it as one JSON line; fail the run if it failed."""

    operator_extra_links = (ReportLink(),)  # "dbguard report" button: the run's report in the UI plugin

    def execute(self, context):
        ti = context["ti"]
        states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
        states.pop(ti.task_id, None)
        spec, dry_run = self.spec(), bool(context["params"].get("dry_run"))
        if spec.run_cutover:  # cutover | rolled_back | aborted | failed | success | dry_run (dbguard.flow)
            status = flow.status(states, is_flipped=flow.flipped(spec, ti.run_id), dry_run=dry_run)
        else:
            status = run_status(states, dry_run=dry_run)
        result = stages.finalize(spec, context["run_id"], status)
        notes = incident.write(spec, context["run_id"], result)  # aborted / rolled_back / failed only
        if notes:
            result = {**result, **notes}
        ti.xcom_push(key=env.RESULT_XCOM_KEY, value=result)
        self.log.info("dbguard result: %s", ledger.result_line(result))
        if status in ("failed", "aborted", "rolled_back"):
            bad = sorted(t for t, s in states.items() if s in FAILED_STATES)
            raise AirflowFailException(f"migration {result.get('migration')!r} {status}; failed tasks: {json.dumps(bad)}")
        return result


class RollbackOperator(StageOperator):
    """The one task of the rollback DAG: abort a run (Params run_id, drop_target, repair_from_target)."""

    def execute(self, context):
        p = context["params"]
        # after a flip: cutover.rollback (resumes from its last checkpoint); before: abort as stages.rollback
        return flow.rollback(self.spec(), p.get("run_id") or None, drop_target=bool(p.get("drop_target")),
                             repair_from="target" if p.get("repair_from_target") else None)
