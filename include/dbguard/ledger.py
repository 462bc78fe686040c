"""The run ledger: a `dbguard` schema in the target holding what every run did.

Tables: runs, events (stage records with op_id/source_rev/target_rev),
ranges (per key range rows, seconds, both checksums), metrics (the fixed
metric names plus anything else, as jsonb) and manifest (version pins).
Writers pass an open target connection; each call commits unless the caller
passes `commit=False` to fold the record into its own transaction.
"""
from __future__ import annotations

import json
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

SCHEMA = "dbguard"

# Names fixed by the brief; `result_line` prints them in this order.
RESULT_KEYS = ("migration", "status", "migrated_rows", "checksum_ok", "dual_write_fail",
               "delta_s_diff", "lambda_state", "cutover_ms", "report", "reason",
               "rollback_ms", "writes_after_cutover", "target_store", "checksum_gate_mode")

DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.runs (
    run_id text PRIMARY KEY,
    migration text NOT NULL,
    started_at timestamptz NOT NULL DEFAULT now(),
    finished_at timestamptz,
    status text NOT NULL DEFAULT 'running',
    spec jsonb
);
ALTER TABLE dbguard.runs ADD COLUMN IF NOT EXISTS reason text;
CREATE TABLE IF NOT EXISTS dbguard.events (
    id bigserial PRIMARY KEY,
    run_id text NOT NULL,
    migration text NOT NULL,
    stage text NOT NULL,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    op_id bigint,
    source_rev text,
    target_rev text,
    detail jsonb
);
CREATE INDEX IF NOT EXISTS events_run_idx ON dbguard.events (run_id, stage);
CREATE TABLE IF NOT EXISTS dbguard.ranges (
    run_id text NOT NULL,
    migration text NOT NULL,
    table_name text NOT NULL,
    range_id int NOT NULL,
    lo jsonb,
    hi jsonb,
    status text NOT NULL,
    rows bigint,
    seconds double precision,
    src_count bigint,
    tgt_count bigint,
    src_sum numeric,
    tgt_sum numeric,
    orphans bigint,
    source_rev text,
    target_rev text,
    attempts int NOT NULL DEFAULT 1,
    updated_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, table_name, range_id)
);
CREATE TABLE IF NOT EXISTS dbguard.metrics (
    run_id text NOT NULL,
    migration text NOT NULL,
    name text NOT NULL,
    value jsonb,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, name)
);
CREATE TABLE IF NOT EXISTS dbguard.manifest (
    migration text NOT NULL,
    run_id text NOT NULL,
    key text NOT NULL,
    value text,
    at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, run_id, key)
);
"""


def ensure(conn: psycopg.Connection) -> None:
    # Serialise concurrent first-time creation (parallel range tasks).
    conn.execute("SELECT pg_advisory_xact_lock(hashtext('dbguard.ledger'))")
    conn.execute(DDL)
    conn.commit()


def start_run(conn: psycopg.Connection, run_id: str, migration: str, spec: dict | None = None) -> None:
    ensure(conn)
    conn.execute(
        """INSERT INTO dbguard.runs (run_id, migration, spec) VALUES (%s, %s, %s)
           ON CONFLICT (run_id) DO UPDATE SET status = 'running', finished_at = NULL""",
        (run_id, migration, Jsonb(spec) if spec is not None else None),
    )
    conn.commit()


def finish_run(conn: psycopg.Connection, run_id: str, migration: str, status: str,
               reason: str | None = None) -> None:
    """Close the run with why it ended that way; a run that failed before start_run (e.g. in preflight)
    gets its row here."""
    conn.execute(
        """INSERT INTO dbguard.runs (run_id, migration, status, finished_at, reason)
           VALUES (%s, %s, %s, clock_timestamp(), %s)
           ON CONFLICT (run_id) DO UPDATE SET status = EXCLUDED.status, finished_at = EXCLUDED.finished_at,
                                              reason = coalesce(EXCLUDED.reason, dbguard.runs.reason)""",
        (run_id, migration, status, reason))
    conn.commit()


def failure_reasons(conn: psycopg.Connection, run_id: str) -> str | None:
    """The messages every failed stage recorded (events '<stage>_failed'), oldest first; None if none."""
    rows = conn.execute("SELECT stage, detail->>'message' FROM dbguard.events WHERE run_id = %s "
                        r"AND stage LIKE '%%\_failed' ORDER BY id", (run_id,)).fetchall()
    return "\n".join(f"{stage.removesuffix('_failed')}: {msg}" for stage, msg in rows) or None


def event(conn: psycopg.Connection, run_id: str, migration: str, stage: str, detail: dict | None = None, *,
          op_id: int | None = None, source_rev: str | None = None, target_rev: str | None = None,
          commit: bool = True) -> None:
    conn.execute(
        """INSERT INTO dbguard.events (run_id, migration, stage, op_id, source_rev, target_rev, detail)
           VALUES (%s, %s, %s, %s, %s, %s, %s)""",
        (run_id, migration, stage, op_id, source_rev, target_rev, Jsonb(detail or {})),
    )
    if commit:
        conn.commit()


def set_metric(conn: psycopg.Connection, run_id: str, migration: str, name: str, value: Any, *,
               commit: bool = True) -> None:
    conn.execute(
        """INSERT INTO dbguard.metrics (run_id, migration, name, value) VALUES (%s, %s, %s, %s)
           ON CONFLICT (run_id, name) DO UPDATE SET value = EXCLUDED.value, at = clock_timestamp()""",
        (run_id, migration, name, Jsonb(value)),
    )
    if commit:
        conn.commit()


def metrics(conn: psycopg.Connection, run_id: str) -> dict[str, Any]:
    rows = conn.execute("SELECT name, value FROM dbguard.metrics WHERE run_id = %s", (run_id,)).fetchall()
    return {name: value for name, value in rows}


def set_manifest(conn: psycopg.Connection, migration: str, run_id: str, pins: dict[str, Any]) -> None:
    for key, value in pins.items():
        conn.execute(
            """INSERT INTO dbguard.manifest (migration, run_id, key, value) VALUES (%s, %s, %s, %s)
               ON CONFLICT (migration, run_id, key) DO UPDATE SET value = EXCLUDED.value""",
            (migration, run_id, key, None if value is None else str(value)),
        )
    conn.commit()


def manifest(conn: psycopg.Connection, migration: str, run_id: str) -> dict[str, str]:
    rows = conn.execute("SELECT key, value FROM dbguard.manifest WHERE migration = %s AND run_id = %s",
                        (migration, run_id)).fetchall()
    return dict(rows)


def result_line(values: dict[str, Any]) -> str:
    """The one JSON line `dbguard run` and `make demo` end with: fixed keys, null where not built."""
    return json.dumps({k: values.get(k) for k in RESULT_KEYS}, default=str)
