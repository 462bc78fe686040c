"""A dbguard stage in its own process, so a scenario can SIGKILL it mid-work (as a worker host dies).

    echo '{"op": "copy_range", "spec": {...}, "run": "r", "range": {...}}' | python -m faults.worker

Ops: copy_range (stages.copy_range), rollback (cutover.rollback). Prints the stage's result as one JSON line.
"""
from __future__ import annotations

import json
import sys
import warnings

warnings.filterwarnings("ignore")


def main() -> int:
    from dbguard import cutover, stages
    from dbguard.spec import parse_spec

    doc = json.load(sys.stdin)
    spec = parse_spec(doc["spec"])
    if doc["op"] == "copy_range":
        out = stages.copy_range(spec, doc["run"], doc["range"])
    elif doc["op"] == "rollback":
        out = cutover.rollback(spec, doc["run"])
    else:
        raise SystemExit(f"unknown op {doc['op']!r}")
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
