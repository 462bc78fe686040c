"""The rollback's verify under its freeze, and the way out when it finds a difference.

A difference there is a real defect (the reverse ledger is drained to zero, both sides are frozen), and "run
rollback again" cannot make it go away. So the rows that differ are named, found by bisection as reconcile finds
them (reconcile.locate), and `dbguard rollback --repair-from target` re-copies exactly those rows from the target
(the primary until the flip back) onto the source under the same freeze, verifies again and lets the rollback
complete. The copy writes as the applier does (`dbguard.applying`, replica role): the source's fence lets it
through and the application's triggers on the source do not fire for it.
"""
from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from .. import db
from ..checksum import relation
from ..ranges import KeyRange
from ..reconcile import RowDiff, Sides, keys_filter, locate
from ..spec import MigrationSpec, Table
from .steps import CutoverError

TEMP = sql.Identifier("dbguard_rollback_repair")


def _compare(spec: MigrationSpec) -> tuple[dict[str, Any], dict[str, RowDiff], list[str]]:
    """count + checksum of every table on both sides; each differing table bisected down to its rows."""
    sides = Sides(spec)
    out, diffs, bad = {}, {}, []
    try:
        for t in spec.tables:
            s, g = sides.checksums(t, None)
            out[t.ref] = {"count": s.count, "equal": s == g}
            if s != g:
                diffs[t.ref] = locate(sides, t, KeyRange(t.ref, 0, None, None), s, g, spec.gates.bisect_leaf_rows)
                bad.append(f"{t.ref}: source {s.to_dict()} != target {g.to_dict()}; only on the source "
                           f"{_keys(diffs[t.ref].missing)}, only on the target {_keys(diffs[t.ref].extra)}, "
                           f"different {_keys(diffs[t.ref].changed)}")
    finally:
        sides.close()
    return out, diffs, bad


def _keys(keys: list[tuple[str, ...]], limit: int = 10) -> str:
    shown = ", ".join("(" + ",".join(k) + ")" for k in keys[:limit])
    return f"{len(keys)} [{shown}{', ...' if len(keys) > limit else ''}]"


def verify_or_repair(spec: MigrationSpec, out: dict[str, Any], repair_from: str | None) -> dict[str, Any]:
    """Under the rollback's freeze. Equal: the per-table verdict. Different: with repair_from="target" the rows
    are re-copied onto the source and verified again (out["repaired"]); else CutoverError naming them
    (out["differing_rows"])."""
    verdict, diffs, bad = _compare(spec)
    if not bad:
        return verdict
    out["differing_rows"] = {n: d.summary() for n, d in diffs.items()}
    if repair_from != "target":
        raise CutoverError("count + checksum differ under the freeze: " + "; ".join(bad))
    out["repaired"] = {n: copy_from_target(spec, spec.table(n), d) for n, d in diffs.items()}
    verdict, _, bad = _compare(spec)
    if bad:
        raise CutoverError("count + checksum still differ after the repair from the target: " + "; ".join(bad))
    return verdict


def copy_from_target(spec: MigrationSpec, table: Table, diff: RowDiff) -> dict[str, int]:
    """Make the source's rows for the differing keys what the target holds: rows only on the source deleted,
    rows only on the target inserted, different rows updated (columns the target does not carry, such as
    exclude_columns, keep the source's value). One transaction on the source."""
    cols = [c.name for c in table.copy_columns]
    ident = lambda names: sql.SQL(", ").join(sql.Identifier(n) for n in names)  # noqa: E731
    rel = relation(table, "source")
    keys_eq = sql.SQL(" AND ").join(sql.SQL("s.{k} = r.{k}").format(k=sql.Identifier(k)) for k in table.key)
    with db.source(spec) as src, db.target(spec) as tgt:
        src.execute("SELECT set_config('dbguard.applying', 'on', true)")  # past the fence, as the applier
        src.execute("SAVEPOINT dbguard_role")
        try:
            src.execute("SET LOCAL session_replication_role = replica")  # the application's triggers stay quiet
        except psycopg.errors.InsufficientPrivilege:
            src.execute("ROLLBACK TO SAVEPOINT dbguard_role")
        src.execute(sql.SQL("CREATE TEMP TABLE {tmp} ON COMMIT DROP AS SELECT {c} FROM {r} WITH NO DATA").format(
            tmp=TEMP, c=ident(cols), r=rel))
        present = diff.extra + diff.changed
        if present:
            out_q = sql.SQL("COPY (SELECT {c} FROM {r} WHERE {w}) TO STDOUT").format(
                c=ident(cols), r=relation(table, "target"), w=keys_filter(table, present))
            with tgt.cursor().copy(out_q) as rows, src.cursor().copy(
                    sql.SQL("COPY {} ({}) FROM STDIN").format(TEMP, ident(cols))) as into:
                for chunk in rows:
                    into.write(chunk)
        n = {"deleted": 0, "updated": 0, "inserted": 0}
        if diff.missing:
            n["deleted"] = src.execute(sql.SQL("DELETE FROM {} WHERE {}").format(
                rel, keys_filter(table, diff.missing))).rowcount
        others = [c for c in cols if c not in table.key]
        if diff.changed and others:
            n["updated"] = src.execute(sql.SQL("UPDATE {r} AS s SET {sets} FROM {tmp} AS r WHERE {eq}").format(
                r=rel, tmp=TEMP, eq=keys_eq, sets=sql.SQL(", ").join(
                    sql.SQL("{c} = r.{c}").format(c=sql.Identifier(c)) for c in others))).rowcount
        if diff.extra:
            n["inserted"] = src.execute(sql.SQL(
                "INSERT INTO {r} ({c}) OVERRIDING SYSTEM VALUE SELECT {c} FROM {tmp} AS r "
                "WHERE NOT EXISTS (SELECT 1 FROM {r} AS s WHERE {eq})").format(
                r=rel, c=ident(cols), tmp=TEMP, eq=keys_eq)).rowcount
        src.commit()
    return n
