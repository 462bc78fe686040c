"""The retrieval stages in a real DAG run: docstring vectors (L2, raw) move to
cosine on normalised vectors and pass the gate; the analyzer mistake
(english -> simple) fails the run, naming the drifting queries."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from dbguard import corpus
from dbguard.airflow import env as afenv
from test_dag import dagbag, reports  # noqa: F401  (fixture)
from test_retrieval import NO_LATENCY_FLOOR_MS

DOCS = afenv.SPECS_FOLDER / "demo_docs.yaml"
BAD = afenv.SPECS_FOLDER / "demo_docs_bad_analyzer.yaml"


def test_docs_migration_passes_the_retrieval_gate(airflow_db, dbpair, reports, tmp_path, monkeypatch):  # noqa: F811
    raw = yaml.safe_load(DOCS.read_text())
    raw["retrieval"]["latency_floor_ms"] = NO_LATENCY_FLOOR_MS  # a shared machine's load is not the migration
    path = tmp_path / "demo_docs.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    corpus.load_docs(dbpair.source)
    dag_run = dagbag().dags["dbguard_demo_docs"].test()
    result = afenv.run_result(dag_run)
    assert dag_run.state == "success", result
    assert result["checksum_ok"] is True
    assert result["delta_s_diff"] is not None and result["delta_s_diff"] <= 0.02
    assert result["lambda_state"] == "convergent"
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["build_indexes"] == states["shadow_reads"] == states["retrieval_gate"] == "success"
    with dbpair.tgt() as c:
        pins = dict(c.execute("SELECT key, value FROM dbguard.manifest WHERE run_id = %s",
                              (dag_run.run_id,)).fetchall())
        assert (pins["EMBED_DIM"], pins["metric"], pins["ANALYZER_CONF"]) == ("128", "cosine", "english"), pins
        assert len(pins["INDEX_HASH"]) >= 16
        opclass = c.execute("SELECT opc.opcname FROM pg_index i JOIN pg_opclass opc ON opc.oid = i.indclass[0] "
                            "JOIN pg_class ic ON ic.oid = i.indexrelid JOIN pg_am am ON am.oid = ic.relam "
                            "WHERE i.indrelid = 'docs.documents'::regclass AND am.amname = 'hnsw'").fetchone()
        assert opclass == ("vector_cosine_ops",)


def test_analyzer_mistake_fails_the_run_naming_queries(airflow_db, dbpair, reports, tmp_path, monkeypatch):  # noqa: F811
    raw = yaml.safe_load(BAD.read_text())
    raw["name"] = "docs_bad_fast"
    raw["retrieval"].update(poke_seconds=1)  # gate_timeout_minutes stays 2: the gate must fail before it
    path = tmp_path / "docs_bad_fast.yaml"
    path.write_text(yaml.safe_dump(raw))
    monkeypatch.setenv("DBGUARD_SPECS", str(path))
    corpus.load_docs(dbpair.source)
    dag_run = dagbag().dags["dbguard_docs_bad_fast"].test()
    result = afenv.run_result(dag_run)
    assert dag_run.state == "failed" and result["status"] == "failed"
    assert result["checksum_ok"] is True  # the data arrived intact: only meaning changed
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["retrieval_gate"] == "failed" and states["release"] == "success"
    assert result["lambda_state"] != "convergent" or result["delta_s_diff"] > 0.02
    with dbpair.tgt() as c:
        n = c.execute("SELECT count(*) FROM dbguard.shadow_reads WHERE run_id = %s AND store LIKE %s AND seed > 0 "
                      "AND lambda <> '→'", (dag_run.run_id, "%tsv%")).fetchone()[0]
        assert n > 0
        msg = c.execute("SELECT detail->>'message' FROM dbguard.events WHERE run_id = %s AND stage = "
                        "'retrieval_gate_failed'", (dag_run.run_id,)).fetchone()[0]
        reason = c.execute("SELECT value #>> '{}' FROM dbguard.metrics WHERE run_id = %s AND name = "
                           "'retrieval_gate_failure'", (dag_run.run_id,)).fetchone()[0]
    assert reason == "unfixable"
    assert "docs.documents.tsv" in msg and "failing queries" in msg, msg
    # Re-measuring reproduced the same numbers: failed at once with the diagnosis, not at the timeout.
    assert "waiting cannot help" in msg and "the analyzer changes english -> simple" in msg, msg
    # the incident report carries the gate message and a regression gold set for the postmortem
    report = json.loads(Path(result["report"]).with_name(Path(result["report"]).name[:-5] + ".json").read_text())
    inc = report["incident"]
    assert inc["failed_gates"][0]["gate"] == "retrieval_gate" and "failing queries" in inc["failed_gates"][0]["message"]
    assert inc["regression_queries"] > 0
    regression = [json.loads(line) for line in Path(inc["regression_gold"]).read_text().splitlines()]
    assert len(regression) == inc["regression_queries"] and all("id" in q for q in regression)
