"""`make celery`: the demo DAG on CeleryExecutor with two Celery workers, on this machine, then one JSON line.

    .venv/bin/python -m dbguard.airflow.celery_demo [--customers N --orders M --batch-rows R --workers 2]

The production-like layout of docker-compose.yaml, without docker: Debian's `redis-server` on a free
127.0.0.1 port is the broker; a fresh database on the embedded source server (.pg/source, unix socket)
is Airflow's metadata DB and the Celery result backend; `airflow db migrate`, then scheduler,
dag-processor, api-server and N Celery workers with distinct names (`airflow celery worker -H
dbguard-w<i>@%h`), in a throwaway AIRFLOW_HOME (dbguard.airflow.stack). The demo shop is loaded into a
fresh source database, `dbguard_demo_shop` is triggered with `batch_rows` small enough for several key
ranges per table, and the pool (spec concurrency) lets them run in parallel, so every worker gets ranges.

All N workers run on one machine, so their task instances would all record the same FQDN as hostname;
each worker therefore gets its own name through Airflow's `[core] hostname_callable` (`worker_hostname`
below reads DBGUARD_WORKER_HOSTNAME), and `workers_used` counts the distinct hostnames of the
`copy_range` task instances in the metadata DB. `checksum_ok` is the run's result (XCom
`dbguard_result` of `finalize`). The last stdout line:

    {"executor": "CeleryExecutor", "workers_used": 2, "checksum_ok": true, "seconds": ..., ...}

Progress goes to stderr, service logs to <home>/logs/*.log. Every process is stopped by PID (process
groups) and the databases are dropped, also on failure; then the home is removed unless the run failed
(its path is printed). Exit status 0 only when the run succeeded with checksum_ok and every worker ran ranges.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

import psycopg
from psycopg import sql

from .. import demo, embedded
from . import env as airflow_env
from .stack import Stack, free_port

DAG_ID = "dbguard_demo_shop"
POOL = "dbguard_demo_shop"  # env.pool_name(spec)
HOSTNAME_CALLABLE = "dbguard.airflow.celery_demo.worker_hostname"  # importable path, also under `python -m`


def celery_env(*, meta: str, broker: str, concurrency: int, source: str, target: str, reports) -> dict[str, str]:
    """The settings this stack adds to Stack's own (executor, execution API URL, JWT secret, folders);
    docker-compose.yaml sets the same variables for its containers (tests/test_compose.py checks)."""
    return {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta,            # postgresql+psycopg2://...
        "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta,         # Celery's SQLAlchemy backend, same database
        "AIRFLOW__CELERY__BROKER_URL": broker,                   # redis://...
        "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(concurrency),
        "AIRFLOW_CONN_DBGUARD_SOURCE": source,
        "AIRFLOW_CONN_DBGUARD_TARGET": target,
        "DBGUARD_REPORT_DIR": str(reports),                      # one folder for finalize and the UI plugin
    }


def worker_hostname() -> str:
    """`[core] hostname_callable` of the demo's workers: DBGUARD_WORKER_HOSTNAME, else this machine's FQDN."""
    return os.environ.get("DBGUARD_WORKER_HOSTNAME") or socket.getfqdn()


def _say(msg: str) -> None:
    print(f"celery: {msg}", file=sys.stderr, flush=True)


def _socket_dir(uri: str) -> str:
    """The unix-socket directory of an embedded server's URI (postgresql://postgres@%2Fpath%2Fto/db)."""
    return unquote(urlparse(uri).netloc.rpartition("@")[2])


def _create_db(server_uri: str, name: str) -> str:
    with psycopg.connect(server_uri, autocommit=True) as c:
        c.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                  .format(sql.Identifier(name)))
    return embedded.with_dbname(server_uri, name)


def _drop_db(server_uri: str, name: str) -> None:
    with psycopg.connect(server_uri, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _wait_redis(port: int, stack: Stack, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"redis-server did not answer PING on 127.0.0.1:{port}; see {stack.log_path('redis')}")


def _wait_workers(stack: Stack, names: list[str], timeout: float = 180) -> None:
    """Until every worker's log says `celery@<name> ready.` (connected to the broker, consuming)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        stack.check_alive()
        if all(" ready." in stack.log_path(n).read_text(errors="replace") for n in names):
            return
        time.sleep(1)
    raise TimeoutError(f"Celery workers not ready after {timeout:.0f}s; see {stack.home / 'logs'}")


def _run_result(stack: Stack, run_id: str) -> dict | None:
    r = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{airflow_env.FINALIZE_TASK_ID}"
                         f"/xcomEntries/{airflow_env.RESULT_XCOM_KEY}", params={"deserialize": "true"})
    if r.status_code != 200:
        return None
    value = r.json().get("value")
    return json.loads(value) if isinstance(value, str) else value


def run(customers: int, orders: int, batch_rows: int, workers: int, concurrency: int, timeout: float,
        keep: bool = False) -> dict:
    """Start the stack, run the DAG once, stop everything; the result dict (raises on failure to start)."""
    redis_bin = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not Path(redis_bin).exists():
        raise RuntimeError("redis-server is missing: run `make sysdeps` (installs Debian's redis-server)")
    t0 = time.monotonic()
    servers = embedded.ensure_default(airflow_env.REPO / ".pg")
    src_server, tgt_server = servers["dbguard_source"], servers["dbguard_target"]
    name = f"dbg_celery_{uuid.uuid4().hex[:8]}"
    meta = f"{name}_meta"
    created: list[tuple[str, str]] = []
    stack = None
    ok = False
    try:
        src = _create_db(src_server, name)
        created.append((src_server, name))
        tgt = _create_db(tgt_server, name)
        created.append((tgt_server, name))
        _create_db(src_server, meta)
        created.append((src_server, meta))
        sock = _socket_dir(src_server)
        redis_port = free_port()
        stack = Stack(executor="CeleryExecutor")
        stack.env.update(celery_env(meta=f"postgresql+psycopg2://postgres@/{meta}?host={sock}",
                                    broker=f"redis://127.0.0.1:{redis_port}/0", concurrency=concurrency,
                                    source=src, target=tgt, reports=stack.home / "reports"))
        _say(f"home {stack.home}; broker redis 127.0.0.1:{redis_port}; metadata DB {meta} on {sock}")
        stack.start("redis", cmd=[redis_bin, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no", "--dir", str(stack.home), "--protected-mode", "yes"])
        _wait_redis(redis_port, stack)
        rows = demo.load_shop(src, customers=customers, orders=orders)
        _say(f"demo data {rows}; airflow db migrate")
        stack.airflow("db", "migrate", timeout=600)
        stack.airflow("pools", "set", POOL, str(workers * concurrency), "dbguard demo_shop: parallel range copies")
        stack.start_services("scheduler", "dag-processor", "api-server")
        names = [f"worker-{i}" for i in range(1, workers + 1)]
        for i, n in enumerate(names, 1):
            stack.start(n, "celery", "worker", "-H", f"dbguard-w{i}@%h", "-c", str(concurrency),
                        "--skip-serve-logs", extra_env={"DBGUARD_WORKER_HOSTNAME": f"dbguard-w{i}",
                                                        "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE})
        stack.wait_healthy(timeout=300)
        _wait_workers(stack, names)
        stack.wait_dag(DAG_ID, timeout=300)
        _say(f"{workers} workers ready after {time.monotonic() - t0:.0f}s; triggering {DAG_ID}")
        t_run = time.monotonic()
        run_id = stack.trigger(DAG_ID, conf={"batch_rows": batch_rows}, run_id=f"celery_{uuid.uuid4().hex[:8]}")
        state = stack.wait_run(DAG_ID, run_id, timeout=timeout)
        run_seconds = time.monotonic() - t_run
        with psycopg.connect(embedded.with_dbname(src_server, meta)) as c:
            per_host = dict(c.execute(
                "SELECT hostname, count(*) FROM task_instance WHERE dag_id = %s AND run_id = %s "
                "AND task_id LIKE %s AND hostname <> '' GROUP BY hostname ORDER BY hostname",
                (DAG_ID, run_id, "%.copy_range")).fetchall())
        result = _run_result(stack, run_id) or {}
        out = {"executor": "CeleryExecutor", "workers_used": len(per_host), "checksum_ok": result.get("checksum_ok"),
               "seconds": round(time.monotonic() - t0, 1), "run_seconds": round(run_seconds, 1), "state": state,
               "workers": workers, "ranges_per_worker": per_host, "ranges": sum(per_host.values()),
               "migrated_rows": result.get("migrated_rows"), "batch_rows": batch_rows}
        ok = state == "success" and out["checksum_ok"] is True and out["workers_used"] == workers
        if not ok:
            _say(f"run {run_id} ended {state}; logs in {stack.home / 'logs'}")
        return out
    finally:
        if stack is not None:
            stack.stop()
        for server, db in created:
            try:
                _drop_db(server, db)
            except psycopg.Error as e:
                _say(f"could not drop {db}: {e}")
        if stack is not None:
            if ok and not keep:
                shutil.rmtree(stack.home, ignore_errors=True)
            else:
                _say(f"kept {stack.home} (service logs in {stack.home / 'logs'})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dbguard.airflow.celery_demo", description=__doc__.split("\n")[0])
    ap.add_argument("--customers", type=int, default=10_000)
    ap.add_argument("--orders", type=int, default=40_000)
    ap.add_argument("--batch-rows", type=int, default=5_000, help="rows per key range (run conf batch_rows)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=2, help="task slots per worker")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for the run")
    ap.add_argument("--keep", action="store_true", help="keep the throwaway AIRFLOW_HOME")
    a = ap.parse_args(argv)
    try:
        out = run(a.customers, a.orders, a.batch_rows, a.workers, a.concurrency, a.timeout, a.keep)
    except Exception as e:  # noqa: BLE001 - one line for the caller, the logs hold the rest
        print(json.dumps({"executor": "CeleryExecutor", "error": f"{type(e).__name__}: {e}"}), flush=True)
        return 1
    print(json.dumps(out), flush=True)
    good = out["state"] == "success" and out["checksum_ok"] is True and out["workers_used"] == out["workers"]
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
