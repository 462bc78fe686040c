"""CPU-seconds spent by each PostgreSQL server and by the relay (this process and its children), for the
bench lines: on a shared machine wall time is noise, CPU per side is what the design changes.

A server's CPU is its process tree's: the postmaster's own and reaped children's (backends exit when their
connection closes, their CPU is then in the postmaster's cutime/cstime), plus the live children's (walwriter,
checkpointer, open backends). Local servers only (reads /proc)."""
from __future__ import annotations

import os
import resource

import psycopg

_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def postmaster_pid(dsn: str) -> int:
    with psycopg.connect(dsn) as c:
        backend = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        return int(_stat(backend)[1])  # the backend's parent


def server_seconds(postmaster: int) -> float:
    f = _stat(postmaster)
    total = sum(int(x) for x in f[11:15])  # utime stime cutime cstime
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                c = _stat(int(pid))
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(c[1]) == postmaster:
                total += int(c[11]) + int(c[12])
    return total / _TCK


def relay_seconds() -> float:
    """This process and its reaped children (the bench's copy workers, psql)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


class Meter:
    """CPU-seconds of source server, target server and relay across a block: `with meter: ...; meter.last`."""

    def __init__(self, src_dsn: str, tgt_dsn: str):
        self.pids = postmaster_pid(src_dsn), postmaster_pid(tgt_dsn)
        self.last: dict[str, float] = {}

    def _now(self) -> tuple[float, float, float]:
        return server_seconds(self.pids[0]), server_seconds(self.pids[1]), relay_seconds()

    def __enter__(self) -> "Meter":
        self._t0 = self._now()
        return self

    def __exit__(self, *exc) -> None:
        t1 = self._now()
        self.last = {k: b - a for k, a, b in zip(("source", "target", "relay"), self._t0, t1)}


def load() -> dict:
    """How busy the machine was: the 1-minute load average and the CPU count."""
    return {"loadavg_1m": round(os.getloadavg()[0], 2), "cpus": os.cpu_count()}
