"""Benchmark `scale`: the whole DAG on 1,000,000 and 10,000,000 rows under a live writer, memory flat.

For each size: load the wide bench table (id, title, body, real[64], timestamptz; ~600 bytes a row), start a
writer (~200 ops/s of inserts, updates and deletes that follows the pointer: it reads `dbguard.control` FOR
SHARE in the transaction that writes, README "Following the pointer"), run the spec's DAG through
`dag.test()` in a child process (the worker that runs every task), stop the writer, drain what is still in
flight, then compare source and target row for row, independently of dbguard (md5 of every row's text,
streamed in key order from both sides and merged).

Memory is measured per process, each in itself (VmHWM of /proc/self/status): the loader, the writer and the
worker each run in a fresh interpreter of their own. Not `ru_maxrss` of a child: Linux folds the spawning
process's peak into the child's at exec, so a child of a 2 GB `python -m bench` reported 2 GB whatever it did.

One JSON line: {"bench": "scale", "rows", "seconds_per_stage", "rows_per_s", "peak_rss_mb" (the largest
process), "peak_rss_mb_per_process" ({worker, writer, loader, report, bench}), "rss_growth", "lost", ...} where
rss_growth = the worker's peak RSS at the largest size / at the smallest.
Goal: time linear in rows, every process under 300 MB, rss_growth <= 1.5, lost 0, writer_errors 0.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psycopg

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.common import drop_databases, fresh_databases  # noqa: E402
from dbguard.writer import Op, Workload, Writer  # noqa: E402

NAME = "bench_scale"
SIZES = [int(x) for x in os.environ.get("BENCH_SCALE_ROWS", "1000000,10000000").split(",")]


class ItemsWorkload(Workload):
    """What the scale bench's application writes: inserts of new rows, updates of titles among the first 1,000
    keys, deletes among keys 1,001..5,000 of bench.items."""

    weights = {"insert": 4, "update": 5, "delete": 1}

    def __init__(self, id_base: int = 2_000_000_000):
        self.next_id, self.n = id_base, 0

    def run(self, kind, conn, rng):
        self.n += 1
        if kind == "insert":
            self.next_id += 1
            conn.execute("INSERT INTO bench.items (id, title, body, vec, created_at) VALUES "
                         "(%s, %s, 'written by the scale bench', '{1,2,3}', clock_timestamp())",
                         (self.next_id, f"w{self.n}"))
        elif kind == "update":
            conn.execute("UPDATE bench.items SET title = %s WHERE id = %s", (f"u{self.n}", rng.randint(1, 1000)))
        else:
            conn.execute("DELETE FROM bench.items WHERE id = %s", (rng.randint(1001, 5000),))
        return Op(kind)


def pointer_writer(src: str, tgt: str) -> Writer:
    """An application (dbguard.writer) on bench.items at 200 ops/s that follows the pointer: it reads
    dbguard.control FOR SHARE in the source transaction that writes (README, "Following the pointer"), so it
    must never meet the fence (errors by class: writer_fenced)."""
    return Writer(ItemsWorkload(), src, tgt, migration=NAME, follow=True, rate=200, seed=11,
                  synchronous_commit="on", max_errors=10_000, name="scale-writer")


def writer_stats(w: Writer) -> dict:
    s = w.stop()
    return {"writer_ops": s["ops"], "writer_errors": s["errors"], "writer_fenced": s["error_kinds"].get("fenced", 0),
            "writer_max_stall_ms": s["max_stall_ms"], "writer_first_error": s["first_error"]}


def row_diff(src: str, tgt: str, batch: int = 50_000) -> int:
    """Rows that differ between the two sides (missing, extra or changed), streamed in key order."""
    q = "SELECT id, md5(t::text) FROM bench.items t ORDER BY id"
    with psycopg.connect(src) as a, psycopg.connect(tgt) as b:
        ca, cb = a.cursor(name="scale_a"), b.cursor(name="scale_b")
        ca.itersize = cb.itersize = batch
        ca.execute(q)
        cb.execute(q)
        ia, ib = iter(ca), iter(cb)
        ra, rb, diff = next(ia, None), next(ib, None), 0
        while ra is not None or rb is not None:
            if rb is None or (ra is not None and ra[0] < rb[0]):
                diff, ra = diff + 1, next(ia, None)
            elif ra is None or rb[0] < ra[0]:
                diff, rb = diff + 1, next(ib, None)
            else:
                diff += ra[1] != rb[1]
                ra, rb = next(ia, None), next(ib, None)
        return diff


def _spec_file(tmp: Path) -> Path:
    import yaml

    from bench.__main__ import wide_spec

    raw = wide_spec(concurrency=2).model_dump(mode="json", by_alias=True, exclude_defaults=True)
    raw.pop("backfill", None)  # the defaults are what is measured
    raw["backfill"] = {"concurrency": 2}
    raw["name"] = NAME
    raw["window"] = {"start": "00:00", "end": "23:59"}
    raw["run_cutover"] = True  # the whole DAG: backfill, reconcile, capture under the writer, cutover
    raw.pop("schema_freeze", None)  # the default (on), as users run it: the cutover verifies what changed
    path = tmp / f"{NAME}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def child(spec_path: str) -> None:
    """In the child: run the DAG once, print per-stage seconds and the result as JSON (last line)."""
    from airflow import settings
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.taskinstance import TaskInstance

    from dbguard.airflow import env

    env.airflow_defaults()
    env.ensure_metadata_db()
    os.environ["DBGUARD_SPECS"] = spec_path
    dag = DagBag(str(env.DAGS_FOLDER)).dags[f"dbguard_{NAME}"]
    before = _status_mb("VmRSS")
    sampler = RssSampler().start()
    t0 = time.monotonic()
    dag_run = dag.test()
    wall = time.monotonic() - t0
    sampler.stop()
    stages: dict[str, float] = {}
    stage_rss: dict[str, float] = {}
    with settings.Session() as s:
        for ti in s.query(TaskInstance).filter(TaskInstance.dag_id == dag.dag_id,
                                               TaskInstance.run_id == dag_run.run_id):
            if ti.start_date and ti.end_date:
                stage = ti.task_id.split(".")[-1] if ti.task_id.endswith(("copy_range", "plan_ranges")) else ti.task_id
                stages[stage] = stages.get(stage, 0.0) + (ti.end_date - ti.start_date).total_seconds()
                peak = sampler.peak(ti.start_date.timestamp(), ti.end_date.timestamp())
                if peak is not None:
                    stage_rss[stage] = max(stage_rss.get(stage, 0.0), peak)
    result = env.run_result(dag_run) or {}
    print(json.dumps({"wall": wall, "stages": {k: round(v, 2) for k, v in stages.items()},
                      "status": result.get("status"), "checksum_ok": result.get("checksum_ok"),
                      "cutover_ms": result.get("cutover_ms"), "checksum_gate_mode": result.get("checksum_gate_mode"),
                      "peak_rss_mb": round(_status_mb("VmHWM"), 1), "rss_before_run_mb": round(before, 1),
                      "stage_rss_mb": {k: round(v, 1) for k, v in stage_rss.items()}}), flush=True)


def _status_mb(field: str) -> float:
    """VmHWM (peak) or VmRSS (now) of this process, in MB."""
    with open("/proc/self/status") as f:
        for ln in f:
            if ln.startswith(field + ":"):
                return int(ln.split()[1]) / 1024
    return 0.0


class RssSampler:
    """This process's RSS every 0.2 s, to say which stage holds the peak."""

    def __init__(self, every: float = 0.2):
        self.every, self.samples = every, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append((time.time(), _status_mb("VmRSS")))

    def start(self) -> "RssSampler":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def peak(self, t0: float, t1: float) -> float | None:
        inside = [mb for t, mb in self.samples if t0 <= t <= t1]
        return max(inside) if inside else None


def writer_process(src: str, tgt: str) -> None:
    """In its own process: the pointer-following writer until a line (or EOF) on stdin, then its stats
    and peak RSS."""
    w = pointer_writer(src, tgt).start()
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps({**writer_stats(w), "peak_rss_mb": round(_status_mb("VmHWM"), 1)}), flush=True)


def load_process(dsn: str, rows: int) -> None:
    """In its own process: load the wide table; seconds and peak RSS."""
    from dbguard import demo

    t0 = time.monotonic()
    demo.load_wide(dsn, "bench.items", rows)
    print(json.dumps({"seconds": round(time.monotonic() - t0, 1), "peak_rss_mb": round(_status_mb("VmHWM"), 1)}),
          flush=True)


def _run_json(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, "-m", "bench.scale", *args], cwd=ROOT, capture_output=True, text=True,
                         env=os.environ.copy())
    if out.returncode != 0:
        raise RuntimeError(f"bench.scale {args[0]} exited {out.returncode}: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def one_size(rows: int, tmp: Path) -> dict:
    from dbguard import capture
    from dbguard.spec import load_spec

    dsns = fresh_databases(NAME)
    loaded = _run_json(["--load", dsns["dbguard_source"], str(rows)])
    spec_path = _spec_file(tmp)
    writer = subprocess.Popen([sys.executable, "-m", "bench.scale", "--writer", dsns["dbguard_source"],
                               dsns["dbguard_target"]], cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env=os.environ.copy())
    writer.stdout.readline()  # "ready"

    def stop_writer() -> dict:
        out_, _ = writer.communicate("stop\n", timeout=120)
        return json.loads(out_.strip().splitlines()[-1])

    log = open(tmp / f"dag_{rows}.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "bench.scale", "--child", str(spec_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=log, text=True, env=os.environ.copy())
    out = proc.stdout.read()
    proc.wait()
    log.write(out)  # Airflow's task log goes to the child's stdout: keep it beside the stderr for diagnosis
    log.close()
    if proc.returncode != 0:
        stop_writer()
        raise RuntimeError(f"the DAG run for {rows} rows exited {proc.returncode}; see {log.name}")
    time.sleep(2)  # a few writes after the run, through the pointer
    wstats = stop_writer()
    spec = load_spec(spec_path)
    last = json.loads([ln for ln in out.splitlines() if ln.startswith("{")][-1])
    # What the writer did after the run ended is still in flight: drain it before comparing.
    run_id = None
    with psycopg.connect(dsns["dbguard_target"]) as c:
        run_id = c.execute("SELECT run_id FROM dbguard.runs ORDER BY started_at DESC LIMIT 1").fetchone()[0]
        m = dict(c.execute("SELECT name, value FROM dbguard.metrics WHERE run_id = %s AND name IN "
                           "('cutover_steps', 'cutover_verify', 'report_render')", (run_id,)).fetchall())
    cut = {"cutover_steps_ms": {x["step"]: x["ms"] for x in m.get("cutover_steps") or []},
           "cutover_verify_mode": (m.get("cutover_verify") or {}).get("mode")}
    for direction in ("forward", "reverse"):
        try:
            if capture.is_on(spec, direction=direction):
                capture.drain(spec, run_id, direction=direction)
        except TypeError:  # a capture without directions (before the cutover work): forward only
            if direction == "forward" and capture.is_on(spec):
                capture.drain(spec, run_id)
    lost = row_diff(dsns["dbguard_source"], dsns["dbguard_target"])
    per = {"worker": last["peak_rss_mb"], "writer": wstats.pop("peak_rss_mb"), "loader": loaded["peak_rss_mb"],
           "report": (m.get("report_render") or {}).get("peak_rss_mb"),  # the worker's child that draws the page
           "bench": round(_status_mb("VmHWM"), 1)}  # this process: drain and row_diff (all sizes so far)
    return {"rows": rows, "load_seconds": loaded["seconds"], "dag_seconds": round(last["wall"], 1),
            "seconds_per_stage": last["stages"], "status": last["status"], "checksum_ok": last["checksum_ok"],
            "cutover_ms": last["cutover_ms"], "checksum_gate_mode": last["checksum_gate_mode"],
            "peak_rss_mb": max(v for v in per.values() if v is not None),
            "peak_rss_mb_per_process": per, "worker_rss_before_run_mb": last["rss_before_run_mb"],
            "worker_stage_rss_mb": last["stage_rss_mb"], **cut, "lost": lost, **wstats}


def main() -> None:
    from dbguard.airflow import env

    env.airflow_defaults()
    env.ensure_metadata_db()
    tmp = Path(tempfile.mkdtemp(prefix="dbguard-scale-"))
    results = [one_size(n, tmp) for n in SIZES]
    if all(r["status"] == "cutover" and r["lost"] == 0 for r in results):
        drop_databases(NAME)  # else keep the last size's databases (and the DAG logs in tmp) for diagnosis
    else:
        print(f"scale: a run did not end cutover with nothing lost; logs in {tmp}, databases {NAME} kept",
              file=sys.stderr)
    small, big = results[0], results[-1]
    ratio = big["rows"] / small["rows"]
    print(json.dumps({"bench": "scale", "rows": big["rows"], "seconds_per_stage": big["seconds_per_stage"],
                      "rows_per_s": round(big["rows"] / big["dag_seconds"]),
                      "peak_rss_mb": big["peak_rss_mb"], "peak_rss_mb_per_process": big["peak_rss_mb_per_process"],
                      "rss_growth": round(big["peak_rss_mb_per_process"]["worker"]
                                          / small["peak_rss_mb_per_process"]["worker"], 2),
                      "lost": sum(r["lost"] for r in results),
                      "time_growth": round(big["dag_seconds"] / small["dag_seconds"], 2), "rows_growth": ratio,
                      "status": big["status"], "cutover_ms": big["cutover_ms"],
                      "checksum_gate_mode": big["checksum_gate_mode"],  # a live writer: "measured"
                      "writer_errors": sum(r["writer_errors"] for r in results),
                      "writer_max_stall_ms": big["writer_max_stall_ms"], "sizes": results}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(sys.argv[2])
    elif len(sys.argv) == 4 and sys.argv[1] == "--writer":
        writer_process(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--load":
        load_process(sys.argv[2], int(sys.argv[3]))
    else:
        main()
