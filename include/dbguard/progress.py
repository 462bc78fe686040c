"""Run progress for the command line, read from the ledger while the DAG runs.

A thread polls the target's `dbguard` tables (runs, events, ranges) about once a second:
the current stage (latest event, or "backfill" while ranges are still planned), ranges
verified / planned, rows, rows/s and an ETA. On a terminal it redraws one line (\\r);
elsewhere it prints one plain line per stage change and one when the backfill ends, so a
log file or CI output stays short. Nothing here imports Airflow.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import shutil
import threading
import time
from dataclasses import dataclass
from typing import IO

import psycopg

from . import db
from .spec import MigrationSpec


@dataclass
class Snapshot:
    run_id: str | None = None
    stage: str | None = None
    planned: int = 0        # ranges in the plan (every status)
    verified: int = 0
    rows: int = 0           # rows copied by verified ranges
    copy_seconds: float = 0.0  # wall time since the first range finished being planned
    tables_planned: int = 0
    tables: int = 0         # tables in the spec (a child table is planned after its parents' ranges)

    @property
    def done(self) -> bool:
        return bool(self.planned) and self.verified >= self.planned and self.tables_planned >= self.tables

    @property
    def rate(self) -> float | None:
        # Mid-copy, under half a second says nothing; a finished backfill has its rate however short.
        if not self.rows or self.copy_seconds <= 0 or (self.copy_seconds < 0.5 and not self.done):
            return None
        return self.rows / self.copy_seconds

    @property
    def eta_s(self) -> float | None:
        if (not self.verified or self.verified >= self.planned or self.copy_seconds <= 0
                or self.tables_planned < self.tables):
            return None
        return (self.planned - self.verified) * self.copy_seconds / self.verified


def _fmt_s(s: float) -> str:
    return f"{s:.0f}s" if s < 90 else f"{s / 60:.1f}min"


def line(snap: Snapshot, elapsed: float) -> str:
    """One human line: `[12s] backfill: ranges 5/10, 50,000 rows, 41,000 rows/s, ETA 3s`."""
    parts = [f"[{_fmt_s(elapsed)}] {snap.stage or 'starting'}"]
    if snap.planned:
        parts.append(f"ranges {snap.verified}/{snap.planned}"
                     + (f" (tables planned {snap.tables_planned}/{snap.tables})" if snap.tables_planned < snap.tables
                        else "") + f", {snap.rows:,} rows")
        if snap.rate:
            parts.append(f"{snap.rate:,.0f} rows/s")
        if snap.eta_s is not None:
            parts.append(f"ETA {_fmt_s(snap.eta_s)}")
    return parts[0] + (": " + ", ".join(parts[1:]) if len(parts) > 1 else "")


def read(conn: psycopg.Connection, migration: str, since: dt.datetime, run_id: str | None,
         tables: int = 0) -> Snapshot:
    """The newest run of `migration` started after `since` (or `run_id`), as a Snapshot."""
    if conn.execute("SELECT to_regclass('dbguard.ranges')").fetchone()[0] is None:
        return Snapshot()
    if run_id is None:
        row = conn.execute("SELECT run_id FROM dbguard.runs WHERE migration = %s AND started_at >= %s "
                           "ORDER BY started_at DESC LIMIT 1", (migration, since)).fetchone()
        if row is None:
            return Snapshot()
        run_id = row[0]
    seen, verified, rows, first, last = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE status = 'verified'), "
        "coalesce(sum(rows) FILTER (WHERE status = 'verified'), 0), min(updated_at), "
        "max(updated_at) FILTER (WHERE status <> 'planned') FROM dbguard.ranges WHERE run_id = %s",
        (run_id,)).fetchone()
    # The plan's size per table: metric planned_ranges.<table> (set by the first copy of that table),
    # else the ranges rows seen so far (a copy task writes its row when it starts).
    per_table = dict(conn.execute(
        "SELECT r.table_name, greatest(count(*), max((m.value #>> '{}')::int)) FROM dbguard.ranges r "
        "LEFT JOIN dbguard.metrics m ON m.run_id = r.run_id AND m.name = 'planned_ranges.' || r.table_name "
        "WHERE r.run_id = %s GROUP BY r.table_name", (run_id,)).fetchall())
    planned, tplanned = max(seen, sum(per_table.values())), len(per_table)
    ev = conn.execute("SELECT stage FROM dbguard.events WHERE run_id = %s ORDER BY id DESC LIMIT 1",
                      (run_id,)).fetchone()
    stage = ev[0] if ev else "preflight"
    if planned and (verified < planned or tplanned < tables) and stage in ("preflight", "capture_on", "drain_changes"):
        stage = "backfill"
    now = conn.execute("SELECT clock_timestamp()").fetchone()[0]
    busy = verified < planned or tplanned < tables
    seconds = ((now if busy else (last or now)) - first).total_seconds() if first else 0.0
    return Snapshot(run_id, stage, planned, verified, int(rows), seconds, tplanned, tables)


class Progress:
    """Context manager: polls in a daemon thread, draws on `out`; stops (and ends the line) on exit."""

    def __init__(self, spec: MigrationSpec, out: IO[str], *, interval_s: float = 1.0, tty: bool | None = None):
        self.spec, self.out, self.interval_s = spec, out, interval_s
        self.tty = out.isatty() if tty is None else tty
        self.since = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=2)
        self.t0 = time.monotonic()
        self.last = Snapshot()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="dbguard-progress", daemon=True)
        self._printed_stage: str | None = None
        self._backfill_done = False
        self._width = 0

    def __enter__(self) -> "Progress":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.poll_once()
        if self.tty and self._width:
            self.out.write("\n")
            self.out.flush()

    def _loop(self) -> None:
        conn = None
        while not self._stop.wait(self.interval_s):
            try:
                if conn is None or conn.closed:
                    conn = db.connect(self.spec.target.conn_id, autocommit=True)
                self._draw(read(conn, self.spec.name, self.since, self.last.run_id, len(self.spec.tables)))
            except (psycopg.Error, Exception):  # the target may not exist yet; progress is best effort
                with contextlib.suppress(Exception):
                    conn and conn.close()
                conn = None
        with contextlib.suppress(Exception):
            conn and conn.close()

    def poll_once(self) -> None:
        with contextlib.suppress(Exception), db.connect(self.spec.target.conn_id, autocommit=True) as conn:
            self._draw(read(conn, self.spec.name, self.since, self.last.run_id, len(self.spec.tables)))

    def _draw(self, snap: Snapshot) -> None:
        if snap.run_id is None:
            return
        self.last = snap
        text = "dbguard: " + line(snap, time.monotonic() - self.t0)
        if self.tty:  # one line redrawn in place: never wider than the terminal (a wrap breaks \r)
            text = text[:max(20, shutil.get_terminal_size((120, 24)).columns - 1)]
            pad = max(0, self._width - len(text))
            self.out.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            if snap.stage != self._printed_stage or (snap.done and not self._backfill_done):
                self._printed_stage = snap.stage
                self._backfill_done = self._backfill_done or snap.done
                self.out.write(text + "\n")
        self.out.flush()
