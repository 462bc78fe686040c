"""One DAG per migration spec.

The DAG is a chain of stages, each added by one builder in `STAGES`:

    preflight -> capture_on -> backfill[table...] -> drain_changes -> reconcile -> finish_schema -> checksum_gate
      -> build_indexes -> shadow_reads -> retrieval_gate -> release -> finalize

With `run_cutover: true` (dbguard.flow):

    ... -> retrieval_gate -> wait_for_window -> soak -> [approval] -> cutover -> tail
      -> rollback (all_done) -> release (all_done) -> finalize

`rollback` runs cutover.rollback after a failure past the flip or a gate escalation; `release`
aborts cleanly for any other failure (and ends a run that did not flip). Two more DAGs per spec:
`dbguard_<name>_rollback` (Params run_id) and, with run_cutover, `dbguard_<name>_finish`.

A builder takes the `Build` and hangs its tasks after `build.tail`. A later
issue adds a stage by writing one builder and inserting it into `STAGES`
(capture_on after preflight, drain_changes after backfill, build_indexes /
shadow_reads / retrieval_gate after checksum_gate, cutover after those);
`release` and `finalize` always close the DAG and run whatever happened.
"""
from __future__ import annotations

import datetime as dt
import difflib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from airflow.sdk import DAG, Param, TaskGroup, chain

from ..errors import SpecError
from ..spec import MigrationSpec
from . import env
from .operators import (
    BuildIndexesOperator,
    CaptureOnOperator,
    CopyRangeOperator,
    FinalizeOperator,
    FinishSchemaOperator,
    PlanRangesOperator,
    PreflightOperator,
    ReconcileOperator,
    ReleaseOperator,
    RollbackOperator,
    ShadowReadsOperator,
)
from .cutover_ops import Approval, CutoverOperator, FinishOperator, TailOperator, UndoOperator, WaitForWindowOperator
from .retrieval_sensor import RetrievalGateSensor
from .sensors import GateSensor

START_DATE = dt.datetime(2024, 1, 1, tzinfo=dt.timezone.utc)


@dataclass
class Build:
    spec: MigrationSpec
    spec_path: str
    dag: DAG
    tail: list = field(default_factory=list)

    def then(self, node) -> None:
        """Chain `node` (a task or TaskGroup) after the current tail; it becomes the tail."""
        for t in self.tail:
            t >> node
        self.tail = [node]


StageBuilder = Callable[[Build], None]


def preflight(b: Build) -> None:
    b.then(PreflightOperator(task_id="preflight", spec_path=b.spec_path))


def capture_on(b: Build) -> None:
    """Dual writes: source triggers feed the change ledger from before the backfill's snapshots."""
    if b.spec.capture.enabled:
        b.then(CaptureOnOperator(task_id="capture_on", spec_path=b.spec_path))


def drain_changes(b: Build) -> None:
    """Apply what the application wrote during the backfill until the lag is within gates.max_lag_ops."""
    if b.spec.capture.enabled:
        b.then(GateSensor(task_id="drain_changes", spec_path=b.spec_path, gate="drain_gate",
                          timeout_minutes=b.spec.gates.checksum_timeout_minutes, poke_interval=2))


def backfill(b: Build) -> None:
    """One TaskGroup per table, parents before children: plan_ranges -> copy_range.expand(krange)."""
    bf = b.spec.backfill
    for table in b.spec.table_order():
        with TaskGroup(group_id=group_id(table.ref), tooltip=f"backfill {table.schema_}.{table.name}") as group:
            plan = PlanRangesOperator(task_id="plan_ranges", spec_path=b.spec_path, table=table.ref)
            CopyRangeOperator.partial(
                task_id="copy_range", spec_path=b.spec_path, pool=env.pool_name(b.spec),
                retries=bf.retries, retry_delay=dt.timedelta(seconds=bf.retry_delay_seconds),
                retry_exponential_backoff=True, max_retry_delay=dt.timedelta(seconds=bf.max_retry_delay_seconds),
                map_index_template="{{ task.krange['label'] }}",
            ).expand(krange=plan.output)
        b.then(group)


def group_id(name: str) -> str:
    """A TaskGroup id for a table: the name itself when Airflow accepts it, else a readable ASCII form
    plus a short hash (table names may be any identifier: "Order Items", unicode, quotes)."""
    import hashlib
    import re

    safe = re.sub(r"[^A-Za-z0-9_-]", "_", name)
    return safe if safe == name else f"{safe[:40]}_{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def reconcile(b: Build) -> None:
    b.then(ReconcileOperator(task_id="reconcile", spec_path=b.spec_path))


def finish_schema(b: Build) -> None:
    """Foreign keys (NOT VALID, then VALIDATE) and non-key indexes, once the data is in (target_schema)."""
    b.then(FinishSchemaOperator(task_id="finish_schema", spec_path=b.spec_path))


def checksum_gate(b: Build) -> None:
    b.then(GateSensor(task_id="checksum_gate", spec_path=b.spec_path, gate="checksum_gate",
                      timeout_minutes=b.spec.gates.checksum_timeout_minutes, poke_interval=5))


def retrieval_stages(b: Build) -> None:
    """Vector/search stores: indexes built offline on the verified target, then shadow reads of the gold
    set and the retrieval gate (re-measures while drift may still settle, fails on escalation)."""
    if not b.spec.has_stores:
        return
    b.then(BuildIndexesOperator(task_id="build_indexes", spec_path=b.spec_path))
    b.then(ShadowReadsOperator(task_id="shadow_reads", spec_path=b.spec_path))
    b.then(RetrievalGateSensor(task_id="retrieval_gate", spec_path=b.spec_path,
                               timeout_minutes=b.spec.retrieval.gate_timeout_minutes + 1,
                               poke_interval=b.spec.retrieval.poke_seconds))


def cutover_stages(b: Build) -> None:
    """spec.run_cutover: wait_for_window -> soak -> [approval] -> cutover -> tail (dbguard.flow decides the
    window, the soak and, in _close, which undo runs)."""
    s = b.spec
    if not s.run_cutover:
        return
    b.then(WaitForWindowOperator(task_id="wait_for_window", spec_path=b.spec_path, retries=0,
                                 doc_md="Passes inside `window`; defers until its next opening; fails at once "
                                        "when that is after `window_deadline_minutes`."))
    b.then(GateSensor(task_id="soak", spec_path=b.spec_path, gate="soak_gate",
                      timeout_minutes=s.soak_minutes + s.gates.checksum_timeout_minutes,
                      poke_interval=max(1.0, min(30.0, s.soak_minutes * 60 / 4)),
                      doc_md=f"Gates re-measured without a freeze, green for {s.soak_minutes:g} minute(s)."))
    if s.approval:
        b.then(Approval(task_id="approval", spec_path=b.spec_path, retries=0,
                        subject=f"Cut {s.name} over to {s.target.conn_id}?",
                        body=(f"dbguard migration `{s.name}`: gates green, soak done. Approve to flip the "
                              "application to the target (rollback stays possible for "
                              f"{s.rollback_ttl_minutes:g} minutes). Reject aborts the run."),
                        doc_md="Human approval of the flip (run conf approve=true approves up front)."))
    b.then(CutoverOperator(task_id="cutover", spec_path=b.spec_path, retries=0,
                           doc_md="The flip (dbguard.cutover): freeze, drain, verify, reverse capture, pointer."))
    b.then(TailOperator(task_id="tail", spec_path=b.spec_path, retries=0,
                        doc_md="Dual-write tail: the target is primary, reverse capture keeps the source current "
                               f"for rollback_ttl_minutes ({s.rollback_ttl_minutes:g}); then run the finish DAG."
                               + (" Readers search the Qdrant collection(s) now: this task carries the target's "
                                  "writes into them every 2 s until then (cutover.readers)."
                                  if any(v.qdrant for t in s.tables for v in t.vector) else "")))


STAGES: list[StageBuilder] = [preflight, capture_on, backfill, drain_changes, reconcile, finish_schema, checksum_gate,
                              retrieval_stages, cutover_stages]


def _close(b: Build) -> None:
    if b.spec.run_cutover:  # rollback after a failed flip or an escalation; release (abort) otherwise
        release = [UndoOperator(task_id="rollback", action="rollback", spec_path=b.spec_path, trigger_rule="all_done",
                                retries=0, doc_md="Runs cutover.rollback after a failure past the flip, or when a "
                                                  "gate escalated (checksum divergence, retrieval drift)."),
                   UndoOperator(task_id="release", action="release", spec_path=b.spec_path, trigger_rule="all_done",
                                doc_md="Aborts cleanly (capture off, freeze lifted) for a failure before the flip, "
                                       "or ends a run that did not cut over.")]
    else:
        release = [ReleaseOperator(task_id="release", spec_path=b.spec_path, trigger_rule="all_done")]
    finalize = FinalizeOperator(task_id=env.FINALIZE_TASK_ID, spec_path=b.spec_path, trigger_rule="all_done",
                                retries=0)
    chain(*b.tail, *release, finalize)


def _columns_md(t) -> str:
    """The column contract as the spec states it (the DAG is built without reading the source's catalog):
    every source column, with the declared ones counted and the excluded ones named."""
    out = "every source column" + (f" ({len(t.columns)} declared)" if t.columns else "")
    return out + (" except " + ", ".join(f"`{c}`" for c in t.exclude_columns) if t.exclude_columns else "")


def _doc_md(spec: MigrationSpec, path: str) -> str:
    rows = "\n".join(
        f"| `{t.schema_}.{t.name}` | `{t.target_schema}.{t.target_name}` | {', '.join(t.key)} | {_columns_md(t)} |"
        for t in spec.table_order())
    window = f"{spec.window.start}-{spec.window.end} {spec.window.timezone}" if spec.window else "none"
    return (f"# dbguard migration `{spec.name}`\n\n{spec.description}\n\n"
            f"Spec: `{path}`. Source `{spec.source.conn_id}` -> target `{spec.target.conn_id}`.\n\n"
            f"| source | target | key | columns |\n|---|---|---|---|\n{rows}\n\n"
            f"Backfill: {spec.backfill.batch_rows} rows per range, pool `{env.pool_name(spec)}` with "
            f"{spec.backfill.concurrency} slots, {spec.backfill.retries} retries. Window: {window}.\n\n"
            + (f"**Cutover** (`run_cutover`): `wait_for_window` (deadline: " + (
                f"{spec.window_deadline_minutes:g} min" if spec.window_deadline_minutes else "next opening")
               + f") -> `soak` ({spec.soak_minutes:g} min green)"
               + (" -> `approval` (human, or run conf approve)" if spec.approval else "")
               + " -> `cutover` -> `tail`; a failure after the flip or a gate escalation runs `rollback`, any other "
               "failure `release` (abort). Ends `cutover` | `rolled_back` | `aborted` | `failed`; end the tail with "
               f"`{spec.dag_id}_finish` after {spec.rollback_ttl_minutes:g} min.\n\n" if spec.run_cutover else "")
            + "The run ends failed when any gate fails; `finalize` records the result in the target's "
            "`dbguard` schema and pushes it as XCom `dbguard_result`.")


def timetable(spec: MigrationSpec):
    """`schedule` when set; with run_cutover and a window, a CronTriggerTimetable at the window's openings
    (minute hour * * days, in the window's timezone); else None (manual)."""
    if spec.schedule is not None or not (spec.run_cutover and spec.window):
        return spec.schedule
    from airflow.timetables.trigger import CronTriggerTimetable

    return CronTriggerTimetable(spec.window.cron(), timezone=spec.window.timezone)


def run_params(spec: MigrationSpec) -> dict[str, Param]:
    """The run conf a migration DAG takes (the trigger form in the UI, `dbguard run --conf`)."""
    return {
        "dry_run": Param(False, type="boolean", title="Dry run",
                         description="Preflight checks only (contract, privileges, headroom); nothing is written"),
        "batch_rows": Param(None, type=["null", "integer"], minimum=100, maximum=10_000_000, title="Rows per key range",
                            description=f"Overrides backfill.batch_rows for this run (spec: {spec.backfill.batch_rows}); "
                                        "each range is one mapped copy task"),
        **({"skip_cutover": Param(False, type="boolean", title="Skip cutover",
                              description="Copy and verify only; the source stays the primary (no flip)"),
            "approve": Param(None, type=["null", "boolean"], title="Approve the flip",
                             description="true: approved up front; false: refused; empty: ask in the UI "
                                         "(Required Actions) before the flip")}
           if spec.run_cutover else {}),
    }


def conf_problems(spec: MigrationSpec, conf: dict) -> list[str]:
    """What dag.test() would refuse in `conf` (with a 47-line ParamValidationError traceback), said up front:
    each key the DAG has no Param for, each value its Param does not accept, with what it does accept."""
    from airflow.sdk.exceptions import ParamValidationError

    params, out = run_params(spec), []
    for key, value in conf.items():
        if key not in params:
            close = difflib.get_close_matches(key, params, n=1)
            out.append(f"--conf {key}: unknown key{f'; did you mean {close[0]!r}?' if close else ''} "
                       f"(this DAG takes {', '.join(sorted(params))})")
            continue
        try:
            params[key].resolve(value)
        except ParamValidationError as e:
            out.append(f"--conf {key}={json.dumps(value)}: {str(e).splitlines()[0]}; "
                       f"give {_accepts(params[key].schema)}")
    return out


def _accepts(schema: dict) -> str:
    """A Param's JSON schema in words: 'an integer 100..10000000 or null'."""
    words = {"null": "null", "boolean": "true or false", "string": "a string", "number": "a number",
             "integer": "an integer"}
    types = schema.get("type", [])
    out = []
    for t in [types] if isinstance(types, str) else types:
        w = words.get(t, t)
        if t in ("integer", "number") and ("minimum" in schema or "maximum" in schema):
            w += f" {schema.get('minimum', '')}..{schema.get('maximum', '')}"
        out.append(w)
    return " or ".join(sorted(out, key=lambda w: w == "null")) or json.dumps(schema)


def build_dag(spec_path: str | os.PathLike, builders: list[StageBuilder] | None = None) -> DAG:
    """The DAG for one spec file (raises SpecError when the spec is invalid); builders default to STAGES."""
    path = str(Path(spec_path).resolve())
    spec = env.spec_at(path)
    if spec.collections:  # a Qdrant source: its own stages (collection_dag)
        from . import collection_dag
        builders, close, doc = builders or [collection_dag.stages], collection_dag.close, collection_dag.doc_md
    else:
        close, doc = _close, _doc_md
    dag = DAG(
        dag_id=spec.dag_id, schedule=timetable(spec), start_date=START_DATE, catchup=False,
        max_active_runs=1, tags=["dbguard", *spec.tags], doc_md=doc(spec, path),
        description=spec.description or f"dbguard migration {spec.name}",
        default_args={"owner": "dbguard"},
        params=run_params(spec),
    )
    with dag:
        b = Build(spec, path, dag)
        for builder in builders or STAGES:
            builder(b)
        close(b)
    return dag


def _one_task_dag(spec_path: str | os.PathLike, suffix: str, operator, description: str, doc_md, params) -> DAG:
    """A one-task DAG `dbguard_<name>_<suffix>` beside the migration's own (rollback, finish)."""
    path = str(Path(spec_path).resolve())
    spec = env.spec_at(path)
    with DAG(
        dag_id=f"{spec.dag_id}_{suffix}", schedule=None, start_date=START_DATE, catchup=False,
        tags=["dbguard", suffix, *spec.tags], default_args={"owner": "dbguard"},
        description=f"{description} dbguard migration {spec.name}", doc_md=doc_md(spec), params=params,
    ) as dag:
        operator(task_id=suffix, spec_path=path)
    return dag


def _collection_dag(spec_path, suffix: str) -> DAG | None:
    """The rollback / finish DAG of a spec with a Qdrant source (None for a spec of tables)."""
    spec = env.spec_at(str(Path(spec_path).resolve()))
    if not spec.collections:
        return None
    from . import collection_dag

    op, doc = collection_dag.ROLLBACK if suffix == "rollback" else collection_dag.FINISH
    return _one_task_dag(spec_path, suffix, op, suffix, lambda s: f"# {suffix.title()} `{s.name}`\n\n{doc}", {})


def build_rollback_dag(spec_path: str | os.PathLike) -> DAG:
    """`dbguard_<name>_rollback`: one click in the UI aborts a run, or flips a cut-over run back."""
    qdrant_source = _collection_dag(spec_path, "rollback")
    if qdrant_source is not None:
        return qdrant_source
    return _one_task_dag(
        spec_path, "rollback", RollbackOperator, "roll back",
        lambda spec: (f"# Roll back `{spec.name}`\n\nBefore a cutover: applies the last captured changes, turns "
                      "capture off, lifts the schema freeze and marks the run `rolled_back`; with `drop_target` also "
                      "drops the migrated target tables (the source was never written but for dbguard's own "
                      "bookkeeping). After a cutover: freezes the target, drains the reverse ledger to zero, verifies "
                      "both sides, sets the source's sequences past the target's, flips the pointer back and removes "
                      "reverse capture; each step is checkpointed, so an interrupted rollback resumes. When the "
                      "verify names rows that differ, trigger it again with `repair_from_target`."),
        {"run_id": Param(None, type=["null", "string"], title="Run id",
                         description="The migration run to roll back; empty: the latest run"),
         "drop_target": Param(False, type="boolean", title="Drop target tables",
                              description="Before a cutover only: also drop the migrated target tables"),
         "repair_from_target": Param(False, type="boolean", title="Repair from the target",
                                     description="After a cutover only: copy the rows the rollback's verify "
                                                 "named from the target onto the source, then complete")})


def build_finish_dag(spec_path: str | os.PathLike) -> DAG:
    """`dbguard_<name>_finish`: ends the dual-write tail of a cut-over run (trigger it after
    rollback_ttl_minutes): reverse capture off, rollback no longer offered."""
    qdrant_source = _collection_dag(spec_path, "finish")
    if qdrant_source is not None:
        return qdrant_source
    return _one_task_dag(
        spec_path, "finish", FinishOperator, "end the dual-write tail of",
        lambda spec: (f"# Finish `{spec.name}`\n\nAfter cutover the source is kept current by reverse capture for "
                      f"`rollback_ttl_minutes` ({spec.rollback_ttl_minutes:g}). Trigger this DAG when that time is "
                      "up (or sooner, when you are sure): reverse capture is removed and rollback is no longer "
                      "offered."),
        {"run_id": Param(None, type=["null", "string"], title="Run id",
                         description="The run whose dual-write tail ends; empty: the latest run"),
         "force": Param(False, type="boolean", title="Force",
                        description="Finish before rollback_ttl_minutes is up (rollback is then no longer offered)")})


class BrokenSpecs(DAG):
    """Stands in for specs that failed to load. DagBag calls validate() before bagging each DAG
    and records the exception as an import error of the DAG file, while the other DAGs of the same
    file still load (a module that raised would lose them all)."""

    def validate(self):
        if len(self.errors) == 1:
            raise self.errors[0]
        raise SpecError(f"{len(self.errors)} spec files",
                        [(f"{e.path}: {field}", msg) for e in self.errors for field, msg in e.problems])


def build_all(paths: list[Path] | None = None) -> dict[str, DAG]:
    """dag_id -> DAG for every spec (include/migrations/*.yaml + $DBGUARD_SPECS); broken ones as one BrokenSpecs."""
    env.install_resolver()
    dags: dict[str, DAG] = {}
    errors: list[SpecError] = []
    for p in paths if paths is not None else env.spec_paths():
        try:
            built = [build_dag(p), build_rollback_dag(p)]
            if env.spec_at(str(Path(p).resolve())).run_cutover:
                built.append(build_finish_dag(p))
        except SpecError as e:
            errors.append(e)
            continue
        dags.update((d.dag_id, d) for d in built)
    if errors:
        broken = BrokenSpecs(dag_id="dbguard_broken_specs", schedule=None, start_date=START_DATE)
        broken.errors = errors
        dags[broken.dag_id] = broken
    return dags
