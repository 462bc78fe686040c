"""Backfill: copy one key range by streaming COPY from source to target, then verify it.

A range is copied in ONE target transaction: delete whatever the target holds
in the range, COPY the source rows in, prove the range, count orphan foreign
keys, and write the ledger row; then commit. A retry (after a crash, a kill or
a timeout) repeats the same transaction, so a range is never half-copied or
duplicated. The proof (range_proof) hashes the source stream as the relay
carries it and the range read back from the target; tables it cannot prove
byte for byte are checksummed in SQL instead: the source side in a REPEATABLE
READ snapshot exported to a second session while the rows stream.
"""
from __future__ import annotations

import queue
import select
import time
from contextlib import closing
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import psycopg
from psycopg import pq, sql
from psycopg.copy import QueuedLibpqWriter
from psycopg.types.json import Jsonb

from . import db, ledger, range_proof
from .capture import fence_copy
from .checksum import Checksum, Hashing, checksum, relation
from .ranges import KeyRange, predicate
from .spec import MigrationSpec, Table
from .transforms import is_builtin, source_expr


@dataclass
class RangeResult:
    table: str
    range_id: int
    label: str
    rows: int
    seconds: float
    source: Checksum
    target: Checksum
    orphans: int
    source_rev: str
    target_rev: str
    extra: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.source == self.target

    def to_dict(self) -> dict:
        return {"table": self.table, "range_id": self.range_id, "label": self.label, "rows": self.rows,
                "seconds": round(self.seconds, 3), "source": self.source.to_dict(),
                "target": self.target.to_dict(), "orphans": self.orphans, "ok": self.ok,
                "source_rev": self.source_rev, "target_rev": self.target_rev, **self.extra}


def fence(tgt: psycopg.Connection, spec: MigrationSpec) -> None:
    """With capture on, no drain batch may commit between a copy's source snapshot and its commit.
    Then, like the applier, the copy writes as a replica: the target's foreign keys (finish_schema adds them;
    a re-run onto an aborted run's target finds them) and user triggers do not fire on rows that replay the
    source — the range's orphan count and the checksum gate judge the result instead. Without the privilege
    (superuser or GRANT SET ON PARAMETER session_replication_role) constraints are checked per row."""
    if spec.capture.enabled:
        fence_copy(tgt, spec)
    tgt.execute("SAVEPOINT dbguard_role")
    try:
        tgt.execute("SET LOCAL session_replication_role = replica")
    except psycopg.errors.InsufficientPrivilege:
        tgt.execute("ROLLBACK TO SAVEPOINT dbguard_role")


def copy_format(spec: MigrationSpec, table: Table) -> str:
    """Binary COPY needs identical types on both sides (and array element OIDs that match)."""
    if spec.backfill.copy_format != "auto":
        return spec.backfill.copy_format
    same = all(c.tgt_type == c.type for c in table.columns)
    portable = all(is_builtin(c.type) or not c.type.endswith("]") for c in table.columns)
    return "binary" if same and portable else "text"


def select_list(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(source_expr(table, c) for c in table.copy_columns)  # generated: re-generated


def column_list(table: Table) -> sql.Composable:
    return sql.SQL(", ").join(sql.Identifier(c.name) for c in table.copy_columns)


WRITE_BATCH_BYTES = 1 << 20


class BoundedQueuedWriter(QueuedLibpqWriter):
    """psycopg's queued writer (a thread sends to the target while we read the source) keeps up
    to 1024 buffers of 128 KB when the target is the slower side: ~128 MB. 32 keep memory flat."""

    def __init__(self, cursor):
        super().__init__(cursor)
        self._queue = queue.Queue(maxsize=32)


class Throttle:
    """Sleeps so that rows/second stays under a cap (None = unthrottled)."""

    def __init__(self, rows_per_second: int | None):
        self.cap, self.start, self.n = rows_per_second, time.monotonic(), 0

    def tick(self, rows: int = 1) -> None:
        if not self.cap:
            return
        self.n += rows
        if self.n % 256 == 0:
            ahead = self.n / self.cap - (time.monotonic() - self.start)
            if ahead > 0:
                time.sleep(ahead)


def stream_rows(src: psycopg.Connection, tgt: psycopg.Connection, table: Table, where: sql.Composable,
                fmt: str, throttle: Throttle | None = None, *, out_q: sql.Composable | None = None,
                digest: "range_proof.StreamDigest | None" = None) -> int:
    """COPY the selected source rows into the target table; returns rows written.

    A queued writer sends to the target from its own thread while this one reads the source, so the
    two servers work at once (as in a `psql | psql` pipe) instead of taking turns. `out_q` replaces the
    source read (the range proof's, in key order); `digest` hashes the stream as it passes."""
    opts = sql.SQL("(FORMAT binary)") if fmt == "binary" else sql.SQL("")
    out_q = out_q or sql.SQL("COPY (SELECT {cols} FROM {t} WHERE {w}) TO STDOUT {o}").format(
        cols=select_list(table), t=relation(table, "source"), w=where, o=opts)
    in_q = sql.SQL("COPY {t} ({cols}) FROM STDIN {o}").format(
        t=relation(table, "target"), cols=column_list(table), o=opts)
    with tgt.cursor() as tcur:
        with tcur.copy(in_q, writer=BoundedQueuedWriter(tcur)) as inp, \
                closing(copy_out(src, out_q.as_bytes(src), throttle, digest)) as chunks:
            for chunk in chunks:
                inp.write(chunk)
        return tcur.rowcount


def copy_out(conn: psycopg.Connection, query: bytes, throttle: Throttle | None = None,
             digest: "range_proof.StreamDigest | None" = None) -> Iterator[bytearray]:
    """The output of a COPY ... TO STDOUT on `conn`, in pieces of about 1 MB; `digest` hashes each piece
    before it is yielded and is told how many CopyData messages (rows) made the stream.

    Read straight from libpq: psycopg's Copy iterator costs ~2.5 µs of Python a row (a generator and a
    wait per row), which on a CPU-bound copy is CPU the servers need; this loop costs about half (one
    call a row, a poll per network read). If the consumer stops early (a target error), the source
    connection is closed: it is mid-COPY and of no further use."""
    pg = conn.pgconn
    poller = select.poll()
    poller.register(pg.socket, select.POLLIN)

    def result():
        while True:
            pg.consume_input()
            if not pg.is_busy():
                return pg.get_result()
            poller.poll()

    def failed(res):
        while pg.get_result() is not None:
            pass
        return psycopg.errors.error_from_result(res, encoding=conn.info.encoding)

    pg.send_query(query)
    while pg.flush():
        select.select([], [pg.socket], [])
    res = result()
    if res.status != pq.ExecStatus.COPY_OUT:
        raise failed(res)
    done = False
    try:
        buf, get, tick = bytearray(), pg.get_copy_data, throttle.tick if throttle and throttle.cap else None
        hash_, messages = digest.update if digest else None, 0
        while True:
            n, data = get(1)
            if n > 0:
                buf += data
                messages += 1
                if tick:
                    tick()
                if len(buf) >= WRITE_BATCH_BYTES:
                    if hash_:
                        hash_(buf)
                    yield buf
                    buf = bytearray()
            elif n == 0:
                poller.poll()
                pg.consume_input()
            elif n == -1:
                break
            else:
                raise psycopg.OperationalError(f"COPY from the source failed: {pg.get_error_message()}")
        if digest:
            digest.messages = messages
        if buf:
            if hash_:
                hash_(buf)
            yield buf
        if (res := result()).status != pq.ExecStatus.COMMAND_OK:
            raise failed(res)
        while pg.get_result() is not None:
            pass
        done = True
    finally:
        if not done:
            conn.close()


def orphan_count(tgt: psycopg.Connection, spec: MigrationSpec, table: Table, r: KeyRange | None) -> int:
    """Rows in the target range whose foreign key points at no parent row in the target."""
    total = 0
    for fk in table.foreign_keys:
        parent = spec.table(fk.references)
        match = sql.SQL(" AND ").join(
            sql.SQL("p.{} = c.{}").format(sql.Identifier(pc), sql.Identifier(cc))
            for pc, cc in zip(fk.ref_columns, fk.columns))
        notnull = sql.SQL(" AND ").join(sql.SQL("c.{} IS NOT NULL").format(sql.Identifier(c)) for c in fk.columns)
        where = predicate(table, r, alias="c") if r is not None else sql.SQL("true")
        q = sql.SQL("SELECT count(*) FROM {child} c WHERE {w} AND {nn} AND NOT EXISTS "
                    "(SELECT 1 FROM {parent} p WHERE {m})").format(
            child=relation(table, "target"), w=where, nn=notnull, parent=relation(parent, "target"), m=match)
        total += tgt.execute(q).fetchone()[0]
    return total


RANGE_UPSERT = """
INSERT INTO dbguard.ranges (run_id, migration, table_name, range_id, lo, hi, status, rows, seconds,
                            src_count, tgt_count, src_sum, tgt_sum, orphans, source_rev, target_rev)
VALUES (%(run_id)s, %(migration)s, %(table)s, %(range_id)s, %(lo)s, %(hi)s, %(status)s, %(rows)s, %(seconds)s,
        %(src_count)s, %(tgt_count)s, %(src_sum)s, %(tgt_sum)s, %(orphans)s, %(source_rev)s, %(target_rev)s)
ON CONFLICT (run_id, table_name, range_id) DO UPDATE SET
    status = EXCLUDED.status, rows = EXCLUDED.rows, seconds = EXCLUDED.seconds,
    src_count = EXCLUDED.src_count, tgt_count = EXCLUDED.tgt_count, src_sum = EXCLUDED.src_sum,
    tgt_sum = EXCLUDED.tgt_sum, orphans = EXCLUDED.orphans, source_rev = EXCLUDED.source_rev,
    target_rev = EXCLUDED.target_rev, attempts = dbguard.ranges.attempts + 1, updated_at = clock_timestamp()
"""


def record_range(tgt: psycopg.Connection, spec: MigrationSpec, run_id: str, r: KeyRange, status: str,
                 res: RangeResult | None = None) -> None:
    tgt.execute(RANGE_UPSERT, {
        "run_id": run_id, "migration": spec.name, "table": r.table, "range_id": r.range_id,
        "lo": Jsonb(list(r.lo)) if r.lo is not None else None,
        "hi": Jsonb(list(r.hi)) if r.hi is not None else None, "status": status,
        "rows": res.rows if res else None, "seconds": res.seconds if res else None,
        "src_count": res.source.count if res else None, "tgt_count": res.target.count if res else None,
        "src_sum": res.source.total if res else None, "tgt_sum": res.target.total if res else None,
        "orphans": res.orphans if res else None, "source_rev": res.source_rev if res else None,
        "target_rev": res.target_rev if res else None,
    })


def _snapshot_checksum(spec: MigrationSpec, table: Table, r: KeyRange, snapshot: str, h: Hashing) -> Checksum:
    with db.source(spec) as conn:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        conn.execute(sql.SQL("SET TRANSACTION SNAPSHOT {}").format(sql.Literal(snapshot)))
        ck = checksum(conn, table, "source", r, h)
        conn.rollback()
        return ck


def _stream_proven(src: psycopg.Connection, tgt: psycopg.Connection, table: Table, r: KeyRange, fmt: str,
                   rows_per_second: int | None) -> tuple[Checksum, Checksum, int]:
    """Copy the range in key order, hashing the stream as it passes; then hash the range read back."""
    tgt.execute(sql.SQL("DELETE FROM {} WHERE {}").format(relation(table, "target"), predicate(table, r)))
    digest = range_proof.StreamDigest(fmt)
    rows = stream_rows(src, tgt, table, predicate(table, r), fmt, Throttle(rows_per_second),
                       out_q=range_proof.source_query(table, r, fmt), digest=digest)
    return digest.checksum(), range_proof.read_back(tgt, table, r, fmt), rows


def _checksummed(spec: MigrationSpec, src: psycopg.Connection, tgt: psycopg.Connection, table: Table,
                 r: KeyRange, rows_per_second: int | None) -> tuple[str, Checksum, Checksum, int]:
    """The SQL checksum on both servers: the source's in a second session on the copy's exported snapshot."""
    snapshot, source_rev = src.execute("SELECT pg_export_snapshot(), pg_current_snapshot()::text").fetchone()
    h = Hashing.between(spec, src, tgt)
    with ThreadPoolExecutor(1) as pool:
        src_ck = pool.submit(_snapshot_checksum, spec, table, r, snapshot, h)
        tgt.execute(sql.SQL("DELETE FROM {} WHERE {}").format(relation(table, "target"), predicate(table, r)))
        rows = stream_rows(src, tgt, table, predicate(table, r), copy_format(spec, table), Throttle(rows_per_second))
        tgt_ck = checksum(tgt, table, "target", r, h)
        return source_rev, src_ck.result(), tgt_ck, rows


def copy_range(spec: MigrationSpec, run_id: str, r: KeyRange, *,
               rows_per_second: int | None = None, planned: int | None = None,
               before_commit: Callable[[psycopg.Connection], None] | None = None) -> RangeResult:
    """Copy and verify one range; idempotent. `planned` (the plan's range count for the table) is
    recorded with it, for the completeness check. `before_commit` is a test hook (crash simulation)."""
    table = spec.table(r.table)
    t0 = time.monotonic()
    fallback = range_proof.fallback_reason(spec, table)
    with db.source(spec) as src, db.target(spec) as tgt:
        fence(tgt, spec)
        src.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        if fallback is None:
            source_rev = src.execute("SELECT pg_current_snapshot()::text").fetchone()[0]
            src_ck, tgt_ck, rows = _stream_proven(src, tgt, table, r, copy_format(spec, table), rows_per_second)
        else:
            source_rev, src_ck, tgt_ck, rows = _checksummed(spec, src, tgt, table, r, rows_per_second)
        orphans = orphan_count(tgt, spec, table, r)
        target_rev = str(tgt.execute("SELECT pg_current_xact_id()").fetchone()[0])
        res = RangeResult(table.ref, r.range_id, r.label, rows, time.monotonic() - t0, src_ck, tgt_ck, orphans,
                          source_rev, target_rev,
                          {"proof": "stream"} if fallback is None else {"proof": "checksum", "proof_why": fallback})
        src.rollback()
        res.seconds = time.monotonic() - t0
        record_range(tgt, spec, run_id, r, "verified" if res.ok else "mismatch", res)
        if planned is not None:
            ledger.set_metric(tgt, run_id, spec.name, f"planned_ranges.{r.table}", planned, commit=False)
        if before_commit:
            before_commit(tgt)
        tgt.commit()
    return res


def record_plan(spec: MigrationSpec, run_id: str, ranges: list[KeyRange]) -> None:
    """Register planned ranges, so completeness can be judged against the plan."""
    if not ranges:
        return
    with db.target(spec) as tgt:
        tgt.execute("DELETE FROM dbguard.ranges WHERE run_id = %s AND table_name = %s AND status = 'planned'",
                    (run_id, ranges[0].table))
        for r in ranges:
            tgt.execute(
                """INSERT INTO dbguard.ranges (run_id, migration, table_name, range_id, lo, hi, status)
                   VALUES (%s, %s, %s, %s, %s, %s, 'planned')
                   ON CONFLICT (run_id, table_name, range_id) DO UPDATE
                   SET lo = EXCLUDED.lo, hi = EXCLUDED.hi, status = 'planned', attempts = 0""",
                (run_id, spec.name, r.table, r.range_id,
                 Jsonb(list(r.lo)) if r.lo is not None else None, Jsonb(list(r.hi)) if r.hi is not None else None))
        tgt.commit()

