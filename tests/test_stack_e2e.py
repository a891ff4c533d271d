"""The bundle under a real Airflow stack (tools/airflow_stack.py): API server, scheduler with the
LocalExecutor, DAG processor and triggerer, as users run it. Triggers through the REST API and the
CLI, a three-day backfill, a retry done by the scheduler, and the web UI in headless Chromium
(screenshots in test-artifacts/ui/). The stack is started once for the module and always stopped."""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import airflow_stack
import psycopg
import pytest
from airflow_env import airflow
from support import browser
from support.stack import (
    Api,
    audit_run,
    backfill_makes_passes_that_change_nothing,
    free_port,
    leftovers,
    meta,
    target,
    wait_until_parked,
)
from throttle import set_state

pytestmark = [pytest.mark.e2e, pytest.mark.stack]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
USERS = 1_500
RETRY_RUN = "retry_check_1"
# Every first try of `finalize` in runs whose id holds "retry_check" fails; the scheduler retries it.
FAIL_ONCE = "finalize@retry_check"
DEADLINE_MINUTES = 0.3


@pytest.fixture(scope="module")
def stack() -> Iterator[airflow_stack.Stack]:
    base = Path(tempfile.mkdtemp(prefix="umstack-", dir="/tmp"))  # short: sockets live under it
    try:
        yield airflow_stack.start(
            base,
            free_port(),
            users=USERS,
            extra_env={
                "USER_MIGRATION_SCHEDULE": "@daily",
                "USER_MIGRATION_FAIL_ONCE": FAIL_ONCE,
                # Short, so the approval test's run misses it while it waits for an answer.
                "USER_MIGRATION_PASS_DEADLINE_MINUTES": str(DEADLINE_MINUTES),
            },
        )
    finally:
        stopped = airflow_stack.stop(base)
        left = leftovers(base)
        shutil.rmtree(base, ignore_errors=True)
        assert "api-server" in stopped and not left, (stopped, left)


@pytest.fixture(scope="module")
def api(stack: airflow_stack.Stack) -> Api:
    api = Api(stack)
    dag = api.wait_for_dag()
    assert dag["is_paused"] is True  # new DAGs start paused: nothing runs until a user says so
    assert api("PATCH", "/dags/user_migration", {"is_paused": False})["is_paused"] is False
    return api


def test_token_flow_refuses_a_wrong_password(stack):
    request = urllib.request.Request(
        f"{stack.url}/auth/token",
        data=json.dumps({"username": "admin", "password": "not-the-password"}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(request, timeout=30)
    assert info.value.code == 401
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(f"{stack.url}/api/v2/dags", timeout=30)
    assert info.value.code == 401


def test_trigger_through_the_rest_api_migrates_every_row(stack, api):
    run = api("POST", "/dags/user_migration/dagRuns", {"dag_run_id": "rest_trigger_1", "logical_date": None})
    assert run["state"] == "queued"
    assert api.wait_for_run("rest_trigger_1")["state"] == "success"

    tis = api.task_instances("rest_trigger_1")
    assert {k for k in tis if k[0] == "copy"} == {("copy", 0), ("copy", 1)}  # mapped partitions
    # cutover=false: the approval and the cutover show as skipped, everything else succeeded.
    gate = {("approve_cutover", -1), ("cutover", -1)}
    assert {k: t["state"] for k, t in tis.items() if k in gate} == dict.fromkeys(gate, "skipped")
    assert all(t["state"] == "success" for k, t in tis.items() if k not in gate)
    report = api(
        "GET", "/dags/user_migration/dagRuns/rest_trigger_1/taskInstances/report/xcomEntries/return_value"
    )
    summary = report["value"]
    summary = json.loads(summary) if isinstance(summary, str) else summary
    assert summary["source_rows"] == USERS
    assert summary["migrated"] + summary["rejected"] == USERS
    assert 0 < summary["rejected"] < USERS * 0.1
    state, audit = audit_run(stack, "rest_trigger_1")
    assert state == "success" and audit["migrated"] == summary["migrated"]
    assert len(target(stack)) == summary["migrated"]


def test_trigger_through_the_cli_is_a_pass_that_changes_nothing(stack, api):
    before = target(stack)
    airflow(stack.env, "dags", "trigger", "user_migration", "--run-id", "cli_trigger_1")
    assert api.wait_for_run("cli_trigger_1")["state"] == "success"
    state, audit = audit_run(stack, "cli_trigger_1")
    assert state == "success"
    assert (audit["inserted"], audit["updated"], audit["removed"]) == (0, 0, 0)
    assert audit["unchanged"] == audit["migrated"] == len(before)
    assert target(stack) == before


def test_backfill_of_three_days_makes_three_passes_and_no_duplicates(stack, api):
    backfill_makes_passes_that_change_nothing(stack, api, "2026-11-01", "2026-11-03")


def test_a_task_that_fails_once_is_retried_by_the_scheduler(stack, api):
    api("POST", "/dags/user_migration/dagRuns", {"dag_run_id": RETRY_RUN, "logical_date": None})
    assert api.wait_for_run(RETRY_RUN, timeout=400)["state"] == "success"
    finalize = api.task_instances(RETRY_RUN)[("finalize", -1)]
    assert finalize["state"] == "success" and finalize["try_number"] == 2
    with psycopg.connect(stack.legacy_dsn) as conn:
        attempts = conn.execute(
            "SELECT try_number, state FROM migration_audit.task_attempts "
            "WHERE run_id = %s AND task_id = 'finalize' AND state <> 'running' ORDER BY try_number",
            (RETRY_RUN,),
        ).fetchall()
    assert attempts == [(1, "failed"), (2, "success")]
    # Other runs were not touched by the fault: their finalize task succeeded at once.
    assert api.task_instances("rest_trigger_1")[("finalize", -1)]["try_number"] == 1


def test_the_web_ui_in_a_real_browser(stack, api):
    """Log in through the form, open user_migration, its documentation, a finished run, the trigger form."""
    if not Path(browser.CHROMIUM).exists():
        pytest.skip("chromium is not installed: `make browser` installs Debian's package (as root)")
    shots = ARTIFACTS / "ui"
    b = browser.Browser()
    try:
        b.goto(stack.url + "/")
        b.wait_for("input[name=username]")  # not logged in: the login form
        b.screenshot(shots / "01-login.png")
        b.fill("input[name=username]", "admin")
        b.fill("input[name=password]", stack.password)
        b.click("button[type=submit]")
        b.wait_for_text("Welcome", "Dags")
        b.goto(stack.url + "/dags/user_migration")
        b.wait_for_text("user_migration", "Latest Run", "data-platform", "copy")
        b.screenshot(shots / "02-dag.png")
        b.click('button[aria-label="Dag Docs"]')
        b.wait_for_text("Dag Documentation", "How to roll back", "user_migration_rollback")
        b.screenshot(shots / "03-docs.png")
        b.goto(stack.url + "/dags/user_migration/runs/rest_trigger_1")
        text = b.wait_for_text(
            "rest_trigger_1", "Success", "PartitionCopyOperator", "MigrationReportOperator"
        )
        assert "ids " in text  # mapped partitions are labelled with their id range
        b.screenshot(shots / "04-finished-run.png")
        b.goto(stack.url + "/dags/user_migration")
        b.wait_for_text("Latest Run")
        b.click('button[aria-label="Trigger Dag"]')
        b.wait_for_text("Run Parameters", "Rows read, transformed and written per batch", "phone_region")
        b.screenshot(shots / "05-trigger-form.png")
    finally:
        b.close()
    for name in ("01-login", "02-dag", "03-docs", "04-finished-run", "05-trigger-form"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


PAGE = "/user-migration"
UI_RUN = "ui_copy_1"


def _page_get(stack: airflow_stack.Stack, path: str, token: str | None = None) -> tuple[int, str]:
    """GET a path of the migration page's app; (status, body), whatever the status."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(stack.url + PAGE + path, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _logged_in_browser(stack: airflow_stack.Stack) -> browser.Browser:
    if not Path(browser.CHROMIUM).exists():
        pytest.skip("chromium is not installed: `make browser` installs Debian's package (as root)")
    b = browser.Browser()
    b.window(1440, 1300)
    b.goto(stack.url + "/")
    b.wait_for("input[name=username]")
    b.fill("input[name=username]", "admin")
    b.fill("input[name=password]", stack.password)
    b.click("button[type=submit]")
    b.wait_for_text("Welcome", "Dags")
    return b


def test_the_migration_page_during_and_after_a_copy(stack, api):
    """The plugin's page: refused without a token, no personal data, and in the UI (a run's tab)
    while a pass copies (the throttle holds it: 400 changed users in batches of 20) and after it."""
    assert _page_get(stack, "/api/data")[0] == 401  # plugin apps are mounted unauthenticated by Airflow
    assert _page_get(stack, "/page")[0] == 401
    assert _page_get(stack, "/page", token="not-a-token")[0] == 403
    (plugin,) = [p for p in api("GET", "/plugins")["plugins"] if p["name"] == "user_migration_page"]
    assert {v["destination"] for v in plugin["external_views"]} == {"nav", "dag_run"}

    with psycopg.connect(stack.legacy_dsn, autocommit=True) as conn:
        emails = [
            r[0].strip().lower() for r in conn.execute("SELECT email FROM account_user") if r[0].strip()
        ]
        changed = conn.execute(
            "UPDATE account_user SET full_name = full_name || ' J' "
            "WHERE id IN (SELECT id FROM account_newuser ORDER BY id LIMIT 400)"
        ).rowcount
    assert changed == 400
    shots = ARTIFACTS / "ui"
    b = _logged_in_browser(stack)
    try:
        set_state(stack.legacy_dsn, "slow", 500, "stack test")
        api(
            "POST",
            "/dags/user_migration/dagRuns",
            {
                "dag_run_id": UI_RUN,
                "logical_date": None,
                "conf": {"batch_size": 20, "batch_seconds": 0, "throttle_check_ms": 100},
            },
        )
        deadline = time.monotonic() + 300
        while True:
            status, body = _page_get(stack, f"/api/data?run_id={UI_RUN}", api.token)
            run = json.loads(body)["run"] if status == 200 else None
            moving = [
                p
                for p in (run or {}).get("partitions", [])
                if p["state"] == "running" and p["rows_done"] >= 40
            ]
            if moving:
                break
            assert time.monotonic() < deadline, body[:2000]
            time.sleep(0.25)
        set_state(stack.legacy_dsn, "pause", 0, "stack test")  # hold it there for the picture
        b.goto(f"{stack.url}/dags/user_migration/runs/{UI_RUN}/plugin/user-migration-run")
        text = b.wait_for_frame_text("Run " + UI_RUN, "running", "rows done", "Cutover readiness")
        assert "refreshes every" in text and " of " in text and "not yet:" in text
        b.screenshot(shots / "06-migration-page-during-copy.png")
        status, html = _page_get(stack, f"/page?run_id={UI_RUN}", api.token)
        assert status == 200 and "http-equiv=refresh" in html
        set_state(stack.legacy_dsn, "run", 0, "stack test")
        assert api.wait_for_run(UI_RUN)["state"] == "success"

        b.goto(f"{stack.url}/dags/user_migration/runs/{UI_RUN}/plugin/user-migration-run")
        text = b.wait_for_frame_text(f"Run {UI_RUN} success", "Rejects by reason", "Field fixes", "Passes")
        assert "every row accounted for\tyes" in text and "duplicate_email" in text
        b.screenshot(shots / "07-migration-page-after-run.png")
    finally:
        set_state(stack.legacy_dsn, "run", 0, "stack test")
        b.close()
    status, body = _page_get(stack, f"/api/data?run_id={UI_RUN}", api.token)
    data = json.loads(body)
    history = {h["run_id"]: h for h in data["history"]}
    assert {"rest_trigger_1", "cli_trigger_1", RETRY_RUN, UI_RUN} <= set(history)
    # The first load may be rest_trigger_1 or the scheduled run the unpausing created.
    assert sum(h["inserted"] or 0 for h in data["history"]) > 0
    assert history[UI_RUN]["updated"] == 400
    assert data["readiness"]["last_validation"]["run_id"] == UI_RUN
    assert all(p["state"] == "done" and p["path"] in ("log", "delta") for p in data["run"]["partitions"])
    _, html = _page_get(stack, f"/page?run_id={UI_RUN}", api.token)
    for text in (body.lower(), html.lower()):
        assert not [e for e in emails if e in text]  # no user's email on the page or in its data
    for name in ("06-migration-page-during-copy", "07-migration-page-after-run"):
        assert (shots / f"{name}.png").stat().st_size > 10_000, name


def _legacy_writable(stack: airflow_stack.Stack) -> bool:
    with psycopg.connect(stack.legacy_dsn) as conn:
        try:
            conn.execute("UPDATE account_user SET id = id WHERE id = (SELECT min(id) FROM account_user)")
        except psycopg.errors.ReadOnlySqlTransaction:
            return False
    return True


def test_a_pass_emits_an_asset_event_with_its_counts(stack, api):
    events = api("GET", "/assets/events?source_run_id=rest_trigger_1")["asset_events"]
    assert [e["source_task_id"] for e in events] == ["report"]
    (event,) = events
    assert event["uri"].startswith("postgres://") and event["uri"].endswith(
        "/user_migration/public/account_newuser"
    )
    assert event["extra"]["kind"] == "pass" and event["extra"]["run_id"] == "rest_trigger_1"
    assert event["extra"]["migrated"] + event["extra"]["rejected"] == USERS
    aliases = api("GET", "/assets/aliases")["asset_aliases"]
    assert {"user_migration_target_users", "user_migration_cutover"} <= {a["name"] for a in aliases}


def test_a_rejected_cutover_leaves_the_legacy_tables_writable_and_the_deadline_fires(stack, api):
    run = "approval_reject_1"
    api(
        "POST",
        "/dags/user_migration/dagRuns",
        {"dag_run_id": run, "logical_date": None, "conf": {"cutover": True}},
    )
    api.wait_for_task_state(run, "approve_cutover", "awaiting_input", timeout=400)
    wait_until_parked(stack, run, "approve_cutover")
    hitl = f"/dags/user_migration/dagRuns/{run}/taskInstances/approve_cutover/-1/hitlDetails"
    detail = api("GET", hitl)
    assert detail["options"] == ["Approve", "Reject"] and detail["defaults"] == ["Reject"]
    assert f"Run {run}" in detail["subject"]
    assert "legacy rows read" in detail["body"] and "reconciliation" in detail["body"]
    assert "Rejected rows by reason" in detail["body"]
    # While the run waits for its answer it passes the pass deadline: the scheduler marks it missed
    # and queues the alert's callback; the triggerer runs notify_overdue_pass, which logs the alert,
    # and stores what it returns in callback.output. (A dict there crashed Airflow 3.3.2's triggerer
    # and left the callback 'queued' or 'running': docs/operations.md, "The deadline alert".)
    deadline = time.monotonic() + 120
    while True:
        rows = meta(
            stack,
            "SELECT d.missed, c.state, c.output FROM deadline d JOIN dag_run r ON r.id = d.dagrun_id "
            "JOIN callback c ON c.id = d.callback_id WHERE r.run_id = %s",
            (run,),
        )
        if rows and rows[0][0] and rows[0][1] in ("success", "failed"):
            break
        assert time.monotonic() < deadline, f"no finished deadline callback (missed, state, output): {rows}"
        time.sleep(2)
    _, state, output = rows[0]
    assert state == "success", output
    assert json.loads(output)["run_id"] == run
    triggerer_log = (stack.base / "home" / "logs" / "triggerer.log").read_text(errors="replace")
    assert f"DEADLINE MISSED: user migration pass {run} of DAG user_migration" in triggerer_log

    answer = api("PATCH", hitl, {"chosen_options": ["Reject"]})
    assert answer["chosen_options"] == ["Reject"]
    assert api.wait_for_run(run)["state"] == "success"
    tis = api.task_instances(run)
    assert (
        tis[("approve_cutover", -1)]["state"],
        tis[("cutover", -1)]["state"],
        tis[("report", -1)]["state"],
    ) == (
        "success",
        "skipped",
        "success",
    )
    state, summary = audit_run(stack, run)
    assert state == "success"
    assert summary["cutover"]["state"] == "not_approved"
    assert summary["cutover"]["decision"] == "rejected by admin"
    assert summary["cutover"]["legacy_tables"] == "writable"
    assert _legacy_writable(stack)
    assert not api("GET", f"/assets/events?source_run_id={run}&source_task_id=cutover")["asset_events"]


def test_an_unanswered_approval_times_out_as_reject(stack, api):
    run = "approval_timeout_1"
    api(
        "POST",
        "/dags/user_migration/dagRuns",
        {"dag_run_id": run, "logical_date": None, "conf": {"cutover": True, "approval_timeout_minutes": 1}},
    )
    api.wait_for_task_state(run, "approve_cutover", "awaiting_input", timeout=400)
    wait_until_parked(stack, run, "approve_cutover")
    # The Param set the answer's deadline a minute after the request (the scheduler's timeout sweep
    # reads task_instance.trigger_timeout). Rather than wait that minute, move the deadline to now:
    # the sweep, the default answer and the operator's handling of it are what is proven here.
    query = (
        "SELECT EXTRACT(EPOCH FROM (t.trigger_timeout - h.created_at)) FROM task_instance t "
        "JOIN hitl_detail h ON h.ti_id = t.id WHERE t.run_id = %s AND t.task_id = 'approve_cutover'"
    )
    ((seconds,),) = meta(stack, query, (run,))
    assert 55 <= seconds <= 65, seconds
    meta(
        stack,
        "UPDATE task_instance SET trigger_timeout = now() - interval '1 second' "
        "WHERE run_id = %s AND task_id = 'approve_cutover' RETURNING id",
        (run,),
    )
    assert api.wait_for_run(run, timeout=300)["state"] == "success"
    assert api.task_instances(run)[("cutover", -1)]["state"] == "skipped"
    _, summary = audit_run(stack, run)
    assert summary["cutover"]["decision"] == "no answer before the approval timed out"
    assert _legacy_writable(stack)


def test_an_approved_cutover_emits_its_asset_event(stack, api):
    """Last: after it the legacy tables are read-only and passes stop."""
    run = "approval_approve_1"
    api(
        "POST",
        "/dags/user_migration/dagRuns",
        {"dag_run_id": run, "logical_date": None, "conf": {"cutover": True}},
    )
    api.wait_for_task_state(run, "approve_cutover", "awaiting_input", timeout=400)
    wait_until_parked(stack, run, "approve_cutover")
    hitl = f"/dags/user_migration/dagRuns/{run}/taskInstances/approve_cutover/-1/hitlDetails"
    assert api("PATCH", hitl, {"chosen_options": ["Approve"]})["responded_by"]["name"] == "admin"
    assert api.wait_for_run(run)["state"] == "success"
    assert api.task_instances(run)[("cutover", -1)]["state"] == "success"
    (event,) = api("GET", f"/assets/events?source_run_id={run}&source_task_id=cutover")["asset_events"]
    assert event["uri"].endswith("/user_migration/migration_audit/cutovers")
    extra = event["extra"]
    assert extra["kind"] == "cutover" and extra["run_id"] == run
    assert extra["source_checksum"] == extra["target_checksum"] and extra["write_pause_seconds"] >= 0
    _, summary = audit_run(stack, run)
    assert summary["cutover"]["state"] == "active" and summary["cutover"]["approval"]["by"] == "admin"
    assert not _legacy_writable(stack)


def test_the_migration_page_shows_the_cutover(stack, api):
    """After the approved cutover (the test before): the page under Plugins shows it as active."""
    b = _logged_in_browser(stack)
    try:
        b.goto(f"{stack.url}/plugin/user-migration")
        text = b.wait_for_frame_text("Cutovers and rollbacks", "approval_approve_1", "match")
        assert "active since" in text
        b.screenshot(ARTIFACTS / "ui" / "08-migration-page-after-cutover.png")
    finally:
        b.close()
