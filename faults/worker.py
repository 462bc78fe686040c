"""A dbguard stage in its own process, so a scenario can SIGKILL it mid-work (as a worker host dies).

    echo '{"op": "copy_range", "spec": {...}, "run": "r", "range": {...}}' | python -m faults.worker

Ops: copy_range (stages.copy_range), cutover (cutover.cutover), rollback (cutover.rollback); "fail_at" is handed
to the last two (e.g. "pointer:kill": the process SIGKILLs itself right after that step's work). Prints the
stage's result as one JSON line.
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
    elif doc["op"] in ("cutover", "rollback"):
        kw = {"fail_at": doc["fail_at"]} if doc.get("fail_at") else {}
        out = getattr(cutover, doc["op"])(spec, doc["run"], **kw)
    else:
        raise SystemExit(f"unknown op {doc['op']!r}")
    print(json.dumps(out, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
