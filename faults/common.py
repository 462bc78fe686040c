"""Shared parts of the fault scenarios: scratch databases, the spec, the live writer, the independent compare.

Nothing here judges a run by dbguard's own checksum: `compare()` reads every row of every migrated table
from both sides (md5 of the row's text, in key order) and counts missing, extra, changed and doubled keys;
`fault_writer` (dbguard.writer) is an application that follows the pointer and remembers the last committed state of every
row it wrote, so after a rollback the primary is checked against what the application really committed.
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator

import psycopg
import yaml
from psycopg import sql

from dbguard import capture, embedded
from dbguard.spec import MigrationSpec, parse_spec
from dbguard.writer import Writer, orders_writer

ROOT = Path(__file__).resolve().parent.parent
DEMO_SPEC = ROOT / "include" / "migrations" / "demo_shop.yaml"
CONN_VARS = ("AIRFLOW_CONN_DBGUARD_SOURCE", "AIRFLOW_CONN_DBGUARD_TARGET")
# the session settings dbguard pins (db.SESSION_SETTINGS): value text is then comparable across servers
COMPARE_SESSION = ("SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres'; "
                   "SET extra_float_digits = 1; SET bytea_output = 'hex'")


def say(msg: str) -> None:
    if os.environ.get("DBGUARD_FAULTS_QUIET") != "1":
        print(f"faults: {msg}", file=__import__("sys").stderr, flush=True)


# ---- sizes ------------------------------------------------------------------------------------------

SIZES = {
    # make faults: a few tens of thousands of rows, a writer at 200 ops/s
    "full": {"customers": 2_000, "orders": 60_000, "rate": 200, "batch_rows": 20_000},
    # tests/test_faults.py: small and quick
    "small": {"customers": 300, "orders": 12_000, "rate": 150, "batch_rows": 6_000},
}


# ---- scratch databases --------------------------------------------------------------------------------

def _server_dsn(uri: str, dbname: str = "postgres") -> str:
    return embedded.with_dbname(uri, dbname)


def _create(server: str, name: str) -> str:
    with psycopg.connect(server, autocommit=True) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        c.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
                  .format(sql.Identifier(name)))
    return embedded.with_dbname(server, name)


def _drop(server: str, name: str) -> None:
    with contextlib.suppress(psycopg.Error), psycopg.connect(server, autocommit=True, connect_timeout=5) as c:
        c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def scratch(tag: str, *, target_server: str | None = None) -> Iterator[dict[str, str]]:
    """Two fresh databases (source on the embedded source server, target on the embedded target server or
    on `target_server`), published as AIRFLOW_CONN_DBGUARD_SOURCE/_TARGET for the block; dropped after it
    (also on failure) and the previous connection variables restored."""
    servers = embedded.ensure_default(ROOT / ".pg")
    src_server = servers["dbguard_source"]
    tgt_server = target_server or servers["dbguard_target"]
    name = f"fault_{tag}_{uuid.uuid4().hex[:8]}"
    saved = {k: os.environ.get(k) for k in CONN_VARS}
    made: list[str] = []
    try:
        dsns = {"source": _create(src_server, name)}
        made.append(src_server)
        dsns["target"] = _create(tgt_server, name)
        made.append(tgt_server)
        os.environ["AIRFLOW_CONN_DBGUARD_SOURCE"] = dsns["source"]
        os.environ["AIRFLOW_CONN_DBGUARD_TARGET"] = dsns["target"]
        dsns["name"] = name
        yield dsns
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        for server in made:
            _drop(server, name)


def shop_spec(**edits: Any) -> MigrationSpec:
    """demo_shop.yaml with nested overrides, e.g. shop_spec(capture={"batch_ops": 20})."""
    raw = yaml.safe_load(DEMO_SPEC.read_text())
    for k, v in edits.items():
        if isinstance(v, dict):
            raw[k] = {**(raw.get(k) or {}), **v}
        else:
            raw[k] = v
    return parse_spec(copy.deepcopy(raw))


def spec_json(spec: MigrationSpec) -> str:
    return json.dumps(spec.model_dump(mode="json", by_alias=True))


# ---- the independent compare --------------------------------------------------------------------------

def _columns(conn: psycopg.Connection, schema: str, table: str) -> list[str]:
    return [r[0] for r in conn.execute(
        "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
        "ORDER BY attnum", (sql.Identifier(schema, table).as_string(conn),)).fetchall()]


def _rows(conn: psycopg.Connection, schema: str, table: str, key: list[str], cols: list[str]) -> list[tuple]:
    """(key text..., md5 of the row's text) in key order; the row is built from named columns, so physical
    column order on either side does not matter."""
    q = sql.SQL("SELECT {k}, md5(ROW({c})::text) FROM {t} ORDER BY {o}").format(
        k=sql.SQL(", ").join(sql.SQL("{}::text").format(sql.Identifier(k)) for k in key),
        c=sql.SQL(", ").join(sql.Identifier(c) for c in cols), t=sql.Identifier(schema, table),
        o=sql.SQL(", ").join(sql.Identifier(k) for k in key))
    return conn.execute(q).fetchall()


def compare(spec: MigrationSpec, src_dsn: str, tgt_dsn: str, *, ignore: Callable[[str, tuple], bool] | None = None
            ) -> dict[str, Any]:
    """Row for row, every migrated table: missing (on the source, not the target), extra (the other way),
    changed (same key, different text), doubled (target rows sharing a key). `ignore(table, key)` skips keys
    that are rightly on one side only (e.g. the writer's rows written after a flip back)."""
    out: dict[str, Any] = {"missing": 0, "extra": 0, "changed": 0, "doubled": 0, "rows": 0, "tables": {},
                           "examples": []}
    with psycopg.connect(src_dsn) as s, psycopg.connect(tgt_dsn) as t:
        for c in (s, t):
            c.execute(COMPARE_SESSION)
        for tb in spec.tables:
            cols = _columns(s, tb.schema_, tb.name)
            key = list(tb.key)
            a = _rows(s, tb.schema_, tb.name, key, cols)
            b = _rows(t, tb.target_schema, tb.target_name, key, cols)
            doubled = len(b) - len({r[:-1] for r in b})
            da = {r[:-1]: r[-1] for r in a}
            dbb = {r[:-1]: r[-1] for r in b}
            skip = (lambda k: ignore(tb.name, k)) if ignore else (lambda k: False)
            missing = [k for k in da if k not in dbb and not skip(k)]
            extra = [k for k in dbb if k not in da and not skip(k)]
            changed = [k for k in da if k in dbb and da[k] != dbb[k] and not skip(k)]
            out["tables"][tb.ref] = {"source_rows": len(a), "target_rows": len(b), "missing": len(missing),
                                     "extra": len(extra), "changed": len(changed), "doubled": doubled}
            out["missing"] += len(missing)
            out["extra"] += len(extra)
            out["changed"] += len(changed)
            out["doubled"] += doubled
            out["rows"] += len(a)
            out["examples"] += [f"{tb.name}:{kind}:{','.join(k)}" for kind, ks in
                                (("missing", missing), ("extra", extra), ("changed", changed)) for k in ks[:3]]
    return out


def lost_duplicated(cmp: dict[str, Any], writer: dict[str, Any] | None = None) -> tuple[int, int]:
    """lost = rows missing or stale on the side that must hold them (+ the writer's committed rows not on its
    primary); duplicated = rows that should not exist (extra or doubled keys, rows the writer deleted that came
    back)."""
    lost = cmp["missing"] + cmp["changed"] + (writer or {}).get("lost", 0)
    dup = cmp["extra"] + cmp["doubled"] + (writer or {}).get("resurrected", 0)
    return lost, dup


# ---- the live writer ------------------------------------------------------------------------------------

def fault_writer(src_dsn: str, tgt_dsn: str, migration: str, *, rate: float = 200, gate: str = "pointer") -> Writer:
    """An application on shop.orders that follows the pointer (dbguard.writer): inserts, updates, deletes and
    key changes of its own rows, `rate` ops/s; it remembers the last committed state of every row, which side
    took each write, its longest stall and every error; a lost connection is reopened (the fault may be a
    server restart). gate="dual_write": like an application on dbguard's switch, it writes only while the
    control row's dual_write is true (and pauses, not stops, while it is false)."""
    return orders_writer(src_dsn, tgt_dsn, migration, rate=rate, seed=3, switch="pause" if gate == "dual_write" else None,
                         max_errors=200, error_pause=0.05)


# ---- small helpers ----------------------------------------------------------------------------------------

def drain_to_zero(spec: MigrationSpec, run_id: str, direction: str = "forward", timeout_s: float = 60) -> dict:
    """Drain until the lag is 0 (the writer stopped first); bounded."""
    t0, total = time.monotonic(), 0
    while True:
        d = capture.drain(spec, run_id, direction)
        total += d["applied"]
        if d["lag"] == 0:
            return {**d, "applied_total": total}
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"drain ({direction}) did not reach lag 0 within {timeout_s} s (lag {d['lag']})")


def wait_for(pred: Callable[[], Any], timeout_s: float, interval: float = 0.01) -> Any:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None


def first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
