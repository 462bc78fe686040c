"""The hostile-input catalogue (tests/hostile/): every malformed or hostile spec is refused with exit 2
and a message naming the field and the fix, before anything is written.

tests/hostile/EXPECT.yaml says, per file, which command must refuse it: `validate` when the spec alone
shows the problem, else `plan` (against real servers: unreachable host, missing privilege, data that
contradicts the spec). Source and target are compared before and after, a refused `run` included.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
import yaml
from psycopg import sql

from dbguard import cli

HOSTILE = Path(__file__).parent / "hostile"
EXPECT = yaml.safe_load((HOSTILE / "EXPECT.yaml").read_text())
ROOT = HOSTILE.parent.parent

SOURCE_SQL = """
CREATE SCHEMA hostile;
CREATE TABLE hostile.items (id bigint PRIMARY KEY, name text);
INSERT INTO hostile.items SELECT g, 'item ' || g FROM generate_series(1, 50) g;
CREATE TABLE hostile.dupes (id bigint, name text);
INSERT INTO hostile.dupes VALUES (1, 'a'), (1, 'b');
CREATE TABLE hostile.victim (id int);
INSERT INTO hostile.victim VALUES (1);
CREATE TABLE hostile.vecs (id bigint PRIMARY KEY, emb real[]);
INSERT INTO hostile.vecs VALUES (1, '{1,0,0}'), (2, '{0,1,0}'), (3, '{0,0,1}');
CREATE TABLE hostile.nanvecs (id bigint PRIMARY KEY, emb real[]);
INSERT INTO hostile.nanvecs VALUES (1, '{1,0,0}'), (2, '{NaN,1,0}');
CREATE TABLE hostile.ragged (id bigint PRIMARY KEY, emb real[]);
INSERT INTO hostile.ragged VALUES (1, '{1,0,0}'), (2, '{1,0,0,0}');
CREATE ROLE hostile_noprivs LOGIN;
"""


BAD_ESCAPE_URI = "postgresql://app:%ff%fe@127.0.0.1:1/shop"  # %ff%fe: bytes that are not UTF-8


def _snapshot(dsn: str) -> dict:
    """Every user table (outside dbguard's own schema) with its row count and an md5 of its rows."""
    with psycopg.connect(dsn) as c:
        rels = [r[0] for r in c.execute(
            "SELECT format('%I.%I', schemaname, tablename) FROM pg_tables "
            "WHERE schemaname NOT IN ('pg_catalog', 'information_schema', 'dbguard') ORDER BY 1")]
        return {r: c.execute(sql.SQL("SELECT count(*), md5(coalesce(string_agg(t::text, ',' ORDER BY t::text), '')) "
                                     "FROM {} t").format(sql.SQL(r))).fetchone() for r in rels}


@pytest.fixture
def hostile_env(dbpair, monkeypatch):
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        if c.execute("SELECT 1 FROM pg_roles WHERE rolname = 'hostile_noprivs'").fetchone():
            c.execute("DROP OWNED BY hostile_noprivs")
            c.execute("DROP ROLE hostile_noprivs")
        c.execute(SOURCE_SQL)
    noprivs = dbpair.src_dsn.replace("postgresql://postgres@", "postgresql://hostile_noprivs@")
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_NOPRIVS", noprivs)
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_DEAD", "postgresql://nobody:pw@127.0.0.1:1/nowhere")
    monkeypatch.chdir(ROOT)  # gold paths in the catalogue are relative to the project root
    yield dbpair
    with psycopg.connect(dbpair.src_dsn, autocommit=True) as c:
        c.execute("DROP OWNED BY hostile_noprivs")
        c.execute("DROP ROLE hostile_noprivs")


def test_the_catalogue_is_big_and_every_file_is_listed():
    files = {p.name for p in HOSTILE.glob("*.yaml")} - {"EXPECT.yaml"}
    assert files == set(EXPECT), "each hostile spec needs an EXPECT.yaml entry (and vice versa)"
    assert len(files) >= 25
    assert {"validate", "plan"} == {c["command"] for c in EXPECT.values()}


@pytest.mark.parametrize("name", sorted(n for n, c in EXPECT.items() if c["command"] == "validate"))
def test_validate_refuses(name, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_BADESCAPE", BAD_ESCAPE_URI)
    assert cli.main(["validate", str(HOSTILE / name)]) == 2
    err = capsys.readouterr().err
    missing = [w for w in EXPECT[name]["expect"] if w not in err]
    assert not missing, f"{name}: message lacks {missing}:\n{err}"
    assert "Traceback" not in err


def test_plan_refuses_what_the_databases_contradict_and_nothing_changes(hostile_env, capsys):
    before = (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn))
    for name in sorted(n for n, c in EXPECT.items() if c["command"] == "plan"):
        path = str(HOSTILE / name)
        assert cli.main(["validate", path]) == 0, f"{name} should pass validate (only the databases refuse it)"
        capsys.readouterr()
        assert cli.main(["plan", path]) == 2, name
        err = capsys.readouterr().err
        missing = [w for w in EXPECT[name]["expect"] if w not in err]
        assert not missing, f"{name}: message lacks {missing}:\n{err}"
        assert "Traceback" not in err
    assert (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn)) == before
    assert ("hostile.victim" in before[0]), "the injection-shaped table name must not have dropped the victim"


def test_a_refused_run_returns_fast_records_why_and_writes_nothing(hostile_env, capsys):
    before = (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn))
    t0 = time.monotonic()
    assert cli.main(["run", str(HOSTILE / "unknown_column.yaml")]) == 2
    seconds = time.monotonic() - t0
    out = capsys.readouterr()
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["status"] == "failed" and "nmae" in result["reason"]
    assert seconds < 10, f"a refused run took {seconds:.1f} s"
    assert (_snapshot(hostile_env.src_dsn), _snapshot(hostile_env.tgt_dsn)) == before
    with hostile_env.tgt() as c:
        status, reason = c.execute("SELECT status, reason FROM dbguard.runs ORDER BY started_at DESC LIMIT 1").fetchone()
    assert status == "refused" and "no such column" in reason


# ---- files that are not files, YAML that is not a spec, flags that are not conf ------------------------

def _dbguard(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`dbguard <args>` in a child with 3 GB of address space and a timeout, so that reading /dev/zero to
    the end fails fast (MemoryError) instead of eating the machine, and a hang is a test failure."""
    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    try:
        return subprocess.run([sys.executable, "-m", "dbguard.cli", *args], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=limit, cwd=ROOT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"dbguard {' '.join(args)} still ran after {timeout} s (it must refuse at once)")


def _refused(out: subprocess.CompletedProcess, *words: str) -> None:
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    missing = [w for w in words if w not in out.stderr]
    assert not missing, f"message lacks {missing}:\n{out.stderr[-2000:]}"


def _fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


def test_a_device_or_a_fifo_is_not_a_spec(tmp_path):
    _refused(_dbguard("validate", "/dev/zero"), "/dev/zero", "character device", "regular file")
    _refused(_dbguard("validate", str(_fifo(tmp_path / "spec.yaml"))), "spec.yaml", "FIFO", "regular file")


def test_a_file_that_is_no_spec_is_not_echoed_back(tmp_path):
    """A credentials file given by mistake (root runs `dbguard validate /etc/shadow`): its lines parse as
    mapping keys, and each used to be printed back as an 'unknown field'."""
    shadow = tmp_path / "shadow"
    shadow.write_text("root:$y$j9T$Secret0Hash:19000:0:99999:7:::\nsvc: Secret1Hash\n")
    out = _dbguard("validate", str(shadow))
    _refused(out, "not a dbguard migration spec", "none of its 2 top-level keys")
    assert "Secret" not in out.stderr + out.stdout


def test_a_spec_over_the_cap_is_refused_without_reading_it_all(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_bytes(b"# " + b"x" * (2 << 20) + b"\n")
    _refused(_dbguard("validate", str(big)), "big.yaml", "1,048,576 bytes")


def test_a_gold_set_that_is_a_device_or_a_fifo_is_refused(tmp_path):
    spec = (HOSTILE / "gold_missing.yaml").read_text()
    for gold in ("/dev/zero", str(_fifo(tmp_path / "gold.jsonl"))):
        path = tmp_path / "spec.yaml"
        path.write_text(spec.replace("tests/hostile/no_such_gold.jsonl", gold))
        _refused(_dbguard("validate", str(path)), "gold", gold, "regular file")


@pytest.mark.parametrize("open_, close", [("[", "]"), ("{a: ", "}")])
def test_yaml_nested_100000_deep_is_refused(tmp_path, capsys, open_, close):
    path = tmp_path / "deep.yaml"
    path.write_text("name: hostile\nbackfill: " + open_ * 100_000 + "1" + close * 100_000 + "\n")
    assert cli.main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nested" in err and "deep" in err and "Traceback" not in err, err[-2000:]


def _dead_endpoints(monkeypatch) -> None:
    """Both conn ids point at a port nobody listens on: whatever touches a database fails loudly."""
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_SOURCE", "postgresql://nobody:pw@127.0.0.1:1/nowhere")
    monkeypatch.setenv("AIRFLOW_CONN_DBGUARD_TARGET", "postgresql://nobody:pw@127.0.0.1:1/nowhere")


@pytest.mark.parametrize("conf, words", [
    (["batch_rows=-5"], ["--conf batch_rows", "-5", "minimum", "100"]),
    (["batch_rows=\"many\""], ["--conf batch_rows", "'many'", "integer"]),
    (["dry_run=3"], ["--conf dry_run", "boolean"]),
    (["batch_row=500"], ["--conf batch_row", "unknown", "batch_rows", "dry_run"]),
    (["approve=true"], ["--conf approve", "unknown", "batch_rows, dry_run"]),  # no run_cutover: no approve
])
def test_run_refuses_bad_conf_before_touching_a_database(monkeypatch, capsys, conf, words):
    _dead_endpoints(monkeypatch)
    monkeypatch.chdir(ROOT)
    assert cli.main(["run", str(HOSTILE / "unknown_column.yaml"), *[a for c in conf for a in ("--conf", c)]]) == 2
    out = capsys.readouterr()
    missing = [w for w in words if w not in out.err]
    assert not missing, f"message lacks {missing}:\n{out.err[-2000:]}"
    assert "Traceback" not in out.err and "cannot reach" not in out.err, out.err[-2000:]
    result = json.loads(out.out.strip().splitlines()[-1])
    assert result["status"] == "failed" and conf[0].split("=")[0] in result["reason"]


def test_conf_without_a_value_is_a_usage_error(monkeypatch, capsys):
    _dead_endpoints(monkeypatch)
    with pytest.raises(SystemExit) as e:
        cli.main(["run", str(HOSTILE / "unknown_column.yaml"), "--conf", "batch_rows"])
    assert e.value.code == 2  # was SystemExit(message): exit status 1, as if the run had failed
    assert "--conf expects key=value, got 'batch_rows'" in capsys.readouterr().err


def test_a_uri_escape_that_is_not_utf8_names_the_connection(monkeypatch, capsys):
    _dead_endpoints(monkeypatch)
    monkeypatch.setenv("AIRFLOW_CONN_HOSTILE_BADESCAPE", BAD_ESCAPE_URI)
    monkeypatch.chdir(ROOT)
    for command in ("validate", "plan", "run"):
        assert cli.main([command, str(HOSTILE / "bad_uri_escape.yaml")]) == 2, command
        err = capsys.readouterr().err
        assert "hostile_badescape" in err and "UTF-8" in err and "Traceback" not in err, (command, err[-2000:])
        assert "%ff" not in err.lower(), "the password must not be printed"


def test_lookalike_and_invisible_characters_in_names_are_warned_about(tmp_path, capsys):
    spec = (HOSTILE / "negative_batch.yaml").read_text().replace("batch_rows: -5", "batch_rows: 500")
    path = tmp_path / "spec.yaml"
    path.write_text(spec, encoding="utf-8")
    assert cli.main(["validate", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err, "a plain spec gets no warning"
    sneaky = spec.replace("- name: items", "- name: \u0456tems").replace("- name: name", "- name: na\u200bme")
    path.write_text(sneaky + "# \u0456 in a comment is fine\n", encoding="utf-8")
    assert cli.main(["validate", str(path)]) == 0  # valid names; a person should still look twice
    err = capsys.readouterr().err
    for words in (["tables[\u0456tems]", "U+0456", "CYRILLIC SMALL LETTER BYELORUSSIAN-UKRAINIAN I", "looks like"],
                  ["columns[na\u200bme]", "U+200B", "ZERO WIDTH SPACE", "invisible"]):
        assert all(w in err for w in words), (words, err)
    path.write_text(spec.replace("- name: name", "- name: \u0437\u0430\u043a\u0430\u0437\u044b"), encoding="utf-8")
    assert cli.main(["validate", str(path)]) == 0
    assert "warning" not in capsys.readouterr().err, "an all-Cyrillic word that looks like no Latin one is fine"


# ---- make airflow listens on localhost only ------------------------------------------------------------

def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _listening_addresses(cmd: list[str], tmp_path: Path, timeout: float = 300) -> set[tuple[str, int]]:
    """Start `cmd` (an `airflow standalone`) in a throwaway home on a free 127.0.0.1 port, wait until it says
    it is ready (scheduler, dag-processor and triggerer heartbeating), and return every TCP address its
    process tree listens on. Stops the tree by PID (its own process group) whatever happens."""
    import shutil
    import signal
    import sqlite3

    import psutil

    from dbguard.airflow.stack import free_port

    home, empty = tmp_path / "home", tmp_path / "empty"
    home.mkdir()
    empty.mkdir()
    with sqlite3.connect(Path(os.environ["AIRFLOW_HOME"]) / "airflow.db") as src, \
            sqlite3.connect(home / "airflow.db") as dst:
        src.backup(dst)  # an already migrated metadata DB: standalone starts in seconds
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW__")}, "AIRFLOW_HOME": str(home),
           "AIRFLOW__CORE__DAGS_FOLDER": str(empty), "AIRFLOW__CORE__PLUGINS_FOLDER": str(empty),
           "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__API__HOST": "127.0.0.1",
           "AIRFLOW__API__PORT": str(port), "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    log = home / "standalone.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    tree: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + timeout
        while not ("Airflow is ready" in log.read_text(errors="replace") and _accepts(port)):
            assert proc.poll() is None, f"standalone exited {proc.returncode}: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"standalone not ready after {timeout} s: {log.read_text()[-3000:]}"
            time.sleep(2)
        time.sleep(5)  # the log servers start with their component, well before it heartbeats
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        found = set()
        for p in tree:
            with contextlib.suppress(psutil.NoSuchProcess):
                found |= {(c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp")
                          if c.status == psutil.CONN_LISTEN}
        assert (("127.0.0.1", port)) in found, (found, log.read_text()[-3000:])
        return found
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass
        for p in [*tree, *(psutil.Process(proc.pid).children(recursive=True) if proc.poll() is None else [])]:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        shutil.rmtree(home, ignore_errors=True)


def test_make_airflow_listens_on_localhost_only(tmp_path):
    """`make airflow` runs `python -m dbguard.airflow.standalone`: the UI on 127.0.0.1 and no task-log server
    (plain `airflow standalone` also listens on [::]:8793 and :8794 for them)."""
    makefile = (ROOT / "Makefile").read_text()
    assert "-m dbguard.airflow.standalone" in makefile and "airflow standalone\n" not in makefile
    found = _listening_addresses([sys.executable, "-m", "dbguard.airflow.standalone"], tmp_path)
    exposed = {(ip, port) for ip, port in found if ip not in ("127.0.0.1", "::1")}
    assert not exposed, f"listening beyond localhost: {sorted(exposed)}"
