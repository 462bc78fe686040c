"""The migration spec: a data engineer's mistakes are caught before anything runs.

Every bad spec below fails with a SpecError that names the field (as a path a
person can find in the YAML) and says what to write instead. Validation is
pure: none of this reaches a database.
"""
from __future__ import annotations

import copy
import datetime as dt
from pathlib import Path

import psycopg
import pytest
import yaml

from dbguard.errors import ConnectionFailed, SpecError
from dbguard.spec import MigrationSpec, Window, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "include" / "migrations" / "demo_shop.yaml"

GOOD = yaml.safe_load("""
name: shop
source: {conn_id: no_such_source}
target: {conn_id: no_such_target}
tables:
  - name: orders
    schema: shop
    key: [id]
    columns:
      - {name: id, type: bigint, nullable: false}
      - {name: customer_id, type: bigint}
      - {name: amount, type: "numeric(12,2)"}
    foreign_keys:
      - {columns: [customer_id], references: customers, ref_columns: [id]}
    target:
      indexes:
        - {columns: [customer_id]}
  - name: customers
    schema: shop
    key: [id]
    columns:
      - {name: id, type: bigint, nullable: false}
      - {name: email, type: text}
window: {start: "22:00", end: "02:00", timezone: Europe/Berlin}
""")


def bad(**edits):
    """GOOD with edits applied; keys are dotted paths, list items by index."""
    raw = copy.deepcopy(GOOD)
    for dotted, value in edits.items():
        node, *parts = [raw, *dotted.split(".")]
        *walk, last = parts
        for p in walk:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        elif value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


DELETE = object()
ORDERS_COLUMNS = GOOD["tables"][0]["columns"]

# (case id, raw spec, field path the error must name, words of the fix the message must contain)
BAD_SPECS = [
    ("missing name", bad(name=DELETE), "name", "required field is missing; add it"),
    ("typo in a top-level field", {**GOOD, "tabels": GOOD["tables"]}, "tabels", "did you mean 'tables'"),
    ("typo in a nested field", bad(**{"backfill": {"batch_row": 1000}}), "backfill.batch_row", "did you mean 'batch_rows'"),
    ("table name longer than PostgreSQL allows", bad(**{"tables.1.name": "é" * 32}),
     f"tables[{'é' * 32}].name", "64 bytes; PostgreSQL identifiers are at most 63 bytes"),
    ("migration name that cannot be a DAG id", bad(name="Shop Migration"), "name",
     "not a plain SQL identifier; use lower-case letters"),
    ("injection-shaped column type",
     bad(**{"tables.0.columns.2": {"name": "amount", "type": "text); drop table x;--"}}),
     "tables[orders].columns[amount].type", "write it as in DDL, for example"),
    ("empty schema", bad(**{"tables.0.schema": ""}), "tables[orders].schema", "is not a name; give the"),
    ("NUL in a column name", bad(**{"tables.0.columns.2": {"name": "amo\x00unt", "type": "integer"}}),
     "tables[orders].columns[amo\x00unt].name", "NUL byte"),
    ("key column not declared", bad(**{"tables.0.key": ["order_id"]}), "tables[orders].key",
     "declare them under columns"),
    ("foreign key to an unknown table",
     bad(**{"tables.0.foreign_keys": [{"columns": ["customer_id"], "references": "clients", "ref_columns": ["id"]}]}),
     "tables[orders].foreign_keys[0].references", "add that table or drop the foreign key"),
    ("foreign-key cycle",
     bad(**{"tables.1.foreign_keys": [{"columns": ["id"], "references": "orders", "ref_columns": ["id"]}]}),
     "tables", "cycle among ['customers', 'orders']"),
    ("batch_rows 0", bad(backfill={"batch_rows": 0}), "backfill.batch_rows", "use a value >= 100"),
    ("concurrency 1000", bad(backfill={"concurrency": 1000}), "backfill.concurrency", "use a value <= 64"),
    ("window 25:00", bad(**{"window.start": "25:00"}), "window.start", "must be HH:MM"),
    ("unknown time zone", bad(**{"window.timezone": "Europe/Atlantis"}), "window.timezone",
     "use an IANA name such as 'UTC'"),
    ("escalation below the pass threshold", bad(gates={"delta_s_max": 0.05, "delta_s_escalate": 0.02}),
     "gates.delta_s_escalate", "must be >= the pass threshold"),
    ("duplicate column", bad(**{"tables.0.columns": ORDERS_COLUMNS + [{"name": "amount", "type": "integer"}]}),
     "tables[orders].columns[amount]", "declared twice; keep one"),
    ("index on an unknown column", bad(**{"tables.0.target": {"indexes": [{"columns": ["placed_at"]}]}}),
     "tables[orders].target.indexes[0].columns", "index only declared columns"),
    ("empty tables list", bad(tables=[]), "tables", "needs at least 1 item(s), got 0"),
    ("duplicate table", bad(**{"tables.1": GOOD["tables"][0]}), "tables[orders]", "listed twice"),
    ("unknown index method", bad(**{"tables.0.target": {"indexes": [{"columns": ["id"], "method": "bitmap"}]}}),
     "tables[orders].target.indexes[0].method", "got 'bitmap'"),
]


@pytest.mark.parametrize("raw,field,fix", [c[1:] for c in BAD_SPECS], ids=[c[0] for c in BAD_SPECS])
def test_bad_spec_names_the_field_and_the_fix(raw, field, fix):
    with pytest.raises(SpecError) as info:
        parse_spec(raw, "bad.yaml")
    fields = [f for f, _ in info.value.problems]
    assert field in fields, info.value.problems
    msg = dict(info.value.problems)[field]
    assert fix in msg, msg
    assert f"  - {field}: " in str(info.value) and str(info.value).startswith("bad.yaml: ")


def test_at_least_twelve_kinds_of_bad_spec_are_covered():
    assert len(BAD_SPECS) >= 12


def test_malformed_yaml_names_line_and_column(tmp_path):
    p = tmp_path / "broken.yaml"
    p.write_text("name: shop\ntables:\n  - name: orders\n   key: [id]\n", encoding="utf-8")
    with pytest.raises(SpecError) as info:
        load_spec(p)
    (where, msg), = info.value.problems
    assert where.startswith("line 4, column") and "not valid YAML" in msg
    assert str(p) in str(info.value)


def test_a_yaml_list_is_not_a_spec(tmp_path):
    p = tmp_path / "list.yaml"
    p.write_text("- name: shop\n", encoding="utf-8")
    with pytest.raises(SpecError, match="must be a YAML mapping with name, source, target, tables"):
        load_spec(p)


def test_missing_file_says_what_to_pass(tmp_path):
    with pytest.raises(SpecError, match="no such file; pass the path of a migration YAML"):
        load_spec(tmp_path / "nope.yaml")


def test_every_problem_is_reported_at_once():
    raw = bad(backfill={"concurrency": 0, "batch_rows": 1}, **{"window.end": "24:00", "tables.0.key": ["x"]})
    with pytest.raises(SpecError) as info:
        parse_spec(raw)
    fields = {f for f, _ in info.value.problems}
    assert {"backfill.concurrency", "backfill.batch_rows", "window.end", "tables[orders].key"} <= fields


def test_validation_never_reaches_a_database(monkeypatch):
    """The conn ids name no connection at all; a validator that tried to connect would
    raise ConnectionFailed (or call psycopg), not SpecError."""
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_SOURCE", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_TARGET", raising=False)
    calls = []
    monkeypatch.setattr(psycopg, "connect", lambda *a, **k: calls.append(a) or pytest.fail("connected"))
    for case, raw, *_ in BAD_SPECS:
        try:
            parse_spec(raw)
        except ConnectionFailed:  # pragma: no cover - the failure this test exists for
            pytest.fail(f"{case}: validation tried to connect")
        except SpecError:
            pass
        else:
            pytest.fail(f"{case}: no SpecError")
    assert calls == []
    # and the good spec validates with the same missing connections
    assert parse_spec(GOOD).source.conn_id == "no_such_source"


def test_demo_spec_loads():
    spec = load_spec(DEMO)
    assert isinstance(spec, MigrationSpec)
    assert spec.dag_id == "dbguard_demo_shop"
    assert [t.name for t in spec.tables] == ["customers", "orders"]
    orders = spec.table("orders")
    assert orders.key == ["id"] and orders.column("amount").type == "numeric(12,2)"
    assert orders.foreign_keys[0].references == "customers"
    assert spec.table("customers").column("created_at").type == "timestamp with time zone"
    assert spec.target.collation == "C" and spec.backfill.batch_rows == 25_000


def test_types_are_normalised_as_ddl_writes_them():
    raw = bad(**{"tables.0.columns.2": {"name": "amount", "type": "  NUMERIC(12, 2) "}})
    assert parse_spec(raw).table("orders").column("amount").type == "numeric(12, 2)"


def test_table_order_puts_parents_first():
    spec = parse_spec(GOOD)
    assert [t.name for t in spec.table_order()] == ["customers", "orders"]
    three = copy.deepcopy(GOOD)
    three["tables"].insert(0, {
        "name": "order_items", "schema": "shop", "key": ["order_id", "line"],
        "columns": [{"name": "order_id", "type": "bigint"}, {"name": "line", "type": "int"},
                    {"name": "parent_line", "type": "int"}],
        "foreign_keys": [{"columns": ["order_id"], "references": "orders", "ref_columns": ["id"]},
                         # a self-reference is not a cycle
                         {"columns": ["order_id", "parent_line"], "references": "order_items",
                          "ref_columns": ["order_id", "line"]}],
    })
    assert [t.name for t in parse_spec(three).table_order()] == ["customers", "orders", "order_items"]


UTC = dt.timezone.utc


def at(y, m, d, hh, mm, tz=UTC):
    return dt.datetime(y, m, d, hh, mm, tzinfo=tz)


def test_window_past_midnight_belongs_to_the_day_it_starts():
    # 2026-01-02 is a Friday.
    w = Window(start="22:00", end="02:00", days=["fri"])
    assert w.contains(at(2026, 1, 2, 22, 0))        # Fri 22:00, inclusive start
    assert w.contains(at(2026, 1, 3, 1, 59))        # Sat 01:59 is still Friday's window
    assert not w.contains(at(2026, 1, 3, 2, 0))     # exclusive end
    assert not w.contains(at(2026, 1, 2, 1, 30))    # Fri 01:30 belongs to Thursday's window
    assert not w.contains(at(2026, 1, 3, 22, 30))   # Saturday evening: not a window day
    assert not w.contains(at(2026, 1, 2, 12, 0))


def test_window_same_day_and_time_zone():
    w = Window(start="01:00", end="05:00", timezone="Europe/Berlin", days=["sun", "mon"])
    assert w.contains(at(2026, 1, 4, 0, 30))        # Sun 01:30 in Berlin (UTC+1)
    assert not w.contains(at(2026, 1, 4, 4, 0))     # Sun 05:00 Berlin: end is exclusive
    assert not w.contains(at(2026, 1, 3, 0, 30))    # Saturday in Berlin
    assert w.contains(at(2026, 7, 5, 23, 30))       # Mon 01:30 Berlin in summer (UTC+2)
    every_day = Window(start="00:00", end="23:59")
    assert every_day.contains(at(2026, 3, 1, 12, 0)) and not every_day.contains(at(2026, 3, 1, 23, 59))


def test_good_spec_defaults_are_documented_values():
    spec = parse_spec(GOOD)
    assert spec.backfill.concurrency == 4 and spec.backfill.batch_rows == 250_000
    assert spec.gates.delta_s_max == 0.02 and spec.gates.delta_s_escalate == 0.05
    assert spec.gates.escalate_after_minutes == 15
    assert spec.schema_freeze is True and spec.table("orders").target_schema == "shop"


DOCS = ROOT / "docs" / "spec.md"


def test_the_annotated_example_in_the_docs_is_a_valid_spec():
    text = DOCS.read_text(encoding="utf-8")
    example = text.split("```yaml\n", 1)[1].split("```", 1)[0]
    spec = parse_spec(yaml.safe_load(example), "docs/spec.md")
    assert [t.name for t in spec.table_order()] == ["customers", "orders"]
    assert spec.window is not None
    assert spec.window.contains(at(2026, 1, 2, 23, 0))      # Sat 00:00 in Berlin: Friday's window
    assert not spec.window.contains(at(2026, 1, 4, 23, 0))  # Mon 00:00 in Berlin: Sunday's, not a window day
    assert spec.table("customers").column("legacy_score").tgt_type == "bigint"


def test_every_spec_field_is_documented():
    """docs/spec.md has a table row for every field of every spec model."""
    import dbguard.spec as model

    text = DOCS.read_text(encoding="utf-8")
    missing = []
    for obj in vars(model).values():
        if isinstance(obj, type) and issubclass(obj, model._Model) and obj is not model._Model:
            for name, field in obj.model_fields.items():
                if f"| `{field.alias or name}` |" not in text:
                    missing.append(f"{obj.__name__}.{field.alias or name}")
    assert missing == [], f"document these fields in docs/spec.md: {missing}"
