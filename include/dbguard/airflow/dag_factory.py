"""One DAG per migration spec.

The DAG is a chain of stages, each added by one builder in `STAGES`:

    preflight -> capture_on -> backfill[table...] -> drain_changes -> reconcile -> finish_schema -> checksum_gate
      -> build_indexes -> shadow_reads -> retrieval_gate -> release -> finalize

A builder takes the `Build` and hangs its tasks after `build.tail`. A later
issue adds a stage by writing one builder and inserting it into `STAGES`
(capture_on after preflight, drain_changes after backfill, build_indexes /
shadow_reads / retrieval_gate after checksum_gate, cutover after those);
`release` and `finalize` always close the DAG and run whatever happened.
"""
from __future__ import annotations

import datetime as dt
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
        with TaskGroup(group_id=group_id(table.name), tooltip=f"backfill {table.schema_}.{table.name}") as group:
            plan = PlanRangesOperator(task_id="plan_ranges", spec_path=b.spec_path, table=table.name)
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


STAGES: list[StageBuilder] = [preflight, capture_on, backfill, drain_changes, reconcile, finish_schema, checksum_gate,
                              retrieval_stages]


def _close(b: Build) -> None:
    release = ReleaseOperator(task_id="release", spec_path=b.spec_path, trigger_rule="all_done")
    finalize = FinalizeOperator(task_id=env.FINALIZE_TASK_ID, spec_path=b.spec_path, trigger_rule="all_done",
                                retries=0)
    chain(*b.tail, release, finalize)


def _doc_md(spec: MigrationSpec, path: str) -> str:
    rows = "\n".join(
        f"| `{t.schema_}.{t.name}` | `{t.target_schema}.{t.target_name}` | {', '.join(t.key)} | {len(t.columns)} |"
        for t in spec.table_order())
    window = f"{spec.window.start}-{spec.window.end} {spec.window.timezone}" if spec.window else "none"
    return (f"# dbguard migration `{spec.name}`\n\n{spec.description}\n\n"
            f"Spec: `{path}`. Source `{spec.source.conn_id}` -> target `{spec.target.conn_id}`.\n\n"
            f"| source | target | key | columns |\n|---|---|---|---|\n{rows}\n\n"
            f"Backfill: {spec.backfill.batch_rows} rows per range, pool `{env.pool_name(spec)}` with "
            f"{spec.backfill.concurrency} slots, {spec.backfill.retries} retries. Window: {window}.\n\n"
            "The run ends failed when any gate fails; `finalize` records the result in the target's "
            "`dbguard` schema and pushes it as XCom `dbguard_result`.")


def build_dag(spec_path: str | os.PathLike, builders: list[StageBuilder] | None = None) -> DAG:
    """The DAG for one spec file (raises SpecError when the spec is invalid); builders default to STAGES."""
    path = str(Path(spec_path).resolve())
    spec = env.spec_at(path)
    dag = DAG(
        dag_id=spec.dag_id, schedule=spec.schedule, start_date=START_DATE, catchup=False,
        max_active_runs=1, tags=["dbguard", *spec.tags], doc_md=_doc_md(spec, path),
        description=spec.description or f"dbguard migration {spec.name}",
        default_args={"owner": "dbguard"},
        params={
            "dry_run": Param(False, type="boolean", description="preflight checks only; nothing is written"),
            "batch_rows": Param(None, type=["null", "integer"], minimum=100,
                                description=f"rows per key range (spec: {spec.backfill.batch_rows})"),
        },
    )
    with dag:
        b = Build(spec, path, dag)
        for builder in builders or STAGES:
            builder(b)
        _close(b)
    return dag


def build_rollback_dag(spec_path: str | os.PathLike) -> DAG:
    """`dbguard_<name>_rollback`: one click in the UI aborts a run and lifts every hold on the source."""
    path = str(Path(spec_path).resolve())
    spec = env.spec_at(path)
    with DAG(
        dag_id=f"{spec.dag_id}_rollback", schedule=None, start_date=START_DATE, catchup=False,
        tags=["dbguard", "rollback", *spec.tags], default_args={"owner": "dbguard"},
        description=f"roll back dbguard migration {spec.name}",
        doc_md=(f"# Roll back `{spec.name}`\n\nApplies the last captured changes, turns capture off, lifts the "
                "schema freeze and marks the run `rolled_back`; with `drop_target` also drops the migrated "
                "target tables. The source is never written by a migration, so it needs no undo."),
        params={"run_id": Param(None, type=["null", "string"], description="default: the latest run"),
                "drop_target": Param(False, type="boolean", description="drop the migrated target tables")},
    ) as dag:
        RollbackOperator(task_id="rollback", spec_path=path)
    return dag


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
        except SpecError as e:
            errors.append(e)
            continue
        dags.update((d.dag_id, d) for d in built)
    if errors:
        broken = BrokenSpecs(dag_id="dbguard_broken_specs", schedule=None, start_date=START_DATE)
        broken.errors = errors
        dags[broken.dag_id] = broken
    return dags
