"""How a migration runs: backfill, gates, maintenance window, capture, cutover."""
from __future__ import annotations

import datetime as dt
import zoneinfo
from typing import Annotated, Literal

from pydantic import AfterValidator, Field, model_validator

from .fields import _HHMM, Ident, _At, _Model, _timezone


class Backfill(_Model):
    batch_rows: int = Field(250_000, ge=100, le=10_000_000, description="rows per key range (250k keeps Airflow's "
                                                                       "per-task cost under 10 % of a run: bench airflow_overhead)")
    concurrency: int = Field(4, ge=1, le=64, description="Airflow pool slots = parallel range copies")
    max_rows_per_second: int | None = Field(None, ge=1, description="throttle per range copy")
    retries: int = Field(3, ge=0, le=20)
    retry_delay_seconds: float = Field(5, gt=0, le=3600)
    max_retry_delay_seconds: float = Field(300, gt=0, le=86400)
    copy_format: Literal["auto", "binary", "text"] = "auto"
    verify: Literal["stream", "checksum"] = Field(
        "stream", description="per-range proof: 'stream' compares the bytes the copy carried with the range read "
                              "back from the target (exact, no extra scan of the source); 'checksum' runs the SQL "
                              "checksum on both servers (see docs: Verification)")


class Gates(_Model):
    repair_attempts: int = Field(2, ge=0, le=10, description="reconcile -> repair -> verify rounds")
    max_repair_rows: int = Field(100_000, ge=0, description="above this many differing rows, fail instead of repairing")
    bisect_leaf_rows: int = Field(2_000, ge=10, description="ranges this small are compared row by row")
    checksum_timeout_minutes: float = Field(30, gt=0)
    max_lag_ops: int = Field(1_000, ge=0, description="drain gate: unapplied change ops allowed after a drain pass "
                                                       "(the final verification drains to 0 under a write freeze)")
    delta_s_max: float = Field(0.02, ge=0, le=2)
    delta_s_escalate: float = Field(0.05, ge=0, le=2)
    escalate_after_minutes: float = Field(15, ge=0)
    latency_p95_change: float = Field(0.15, ge=0)
    float_tolerance: float = Field(1e-6, ge=0, le=1)

    @model_validator(mode="after")
    def _check(self) -> "Gates":
        if self.delta_s_escalate < self.delta_s_max:
            raise _At("delta_s_escalate", f"{self.delta_s_escalate} is below delta_s_max ({self.delta_s_max}); "
                                          "the escalation threshold must be >= the pass threshold")
        return self


class Window(_Model):
    start: str = Field(description="HH:MM, inclusive")
    end: str = Field(description="HH:MM, exclusive; may be past midnight (end < start)")
    timezone: Annotated[str, AfterValidator(_timezone)] = "UTC"
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] | None = None

    @model_validator(mode="after")
    def _check(self) -> "Window":
        for name in ("start", "end"):
            if not _HHMM.match(getattr(self, name)):
                raise _At(name, f"{getattr(self, name)!r} must be HH:MM (24-hour, 00:00..23:59), e.g. '02:00'")
        if self.start == self.end:
            raise _At("end", "start and end are equal: the window would be empty; "
                             "for a window past midnight give an end before the start")
        return self

    def contains(self, when: dt.datetime) -> bool:
        local = when.astimezone(zoneinfo.ZoneInfo(self.timezone))
        t = local.strftime("%H:%M")
        if self.start < self.end:
            inside, day = self.start <= t < self.end, local
        else:  # past midnight: the part after midnight belongs to the previous day's window
            inside = t >= self.start or t < self.end
            day = local if t >= self.start else local - dt.timedelta(days=1)
        return inside and (self.days is None or day.strftime("%a").lower() in self.days)

    def next_open(self, after: dt.datetime) -> dt.datetime:
        """The first instant >= `after` that is inside the window (`after` itself when it is inside), as an
        aware UTC datetime. Openings are at `start` local time on the window's days; any window opens
        within 8 days. A `start` that does not exist on a DST day (a gap) opens at the first valid minute."""
        if self.contains(after):
            return after.astimezone(dt.timezone.utc)
        tz = zoneinfo.ZoneInfo(self.timezone)
        local = after.astimezone(tz)
        h, m = (int(x) for x in self.start.split(":"))
        for d in range(0, 9):
            day = (local + dt.timedelta(days=d)).date()
            # wall-clock start on that day, normalised through UTC (a DST gap moves it forward)
            opening = dt.datetime(day.year, day.month, day.day, h, m, tzinfo=tz).astimezone(dt.timezone.utc)
            if opening >= after and self.contains(opening):
                return opening
        raise ValueError(f"window {self.describe()} never opens")  # unreachable: validated non-empty

    def describe(self) -> str:
        days = ",".join(self.days) if self.days else "daily"
        return f"{self.start}-{self.end} {self.timezone} ({days})"

    def cron(self) -> str:
        """Cron expression for the window's openings (minute hour * * days), in `timezone`."""
        h, m = (int(x) for x in self.start.split(":"))
        return f"{m} {h} * * {','.join(self.days) if self.days else '*'}"


class Capture(_Model):
    """Change capture (dual writes): source triggers -> change ledger -> idempotent applier."""

    enabled: bool = Field(True, description="capture source writes during the run (off = snapshot-only migration)")
    batch_ops: int = Field(2_000, ge=1, le=100_000, description="ledger ops applied per target transaction")
    ddl_lock_timeout_ms: int = Field(5_000, ge=1, description="lock_timeout while creating/dropping the triggers")
    stop_on_error: bool = Field(False, description="stop draining after a batch with failed ops "
                                                   "(they are recorded either way; dual_write_fail must be 0)")


class PgBouncer(_Model):
    """Where the PgBouncer that applications connect through is, for `cutover.pointer: pgbouncer`."""

    config: str = Field(description="path of the pgbouncer ini file whose [databases] entry is rewritten")
    database: Ident = Field(description="the alias applications connect to (a key of [databases])")
    host: str = Field("127.0.0.1", description="admin console host (or unix socket directory)")
    port: int = Field(6432, ge=1, le=65535, description="admin console port")
    user: str = Field("pgbouncer", description="a user listed in admin_users")


class Cutover(_Model):
    """How the flip moves the application and how long writers may be frozen for it."""

    pointer: Literal["control_table", "pgbouncer"] = Field(
        "control_table", description="control_table: applications read dbguard.control.write_target on the source; "
                                     "pgbouncer: the alias in the pgbouncer ini is rewritten and reloaded")
    lock_timeout_ms: int = Field(3_000, ge=1, description="bound on each attempt to take the write freeze")
    retries: int = Field(3, ge=0, le=100, description="attempts after the first when the freeze lock times out")
    pgbouncer: PgBouncer | None = Field(None, description="required with pointer: pgbouncer")

    @model_validator(mode="after")
    def _pgbouncer_needs_settings(self) -> "Cutover":
        if self.pointer == "pgbouncer" and self.pgbouncer is None:
            raise ValueError("pgbouncer: pointer 'pgbouncer' needs cutover.pgbouncer {config, database, host, "
                             "port, user}")
        return self
