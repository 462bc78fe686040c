"""The Airflow side of the environment: home, metadata DB, pool, connections, results.

Everything Airflow-specific that both the DAG tasks and `dbguard run` need.
Airflow is imported lazily inside functions, because `airflow_defaults()` must
set AIRFLOW_HOME & co. before Airflow's first import reads its configuration.
"""
from __future__ import annotations

import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from .. import db
from ..spec import MigrationSpec, load_spec

REPO = Path(__file__).resolve().parents[3]
DAGS_FOLDER = REPO / "dags"
SPECS_FOLDER = REPO / "include" / "migrations"
FINALIZE_TASK_ID = "finalize"
RESULT_XCOM_KEY = "dbguard_result"


def airflow_defaults(home: Path | None = None) -> dict[str, str]:
    """Set AIRFLOW_HOME, dags/plugins folders and no examples, unless already set (as the Makefile does)."""
    defaults = {
        "AIRFLOW_HOME": str(home or REPO / ".airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS_FOLDER),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
    }
    for k, v in defaults.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in defaults}


def ensure_metadata_db(log=sys.stderr) -> bool:
    """Run `airflow db migrate` once per AIRFLOW_HOME (same stamp file as the Makefile); True if it ran.

    dag.test() needs a migrated metadata DB (SQLite under AIRFLOW_HOME by default); migrate takes ~3 s.
    """
    home = Path(os.environ["AIRFLOW_HOME"])
    stamp = home / ".migrated"
    if stamp.exists():
        return False
    home.mkdir(parents=True, exist_ok=True)
    print(f"dbguard: airflow db migrate (AIRFLOW_HOME={home})", file=log)
    airflow_bin = Path(sys.executable).with_name("airflow")
    cmd = [str(airflow_bin)] if airflow_bin.exists() else [sys.executable, "-m", "airflow"]
    with open(home / "migrate.log", "w") as out:
        rc = subprocess.run(cmd + ["db", "migrate"], stdout=out, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        raise RuntimeError(f"airflow db migrate failed (exit {rc}); see {home / 'migrate.log'}")
    stamp.touch()
    return True


def pool_name(spec: MigrationSpec) -> str:
    return f"dbguard_{spec.name}"


def ensure_pool(spec: MigrationSpec) -> None:
    """Create or resize the spec's pool in the metadata DB.

    The scheduler only runs a task whose pool exists (otherwise it stays queued and the
    DAG shows a "non-existent pool" warning); dag.test() ignores pools entirely
    (checked on 3.3.2: a mapped task in an undefined pool ran fine). The CLI still
    creates it so a later `airflow standalone` finds the same pool.
    Equivalent CLI: `airflow pools set dbguard_<name> <slots> "<description>"`.
    """
    from airflow.models.pool import Pool

    Pool.create_or_update_pool(
        name=pool_name(spec), slots=spec.backfill.concurrency,
        description=f"dbguard {spec.name}: parallel range copies (backfill.concurrency)",
        include_deferred=False,
    )


def _airflow_conn_uri(conn_id: str) -> str | None:
    """Ask Airflow's connection store (secrets backends, metadata DB via the task API); None if undefined."""
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id).get_uri()
    except Exception:  # AirflowNotFoundException, or no task context outside a worker
        return None


def airflow_connection_uri(conn_id: str) -> str | None:
    """Outside a task (the CLI): the connection from Airflow's secrets backends or metadata DB, else None."""
    uri = _airflow_conn_uri(conn_id)
    if uri is not None:
        return uri
    try:
        from airflow.models.connection import Connection

        return Connection.get_connection_from_secrets(conn_id).get_uri()
    except Exception:  # not defined, or no metadata DB yet
        return None


def install_resolver() -> None:
    """Let dbguard.db resolve conn ids through Airflow (env AIRFLOW_CONN_<ID> still wins), and hand
    every password a resolved URI carries to Airflow's secrets masker (task logs show ***)."""
    from airflow.sdk.log import mask_secret

    db.set_resolver(_airflow_conn_uri)
    db.set_masker(mask_secret)


@lru_cache(maxsize=64)
def _load(path: str, mtime: float) -> MigrationSpec:
    return load_spec(path)


def spec_at(path: str) -> MigrationSpec:
    """load_spec, cached per process and file version (tasks call this once per task)."""
    return _load(path, os.path.getmtime(path))


def spec_paths() -> list[Path]:
    """include/migrations/*.yaml plus the paths in env DBGUARD_SPECS (os.pathsep-separated)."""
    paths = sorted(SPECS_FOLDER.glob("*.yaml"))
    extra = [Path(p).resolve() for p in os.environ.get("DBGUARD_SPECS", "").split(os.pathsep) if p.strip()]
    return paths + [p for p in extra if p not in paths]


def run_result(dag_run) -> dict[str, Any] | None:
    """The result dict finalize pushed (XCom key RESULT_XCOM_KEY) for a finished DagRun, or None."""
    from airflow import settings
    from airflow.models.xcom import XComModel

    with settings.Session() as session:
        row = session.scalars(XComModel.get_many(
            run_id=dag_run.run_id, dag_ids=dag_run.dag_id, task_ids=FINALIZE_TASK_ID, key=RESULT_XCOM_KEY,
        )).first()
        return XComModel.deserialize_value(row) if row is not None else None
