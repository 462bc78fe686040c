"""Draw a run's HTML page in a process of its own: pandas, numpy and matplotlib (about 70 MB resident) are
loaded there, never in the process that runs the migration's tasks (under `dag.test()` every task runs in one
process, so the report's libraries would be that process's peak).

    python -m dbguard.report.render    reads a pickle of (spec, run_id, data, base) on stdin, writes
                                        <base>.html, prints {"peak_rss_mb": ...} on stdout

`in_child()` is the caller's side; when the child cannot run, the page is drawn in the calling process.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for ln in f:
                if ln.startswith("VmHWM:"):
                    return round(int(ln.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def in_child(spec, run_id: str, data: dict, base: Path, timeout: float = 300) -> tuple[str, float | None]:
    """Render in a fresh interpreter; returns (how, the child's peak RSS in MB). `how` is "child", or
    "in process: <why>" when the child failed (the page is then drawn here, so a report is never lost)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # Airflow adds to sys.path
    try:
        out = subprocess.run([sys.executable, "-m", "dbguard.report.render"], input=pickle.dumps(
            (spec, run_id, data, base)), capture_output=True, timeout=timeout, env=env, check=False)
        if out.returncode == 0:
            return "child", json.loads(out.stdout.decode().strip().splitlines()[-1])["peak_rss_mb"]
        why = (out.stderr.decode(errors="replace").strip().splitlines() or [f"exit {out.returncode}"])[-1]
    except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError) as e:
        why = f"{type(e).__name__}: {e}"
    from . import page

    Path(f"{base}.html").write_text(page.render(spec, run_id, data, base))
    return f"in process: {why}", None


def main() -> int:
    spec, run_id, data, base = pickle.loads(sys.stdin.buffer.read())  # from in_child, our own parent only
    from . import page

    Path(f"{base}.html").write_text(page.render(spec, run_id, data, base))
    print(json.dumps({"peak_rss_mb": _peak_rss_mb()}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
