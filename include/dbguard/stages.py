"""Stage entry points: what each DAG task (and the CLI) calls.

Every function takes the spec and the run id, returns JSON-able values (they
travel as XCom) and is safe to re-run. The Airflow layer only parses
arguments and calls these.
"""
from __future__ import annotations

from typing import Any

from .spec import MigrationSpec


def preflight(spec: MigrationSpec, run_id: str, *, dry_run: bool = False) -> dict[str, Any]:
    """Read-only checks (contract, privileges, headroom), then target creation + schema freeze."""
    raise NotImplementedError


def plan_ranges(spec: MigrationSpec, run_id: str, table: str, *, batch_rows: int | None = None) -> list[dict]:
    """Key ranges for one table: [{"table", "range_id", "lo", "hi", "label"}]."""
    raise NotImplementedError


def copy_range(spec: MigrationSpec, run_id: str, krange: dict) -> dict[str, Any]:
    """Copy one range (idempotent), verify count+checksum+orphans: {"rows", "seconds", "ok", ...}."""
    raise NotImplementedError


def reconcile(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Whole-table count+checksum, bisection, repair, re-verify: {"checksum_ok", "tables": {...}}."""
    raise NotImplementedError


def checksum_gate(spec: MigrationSpec, run_id: str) -> tuple[bool, str]:
    """(passed, message): passes only at 100 % completeness and equal checksums."""
    raise NotImplementedError


def release(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """Undo run-scoped holds on the source (schema freeze); safe to call twice."""
    raise NotImplementedError


def finalize(spec: MigrationSpec, run_id: str, status: str) -> dict[str, Any]:
    """Write the report, close the run in the ledger, return the result dict (ledger.RESULT_KEYS)."""
    raise NotImplementedError
