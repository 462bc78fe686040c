"""`dbguard.cutover_state` on the SOURCE: one row per migration and run, the phase, the primary and the
rollback checkpoints.

Why the source: the control_table pointer (dbguard.control) lives there, so the flip (and the flip
back) commits in the same transaction as the phase it records; state and pointer cannot disagree."""
from __future__ import annotations

import datetime as dt
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from .. import db
from ..spec import MigrationSpec

DDL = """
CREATE SCHEMA IF NOT EXISTS dbguard;
CREATE TABLE IF NOT EXISTS dbguard.cutover_state (
    migration      text NOT NULL,
    run_id         text NOT NULL,
    phase          text NOT NULL DEFAULT 'before',
    primary_side   text NOT NULL DEFAULT 'source',
    pointer        text,
    checkpoints    jsonb NOT NULL DEFAULT '[]',
    last_error     text,
    cutover_at     timestamptz,
    rollback_started_at timestamptz,
    rolled_back_at timestamptz,
    finished_at    timestamptz,
    updated_at     timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (migration, run_id)
);
"""
PHASES = ("before", "cutover", "rolling_back", "rolled_back", "finished")
FIELDS = ("phase", "primary_side", "pointer", "checkpoints", "last_error", "cutover_at", "rollback_started_at",
          "rolled_back_at", "finished_at", "updated_at")


def ensure(conn: psycopg.Connection) -> None:
    conn.execute(DDL)


def read(conn: psycopg.Connection, spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    if conn.execute("SELECT to_regclass('dbguard.cutover_state')").fetchone()[0] is None:
        row = None
    else:
        row = conn.execute("SELECT " + ", ".join(FIELDS) + " FROM dbguard.cutover_state WHERE migration = %s "
                           "AND run_id = %s", (spec.name, run_id)).fetchone()
    d = dict(zip(FIELDS, row)) if row else {"phase": "before", "primary_side": "source", "pointer": None,
                                          "checkpoints": [], "last_error": None}
    return {k: (v.isoformat() if isinstance(v, dt.datetime) else v) for k, v in d.items()}


def write(conn: psycopg.Connection, spec: MigrationSpec, run_id: str, **values: Any) -> None:
    """Upsert the row with `values` in conn's transaction; `stamp=<column>` sets that timestamp to now."""
    stamp = values.pop("stamp", None)
    if "checkpoints" in values:
        values["checkpoints"] = Jsonb(values["checkpoints"])
    cols = ["migration", "run_id", *values]
    params = {"migration": spec.name, "run_id": run_id, **values}
    sets = [f"{k} = EXCLUDED.{k}" for k in values] + ["updated_at = clock_timestamp()"]
    if stamp:
        assert stamp in FIELDS
        cols.append(stamp)
        params[stamp] = dt.datetime.now(dt.timezone.utc)
        sets.append(f"{stamp} = EXCLUDED.{stamp}")
    # column names come from this module (FIELDS), never from a spec
    conn.execute(f"INSERT INTO dbguard.cutover_state ({', '.join(cols)}) VALUES "
                 f"({', '.join('%(' + c + ')s' for c in cols)}) ON CONFLICT (migration, run_id) DO UPDATE SET "
                 + ", ".join(sets), params)


def get(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    with db.source(spec) as src:
        return read(src, spec, run_id)
