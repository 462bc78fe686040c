"""The UI in a real browser: headless Debian Chromium (Playwright) against a running Airflow.

Airflow runs what `airflow standalone` runs (LocalExecutor, SQLite, scheduler + dag-processor + api-server +
triggerer, simple auth manager), started one by one so that nothing but the api-server listens, in a
throwaway AIRFLOW_HOME on a free 127.0.0.1 port (dbguard.airflow.stack), wired to two
fresh databases on the embedded servers with the demo shop loaded small. In the browser: the plugin page
refuses a visitor who is not logged in, a wrong password does not log in, the right one does; the demo DAG
is triggered from its trigger form (Params: rows per key range, a run id), the run succeeds, its report is
opened from the run's "dbguard report" tab and from finalize's "dbguard report" extra link, its matplotlib
plots are decoded images, and after logging out the plugin refuses the browser again.
A screenshot of every step goes to .artifacts/browser/ (NN_<step>.png), Airflow's logs to
.artifacts/browser/logs/. Needs /usr/bin/chromium (`make sysdeps`); without it the test fails, it never skips.
"""
from __future__ import annotations

import os
import re
import shutil
import time
import uuid
from pathlib import Path

import pytest

from dbguard import demo

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("DBGUARD_CHROMIUM", "/usr/bin/chromium"))  # Debian's, from `make sysdeps`
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SHOTS = ROOT / ".artifacts" / "browser"
DAG_ID = "dbguard_demo_shop"
POOL = "dbguard_demo_shop"  # env.pool_name(spec): copy_range tasks wait forever without it
CUSTOMERS, ORDERS, BATCH_ROWS = 2000, 8000, 4000  # 1 + 2 key ranges
REFUSED = (401, 403)


@pytest.fixture
def stack(dbpair, tmp_path):
    """Airflow on the dbpair databases; stopped (every process, by PID) whatever happens."""
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run `make sysdeps` (installs Debian's chromium) for the browser test")
    from dbguard.airflow.stack import Stack

    demo.load_shop(dbpair.src_dsn, customers=CUSTOMERS, orders=ORDERS)
    s = Stack(extra_env={"DBGUARD_REPORT_DIR": str(tmp_path / "reports")})
    s.t0 = time.monotonic()
    try:
        s.airflow("db", "migrate")
        s.start_services()  # scheduler, dag-processor, api-server, triggerer: `airflow standalone`'s set
        s.wait_healthy(timeout=240)
        print(f"airflow healthy after {time.monotonic() - s.t0:.1f}s")
        r = s.api("POST", "/pools", json={"name": POOL, "slots": 4, "description": "browser test",
                                          "include_deferred": False})
        assert r.status_code in (201, 409), r.text
        s.wait_dag(DAG_ID, timeout=180, unpause=False)  # the trigger form unpauses it
        print(f"{DAG_ID} parsed after {time.monotonic() - s.t0:.1f}s")
        yield s
    finally:
        t_stop = time.monotonic()
        s.stop()
        print(f"airflow stopped in {time.monotonic() - t_stop:.1f}s; {time.monotonic() - s.t0:.1f}s in all")
        shutil.rmtree(SHOTS / "logs", ignore_errors=True)
        shutil.copytree(s.home / "logs", SHOTS / "logs", dirs_exist_ok=True)
        shutil.rmtree(s.home, ignore_errors=True)


def test_login_trigger_report_and_logout_in_chromium(stack):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    shots: list[Path] = []

    def shot(page, step: str, full_page: bool = False) -> None:
        path = SHOTS / f"{len(shots) + 1:02d}_{step}.png"
        page.screenshot(path=str(path), full_page=full_page)
        shots.append(path)

    url, run_id = stack.url, f"browser_{uuid.uuid4().hex[:8]}"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 900})
            context.set_default_timeout(30_000)
            page = context.new_page()

            # Not logged in: the plugin refuses, the UI sends us to its login page.
            for path in ("/dbguard/", f"/dbguard/?dag_id={DAG_ID}"):
                r = page.request.get(url + path, max_redirects=0)
                assert r.status in REFUSED, (path, r.status)
            page.goto(url + "/")
            page.wait_for_url(re.compile(r"/auth/login"))
            username, password = page.locator("input[name=username]"), page.locator("input[name=password]")
            username.fill(stack.user)
            password.fill("not-the-password")
            page.locator("button[type=submit]").click()
            expect(page.get_by_text(re.compile("invalid|incorrect|wrong", re.I)).first).to_be_visible()
            assert "/auth/login" in page.url and not any(c["name"] == "_token" for c in context.cookies())
            shot(page, "login_wrong_password")
            password.fill(stack.password)
            page.locator("button[type=submit]").click()
            page.wait_for_url(lambda u: "/auth/login" not in u)
            assert any(c["name"] == "_token" for c in context.cookies()), "no session cookie after login"

            # The demo DAG, and its trigger form with our Params.
            page.goto(f"{url}/dags/{DAG_ID}")
            expect(page.get_by_role("heading", name=DAG_ID).first).to_be_visible()
            expect(page.get_by_text("checksum_gate").first).to_be_visible()
            shot(page, "dag")
            page.get_by_test_id("trigger-dag-button").click()
            form = page.get_by_role("dialog")
            expect(form.get_by_text("Rows per key range")).to_be_visible()
            form.get_by_role("spinbutton").fill(str(BATCH_ROWS))
            form.get_by_text("Advanced Options").click()
            form.locator("input[name=dagRunId]").fill(run_id)
            shot(page, "trigger_form")
            page.get_by_test_id("trigger-dag-submit").click()
            page.wait_for_url(re.compile(rf"/runs/{run_id}"))

            t_run = time.monotonic()
            state = stack.wait_run(DAG_ID, run_id, timeout=300)
            print(f"run {run_id} {state} in {time.monotonic() - t_run:.1f}s")
            run = stack.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}").json()
            assert state == "success", f"run {run_id} ended {state}; Airflow logs in {SHOTS / 'logs'}"
            assert run["conf"].get("batch_rows") == BATCH_ROWS, run["conf"]  # the form's Param reached the run
            copies = [t for t in stack.task_instances(DAG_ID, run_id) if t["task_id"].endswith(".copy_range")]
            orders = [t for t in copies if t["task_id"] == "orders.copy_range"]
            assert {t["task_id"] for t in copies} == {"customers.copy_range", "orders.copy_range"}, copies
            assert len(orders) >= ORDERS // BATCH_ROWS, "orders were not cut at the form's rows per key range"
            assert all(t["state"] == "success" for t in copies), [(t["task_id"], t["state"]) for t in copies]

            page.goto(f"{url}/dags/{DAG_ID}/runs/{run_id}")
            expect(page.get_by_text("Success").first).to_be_visible()
            shot(page, "run_success")

            # The run's "dbguard report" tab: the plugin's index for this run, inside the UI.
            page.get_by_role("link", name="dbguard report").click()
            frame = page.frame_locator("iframe").first
            row = frame.locator("tr", has=frame.get_by_role("link", name=run_id))
            expect(row).to_be_visible()
            expect(row).to_contain_text("success")
            expect(row).to_contain_text(str(CUSTOMERS + ORDERS))  # migrated_rows
            expect(row.locator("td").nth(4)).to_have_text("True")  # checksum_ok
            shot(page, "report_tab")

            # finalize's extra link opens the report page itself; its plots are decoded images.
            page.goto(f"{url}/dags/{DAG_ID}/runs/{run_id}/tasks/finalize/details")
            expect(page.get_by_text("Extra Links")).to_be_visible()
            page.get_by_role("link", name="dbguard report").click()
            page.wait_for_url(re.compile(rf"/dbguard/report/{DAG_ID}/{run_id}\.html$"))
            expect(page.get_by_role("heading", name="Plots")).to_be_visible()
            images = page.eval_on_selector_all(
                "img", "els => els.map(e => ({w: e.naturalWidth, h: e.naturalHeight, done: e.complete, "
                       "shown: e.getBoundingClientRect().width, png: e.src.startsWith('data:image/png')}))")
            assert len(images) >= 2, images
            assert all(i["done"] and i["w"] > 0 and i["h"] > 0 and i["shown"] > 0 and i["png"] for i in images), images
            shot(page, "report", full_page=True)

            # Log out from the user menu; the plugin refuses the browser again.
            page.goto(f"{url}/dags/{DAG_ID}")
            page.get_by_role("button", name="User").click()
            token = next(c["value"] for c in context.cookies() if c["name"] == "_token")
            page.get_by_role("menuitem", name=re.compile("log ?out", re.I)).click()
            expect(page.get_by_text("You are about to logout")).to_be_visible()
            page.get_by_role("button", name="Confirm").click()
            page.wait_for_url(re.compile(r"/auth/login"))
            expect(page.locator("input[name=username]")).to_be_visible()
            shot(page, "logged_out")
            for path in ("/dbguard/", f"/dbguard/report/{DAG_ID}/{run_id}.html"):
                r = page.request.get(url + path, max_redirects=0)
                assert r.status in REFUSED, (path, r.status)
                assert "checksum" not in r.text()
            assert not any(c["name"] == "_token" for c in context.cookies()), "logout left the session cookie"
            r = page.request.get(url + "/dbguard/", headers={"Authorization": f"Bearer {token}"}, max_redirects=0)
            assert r.status in REFUSED, f"the logged-out session's token still opens the plugin ({r.status})"
        finally:
            browser.close()
    assert len(shots) >= 3 and all(s.stat().st_size > 10_000 for s in shots), shots
