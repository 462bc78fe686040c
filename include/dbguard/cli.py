"""`dbguard validate | plan | run | rollback | demo | embedded | pools`.

`run` and `demo` execute the spec's DAG in-process through `dag.test()` and end
with one JSON line (keys `ledger.RESULT_KEYS`) as the LAST line of stdout. stderr gets
a progress line (from the ledger) and a few plain lines; Airflow's own log goes to
reports/<dag_id>/<run>.airflow.log, named at the end (`--verbose`: on stderr instead). Exit codes: 0 success (or a dry run
whose checks passed), 1 the run failed, 2 the spec or the arguments are wrong.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sys
import time
from pathlib import Path

import psycopg

from . import db, embedded, ledger
from .errors import DbguardError, SpecError
from .spec import MigrationSpec, load_spec

REPO = Path(__file__).resolve().parents[2]
DEMO_SPECS = {name: REPO / "include" / "migrations" / f"demo_{name}.yaml"
              for name in ("shop", "docs", "docs_bad_analyzer", "docs_qdrant", "docs_qdrant_bad_metric")}
DEMO_SPEC = DEMO_SPECS["shop"]
DEMO_DB = "dbguard_demo"
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


_TERM = None  # the terminal's stderr while Airflow's output goes to a log file (see airflow_log_to)


def say(msg: str) -> None:
    """Human-readable progress: stderr, so stdout stays machine-readable."""
    print(f"dbguard: {msg}", file=_TERM or sys.stderr, flush=True)


@contextlib.contextmanager
def airflow_log_to(path: Path, *, verbose: bool = False):
    """Send everything written to fd 1 and 2 (Airflow's loggers, task output) to `path` while the block
    runs; `say` and the progress line keep writing to the real stderr. fd 1 stays on the log file
    afterwards (late loggers at exit), fd 2 comes back so errors after the run print in full.
    verbose: change nothing (Airflow's logs on stderr, as before)."""
    global _TERM
    if verbose:
        yield sys.stderr
        return
    sys.stdout.flush()
    sys.stderr.flush()
    path.parent.mkdir(parents=True, exist_ok=True)
    saved = os.dup(2)
    _TERM = os.fdopen(os.dup(2), "w", buffering=1)
    with open(path, "a") as log:
        os.dup2(log.fileno(), 1)
        os.dup2(log.fileno(), 2)
    try:
        yield _TERM
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved, 2)
        os.close(saved)


def failure_details(log_path: Path, limit: int = 40) -> list[str]:
    """The error lines of failed tasks from the Airflow log: each exception's last line, once."""
    if not log_path.is_file():
        return []
    seen: list[str] = []
    for ln in log_path.read_text(errors="replace").splitlines():
        s = ln.strip()
        if (("Exception: " in s or "Error: " in s) and not s.startswith(("File ", "raise ", "^"))
                and "Traceback" not in s and s not in seen):
            seen.append(s)
    return seen[-limit:]


def claim_stdout():
    """Point file descriptor 1 at stderr for the rest of the process and return a file on the
    real stdout. Airflow's loggers (and pgserver's exit handlers, which log after main returns)
    hold their own stdout references, so redirecting sys.stdout alone would not keep the JSON
    line last."""
    sys.stdout.flush()
    real = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    return real


def _load(path: str) -> MigrationSpec:
    return load_spec(path)


def batch_rows_arg(value: str) -> int:
    """--batch-rows gets the spec's own bounds (backfill.batch_rows), so a flag cannot do what a spec may not."""
    from .spec import Backfill

    lo, hi = (next(getattr(m, a) for m in Backfill.model_fields["batch_rows"].metadata if hasattr(m, a))
              for a in ("ge", "le"))
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a whole number; give rows per key range, "
                                         f"{lo}..{hi}") from None
    if not lo <= n <= hi:
        raise argparse.ArgumentTypeError(f"{n} is out of range; give rows per key range, {lo}..{hi} "
                                         "(as backfill.batch_rows in the spec)")
    return n


def embedded_uris(*, reset_target: bool = False) -> dict[str, str]:
    """Start (or reuse) the two embedded servers; URIs of database `dbguard_demo` on each.

    A dedicated database, created with UTF8 and collation/ctype C (the servers' own
    `postgres` database has C.UTF-8, which preflight rightly refuses for demo_shop.yaml).
    reset_target drops and recreates it on the target so a demo run starts empty.
    """
    from psycopg import sql

    say("starting the embedded PostgreSQL servers (.pg/)")
    out = {}
    for conn_id, uri in embedded.ensure_default(REPO / ".pg").items():
        name = sql.Identifier(DEMO_DB)
        with psycopg.connect(db.dsn_for(uri), autocommit=True) as c:
            if reset_target and conn_id == "dbguard_target":
                c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(name))
            if not c.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DEMO_DB,)).fetchone():
                c.execute(sql.SQL("CREATE DATABASE {} ENCODING 'UTF8' LC_COLLATE 'C' LC_CTYPE 'C' "
                                  "TEMPLATE template0").format(name))
        out[conn_id] = embedded.with_dbname(uri, DEMO_DB)
    return out


def use_embedded_if_default(spec: MigrationSpec) -> dict[str, str]:
    """Export the embedded servers' URIs when the spec uses the default conn ids and the user
    has not set AIRFLOW_CONN_<ID> (a real Postgres always wins)."""
    ids = {e.conn_id for e in (spec.source, spec.target) if e is not None}  # a Qdrant source has no source
    if ids and ids <= set(embedded.DEFAULT_CONN_IDS) and not all(os.environ.get(db.env_var(i)) for i in ids):
        return embedded.export_env(embedded_uris())
    return {}


# ---- validate / plan ----------------------------------------------------------------

def undefined_connections(spec: MigrationSpec) -> list[tuple[str, str]]:
    """(field, message) for each conn_id nothing defines: not AIRFLOW_CONN_<ID>, not the embedded
    default, not an Airflow connection (asked only when the first two miss, since it imports Airflow)."""
    problems = []
    for field, conn_id in [(f"{f}.conn_id", e.conn_id) for f, e in (("source", spec.source), ("target", spec.target))
                           if e is not None]:
        if os.environ.get(db.env_var(conn_id)):
            try:  # a URI psycopg cannot decode is refused here, by its conn id
                db.dsn_for(conn_id)
            except DbguardError as e:
                problems.append((field, str(e)))
            continue
        if conn_id in embedded.DEFAULT_CONN_IDS:
            continue
        from .airflow import env

        env.airflow_defaults()
        if env.airflow_connection_uri(conn_id) is None:
            problems.append((field, f"connection {conn_id!r} is not defined: set {db.env_var(conn_id)}="
                                    "postgresql://user:pass@host:5432/db or add it in Airflow (Admin > Connections)"))
    return problems


def gold_problems(spec: MigrationSpec) -> list[tuple[str, str]]:
    """The gold set is a file the spec names: validate reads it like the retrieval stages will."""
    if spec.gold is None:
        return []
    from . import retrieval

    dims = {v.dim for t in spec.tables for v in t.vector}
    try:
        retrieval.load_gold(retrieval.gold_path(spec), dims.pop() if len(dims) == 1 else None)
    except retrieval.GoldSetError as e:
        return [("gold", str(e))]
    return []


def cmd_validate(args) -> int:
    spec = _load(args.spec)
    if problems := undefined_connections(spec) + gold_problems(spec):
        raise SpecError(args.spec, problems)
    from .spec.lookalikes import suspicious_names

    for field, why in suspicious_names(spec):
        say(f"warning: {field}: {why}")
    if spec.collections:
        print(f"{args.spec}: valid. migration {spec.name!r} (DAG {spec.dag_id}), collections: "
              + ", ".join(mv.label for mv in spec.collections))
        return EXIT_OK
    print(f"{args.spec}: valid. migration {spec.name!r} (DAG {spec.dag_id}), "
          f"{spec.source.conn_id} -> {spec.target.conn_id}, tables: "
          + ", ".join(f"{t.schema_}.{t.name}" for t in spec.table_order()))
    return EXIT_OK


def cmd_init(args) -> int:
    """A complete spec from the source catalog, on stdout (reads only)."""
    from . import init_spec
    from .spec import _ident

    try:
        _ident(args.name)
    except ValueError as e:
        raise SpecError("dbguard init", [("NAME", f"{e}; it becomes the DAG id dbguard_<NAME>")]) from None
    tables = [x.strip() for x in args.tables.split(",") if x.strip()] if args.tables else None
    print(init_spec.generate(args.name, args.source, args.target, schema=args.schema, tables=tables,
                             gold=args.gold), end="")
    return EXIT_OK


def cmd_plan(args) -> int:
    from . import stages

    from . import preflight
    from .errors import ConnectionFailed, PreflightError

    spec = _load(args.spec)
    use_embedded_if_default(spec)
    try:  # every read-only check first: a plan of a migration that preflight would refuse is no plan
        from . import catalog

        spec = catalog.resolve(spec)  # columns completed from the source catalog
        preflight.validate(spec)
    except (PreflightError, ConnectionFailed, SpecError) as e:
        print(f"dbguard plan: {args.spec}: {e}", file=sys.stderr)
        return EXIT_USAGE
    run_id = "plan__" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
    bf, g = spec.backfill, spec.gates
    print(f"migration {spec.name} (DAG {spec.dag_id}): {spec.source.conn_id} -> {spec.target.conn_id}")
    for t in spec.table_order():
        ranges = stages.plan_ranges(spec, run_id, t.ref, batch_rows=args.batch_rows)
        print(f"table {t.schema_}.{t.name} -> {t.target_schema}.{t.target_name} key ({', '.join(t.key)}): "
              f"{len(ranges)} range(s)")
        for r in ranges:
            print(f"  range {r['range_id']}: {r['label']}")
    print(f"backfill: {args.batch_rows or bf.batch_rows} rows/range, {bf.concurrency} parallel "
          f"(pool dbguard_{spec.name}), {bf.retries} retries, max {bf.max_rows_per_second or 'unlimited'} rows/s")
    print(f"gates: checksum (repair attempts {g.repair_attempts}, max repair rows {g.max_repair_rows}, "
          f"timeout {g.checksum_timeout_minutes} min); delta_s <= {g.delta_s_max} "
          f"(escalate > {g.delta_s_escalate} for {g.escalate_after_minutes} min)")
    w = spec.window
    print(f"window: {w.start}-{w.end} {w.timezone} {','.join(w.days) if w.days else 'every day'}" if w
          else "window: none (cutover at any time)")
    return EXIT_OK


# ---- run ------------------------------------------------------------------------------

def _conf(pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            print(f"dbguard: --conf expects key=value, got {pair!r}", file=sys.stderr)
            raise SystemExit(EXIT_USAGE)
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _fallback_result(spec: MigrationSpec, run_id: str | None) -> dict:
    """When finalize never pushed its result: what the ledger knows, marked failed."""
    values: dict = {}
    if run_id:
        with contextlib.suppress(Exception), db.target(spec) as conn:
            values = {**ledger.metrics(conn, run_id), "reason": ledger.failure_reasons(conn, run_id)}
    return {**values, "migration": spec.name, "status": "failed"}


def run_spec(spec_path: str, conf: dict, *, verbose: bool = False) -> dict:
    """Run the spec's DAG once through dag.test(); returns the result dict (ledger.RESULT_KEYS).

    Call after claim_stdout() (Airflow logs to stdout). Learned on Airflow 3.3.2:
    - dag.test() needs a migrated metadata DB, and the DAG must come from the dags folder:
      it re-parses the dags-folder bundle and serialises it (an inline DAG fails "not serialized").
    - dag.test() ignores pools (tasks run one at a time in this process); ensure_pool is for the
      scheduler of a later `airflow standalone`.
    - it returns the DagRun (ORM); the finalize result is read back as XCom from the metadata DB.
    """
    from .airflow import env

    spec = _load(spec_path)
    env.airflow_defaults()
    if Path(spec_path).resolve().parent != env.SPECS_FOLDER:  # let dags/ build this spec too
        os.environ["DBGUARD_SPECS"] = os.pathsep.join(
            p for p in [os.environ.get("DBGUARD_SPECS", ""), str(Path(spec_path).resolve())] if p)
    env.ensure_metadata_db()
    use_embedded_if_default(spec)

    from airflow.dag_processing.dagbag import DagBag

    from . import progress, report

    # Airflow's own log goes beside the run's report; renamed after the run id once dag.test() made it.
    log_dir = report.report_dir() / spec.dag_id
    log_path = log_dir / f".airflow-{os.getpid()}.log"
    if not verbose:
        os.environ["DBGUARD_AIRFLOW_LOG_BESIDE_REPORT"] = "1"  # the report links <run>.airflow.log
    with airflow_log_to(log_path, verbose=verbose) as term:
        env.ensure_pool(spec)
        bag = DagBag(str(env.DAGS_FOLDER))
        dag = bag.dags.get(spec.dag_id)
        if dag is None:
            raise DbguardError(f"DAG {spec.dag_id} did not load from {env.DAGS_FOLDER}: "
                               + ("; ".join(bag.import_errors.values()) or "not found"))
        say(f"running {spec.dag_id} with conf {json.dumps(conf)}")
        t0 = time.monotonic()
        with (contextlib.nullcontext() if spec.collections else progress.Progress(spec, term)):
            dag_run = dag.test(run_conf=conf)
    if not verbose and log_path.exists():
        named = log_dir / f"{report._safe(dag_run.run_id)}.airflow.log"
        log_path.rename(named)
        log_path = named
    result = env.run_result(dag_run) or _fallback_result(spec, dag_run.run_id)
    say(f"DAG run {dag_run.run_id} ended {dag_run.state} in {time.monotonic() - t0:.1f}s")
    if result.get("status") not in ("success", "dry_run"):
        reason = result.get("reason") or ""
        for ln in ([reason] if reason else []) + [ln for ln in failure_details(log_path)
                                                  if ln.split(": ", 1)[-1][:80] not in reason]:
            say(ln)  # the gate's full message, then task errors it does not already say
    if result.get("report"):
        say(f"report: {result['report']}")
    if not verbose:
        say(f"airflow log: {log_path}")
    return result


def _run_and_print(spec_path: str, conf: dict, real_stdout, verbose: bool = False) -> int:
    try:
        result = run_spec(spec_path, conf, verbose=verbose)
    except SpecError:
        raise
    except DbguardError as e:
        say(str(e))
        result = {"migration": _load(spec_path).name, "status": "failed", "reason": str(e)}
    print(ledger.result_line(result), file=real_stdout, flush=True)
    return EXIT_OK if result.get("status") in ("success", "dry_run", "cutover") else EXIT_FAILED


def preflight_refusal(spec: MigrationSpec) -> str | None:
    """Run preflight's read-only checks before starting Airflow: a refused run returns in seconds, with
    its reason on stderr, in the JSON line and (when the target is reachable) in the ledger's runs row."""
    from . import preflight
    from .errors import ConnectionFailed, PreflightError

    use_embedded_if_default(spec)
    if spec.collections:  # a Qdrant source: the DAG's own preflight task reads only and refuses
        return None
    try:
        preflight.validate(spec)
        return None
    except (PreflightError, ConnectionFailed) as e:
        reason = str(e)
    with contextlib.suppress(DbguardError, psycopg.Error), db.target(spec) as conn:
        ledger.ensure(conn)
        run_id = "refused__" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S")
        ledger.finish_run(conn, run_id, spec.name, "refused", reason)
    return reason


def cmd_run(args) -> int:
    spec = _load(args.spec)  # a bad spec exits 2 before anything starts
    conf = _conf(args.conf or [])
    if conf:  # checked against the DAG's Params before any database is touched (dag.test() would raise)
        from .airflow import env

        env.airflow_defaults()  # before Airflow's first import reads its configuration
        from .airflow import dag_factory

        if problems := dag_factory.conf_problems(spec, conf):
            for p in problems:
                say(p)
            print(ledger.result_line({"migration": spec.name, "status": "failed", "reason": "; ".join(problems)}),
                  flush=True)
            return EXIT_USAGE
    if not args.dry_run and (reason := preflight_refusal(spec)):
        say(reason)
        print(ledger.result_line({"migration": spec.name, "status": "failed", "reason": reason}), flush=True)
        return EXIT_USAGE
    if args.dry_run:
        conf["dry_run"] = True
    if args.batch_rows:
        conf["batch_rows"] = args.batch_rows
    if spec.run_cutover and spec.approval:  # the command line never waits for a human: approve now or abort
        conf.setdefault("approve", bool(args.approve))
    return _run_and_print(args.spec, conf, claim_stdout(), args.verbose)


# ---- demo / embedded --------------------------------------------------------------------

def reset_target(spec: MigrationSpec) -> None:
    """Drop the spec's target schemas (on a user-supplied target; the ledger schema stays)."""
    from psycopg import sql

    schemas = sorted({t.target_schema for t in spec.tables})
    with db.target(spec) as conn:
        for s in schemas:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(s)))
        conn.commit()


def cmd_demo(args) -> int:
    from . import corpus, demo

    spec_path = DEMO_SPECS["shop" if args.which == "round_trip" else args.which]
    spec = _load(str(spec_path))
    real_stdout = claim_stdout()
    ids = [spec.source.conn_id, spec.target.conn_id]
    if all(os.environ.get(db.env_var(i)) for i in ids):
        say(f"using {', '.join(db.env_var(i) for i in ids)} from the environment")
        reset_target(spec)
    else:
        embedded.export_env(embedded_uris(reset_target=True))
    if any(v.qdrant for t in spec.tables for v in t.vector):
        from .stores import qdrant

        say(f"Qdrant: dropped {qdrant.drop_collections(spec) or 'no'} collection(s) of an earlier demo run")
    t0 = time.monotonic()
    if args.which in ("shop", "round_trip"):
        say(f"loading demo data into the source ({args.customers} customers, {args.orders} orders)")
        counts = demo.load_shop(spec.source.conn_id, customers=args.customers, orders=args.orders)
    else:
        say("embedding standard-library docstrings (TF-IDF + SVD) into the source")
        # the Qdrant demos: vector lengths vary with the document (0.1..1.9), which cosine ignores and Dot does not
        counts = corpus.load_docs(spec.source.conn_id, norm_spread=0.9 if "qdrant" in args.which else None)
    say(f"loaded in {time.monotonic() - t0:.1f}s: {counts}; target is empty; running the migration")
    if args.which == "round_trip":  # migrate, cut over under a live writer, roll back, compare
        from .round_trip import round_trip

        out = round_trip(spec, f"round_trip_{int(time.time())}", say=say)
        print(json.dumps({k: out[k] for k in ("status", "cutover_ms", "rollback_ms", "writes_after_cutover",
                                              "lost")}, default=str), file=real_stdout, flush=True)
        return EXIT_OK if out["status"] == "rolled_back" and out["lost"] == 0 else EXIT_FAILED
    return _run_and_print(str(spec_path), {}, real_stdout, args.verbose)


def cmd_rollback(args) -> int:
    from . import stages

    spec = _load(args.spec)
    use_embedded_if_default(spec)
    out = stages.rollback(spec, args.run_id, drop_target=args.drop_target,  # after a cutover: cutover.rollback
                          repair_from=args.repair_from)
    if "rollback_ms" in out:
        say(f"rolled back run {out['run_id']} after its cutover in {out['rollback_ms']} ms: the source is the "
            f"primary again, the pointer flipped back, writes made on the target meanwhile "
            f"({out['writes_after_cutover']['target']}) applied to the source, the target fenced"
            + (f"; rows copied from the target under the freeze: {out['repaired']}" if out.get("repaired") else "")
            + (f"; readers search pgvector again ({', '.join(out['readers']['readers'])}), the collection holds "
               "those writes too" if out.get("readers") else ""))
    else:
        say(f"rolled back run {out['run_id']}: capture off, schema freeze lifted"
            + (f", dropped {', '.join(out['dropped'])}" if out.get("dropped") else ""))
    print(json.dumps(out, default=str))
    return EXIT_OK


def cmd_embedded(args) -> int:
    for conn_id, uri in embedded_uris().items():
        print(f"export {db.env_var(conn_id)}='{uri}'")
    return EXIT_OK


def cmd_pools(args) -> int:
    """Create or resize the pool of every spec's DAG (the scheduler needs it; dag.test() does not)."""
    from .airflow import env

    env.airflow_defaults()
    env.ensure_metadata_db()
    for path in args.specs or [str(p) for p in env.spec_paths()]:
        spec = _load(path)
        env.ensure_pool(spec)
        say(f"pool {env.pool_name(spec)}: {spec.backfill.concurrency} slots")
    return EXIT_OK


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbguard", description="Guarded database migrations on Apache Airflow.")
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a spec; exit 2 listing every problem")
    v.add_argument("spec")
    v.set_defaults(fn=cmd_validate)
    ini = sub.add_parser("init", help="write a complete spec YAML to stdout from the source catalog (reads only)")
    ini.add_argument("name", help="migration name (the DAG id is dbguard_<name>)")
    ini.add_argument("--source", required=True, help="source conn id (or AIRFLOW_CONN_<ID> / a URI)")
    ini.add_argument("--target", required=True, help="target conn id")
    ini.add_argument("--schema", help="only tables of this schema (default: every non-system schema)")
    ini.add_argument("--tables", help="comma-separated table names (schema.table when no --schema)")
    ini.add_argument("--gold", help="gold set (JSONL) for the retrieval gate: vector/tsvector columns become "
                                    "retrieval stores (without it they are emitted commented out)")
    ini.set_defaults(fn=cmd_init)
    pl = sub.add_parser("plan", help="tables, key ranges, gates and window; reads only")
    pl.add_argument("spec")
    pl.add_argument("--batch-rows", type=batch_rows_arg)
    pl.set_defaults(fn=cmd_plan)
    r = sub.add_parser("run", help="run the spec's DAG in-process (dag.test); last stdout line is JSON")
    r.add_argument("spec")
    r.add_argument("--dry-run", action="store_true", help="preflight checks only")
    r.add_argument("--batch-rows", type=batch_rows_arg, help="rows per key range (overrides the spec)")
    r.add_argument("--conf", action="append", metavar="KEY=VALUE", help="DAG run conf (value parsed as JSON)")
    r.add_argument("--approve", action="store_true", help="approve the flip up front (spec approval: true); "
                   "without it such a run stops before the flip and ends 'aborted'")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="Airflow's own log on stderr (default: a file beside the report, named at the end)")
    r.set_defaults(fn=cmd_run)
    d = sub.add_parser("demo", help="load demo data into embedded servers and migrate it")
    d.add_argument("which", nargs="?", choices=sorted([*DEMO_SPECS, "round_trip"]), default="shop",
                   help="shop: OLTP tables (default); round_trip: the shop under a live writer, cut over, "
                        "write to the target, roll back, compare (JSON: status, cutover_ms, rollback_ms, "
                        "writes_after_cutover, lost); docs: vectors + full-text search through the retrieval "
                        "gate; docs_bad_analyzer: an analyzer mistake the gate catches (exit 1); docs_qdrant: "
                        "the vectors from pgvector into a Qdrant collection (local mode) through every gate; "
                        "docs_qdrant_bad_metric: Dot on unnormalised vectors, caught by the gate (exit 1)")
    d.add_argument("--customers", type=int, default=50_000)
    d.add_argument("--orders", type=int, default=200_000)
    d.add_argument("-v", "--verbose", action="store_true", help="Airflow's own log on stderr")
    d.set_defaults(fn=cmd_demo)
    rb = sub.add_parser("rollback", help="before a cutover: abort a run (last drain, capture off, freeze lifted); "
                                         "after one: flip back to the source losing no write (resumable)")
    rb.add_argument("spec")
    rb.add_argument("--run-id", help="default: the migration's latest run in the target ledger")
    rb.add_argument("--drop-target", action="store_true", help="also drop the migrated target tables")
    rb.add_argument("--repair-from", choices=["target"], help="after a cutover, when the rollback found rows that "
                    "differ under its freeze (it names them): copy those rows from the target onto the source "
                    "under the same freeze, verify again and complete")
    rb.set_defaults(fn=cmd_rollback)
    e = sub.add_parser("embedded", help="start the embedded servers; print export lines for eval")
    e.set_defaults(fn=cmd_embedded)
    po = sub.add_parser("pools", help="create/resize the Airflow pool of each spec (for airflow standalone)")
    po.add_argument("specs", nargs="*", help="default: include/migrations/*.yaml and $DBGUARD_SPECS")
    po.set_defaults(fn=cmd_pools)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except SpecError as e:
        print(str(e), file=sys.stderr)
        return EXIT_USAGE
    except DbguardError as e:
        print(f"dbguard: {e}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
