"""docker-compose.yaml: the production-like stack (no docker engine here, so it is parsed, not run)."""
from __future__ import annotations

import re
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


def test_same_executor_broker_backend_and_variables_as_make_celery(compose):
    """`make celery` (dbguard.airflow.celery_demo) is this stack without docker: every variable it sets is
    set here too, with the same kind of value, and identically in every Airflow container."""
    from dbguard.airflow.celery_demo import celery_env

    local = set(celery_env(meta="postgresql+psycopg2://u@/m?host=/s", broker="redis://127.0.0.1:1/0",
                           concurrency=2, source="postgresql://s", target="postgresql://t", reports="/r"))
    local |= {"AIRFLOW__CORE__EXECUTOR", "AIRFLOW__CORE__EXECUTION_API_SERVER_URL", "AIRFLOW__API_AUTH__JWT_SECRET"}
    envs = {name: compose["services"][name]["environment"] for name in AIRFLOW_SERVICES}
    for name, env in envs.items():
        assert local <= set(env), (name, sorted(local - set(env)))
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://"), name
        assert env["AIRFLOW__CELERY__RESULT_BACKEND"].startswith("db+postgresql"), name
        assert env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://redis:6379/") or \
            env["AIRFLOW__CELERY__BROKER_URL"].startswith("redis://:@redis:6379/"), name
        # the scheduler signs task tokens that the api-server must accept: one secret, never empty
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == envs["airflow-apiserver"]["AIRFLOW__API_AUTH__JWT_SECRET"]
        secret = str(env["AIRFLOW__API_AUTH__JWT_SECRET"])
        assert re.fullmatch(r"\$\{\w+:-[^}]+\}|[^$]+", secret), (name, secret)  # a non-empty value or default
        for var in local - {"AIRFLOW__API_AUTH__JWT_SECRET"}:
            assert env[var] == envs["airflow-apiserver"][var], (name, var)


def test_reports_are_shared_by_workers_and_the_ui(compose):
    """finalize writes the report on a worker; the plugin serves it from the api-server container."""
    services = compose["services"]
    report_dir = services["airflow-worker"]["environment"]["DBGUARD_REPORT_DIR"]
    for name in ("airflow-worker", "airflow-apiserver"):
        mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name]["volumes"]}
        assert report_dir in mounts and mounts[report_dir] in compose["volumes"], (name, mounts)
        assert services[name]["environment"]["DBGUARD_REPORT_DIR"] == report_dir


def test_init_creates_every_specs_pool_with_its_concurrency(compose):
    """The scheduler never runs a task whose pool does not exist: airflow-init creates one per spec."""
    from dbguard.airflow import env as airflow_env

    script = "\n".join(compose["services"]["airflow-init"]["command"])
    pools = {m[0]: int(m[1]) for m in re.findall(r"airflow pools set (\S+) (\d+)", script)}
    specs = [airflow_env.spec_at(str(p)) for p in sorted((ROOT / "include" / "migrations").glob("*.yaml"))]
    assert specs
    assert pools == {airflow_env.pool_name(s): s.backfill.concurrency for s in specs}
    assert script.index("exec /entrypoint bash -c") < script.index("airflow pools set")  # after the migration


def test_a_pinned_qdrant_server_wired_to_the_qdrant_connection(compose, monkeypatch):
    """A vector store's `qdrant:` target reaches the compose service through the provider's conn type."""
    from dbguard.stores import qdrant

    services = compose["services"]
    image = services["qdrant"]["image"]
    assert re.fullmatch(r"qdrant/qdrant:v\d+\.\d+\.\d+", image), image  # official, pinned (never :latest)
    assert any(p.startswith("6333:") for p in services["qdrant"]["ports"])
    spec = load_spec(ROOT / "include" / "migrations" / "demo_docs_qdrant.yaml")
    var = f"AIRFLOW_CONN_{spec.tables[0].vector[0].qdrant.conn_id.upper()}"
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env[var] == "qdrant://qdrant:6333", name
        if name != "airflow-init":  # init only migrates the metadata DB
            assert "qdrant-client==" in env["_PIP_ADDITIONAL_REQUIREMENTS"], name
    monkeypatch.setenv(var, services["airflow-worker"]["environment"][var])
    kw = qdrant.client_kwargs(spec.tables[0].vector[0].qdrant.conn_id)
    assert (kw["host"], kw["port"]) == ("qdrant", 6333)


def test_qdrant_healthcheck_asks_readyz_and_the_worker_waits_for_it(compose):
    """The image has no curl: the healthcheck is bash builtins over /dev/tcp. Run as compose would (its
    $$ unescaped) against an HTTP server on the port: healthy on /readyz 200, not on 503 or nothing."""
    import http.server
    import shutil
    import socket
    import subprocess
    import threading

    services = compose["services"]
    assert services["airflow-worker"]["depends_on"]["qdrant"] == {"condition": "service_healthy"}
    kind, cmd = services["qdrant"]["healthcheck"]["test"]
    assert kind == "CMD-SHELL" and "/readyz" in cmd
    if shutil.which("bash") is None:
        pytest.fail("bash is needed to run the healthcheck command")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = cmd.replace("$$", "$").replace("/6333", f"/{port}")

    class Ready(http.server.BaseHTTPRequestHandler):
        code = 200

        def do_GET(self):
            self.send_response(Ready.code if self.path == "/readyz" else 404)
            self.end_headers()

        def log_message(self, *a):
            pass

    def healthy() -> bool:
        return subprocess.run(["sh", "-c", cmd], capture_output=True, timeout=10).returncode == 0

    srv = http.server.HTTPServer(("127.0.0.1", port), Ready)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        assert healthy()
        Ready.code = 503  # shards not ready yet
        assert not healthy()
    finally:
        srv.shutdown()
        srv.server_close()
    assert not healthy()  # nothing listening
