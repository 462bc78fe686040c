"""`dbguard init` (issue 10 §2): a spec written from the source catalog validates unchanged and migrates."""
from __future__ import annotations

import yaml

from dbguard import cli, corpus, demo, stages, target_schema
from dbguard.spec import load_spec
from util import fingerprint


def init(capsys, *args) -> str:
    assert cli.main(["init", *args]) == 0
    return capsys.readouterr().out


def validate(capsys, tmp_path, text, name) -> None:
    path = tmp_path / f"{name}.yaml"
    path.write_text(text, encoding="utf-8")
    code = cli.main(["validate", str(path)])
    out = capsys.readouterr()
    assert code == 0, out.err
    return path


def test_init_shop_validates_and_migrates(dbpair, capsys, tmp_path):
    demo.load_shop(dbpair.source, customers=400, orders=1600)
    text = init(capsys, "shop_init", "--source", "dbguard_source", "--target", "dbguard_target", "--schema", "shop")
    raw = yaml.safe_load(text)
    assert [t["name"] for t in raw["tables"]] == ["customers", "orders"]
    orders = raw["tables"][1]
    assert orders["key"] == ["id"] and orders["foreign_keys"] == [
        {"columns": ["customer_id"], "references": "customers", "ref_columns": ["id"]}]
    assert {"name": "amount", "type": "numeric(12,2)", "nullable": False} in orders["columns"]
    assert "# EDIT" in text and 1 <= raw["backfill"]["concurrency"] and raw["backfill"]["batch_rows"] >= 50_000
    path = validate(capsys, tmp_path, text, "shop_init")
    s = load_spec(path)
    stages.preflight(s, "init")
    for t in s.tables:
        for r in stages.plan_ranges(s, "init", t.name):
            assert stages.copy_range(s, "init", r)["ok"]
    assert stages.reconcile(s, "init")["checksum_ok"]
    assert stages.finish_schema(s, "init")["differences"] == []
    assert stages.checksum_gate(s, "init")[0]
    stages.release(s, "init")
    with dbpair.src() as a, dbpair.tgt() as b:
        for c in (a, b):
            c.execute("SET TimeZone = 'UTC'; SET extra_float_digits = 1")
        for rel in ("shop.customers", "shop.orders"):
            assert fingerprint(a, rel) == fingerprint(b, rel), rel
    assert target_schema.differences(s) == []


def test_init_docs_emits_stores_with_dim_metric_and_config(dbpair, capsys, tmp_path):
    corpus.load_docs(dbpair.source, max_docs=300)
    # without a gold set the stores are emitted commented out, with a hint, and the spec validates
    text = init(capsys, "docs_init", "--source", "dbguard_source", "--target", "dbguard_target", "--schema", "docs")
    assert "# gold: include/gold/<name>.jsonl" in text and "#     source_metric: l2" in text
    validate(capsys, tmp_path, text, "docs_init")
    assert "vector" not in yaml.safe_load(text)["tables"][0]
    # with one, they are live: dimension and metric from the HNSW index's operator class, tsvector config
    text = init(capsys, "docs_init", "--source", "dbguard_source", "--target", "dbguard_target", "--schema", "docs",
                "--gold", "include/gold/demo_docs.jsonl")
    path = validate(capsys, tmp_path, text, "docs_init_gold")
    t = load_spec(path).tables[0]
    assert (t.vector[0].column, t.vector[0].dim, t.vector[0].source_metric) == ("embedding", 128, "l2")
    assert t.vector[0].source_index is not None and t.vector[0].source_index.type == "hnsw"
    assert t.search[0].column == "tsv" and t.search[0].config == t.search[0].source_config


def test_init_names_an_unknown_table(dbpair, capsys):
    demo.load_shop(dbpair.source, customers=10, orders=10)
    assert cli.main(["init", "x", "--source", "dbguard_source", "--target", "dbguard_target",
                     "--tables", "shop.Customers"]) == 2
    assert "did you mean 'customers'" in capsys.readouterr().err


def test_init_reads_a_generated_tsvector_config_and_orm_names(dbpair, capsys, tmp_path):
    from util import run

    with dbpair.src() as c:
        run(c, "CREATE EXTENSION IF NOT EXISTS vector",
            'CREATE TABLE "Articles" ("Id" bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, "Title" text NOT NULL, '
            "body text, emb vector(3), "
            """tsv tsvector GENERATED ALWAYS AS (to_tsvector('simple', coalesce("Title", '') || ' ' || coalesce(body, ''))) STORED)""",
            'CREATE INDEX ON "Articles" USING hnsw (emb vector_ip_ops)',
            'CREATE TABLE "nokey" (a int)')
    gold = tmp_path / "gold.jsonl"
    gold.write_text('{"id": "q1", "text": "hello", "vector": [1, 0, 0]}\n', encoding="utf-8")
    text = init(capsys, "orm_init", "--source", "dbguard_source", "--target", "dbguard_target", "--schema", "public",
                "--gold", str(gold))
    assert "# skipped: public.nokey has no primary key" in text
    path = validate(capsys, tmp_path, text, "orm_init")
    t = load_spec(path).table("Articles")
    assert t.key == ["Id"] and t.column("tsv").generated
    assert (t.vector[0].dim, t.vector[0].source_metric) == (3, "ip")
    assert (t.search[0].config, t.search[0].source_columns) == ("simple", ["Title", "body"])
