"""`make celery` for real: the demo DAG on CeleryExecutor with two Celery workers (about 2-3 minutes).

Runs `python -m dbguard.airflow.celery_demo` as `make celery` does: redis-server as broker, a PostgreSQL
metadata DB and result backend on the embedded server, scheduler + dag-processor + api-server + two
workers with distinct names (2 task slots each), the demo shop migrated in 1 + 4 key ranges, so the
4-slot pool hands out at least 4 copies at once and each worker (prefetch 1) can reserve only 2. Both workers must
have run key ranges, the run must succeed with equal checksums, and nothing it started may be left over.
Needs Debian's redis-server (`make sysdeps`); without it the test fails, it never skips.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent


def _processes_of(home: str) -> list[list[str]]:
    """Command lines of processes still running in that AIRFLOW_HOME (redis-server: --dir <home>)."""
    out = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.environ().get("AIRFLOW_HOME") == home or home in " ".join(p.info["cmdline"] or []):
                out.append(p.info["cmdline"])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return out


def test_make_celery_spreads_the_ranges_over_two_workers():
    assert shutil.which("redis-server") or Path("/usr/bin/redis-server").exists(), \
        "redis-server is missing: run `make sysdeps` (installs Debian's redis-server)"
    proc = subprocess.run([sys.executable, "-m", "dbguard.airflow.celery_demo", "--customers", "4000",
                           "--orders", "16000", "--batch-rows", "4000", "--timeout", "300"],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL)
    lines = proc.stdout.strip().splitlines()
    assert lines, f"no output; stderr: {proc.stderr[-3000:]}"
    out = json.loads(lines[-1])
    assert proc.returncode == 0, (out, proc.stderr[-3000:])
    assert out["executor"] == "CeleryExecutor" and out["state"] == "success", out
    assert out["checksum_ok"] is True and out["migrated_rows"] == 20_000, out
    assert out["workers_used"] == 2 and sorted(out["ranges_per_worker"]) == ["dbguard-w1", "dbguard-w2"], out
    assert all(n > 0 for n in out["ranges_per_worker"].values()) and out["ranges"] >= 1 + 16_000 // 4000, out
    home = re.search(r"home (\S+);", proc.stderr).group(1)
    assert not _processes_of(home), f"left running: {_processes_of(home)}"
    assert not Path(home).exists(), f"{home} was not removed after a good run"
