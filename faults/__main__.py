"""`make faults`: inject real faults under a live writer, let dbguard recover, compare row for row.

    python -m faults [NAME ...] [--size full|small]

One JSON line per scenario on stdout:
{"fault": NAME, "recovered": bool, "lost": N, "duplicated": N, "seconds": s, "outcome": ..., ...details}
Progress goes to stderr. Exit status 1 when any scenario did not recover or lost / duplicated a row.
Uses the embedded servers (.pg/) in scratch databases named fault_*, dropped at the end; target_restart
starts (and stops) a private PostgreSQL server of its own. See docs/faults.md.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

warnings.filterwarnings("ignore")


def scenario_table() -> dict:
    from . import scenarios as s

    return {name: getattr(s, name) for name in s.ORDER}


def run_one(name: str, fn, size: dict) -> dict:
    from .common import first_line

    t0 = time.monotonic()
    try:
        res = fn(size)
    except Exception as e:  # noqa: BLE001  a scenario that crashed measured nothing: say so, never pass
        traceback.print_exc(file=sys.stderr)
        res = {"recovered": False, "lost": None, "duplicated": None, "outcome": "scenario_error",
               "error": first_line(e)}
    line = {"fault": name, "recovered": bool(res.pop("recovered")), "lost": res.pop("lost"),
            "duplicated": res.pop("duplicated"), "seconds": round(time.monotonic() - t0, 2), **res}
    return line


def ok(line: dict) -> bool:
    return line["recovered"] and line["lost"] == 0 and line["duplicated"] == 0


def main(argv: list[str] | None = None) -> int:
    from .common import SIZES

    table = scenario_table()
    ap = argparse.ArgumentParser(prog="python -m faults")
    ap.add_argument("names", nargs="*", default=list(table), help=f"scenarios (default all): {', '.join(table)}")
    ap.add_argument("--size", choices=list(SIZES), default=os.environ.get("DBGUARD_FAULTS_SIZE", "full"))
    args = ap.parse_args(argv)
    bad = [n for n in args.names if n not in table]
    if bad:
        ap.error(f"unknown scenario(s) {bad}; choose from {list(table)}")
    from dbguard.airflow import env as afenv

    afenv.airflow_defaults()  # before Airflow's first import (dag_cleared_rerun runs a real DAG)
    # stdout carries only the JSON lines: whatever else writes to fd 1 (Airflow's task logs) goes to stderr
    sys.stdout.flush()
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    failed = 0
    for name in args.names:
        line = run_one(name, table[name], SIZES[args.size])
        print(json.dumps(line, default=str), file=out, flush=True)
        failed += not ok(line)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
