"""`dbguard demo round_trip`: migrate the shop under a live writer that follows the pointer, cut over,
keep writing to the new primary, roll back, compare both sides row for row.

The writer (dbguard.writer.orders_writer) is the application pattern from the README: every transaction
reads dbguard.control.write_target FOR SHARE on the source and writes to that side before it commits. The
cutover's freeze holds that row, so the writer waits (its longest stall is reported) instead of writing to
the wrong side.
"""
from __future__ import annotations

import time
from typing import Any

from psycopg import sql
from psycopg.conninfo import make_conninfo

from . import db, stages
from .errors import DbguardError
from .spec import MigrationSpec
from .writer import Writer, orders_writer


def side_dsn(spec: MigrationSpec, side: str) -> str:
    """The DSN db.source / db.target connect to (target.database when the spec names one)."""
    if side == "source":
        return db.dsn_for(spec.source.conn_id)
    dsn = db.dsn_for(spec.target.conn_id)
    return make_conninfo(dsn, dbname=spec.target.database) if spec.target.database else dsn


def pointer_writer(spec: MigrationSpec, rate: float = 200) -> Writer:
    """Inserts, updates and deletes its own shop.orders rows at `rate` ops/s on whichever side the pointer
    names; remembers every committed row (Writer.rows: id -> amount, or None when deleted)."""
    return orders_writer(side_dsn(spec, "source"), side_dsn(spec, "target"), spec.name, rate=rate,
                         seed=5, id_base=700_000_000, weights={"insert": 5, "update": 4, "delete": 1}, max_errors=50)


def differing_rows(spec: MigrationSpec) -> list[tuple[str, tuple]]:
    """(table, key) of every row that differs between source and target (missing, extra or changed)."""
    from . import catalog
    from .checksum import Hashing, relation, row_hash
    from .ranges import key_text

    spec = catalog.resolve(spec)  # every migrated column, as the checksums compare them
    out = []
    with db.source(spec) as s, db.target(spec) as t:
        h = Hashing.between(spec, s, t)
        for tb in spec.tables:
            q = lambda side: sql.SQL("SELECT {k}, {h} FROM {r}").format(  # noqa: E731
                k=key_text(tb), h=row_hash(tb, side, h), r=relation(tb, side))
            a = {tuple(r[:-1]): r[-1] for r in s.execute(q("source"))}
            b = {tuple(r[:-1]): r[-1] for r in t.execute(q("target"))}
            out += [(tb.name, k) for k in a.keys() | b.keys() if a.get(k) != b.get(k)]
    return out


def migrate(spec: MigrationSpec, run_id: str) -> dict[str, Any]:
    """The library stages of a run up to the flip (what the DAG's tasks call, in order, through the gate)."""
    stages.preflight(spec, run_id)
    stages.capture_on(spec, run_id)
    for t in spec.table_order():
        for r in stages.plan_ranges(spec, run_id, t.name):
            stages.copy_range(spec, run_id, r)
    rec = stages.reconcile(spec, run_id)
    stages.finish_schema(spec, run_id)
    passed, message = stages.checksum_gate(spec, run_id)  # under its freeze; sets the verified watermark
    if not passed:
        raise DbguardError(message)
    return rec


def round_trip(spec: MigrationSpec, run_id: str, *, seconds: float = 3.0, rate: float = 200,
               say=print) -> dict[str, Any]:
    from .cutover import cutover, rollback

    w = pointer_writer(spec, rate=rate)
    with db.source(spec) as src:  # the pointer the writer reads exists before capture starts
        from .cutover import pointer
        pointer.prepare(src, spec)
        src.commit()
    w.start()
    say("migrating the shop under a live writer that follows the pointer")
    rec = migrate(spec, run_id)
    say(f"copied and verified ({rec['migrated_rows']} rows); cutting over")
    c = cutover(spec, run_id)
    say(f"cut over in {c['cutover_ms']} ms of write freeze; writing to the target for {seconds:g} s")
    time.sleep(seconds)
    r = rollback(spec, run_id)
    say(f"rolled back in {r['rollback_ms']} ms; the writer follows the pointer back to the source")
    time.sleep(0.5)
    ws = w.stop()
    mine = w.check(side_dsn(spec, "source"))  # the writer's last committed state of its rows, on the source
    lost_writes = mine["lost"] + mine["resurrected"]
    # rows differing between the sides, except the writer's rows written to the source after the flip back
    # (those are on the new-old primary only, as they should be: reverse capture ended with the rollback)
    diff = [d for d in differing_rows(spec) if not (d[0] == "orders" and int(d[1][0]) in w.after_back)]
    say(f"writer: {ws}")
    return {"status": "rolled_back" if r["status"] == "rolled_back" else "failed", "cutover_ms": c["cutover_ms"],
            "rollback_ms": r["rollback_ms"], "writes_after_cutover": r["writes_after_cutover"],
            "lost": lost_writes + len(diff), "differing_rows": [f"{t}:{','.join(k)}" for t, k in diff[:10]],
            "writer_max_stall_ms": ws["max_stall_ms"], "writer_errors": ws["errors"]}
