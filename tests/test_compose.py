"""docker-compose.yaml: the production-like stack (no docker engine here, so it is parsed, not run)."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dbguard.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent
AIRFLOW_SERVICES = ["airflow-apiserver", "airflow-scheduler", "airflow-dag-processor", "airflow-worker",
                    "airflow-triggerer", "airflow-init"]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yaml").read_text(encoding="utf-8"))


def test_has_the_official_airflow3_services_and_two_pgvector_databases(compose):
    services = compose["services"]
    for name in AIRFLOW_SERVICES + ["postgres", "redis", "source-db", "target-db"]:
        assert name in services, name
    assert services["source-db"]["image"] == services["target-db"]["image"] == "pgvector/pgvector:pg18"
    commands = {services[s].get("command") for s in AIRFLOW_SERVICES if isinstance(services[s].get("command"), str)}
    assert {"api-server", "scheduler", "dag-processor", "celery worker", "triggerer"} <= commands


def test_every_airflow_service_runs_airflow_3_3_2_with_celery(compose):
    for name in AIRFLOW_SERVICES:
        svc = compose["services"][name]
        image = svc["image"]
        assert image.endswith("apache/airflow:3.3.2}") or image == "apache/airflow:3.3.2", (name, image)
        assert svc["environment"]["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert "redis" in svc["depends_on"] and "postgres" in svc["depends_on"], name


def test_connections_point_at_the_two_database_services(compose):
    services = compose["services"]
    spec = load_spec(ROOT / "include" / "migrations" / "demo_shop.yaml")
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        for conn_id, host in [(spec.source.conn_id, "source-db"), (spec.target.conn_id, "target-db")]:
            uri = env[f"AIRFLOW_CONN_{conn_id.upper()}"]
            assert uri.startswith("postgresql://") and f"@{host}:5432/" in uri, (name, uri)
    # the target server is initialised with the encoding/collation the spec demands
    initdb = services["target-db"]["environment"]["POSTGRES_INITDB_ARGS"]
    assert f"--encoding={spec.target.encoding}" in initdb and f"--locale={spec.target.collation}" in initdb


def test_bind_mounts_exist_and_the_project_is_importable(compose):
    env = compose["services"]["airflow-worker"]["environment"]
    targets = {}
    for vol in compose["services"]["airflow-worker"]["volumes"]:
        host, container = vol.split(":")[:2]
        targets[container] = host
        if host.startswith("."):
            assert (ROOT / host).is_dir(), f"{host} is mounted but does not exist"
        else:
            assert host in compose["volumes"], f"named volume {host} is not declared"
    assert targets["/opt/airflow/dags"] == "./dags"
    assert targets["/opt/airflow/plugins"] == "./plugins"
    assert targets["/opt/airflow/include"] == "./include"
    assert (ROOT / "include" / "dbguard" / "__init__.py").is_file()
    assert env["PYTHONPATH"] == "/opt/airflow/include"
    assert "psycopg" in env["_PIP_ADDITIONAL_REQUIREMENTS"]
