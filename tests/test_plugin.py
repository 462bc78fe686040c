"""The report plugin: only a logged-in Airflow user gets anything, and no request reads outside the
reports folder (`..`, encoded or not, absolute names, symlinks), nor learns where that folder is."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def client(tmp_path, monkeypatch, airflow_db):
    reports = tmp_path / "reports"
    (reports / "dbguard_x").mkdir(parents=True)
    (reports / "dbguard_x" / "run1.html").write_text("<html>the report</html>")
    (reports / "dbguard_x" / "run1.json").write_text(json.dumps({"result": {
        "status": "cutover", "checksum_ok": True, "migrated_rows": 10, "cutover_ms": 812.5}}))
    (reports / "dbguard_x" / "run1.incident.md").write_text("# incident")
    (tmp_path / "secret.html").write_text("SECRET one folder up")
    (reports / "dbguard_x" / "link.html").symlink_to(tmp_path / "secret.html")
    # A run whose JSON is a symlink out of the folder, and a DAG folder that is one: the index reads neither.
    (tmp_path / "secret.json").write_text(json.dumps({"result": {"status": "LEAKED-STATUS", "cutover_ms": 31337}}))
    (reports / "dbguard_x" / "run2.html").write_text("<html>run 2</html>")
    (reports / "dbguard_x" / "run2.json").symlink_to(tmp_path / "secret.json")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "run3.html").write_text("<html>outside</html>")
    (tmp_path / "elsewhere" / "run3.json").write_text(json.dumps({"result": {"status": "LEAKED-DIR"}}))
    (reports / "dbguard_y").symlink_to(tmp_path / "elsewhere")
    monkeypatch.setenv("DBGUARD_REPORT_DIR", str(reports))
    from airflow.api_fastapi.app import create_auth_manager
    from airflow.api_fastapi.auth.managers.simple.user import SimpleAuthManagerUser

    manager = create_auth_manager()
    manager.init()
    token = manager.generate_jwt(SimpleAuthManagerUser(username="admin", role="admin"))
    spec = importlib.util.spec_from_file_location("dbguard_plugin_under_test", ROOT / "plugins" / "dbguard_plugin.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    return TestClient(plugin.app), {"Authorization": f"Bearer {token}"}, tmp_path


def test_unauthenticated_requests_are_refused(client):
    c, _, _ = client
    for url in ("/", "/report/dbguard_x/run1.html", "/docs", "/redoc", "/openapi.json", "/docs/oauth2-redirect"):
        r = c.get(url)
        assert r.status_code in ((401, 403) if url.startswith(("/report", "/?")) or url == "/" else (401, 403, 404)), \
            (url, r.status_code)
        assert "the report" not in r.text and "openapi" not in r.text.lower(), url
    r = c.get("/", headers={"Authorization": "Bearer not-a-token"})
    assert r.status_code in (401, 403)


def test_a_logged_in_user_sees_runs_with_their_gates_and_the_report(client):
    c, auth, tmp = client
    page = c.get("/", headers=auth)
    assert page.status_code == 200
    assert "run1" in page.text and "cutover" in page.text and "812.5" in page.text
    assert str(tmp) not in page.text, "the index must not print the server's reports path"
    assert c.get("/report/dbguard_x/run1.html", headers=auth).text == "<html>the report</html>"
    assert c.get("/report/dbguard_x/run1.incident.md", headers=auth).status_code == 200


@pytest.mark.parametrize("url", [
    "/report/../secret.html", "/report/%2E%2E/secret.html", "/report/dbguard_x/..%2F..%2Fsecret.html",
    "/report/dbguard_x/%2E%2E%2F%2E%2E%2Fsecret.html", "/report/%2E%2E%2F/secret.html",
    "/report/dbguard_x/%2Fetc%2Fpasswd", "/report/dbguard_x/link.html", "/report/dbguard_x/../../secret.html",
])
def test_no_request_reads_outside_the_reports_folder(client, url):
    c, auth, _ = client
    r = c.get(url, headers=auth)
    assert "SECRET" not in r.text and "root:" not in r.text
    assert r.status_code in (400, 404, 405), (url, r.status_code)


def test_the_index_reads_no_run_json_through_a_symlink(client):
    c, auth, _ = client
    page = c.get("/", headers=auth).text
    assert "run1" in page and "cutover" in page
    assert "LEAKED" not in page and "31337" not in page, "the index followed a symlink out of the reports folder"
    assert "run3" not in page, "a DAG folder that is a symlink out is not listed"
