"""The flip in the DAG: window, soak, approval, routing of failures to release or rollback, the finish
and rollback DAGs, the incident note. Pure rules (dbguard.flow, spec.Window) as unit tests; the rest
through real dag.test() runs of DAGs from dags/ on real PostgreSQL."""
from __future__ import annotations

import datetime as dt
import zoneinfo

import pytest

from dbguard import demo, flow, ledger
from dbguard.airflow import env as afenv
from dbguard.errors import SpecError
from dbguard.spec import Window, load_spec
from test_dag import dagbag, reports, spec_variant  # noqa: F401  (fixture)

UTC = dt.timezone.utc


# ---- window: pure -------------------------------------------------------------------------------

def test_next_open_same_day_next_day_and_inside():
    w = Window(start="02:00", end="04:00")
    assert w.next_open(dt.datetime(2026, 3, 2, 1, 0, tzinfo=UTC)) == dt.datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    assert w.next_open(dt.datetime(2026, 3, 2, 5, 0, tzinfo=UTC)) == dt.datetime(2026, 3, 3, 2, 0, tzinfo=UTC)
    inside = dt.datetime(2026, 3, 2, 3, 17, tzinfo=UTC)
    assert w.next_open(inside) == inside


def test_next_open_days_and_past_midnight_in_a_timezone():
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    w = Window(start="22:00", end="02:00", timezone="Europe/Berlin", days=["fri"])
    wed = dt.datetime(2026, 11, 25, 12, 0, tzinfo=berlin)
    assert w.next_open(wed) == dt.datetime(2026, 11, 27, 22, 0, tzinfo=berlin)
    sat_early = dt.datetime(2026, 11, 28, 1, 30, tzinfo=berlin)  # still Friday's window
    assert w.next_open(sat_early) == sat_early
    sat_late = dt.datetime(2026, 11, 28, 2, 0, tzinfo=berlin)  # end is exclusive: a week later
    assert w.next_open(sat_late) == dt.datetime(2026, 12, 4, 22, 0, tzinfo=berlin)


def test_next_open_across_a_dst_change():
    # New York springs forward on 2026-03-08 (02:00 -> 03:00): a 02:30 opening that day does not exist
    w = Window(start="02:30", end="04:00", timezone="America/New_York")
    got = w.next_open(dt.datetime(2026, 3, 8, 6, 0, tzinfo=UTC))  # 01:00 EST
    assert w.contains(got) and got.date() == dt.date(2026, 3, 8)
    # after the change the opening is 02:30 EDT = 06:30 UTC
    assert w.next_open(dt.datetime(2026, 3, 9, 0, 0, tzinfo=UTC)) == dt.datetime(2026, 3, 9, 6, 30, tzinfo=UTC)


def test_window_verdict_pass_wait_fail_and_message_names_the_window(tmp_path):
    spec = load_spec(spec_variant(tmp_path, "w", lambda raw: raw.update(
        window={"start": "02:00", "end": "03:00", "timezone": "UTC"}, window_deadline_minutes=30)))
    at = dt.datetime(2026, 3, 2, 2, 30, tzinfo=UTC)
    assert flow.window_verdict(spec, at, at)[0] == "pass"
    before = dt.datetime(2026, 3, 2, 1, 45, tzinfo=UTC)
    verdict, _, opening = flow.window_verdict(spec, before, before)
    assert (verdict, opening) == ("wait", dt.datetime(2026, 3, 2, 2, 0, tzinfo=UTC))
    after = dt.datetime(2026, 3, 2, 4, 0, tzinfo=UTC)
    verdict, msg, _ = flow.window_verdict(spec, after, after)
    assert verdict == "fail" and "02:00-03:00 UTC" in msg and "window_deadline_minutes" in msg


def test_window_timetable_is_a_cron_trigger_at_the_openings(airflow_db, tmp_path):
    from airflow.timetables.trigger import CronTriggerTimetable

    from dbguard.airflow.dag_factory import timetable

    spec = load_spec(spec_variant(tmp_path, "tt", lambda raw: raw.update(
        run_cutover=True, schedule=None,
        window={"start": "22:30", "end": "01:00", "timezone": "Europe/Berlin", "days": ["fri", "sat"]})))
    tt = timetable(spec)
    assert isinstance(tt, CronTriggerTimetable)
    assert tt._expression == "30 22 * * fri,sat" and str(tt._timezone.name) == "Europe/Berlin"
    assert timetable(spec.model_copy(update={"schedule": "@daily"})) == "@daily"
    assert timetable(spec.model_copy(update={"run_cutover": False})) is None


def test_new_fields_refuse_bad_values_naming_the_field(tmp_path):
    for field, value in (("soak_minutes", -1), ("window_deadline_minutes", 0), ("approval", "yes")):
        with pytest.raises(SpecError) as e:
            load_spec(spec_variant(tmp_path, f"bad_{field}", lambda raw: raw.update({field: value})))
        assert field in str(e.value)
    spec = load_spec(spec_variant(tmp_path, "defaults", lambda raw: None))
    assert (spec.run_cutover, spec.soak_minutes, spec.approval, spec.window_deadline_minutes) == (False, 0, False, None)


# ---- routing and status: pure -------------------------------------------------------------------

def test_rollback_and_release_routing_before_and_after_the_flip():
    ok = {"preflight": "success", "checksum_gate": "success", "cutover": "success", "tail": "success"}
    assert not flow.needs_rollback(ok, True) and not flow.needs_release(True)  # a clean flip holds
    assert flow.needs_rollback({**ok, "tail": "failed"}, True)
    assert not flow.needs_rollback({**ok, "cutover": "failed"}, False)  # cutover undid itself: abort
    assert not flow.needs_rollback({"preflight": "failed", "checksum_gate": "upstream_failed"}, False)
    assert flow.needs_rollback({"checksum_gate": "failed"}, False)  # divergence survived repair
    assert flow.needs_rollback({"retrieval_gate": "failed"}, False)  # escalation
    assert not flow.needs_rollback({"wait_for_window": "skipped", "cutover": "skipped"}, False)
    assert flow.needs_release(False)


def test_status_names_how_the_run_ended():
    assert flow.status({"cutover": "success", "tail": "success", "rollback": "skipped", "release": "skipped"},
                       is_flipped=True) == "cutover"
    assert flow.status({"tail": "failed", "rollback": "success"}, is_flipped=False) == "rolled_back"
    assert flow.status({"wait_for_window": "failed", "release": "success", "rollback": "skipped"},
                       is_flipped=False) == "aborted"
    assert flow.status({"tail": "failed", "rollback": "failed"}, is_flipped=True) == "failed"
    assert flow.status({"wait_for_window": "skipped", "release": "success"}, is_flipped=False) == "success"
    assert flow.status({}, is_flipped=False, dry_run=True) == "dry_run"


# ---- DAG shape ----------------------------------------------------------------------------------

def _cutover_spec(tmp_path, monkeypatch, name="shop_cut", **fields):
    def edit(raw):
        raw.update(name=name, run_cutover=True, soak_minutes=0.02, **fields)
    path = spec_variant(tmp_path, name, edit)
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    return path


def test_dag_shape_with_cutover_and_approval(airflow_db, tmp_path, monkeypatch):
    _cutover_spec(tmp_path, monkeypatch, approval=True)
    bag = dagbag()
    assert bag.import_errors == {}
    dag = bag.dags["dbguard_shop_cut"]
    order = ["checksum_gate", "wait_for_window", "soak", "approval", "cutover", "tail", "rollback", "release",
             "finalize"]
    for a, b in zip(order, order[1:]):
        assert dag.task_dict[b].upstream_task_ids == {a}, (a, b)
    for t in ("rollback", "release", "finalize"):
        assert dag.task_dict[t].trigger_rule == "all_done"
    assert type(dag.task_dict["approval"]).__mro__[1].__name__ == "ApprovalOperator"
    assert {"dbguard_shop_cut_rollback", "dbguard_shop_cut_finish"} <= set(bag.dags)
    assert dag.params["skip_cutover"] is False and dag.params["approve"] is None
    assert dag.timetable.summary  # window from demo_shop: a cron trigger at its openings
    assert "**Cutover**" in dag.doc_md and "`approval`" in dag.doc_md and "dbguard_shop_cut_finish" in dag.doc_md
    assert dag.task_dict["soak"].doc_md and dag.task_dict["rollback"].doc_md


# ---- real runs ----------------------------------------------------------------------------------

def _closed_window_now() -> dict:
    """A one-hour window that opened 3 hours ago (closed now, next opening ~21 h away)."""
    start = (dt.datetime.now(UTC) - dt.timedelta(hours=3)).replace(second=0, microsecond=0)
    return {"start": start.strftime("%H:%M"), "end": (start + dt.timedelta(hours=1)).strftime("%H:%M"),
            "timezone": "UTC"}


def _open_window_now() -> dict:
    start = (dt.datetime.now(UTC) - dt.timedelta(minutes=30)).replace(second=0, microsecond=0)
    return {"start": start.strftime("%H:%M"), "end": (start + dt.timedelta(hours=2)).strftime("%H:%M"),
            "timezone": "UTC"}


def _states(dag_run) -> dict:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


def test_a_run_outside_the_window_does_not_flip_and_aborts_naming_the_window(airflow_db, dbpair, reports,
                                                                               tmp_path, monkeypatch):
    _cutover_spec(tmp_path, monkeypatch, window=_closed_window_now(), window_deadline_minutes=5)
    demo.load_shop(dbpair.source, customers=300, orders=900)
    dag_run = dagbag().dags["dbguard_shop_cut"].test()
    states = _states(dag_run)
    assert states["wait_for_window"] == "failed"
    assert (states["cutover"], states["rollback"], states["release"]) == ("upstream_failed", "skipped", "success")
    result = afenv.run_result(dag_run)
    assert result["status"] == "aborted" and "window_deadline_minutes" in result["reason"]
    assert not flow.flipped(load_spec(tmp_path / "shop_cut.yaml"), dag_run.run_id)
    note = reports / "dbguard_shop_cut" / f"{_safe(dag_run.run_id)}.incident.md"
    assert note.is_file() and "wait_for_window" in note.read_text()


def test_approval_blocks_the_flip_without_approve(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    _cutover_spec(tmp_path, monkeypatch, window=_open_window_now(), approval=True)
    demo.load_shop(dbpair.source, customers=300, orders=900)
    dag_run = dagbag().dags["dbguard_shop_cut"].test(run_conf={"approve": False})
    states = _states(dag_run)
    assert (states["wait_for_window"], states["soak"]) == ("success", "success")
    assert states["approval"] == "failed" and states["cutover"] == "upstream_failed"
    result = afenv.run_result(dag_run)
    assert result["status"] == "aborted" and "--approve" in result["reason"]
    assert result["cutover_ms"] is None
    with dbpair.tgt() as conn:
        stages_seen = {s for (s,) in conn.execute("SELECT stage FROM dbguard.events WHERE run_id = %s",
                                                  (dag_run.run_id,))}
    assert "soak" in stages_seen and not any(s.startswith("cutover.") for s in stages_seen)


def _safe(run_id: str) -> str:
    from dbguard import report

    return report._safe(run_id)


def test_retrieval_escalation_runs_the_rollback_path_promptly_with_an_incident_note(airflow_db, dbpair, reports,
                                                                                     tmp_path, monkeypatch):
    """The analyzer mistake (english -> simple) on a cutover spec: the retrieval gate fails within a short
    escalation window (not at its timeout), the rollback task runs, nothing is flipped, and the incident
    note, postmortem and regression gold set are written."""
    import yaml

    from dbguard import corpus

    raw = yaml.safe_load((afenv.SPECS_FOLDER / "demo_docs_bad_analyzer.yaml").read_text())
    raw.update(name="docs_escalate", run_cutover=True, window=None)
    raw["retrieval"].update(poke_seconds=1, gate_timeout_minutes=5)
    raw["gates"].update(escalate_after_minutes=0.05)
    path = tmp_path / "docs_escalate.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    corpus.load_docs(dbpair.source)
    dag_run = dagbag().dags["dbguard_docs_escalate"].test()
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["retrieval_gate"].state == "failed"
    assert (tis["retrieval_gate"].end_date - tis["retrieval_gate"].start_date).total_seconds() < 120  # not 5 min
    assert (tis["wait_for_window"].state, tis["cutover"].state) == ("upstream_failed", "upstream_failed")
    assert (tis["rollback"].state, tis["release"].state) == ("success", "success")  # release is idempotent
    result = afenv.run_result(dag_run)
    assert result["status"] == "rolled_back" and result["cutover_ms"] is None
    spec = load_spec(path)
    assert not flow.flipped(spec, dag_run.run_id)
    from dbguard import capture

    assert not capture.is_on(spec)  # the abort removed capture
    base = reports / "dbguard_docs_escalate" / _safe(dag_run.run_id)
    note = base.with_name(base.name + ".incident.md").read_text()
    assert "retrieval_gate" in note and "delta_s_diff" in note and "| at | stage |" in note
    assert "nothing was flipped" in note
    assert base.with_name(base.name + ".postmortem.md").is_file()
    reg = reports / "dbguard_docs_escalate" / "regression_gold.jsonl"
    assert reg.is_file() and len(reg.read_text().splitlines()) > 0
    with dbpair.tgt() as conn:
        assert conn.execute("SELECT status FROM dbguard.runs WHERE run_id = %s",
                            (dag_run.run_id,)).fetchone() == ("rolled_back",)


def _window_opening_soon(min_wait_s: float = 40) -> tuple[dict, dt.datetime]:
    """A 10-minute window opening at the next minute boundary at least min_wait_s away."""
    now = dt.datetime.now(UTC)
    opening = (now + dt.timedelta(seconds=min_wait_s + 60)).replace(second=0, microsecond=0)
    return ({"start": opening.strftime("%H:%M"), "end": (opening + dt.timedelta(minutes=10)).strftime("%H:%M"),
             "timezone": "UTC"}, opening)


def test_wait_for_window_defers_until_the_opening_under_dag_test(airflow_db, dbpair, reports, tmp_path,
                                                                 monkeypatch):
    """Outside the window the task defers on a DateTimeTrigger (run in-process by dag.test) and goes on
    at the opening; approve=false then stops the run before the flip."""
    window, opening = _window_opening_soon()
    _cutover_spec(tmp_path, monkeypatch, window=window, approval=True, window_deadline_minutes=10)
    demo.load_shop(dbpair.source, customers=300, orders=900)
    dag_run = dagbag().dags["dbguard_shop_cut"].test(run_conf={"approve": False})
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["wait_for_window"].state == "success"
    assert tis["wait_for_window"].start_date < opening <= tis["wait_for_window"].end_date
    assert tis["soak"].start_date >= opening
    with dbpair.tgt() as conn:
        waits = [d for (d,) in conn.execute("SELECT detail FROM dbguard.events WHERE run_id = %s AND "
                                             "stage = 'wait_for_window'", (dag_run.run_id,))]
    assert waits and dt.datetime.fromisoformat(waits[0]["opening"]) == opening
    assert afenv.run_result(dag_run)["status"] == "aborted"


def test_drill_parses_fail_at():
    assert flow.drill({"fail_at": "tail"}, "tail") == ""
    assert flow.drill({"fail_at": "cutover.pointer"}, "cutover") == "pointer"
    assert flow.drill({"fail_at": "cutover.pointer"}, "tail") is None
    assert flow.drill({}, "tail") is None and flow.drill(None, "cutover") is None


def test_a_full_run_inside_the_window_ends_cutover(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    from dbguard import cutover

    path = _cutover_spec(tmp_path, monkeypatch, window=_open_window_now(), approval=True)
    demo.load_shop(dbpair.source, customers=300, orders=900)
    dag_run = dagbag().dags["dbguard_shop_cut"].test(run_conf={"approve": True})
    states = _states(dag_run)
    result = afenv.run_result(dag_run)
    assert dag_run.state == "success", (states, result)
    assert (states["cutover"], states["tail"], states["rollback"], states["release"]) == (
        "success", "success", "skipped", "skipped")
    assert result["status"] == "cutover" and result["cutover_ms"] > 0
    st = cutover.state(load_spec(path), dag_run.run_id)
    assert (st["phase"], st["primary"]) == ("cutover", "target")
    with dbpair.tgt() as conn:
        assert conn.execute("SELECT status FROM dbguard.runs WHERE run_id = %s",
                            (dag_run.run_id,)).fetchone() == ("cutover",)
    assert not list(reports.glob("dbguard_shop_cut/*.incident.md"))  # a clean flip is no incident
    bag = dagbag()
    # finish refuses while rollback is still offered (rollback_ttl_minutes: 60) ...
    early = bag.dags["dbguard_shop_cut_finish"].test(run_conf={"run_id": dag_run.run_id})
    assert early.state == "failed"
    assert cutover.state(load_spec(path), dag_run.run_id)["phase"] == "cutover"
    # ... and the rollback DAG flips back, losing nothing
    with dbpair.src() as conn:  # fenced: the old primary refuses a straggling client's write
        import psycopg

        with pytest.raises(psycopg.errors.ReadOnlySqlTransaction, match="fenced"):
            conn.execute("UPDATE shop.customers SET full_name = full_name "
                         "WHERE id = (SELECT min(id) FROM shop.customers)")
    rb = bag.dags["dbguard_shop_cut_rollback"].test(run_conf={"run_id": dag_run.run_id})
    assert rb.state == "success"
    st = cutover.state(load_spec(path), dag_run.run_id)
    assert (st["phase"], st["primary"]) == ("rolled_back", "source")
    with dbpair.tgt() as conn:
        assert ledger.metrics(conn, dag_run.run_id).get("rollback_ms") is not None


def test_the_finish_dag_ends_the_tail_after_the_ttl(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    from dbguard import cutover

    path = _cutover_spec(tmp_path, monkeypatch, window=_open_window_now(), rollback_ttl_minutes=0.01)
    demo.load_shop(dbpair.source, customers=300, orders=900)
    bag = dagbag()
    dag_run = bag.dags["dbguard_shop_cut"].test()
    assert afenv.run_result(dag_run)["status"] == "cutover"
    fin = bag.dags["dbguard_shop_cut_finish"].test(run_conf={"run_id": dag_run.run_id})
    assert fin.state == "success"
    assert cutover.state(load_spec(path), dag_run.run_id)["phase"] == "finished"


def test_a_failure_after_the_flip_runs_rollback(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    from dbguard import cutover

    path = _cutover_spec(tmp_path, monkeypatch, window=_open_window_now())
    demo.load_shop(dbpair.source, customers=300, orders=900)
    dag_run = dagbag().dags["dbguard_shop_cut"].test(run_conf={"fail_at": "tail"})
    states = _states(dag_run)
    result = afenv.run_result(dag_run)
    assert (states["cutover"], states["tail"], states["rollback"], states["release"]) == (
        "success", "failed", "success", "success"), (states, result)  # release after the flip back
    assert result["status"] == "rolled_back" and result["cutover_ms"] > 0
    st = cutover.state(load_spec(path), dag_run.run_id)
    assert (st["phase"], st["primary"]) == ("rolled_back", "source")
    with dbpair.tgt() as conn:
        m = ledger.metrics(conn, dag_run.run_id)
    assert m.get("rollback_ms") is not None and result["rollback_ms"] == m["rollback_ms"]
    assert result["writes_after_cutover"] is not None
    note = (reports / "dbguard_shop_cut" / f"{_safe(dag_run.run_id)}.incident.md").read_text()
    assert "tail" in note and "had been flipped" in note and "rollback." in note


def test_soak_clock_starts_at_the_first_green_and_passes_after_soak_minutes(dbpair, tmp_path):
    from dbguard import db

    spec = load_spec(spec_variant(tmp_path, "soak", lambda raw: raw.update(
        soak_minutes=1, capture={"enabled": False})))
    with db.target(spec) as tgt:
        ledger.ensure(tgt)
        ledger.set_metric(tgt, "r1", spec.name, "checksum_ok", False)
    verdict, msg = flow.soak_gate(spec, "r1")
    assert verdict is False and "checksum_ok" in msg  # a red verdict that cannot recover fails at once
    with db.target(spec) as tgt:
        ledger.set_metric(tgt, "r1", spec.name, "checksum_ok", True)
    t0 = dt.datetime(2026, 3, 2, 2, 0, tzinfo=UTC)
    assert flow.soak_gate(spec, "r1", now=t0)[0] is None
    assert flow.soak_gate(spec, "r1", now=t0 + dt.timedelta(seconds=30))[0] is None
    verdict, msg = flow.soak_gate(spec, "r1", now=t0 + dt.timedelta(seconds=61))
    assert verdict is True and "green for 1.02 of 1 minute" in msg
    with db.target(spec) as tgt:
        assert ledger.metrics(tgt, "r1")[flow.SOAK_SINCE] == t0.isoformat()


def test_cli_run_takes_approve():
    from dbguard import cli

    assert cli.parser().parse_args(["run", "x.yaml", "--approve"]).approve is True
    assert cli.parser().parse_args(["run", "x.yaml"]).approve is False


def test_cli_without_approve_stops_before_the_flip_and_with_it_cuts_over(airflow_db, dbpair, tmp_path):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    from dbguard import cutover

    def edit(raw):
        raw.update(name="shop_cli_cut", run_cutover=True, approval=True, soak_minutes=0.01, window=_open_window_now())
    spec = spec_variant(tmp_path, "shop_cli_cut", edit)
    demo.load_shop(dbpair.source, customers=300, orders=900)
    env = {**os.environ, "DBGUARD_REPORT_DIR": str(tmp_path / "reports")}
    dbguard = str(Path(sys.executable).with_name("dbguard"))
    proc = subprocess.run([dbguard, "run", str(spec)], capture_output=True, text=True, env=env, timeout=300)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 1 and result["status"] == "aborted", proc.stderr[-3000:]
    assert "--approve" in proc.stderr and result["cutover_ms"] is None
    # start over from a clean target (a re-run onto the aborted run's copy is not this test's subject)
    drop = subprocess.run([dbguard, "rollback", str(spec), "--drop-target"], capture_output=True, text=True,
                          env=env, timeout=120)
    assert drop.returncode == 0, drop.stderr[-2000:]
    proc = subprocess.run([dbguard, "run", str(spec), "--approve"], capture_output=True, text=True, env=env,
                          timeout=300)
    result = json.loads(proc.stdout.splitlines()[-1])
    assert proc.returncode == 0 and result["status"] == "cutover", proc.stderr[-3000:]
    assert result["cutover_ms"] > 0 and result["writes_after_cutover"] == {"target": 0, "source": 0}
    with dbpair.tgt() as conn:
        run_id = conn.execute("SELECT run_id FROM dbguard.runs WHERE migration = 'shop_cli_cut' "
                              "ORDER BY started_at DESC LIMIT 1").fetchone()[0]
    assert cutover.state(load_spec(spec), run_id)["primary"] == "target"


def test_skip_cutover_copies_verifies_and_releases(airflow_db, dbpair, reports, tmp_path, monkeypatch):
    _cutover_spec(tmp_path, monkeypatch, window=_open_window_now())
    demo.load_shop(dbpair.source, customers=300, orders=900)
    dag_run = dagbag().dags["dbguard_shop_cut"].test(run_conf={"skip_cutover": True})
    states = _states(dag_run)
    assert dag_run.state == "success", states
    assert (states["wait_for_window"], states["cutover"], states["rollback"], states["release"]) == (
        "skipped", "skipped", "skipped", "success")
    result = afenv.run_result(dag_run)
    assert result["status"] == "success" and result["checksum_ok"] is True and result["cutover_ms"] is None
