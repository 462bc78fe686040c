"""The writer's loop: connections, the pointer, pacing, what was acknowledged, errors.

One operation is one transaction. Following the pointer (`follow=<migration>`), it is the README's
protocol: read `dbguard.control.write_target` FOR SHARE on the source, write to that side in the same
transaction (on the source) or before that transaction commits (on the target), commit. The cutover's
freeze holds that row, so a writer that follows it waits instead of writing to the side being left, and
never meets the fence. Without `follow`, every write goes to the fixed `source` DSN.
"""
from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import psycopg

POINTER = ("SELECT write_target, dual_write FROM dbguard.control WHERE migration = %s AND direction = 'forward' "
           "FOR SHARE")


@dataclass(frozen=True)
class Op:
    """What one committed operation did to one of the writer's own rows: `key` now holds `value` (None =
    deleted); `old_key` is the key it had before a key change. key None: nothing to remember."""
    kind: str
    key: Any = None
    value: Any = None
    old_key: Any = None


class Workload:
    """What to write. `weights` maps operation kinds to relative frequencies; `op_<kind>(conn, rng)` does one
    (returns an Op, or None when there was nothing to do). Subclasses keep their own state of live rows."""

    weights: dict[str, int] = {}
    session_sql: str | None = None  # run on every connection the writer opens (output settings, ...)

    def prepare(self, conn: psycopg.Connection) -> None:
        """Read what the workload needs from the source before the first write (autocommit connection)."""

    def pick(self, rng: random.Random) -> str:
        kinds, weights = zip(*self.weights.items())
        return rng.choices(kinds, weights)[0]

    def run(self, kind: str, conn: psycopg.Connection, rng: random.Random) -> Op | None:
        return getattr(self, "op_" + kind)(conn, rng)

    def acknowledged(self, op: Op) -> None:
        """Called once `op`'s transaction committed (state that must follow only what was acknowledged)."""

    def read(self, conn: psycopg.Connection, keys: list) -> dict:
        """{key: value} as `conn`'s side holds them now, for `Writer.check` (workloads that remember rows)."""
        raise NotImplementedError(f"{type(self).__name__} does not remember its rows")


def classify(e: BaseException) -> str:
    """fenced (an old primary refused the write), connection, conflict (deadlock, serialization), other."""
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction) and "fenced" in str(e):
        return "fenced"
    if isinstance(e, (psycopg.OperationalError, psycopg.InterfaceError)) and not isinstance(
            e, (psycopg.errors.QueryCanceled, psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected,
                psycopg.errors.SerializationFailure)):
        return "connection"
    if isinstance(e, (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure)):
        return "conflict"
    return "other"


class Writer:
    """An application writing `workload` in a background thread, `rate` operations a second (None: as fast as
    it can), the sequence fixed by `seed`.

    follow=True: follow `migration`'s pointer between `source` and `target` (see the module doc); else every
    write goes to `source`. switch="stop" | "pause": honour the control row's `dual_write` like an application
    on dbguard's switch: stop for good (or pause, then go on) while it is false. The control row is read FOR
    SHARE in the write's own transaction on `source`, once dbguard.control exists.

    It remembers what was acknowledged: `rows` (key -> last committed value, None = deleted), `side_of` (key
    -> the side that took its last write), `after_back` (keys written to the source after writes to the
    target: a flip back), counts by kind and side, the longest stall, every error and its class.
    """

    def __init__(self, workload: Workload, source: str, target: str | None = None, *, migration: str | None = None,
                 follow: bool = False, switch: str | None = None, rate: float | None = 200, seed: int = 7, max_ops: int | None = None,
                 synchronous_commit: str = "off", max_errors: int = 100, error_pause: float = 0.0,
                 name: str = "app-writer"):
        if follow and not target:
            raise ValueError("Writer(follow=True) needs the target DSN too")
        if (follow or switch) and not migration:
            raise ValueError("Writer(follow=/switch=) needs the migration whose control row to read")
        if switch not in (None, "stop", "pause"):
            raise ValueError(f"Writer(switch={switch!r}): expected 'stop' or 'pause'")
        self.workload, self.migration, self.follow, self.switch = workload, migration, follow, switch
        self.dsns = {"source": source, "target": target}
        self.rate, self.seed, self.max_ops, self.name = rate, seed, max_ops, name
        self.synchronous_commit, self.max_errors, self.error_pause = synchronous_commit, max_errors, error_pause
        self.rng = random.Random(seed)
        self.rows: dict[Any, Any] = {}
        self.side_of: dict[Any, str] = {}
        self.after_back: set = set()
        self.counts: Counter = Counter()
        self.sides: Counter = Counter()
        self.errors: list[str] = []
        self.error_kinds: Counter = Counter()
        self.ops = self.paused = 0
        self.max_stall_ms = 0.0
        self.started = self.stopped = 0.0
        self._conns: dict[str, psycopg.Connection | None] = {"source": None, "target": None}
        self._stop, self._pause, self._idle = threading.Event(), threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._stats: dict | None = None

    # -- connections --------------------------------------------------------------------------------------
    def _conn(self, side: str) -> psycopg.Connection:
        """One connection per side, reopened when lost (the fault may be a server restart). The source's is
        the pointer's (its transaction is the operation's); the target's is autocommit when following."""
        c = self._conns[side]
        if c is None or c.closed or c.broken:
            c = psycopg.connect(self.dsns[side], autocommit=side == "target", connect_timeout=10)
            c.execute("SELECT set_config('synchronous_commit', %s, false)", (self.synchronous_commit,))
            if self.workload.session_sql:
                c.execute(self.workload.session_sql)
            if not c.autocommit:
                c.commit()
            self._conns[side] = c
        return c

    # -- control ------------------------------------------------------------------------------------------
    def start(self) -> "Writer":
        with psycopg.connect(self.dsns["source"], autocommit=True) as c:
            if self.workload.session_sql:
                c.execute(self.workload.session_sql)
            self.workload.prepare(c)
        self._conn("source")
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self.started = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> dict[str, Any]:
        """Stop (idempotent) and return the stats."""
        if self._stats is not None:
            return self._stats
        self._stop.set()
        self._pause.clear()
        if self._thread is not None:
            self._thread.join(60)
        self.stopped = self.stopped or time.monotonic()
        for c in self._conns.values():
            if c is not None:
                with contextlib.suppress(Exception):
                    c.close()
        self._stats = self.stats()
        return self._stats

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """With max_ops (or a switch that stops it): block until the writer ends by itself, then stop."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.stop()

    def run_for(self, seconds: float) -> dict[str, Any]:
        self.start()
        time.sleep(seconds)
        return self.stop()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def pause(self, timeout: float = 10) -> None:
        """Hold the writer between operations; returns once no operation is in flight."""
        self._idle.clear()
        self._pause.set()
        if not self._idle.wait(timeout) and self.running:
            raise TimeoutError(f"writer still mid-operation after {timeout} s")

    def resume(self) -> None:
        self._pause.clear()

    def stats(self) -> dict[str, Any]:
        secs = (self.stopped or time.monotonic()) - self.started if self.started else 0
        return {"ops": self.ops, "seconds": round(secs, 3), "ops_per_s": round(self.ops / secs, 1) if secs else None,
                "max_stall_ms": round(self.max_stall_ms, 1), "by_kind": dict(self.counts), "by_side": dict(self.sides),
                "paused": self.paused, "errors": len(self.errors), "error_kinds": dict(self.error_kinds),
                "first_error": self.errors[:1], "first_errors": sorted(set(self.errors))[:3]}

    # -- what it acknowledged ------------------------------------------------------------------------------
    def check(self, dsn: str) -> dict[str, int]:
        """The writer's own record against one side: lost = committed rows absent or stale there,
        resurrected = rows it deleted (or re-keyed away) that are there."""
        with psycopg.connect(dsn) as c:
            got = self.workload.read(c, list(self.rows))
        lost = sum(1 for k, v in self.rows.items() if v is not None and got.get(k) != v)
        resurrected = sum(1 for k, v in self.rows.items() if v is None and k in got)
        return {"rows": len(self.rows), "lost": lost, "resurrected": resurrected}

    def _remember(self, op: Op, side: str) -> None:
        self.counts[op.kind] += 1
        self.sides[side] += 1
        self.ops += 1
        if op.key is None:
            return
        back = side == "source" and self.sides["target"] > 0
        if op.old_key is not None:
            self.rows[op.old_key] = None
            self.side_of[op.old_key] = side
            if back:
                self.after_back.add(op.old_key)
        self.rows[op.key] = op.value
        self.side_of[op.key] = side
        if back:
            self.after_back.add(op.key)

    # -- the loop -------------------------------------------------------------------------------------------
    def _where(self, src: psycopg.Connection) -> str | None:
        """The side to write to, in `src`'s open transaction; None: the switch says do not write now."""
        if not (self.follow or self.switch):
            return "source"
        if src.execute("SELECT to_regclass('dbguard.control')").fetchone()[0] is None:
            return "source"  # capture not set up yet: plain writes
        row = src.execute(POINTER, (self.migration,)).fetchone()
        side, dual = (row[0], row[1]) if row else ("source", True)
        if self.switch and not dual:
            return None
        return side if self.follow else "source"

    def _run(self) -> None:
        n = 0
        while not self._stop.is_set():
            if self._pause.is_set():
                self._idle.set()
                time.sleep(0.01)
                continue
            self._idle.clear()
            kind = self.workload.pick(self.rng)
            t = time.monotonic()
            src = None
            try:
                src = self._conn("source")
                side = self._where(src)
                if side is None:  # the switch is off
                    src.rollback()
                    if self.switch == "stop":
                        break
                    self.paused += 1
                    time.sleep(0.02)
                    continue
                op = self.workload.run(kind, src if side == "source" else self._conn("target"), self.rng)
                src.commit()
                if op is not None:
                    self._remember(op, side)
                    self.workload.acknowledged(op)
            except psycopg.Error as e:
                with contextlib.suppress(Exception):
                    if src is not None and not src.closed:
                        src.rollback()
                self.errors.append(f"{kind}: {(str(e).strip().splitlines() or [type(e).__name__])[0]}")
                self.error_kinds[classify(e)] += 1
                if len(self.errors) > self.max_errors:
                    break
                if self.error_pause:
                    time.sleep(self.error_pause)
            self.max_stall_ms = max(self.max_stall_ms, (time.monotonic() - t) * 1000)
            n += 1
            if self.max_ops is not None and self.ops >= self.max_ops:
                break
            if self.rate:
                ahead = n / self.rate - (time.monotonic() - self.started)
                if ahead > 0:
                    time.sleep(ahead)
        self.stopped = time.monotonic()
        self._idle.set()
