"""Real Airflow processes for tests, benches and demos: a throwaway AIRFLOW_HOME on a free 127.0.0.1 port.

    with Stack(executor="LocalExecutor") as s:       # a temp home, a free port, SimpleAuthManager admin
        s.airflow("db", "migrate")
        s.start_services()                          # what `airflow standalone` runs, log servers off
        s.wait_healthy()                            # GET /api/v2/monitor/health
        s.wait_dag("dbguard_demo_shop")             # parsed and visible in the REST API
        run_id = s.trigger("dbguard_demo_shop", conf={"batch_rows": 500})
        state = s.wait_run("dbguard_demo_shop", run_id, timeout=300)

`start_services()` starts the components `airflow standalone` runs (scheduler, dag-processor, api-server,
triggerer) one by one instead of `standalone` itself, because only then can their task-log servers be
switched off (`--skip-serve-logs`): those bind every interface ([::]:8793 / 8794) and would also collide
between two stacks; the api-server reads the task logs from the shared home instead.
Every process is started in its own session (process group) with its output in `<home>/logs/<name>.log`;
`stop()` (also on leaving the `with`, failing or not) sends SIGTERM to each group, waits, then SIGKILLs the
group and any descendant that left it (Airflow task processes make their own process groups), all by PID;
a temp home the Stack made itself is removed after a clean `with`, kept (with its logs) after an error.
The REST calls use the simple auth manager's token endpoint (POST /auth/token) and /api/v2.
No Airflow import here: Airflow runs only in the child processes.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from . import env as airflow_env

AIRFLOW_BIN = Path(sys.executable).with_name("airflow")
FINISHED = ("success", "failed")
SERVES_LOGS = {"scheduler", "triggerer"}  # components that start a task-log server unless told not to


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Stack:
    """Airflow services sharing one throwaway home; see the module docstring."""

    def __init__(self, home: Path | None = None, *, executor: str = "LocalExecutor",
                 extra_env: dict[str, str] | None = None, user: str = "admin"):
        self.own_home = home is None  # a temp home is removed on a clean exit from `with`, kept after an error
        self.home = Path(home or tempfile.mkdtemp(prefix="dbguard-stack-"))
        (self.home / "logs").mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.user, self.password = user, secrets.token_urlsafe(12)
        passwords = self.home / "passwords.json"
        passwords.write_text(json.dumps({user: self.password}))
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")},
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(airflow_env.DAGS_FOLDER),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(airflow_env.REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTOR": executor,
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{user}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(passwords),
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.url}/execution/",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.port),
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),  # one secret for every process
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
            "PATH": f"{AIRFLOW_BIN.parent}{os.pathsep}{os.environ.get('PATH', '')}",
            **(extra_env or {}),
        }
        self.procs: dict[str, subprocess.Popen] = {}
        self._logs: list = []
        self._token: str | None = None
        self._http = httpx.Client(base_url=self.url, timeout=30)

    # ---- processes ----------------------------------------------------------------------------------
    def airflow(self, *args: str, timeout: float = 300, check: bool = True) -> str:
        """Run one `airflow ...` CLI command to completion in this home; its stdout."""
        out = subprocess.run([str(AIRFLOW_BIN), *args], env=self.env, capture_output=True, text=True,
                             timeout=timeout, stdin=subprocess.DEVNULL)
        if check and out.returncode:
            raise RuntimeError(f"airflow {' '.join(args)} failed ({out.returncode}): {out.stderr[-3000:]}")
        return out.stdout

    def start(self, name: str, *args: str, cmd: list[str] | None = None, extra_env: dict | None = None):
        """Start `airflow <args>` (or `cmd`) in its own process group, output in logs/<name>.log."""
        log = open(self.log_path(name), "ab")
        self._logs.append(log)
        proc = subprocess.Popen(cmd or [str(AIRFLOW_BIN), *args], env={**self.env, **(extra_env or {})},
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.home)
        self.procs[name] = proc
        return proc

    def start_services(self, *names: str) -> None:
        """Start Airflow components (default: scheduler, dag-processor, api-server, triggerer), each as
        `airflow <name>`, with the task-log servers off so that only the api-server listens (127.0.0.1)."""
        for name in names or ("scheduler", "dag-processor", "api-server", "triggerer"):
            self.start(name, *name.split(), *(["--skip-serve-logs"] if name in SERVES_LOGS else []))

    def log_path(self, name: str) -> Path:
        return self.home / "logs" / f"{name}.log"

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}; see {self.log_path(name)}")

    def stop(self, grace: float = 20) -> None:
        """Stop every started process by PID: SIGTERM to its group, wait, then SIGKILL the group and
        whatever descendant is left (task processes run in their own groups). Idempotent."""
        import psutil

        kids: dict[int, psutil.Process] = {}
        for proc in self.procs.values():
            try:
                kids.update({k.pid: k for k in psutil.Process(proc.pid).children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        for proc in reversed(list(self.procs.values())):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace
        for proc in self.procs.values():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the leader may be gone while its group lives on
            except (ProcessLookupError, PermissionError):
                pass
            proc.wait(timeout=10)
        for kid in kids.values():
            try:
                if kid.is_running():
                    kid.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(list(kids.values()), timeout=5)
        self.procs.clear()
        for log in self._logs:
            log.close()
        self._logs.clear()
        self._http.close()

    def __enter__(self) -> "Stack":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.stop()
        if self.own_home and exc_type is None:
            import shutil

            shutil.rmtree(self.home, ignore_errors=True)

    # ---- REST API -------------------------------------------------------------------------------------
    def token(self) -> str:
        """A JWT for the admin user (POST /auth/token, the simple auth manager's login)."""
        if self._token is None:
            r = self._http.post("/auth/token", json={"username": self.user, "password": self.password})
            r.raise_for_status()
            self._token = r.json()["access_token"]
        return self._token

    def api(self, method: str, path: str, **kw) -> httpx.Response:
        """An authenticated call to /api/v2<path>."""
        return self._http.request(method, f"/api/v2{path}", headers={"Authorization": f"Bearer {self.token()}"}, **kw)

    def wait_healthy(self, timeout: float = 180, components=("metadatabase", "scheduler")) -> dict:
        """Poll GET /api/v2/monitor/health until the api-server answers and `components` are healthy."""
        deadline, last = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            self.check_alive()
            try:
                last = self._http.get("/api/v2/monitor/health").json()
                if all((last.get(c) or {}).get("status") == "healthy" for c in components):
                    return last
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(1)
        raise TimeoutError(f"Airflow not healthy after {timeout:.0f}s (last: {last}); logs in {self.home / 'logs'}")

    def wait_dag(self, dag_id: str, timeout: float = 180, unpause: bool = True) -> dict:
        """Wait until the dag-processor has parsed `dag_id` (GET /dags/<id> is 200); unpause it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.check_alive()
            r = self.api("GET", f"/dags/{dag_id}")
            if r.status_code == 200:
                if unpause and r.json().get("is_paused"):
                    self.api("PATCH", f"/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
                return r.json()
            time.sleep(2)
        errors = self.api("GET", "/importErrors").text[:3000]
        raise TimeoutError(f"DAG {dag_id} not parsed after {timeout:.0f}s; import errors: {errors}; "
                           f"logs in {self.home / 'logs'}")

    def trigger(self, dag_id: str, conf: dict | None = None, run_id: str | None = None) -> str:
        """POST /dags/<id>/dagRuns; returns the run id."""
        body = {"logical_date": None, "conf": conf or {}, **({"dag_run_id": run_id} if run_id else {})}
        r = self.api("POST", f"/dags/{dag_id}/dagRuns", json=body)
        if r.status_code >= 400:
            raise RuntimeError(f"trigger {dag_id} failed: {r.status_code} {r.text[:2000]}")
        return r.json()["dag_run_id"]

    def wait_run(self, dag_id: str, run_id: str, timeout: float = 300) -> str:
        """Poll the run until success/failed; returns the state (TimeoutError after `timeout` seconds)."""
        deadline, state = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            self.check_alive()
            r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}")
            if r.status_code == 200:
                state = r.json()["state"]
                if state in FINISHED:
                    return state
            time.sleep(2)
        raise TimeoutError(f"run {dag_id}/{run_id} still {state} after {timeout:.0f}s; logs in {self.home / 'logs'}")

    def task_instances(self, dag_id: str, run_id: str) -> list[dict]:
        """Every task instance of a run (mapped ones included), as the REST API lists them."""
        r = self.api("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances", params={"limit": 1000})
        r.raise_for_status()
        return r.json()["task_instances"]
