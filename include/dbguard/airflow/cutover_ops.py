"""Thin tasks around the flip: wait_for_window, approval, cutover, tail, and the two undo tasks.

The decisions live in `dbguard.flow` (window verdict, soak, which undo runs, final status) and the
work in `dbguard.cutover`; these only hand Airflow's context to them.
"""
from __future__ import annotations

import datetime as dt
from typing import Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.providers.standard.triggers.temporal import DateTimeTrigger
from airflow.sdk.exceptions import AirflowFailException, AirflowSkipException

from .. import flow, stages
from . import env
from .operators import StageOperator, record_failure


def task_states(context) -> dict[str, str | None]:
    """Every other task's state in this run (task_id -> state), mapped tasks folded by the Task SDK."""
    ti = context["ti"]
    states = ti.get_task_states(dag_id=ti.dag_id, run_ids=[ti.run_id]).get(ti.run_id, {})
    states.pop(ti.task_id, None)
    return states


class WaitForWindowOperator(StageOperator):
    """Passes inside spec.window; outside it defers on a DateTimeTrigger until the next opening (no worker
    slot held; dag.test() runs the trigger in-process), or fails at once when that opening is after
    window_deadline_minutes. Param skip_cutover skips it and so the whole flip."""

    ui_color = "#fff4e5"

    def execute(self, context, waiting_since: str | None = None):
        if context["params"].get("skip_cutover"):
            raise AirflowSkipException("skip_cutover: this run copies and verifies, the source stays primary")
        spec = self.spec()
        since = dt.datetime.fromisoformat(waiting_since) if waiting_since else flow.utcnow()
        verdict, message, opening = flow.window_verdict(spec, flow.utcnow(), since)
        self.log.info("wait_for_window %s: %s", verdict, message)
        if verdict == "fail":
            stages.record_gate_failure(spec, context["run_id"], "wait_for_window", message)
            raise AirflowFailException(message)
        if verdict == "wait":
            flow.record_wait(spec, context["run_id"], message, opening)
            self.defer(trigger=DateTimeTrigger(moment=opening), method_name="execute_complete",
                       kwargs={"waiting_since": since.isoformat()})
        return {"window": message}

    def execute_complete(self, context, event: Any = None, waiting_since: str | None = None):
        return self.execute(context, waiting_since=waiting_since)  # re-check: DST or a clock skew


class Approval(ApprovalOperator):
    """The human step before the flip (spec approval: true). Run conf `approve` decides up front:
    true passes (dbguard run --approve), false fails without asking (the CLI never waits for a human);
    unset asks in the UI's Required Actions. Reject fails the task, so the run aborts before the flip."""

    def execute(self, context):
        approve = context["params"].get("approve")
        if approve is True:
            self.log.info("approved up front (run conf approve=true)")
            return {"chosen_options": [self.APPROVE], "by": "run conf"}
        if approve is False:
            spec = env.spec_at(self.spec_path)
            msg = ("approval: true in the spec and nobody approved: nothing was flipped; run "
                   "`dbguard run SPEC --approve` or approve the task in the Airflow UI")
            stages.record_gate_failure(spec, context["run_id"], "approval", msg)
            raise AirflowFailException(msg)
        return super().execute(context)

    def __init__(self, *, spec_path: str, **kwargs: Any) -> None:
        kwargs.setdefault("on_failure_callback", record_failure)  # rejected in the UI: the run's reason
        super().__init__(fail_on_reject=True, **kwargs)
        self.spec_path = spec_path


class CutoverOperator(StageOperator):
    """The flip: freeze, drain, verify, sequences, reverse capture, pointer, unfreeze (dbguard.cutover).
    On error the library has undone itself (the source stays primary) before raising."""

    ui_color = "#fde2e2"

    def execute(self, context):
        from .. import cutover

        step = flow.drill(context["dag_run"].conf, "cutover")  # run conf fail_at: cutover.<step> (a drill)
        return cutover.cutover(self.spec(), context["run_id"], **({"fail_at": step} if step else {}))


class TailOperator(StageOperator):
    def execute(self, context):
        spec = self.spec()
        if flow.drill(context["dag_run"].conf, "tail") is not None:
            msg = "drill: failure injected after the flip (run conf fail_at=tail); the rollback path runs"
            stages.record_gate_failure(spec, context["run_id"], "tail", msg)
            raise AirflowFailException(msg)
        return flow.tail(spec, context["run_id"])


class UndoOperator(StageOperator):
    """`rollback` or `release` (trigger rule all_done): runs when flow.needs_rollback / needs_release, else skips."""

    def __init__(self, *, action: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.action = action

    def execute(self, context):
        spec, run_id = self.spec(), context["run_id"]
        is_flipped = flow.flipped(spec, run_id)
        run = (flow.needs_release(is_flipped) if self.action == "release"
               else flow.needs_rollback(task_states(context), is_flipped))
        if not run:
            raise AirflowSkipException(f"{self.action} not needed (flipped: {is_flipped})")
        if self.action == "release":
            return stages.release(spec, run_id)
        return flow.rollback(spec, run_id)  # cutover.rollback after a flip; before it, the abort of stages.rollback


class FinishOperator(StageOperator):
    """The finish DAG's task: end the dual-write tail (reverse capture off); rollback is no longer offered."""

    def execute(self, context):
        from .. import cutover

        p = context["params"]
        return cutover.finish(self.spec(), p.get("run_id") or stages.latest_run(self.spec()),
                              force=bool(p.get("force")))

