"""The migration page (plugins/migration_page.py) on a real PostgreSQL: what its data endpoint and its
HTML show after passes and while a partition runs, that they hold no personal data, and that a
request without a token, with a bad one or without read access to the DAG is refused before the
database is touched. The page in a browser on the real Airflow stack: tests/test_stack_e2e.py.
"""

from __future__ import annotations

import re
import threading
import time
from collections import Counter
from collections.abc import Iterator

import psycopg
import pytest
from airflow.api_fastapi.core_api import security
from airflow.models.dag import DagModel
from fastapi.testclient import TestClient
from jwt import InvalidTokenError
from support import fixture_users as fx
from support.fault_tools import prepare_run
from support.pipeline import run_stages
from throttle import set_state

from user_migration import audit, partition_copy
from user_migration.config import Settings
from user_migration.partition_copy import copy_partition
from user_migration.ui_app import app, audit_connection, read_access
from user_migration.ui_data import page_data


@pytest.fixture
def client(legacy) -> Iterator[TestClient]:
    """The app with DAG access granted and the test database as the target."""

    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(legacy, autocommit=True) as conn:
            yield conn

    app.dependency_overrides = {read_access: lambda: None, audit_connection: connection}
    try:
        yield TestClient(app)
    finally:
        app.dependency_overrides = {}


def personal_values() -> set[str]:
    """Every email, username, phone, name and password hash of the fixture, as written and lower-case."""
    values: set[str] = set()
    for row in fx.ROWS:
        _, password, _, _, email, username, full_name, _, phone, _, _ = row
        for value in (password, email, full_name, phone, *(m for m in fx.MIGRATED.get(row[0], ()))):
            if isinstance(value, str) and len(value.strip()) >= 5:
                values |= {value.strip(), value.strip().lower()}
        if username and len(username) >= 4:
            values.add(username)
    return values


def leaked(text: str) -> list[str]:
    return sorted(v for v in personal_values() if v in text)


def two_passes(legacy: str, backup_dir) -> None:
    settings = Settings(partitions=2, batch_size=4)
    run_stages(legacy, legacy, settings, "pass-1", backup_dir)
    with psycopg.connect(legacy) as conn:
        conn.execute("UPDATE account_user SET full_name = 'Niaj N' WHERE id = 13")
        conn.execute("DELETE FROM account_user_user_permissions WHERE user_id = 40")
        conn.execute("DELETE FROM account_user WHERE id = 40")
    run_stages(legacy, legacy, settings, "pass-2", backup_dir)
    with psycopg.connect(legacy, autocommit=True) as conn:
        for run_id in ("pass-1", "pass-2"):
            audit.finish_run(conn, run_id, "success", {})
        audit.store_validation(
            conn,
            "pass-2",
            [
                {"name": "every_source_row_accounted", "success": True, "observed": None, "details": None},
                {"name": "emails_unique", "success": True, "observed": None, "details": None},
            ],
        )


def test_after_two_passes_the_page_shows_progress_rejects_history_and_readiness(legacy, backup_dir, client):
    two_passes(legacy, backup_dir)

    response = client.get("/api/data", params={"run_id": "pass-1"})
    assert response.status_code == 200
    data = response.json()
    run = data["run"]
    assert (run["run_id"], run["state"], run["copying"]) == ("pass-1", "success", False)
    parts = run["partitions"]
    assert [p["state"] for p in parts] == ["done", "done"] and all(p["share"] == 1.0 for p in parts)
    assert sum(p["rows_done"] for p in parts) == len(fx.ROWS)  # a first load reads every row
    assert all(p["path"] == "load" and p["batches"] >= 1 and p["rows_per_second"] > 0 for p in parts)
    rec = run["reconciliation"]
    assert rec["rejected_by_reason"] == dict(Counter(reason for reason, _ in fx.REJECTED.values()))
    assert rec["fixed_by_field"] == dict(Counter(f"{f[1]}:{f[4]}" for f in fx.FIXES))
    assert rec["migrated"] + rec["rejected"] == rec["rows_read"] == len(fx.ROWS)

    history = data["history"]
    assert [h["run_id"] for h in history] == ["pass-1", "pass-2"]  # oldest first
    assert (history[0]["inserted"], history[0]["rejected"]) == (len(fx.MIGRATED), len(fx.REJECTED))
    assert (history[1]["inserted"], history[1]["removed"]) == (1, 2)  # 13 now valid; 14 and 40 leave

    readiness = data["readiness"]
    assert readiness["last_validation"]["run_id"] == "pass-2"
    assert (readiness["last_validation"]["passed"], readiness["last_validation"]["checks"]) == (2, 2)
    assert readiness["last_pass"]["run_id"] == "pass-2"
    assert readiness["lease"] is None and readiness["cutovers"] == []

    # Without a run id: the newest run. The HTML shows the same, with charts and no script.
    assert client.get("/api/data").json()["run"]["run_id"] == "pass-2"
    page = client.get("/page", params={"run_id": "pass-1"})
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    html = page.text
    for heading in (
        "Partitions",
        "Rejects by reason",
        "Field fixes",
        "Reconciliation",
        "Passes",
        "Cutover readiness",
    ):
        assert f"<h2>{heading}</h2>" in html, heading
    assert html.count("<svg class=chart") == 3  # rejects, fixes, passes
    assert "duplicate_email" in html and "email:email_normalized" in html
    assert "<script" not in html and "http-equiv=refresh" not in html  # finished: no refresh
    # A run of another DAG (the UI offers the tab on every DAG's runs) shows user_migration's newest.
    other = client.get("/page", params={"dag_id": "user_migration_rollback", "run_id": "pass-1"}).text
    assert "makes no migration passes" in other and "Run <b>pass-2</b>" in other

    for text in (response.text, client.get("/api/data").text, html):
        assert leaked(text) == []
    assert "Alice@Example.COM" in personal_values()  # the check looks for real values


def test_a_paused_partition_shows_its_rows_done_rate_and_time_left(legacy, backup_dir, client):
    settings = Settings(partitions=2, batch_size=3, batch_seconds=0, throttle_check_ms=0)
    partitions = prepare_run(legacy, legacy, settings, "live", backup_dir)

    def after_batch(batch_no: int) -> None:
        if batch_no == 1:
            set_state(legacy, "pause", 0, "test")

    outcome: list[object] = []

    def copy() -> None:
        with (
            psycopg.connect(legacy, autocommit=True) as source,
            psycopg.connect(legacy, autocommit=True) as target,
        ):
            try:
                outcome.append(copy_partition(source, target, settings, "live", partitions[0]))
            except Exception as exc:
                outcome.append(exc)

    original = partition_copy.kill_after_batch
    partition_copy.kill_after_batch = after_batch
    worker = threading.Thread(target=copy)
    try:
        worker.start()
        deadline = time.monotonic() + 20
        while True:
            with psycopg.connect(legacy, autocommit=True) as conn:
                run = page_data(conn, "live")["run"]
            if run["partitions"][0]["rows_done"] == 6:
                break
            assert time.monotonic() < deadline, run["partitions"]
            time.sleep(0.1)
        first, second = run["partitions"]
        assert run["copying"] and first["state"] == "running" and second["state"] == "waiting"
        # Two batches of three committed nothing yet, but the page sees them: 6 of about half the rows.
        assert (first["rows_done"], first["batches"], first["planned_estimated"]) == (6, 2, True)
        assert first["rows_planned"] == -(-len(fx.ROWS) // 2)
        assert first["rows_per_second"] > 0 and first["seconds_left"] > 0
        html = client.get("/page", params={"run_id": "live"}).text
        assert "http-equiv=refresh" in html and "6 of ≈" in html and leaked(html) == []
        assert "not yet: 0 of 2 partitions done" in html
    finally:
        set_state(legacy, "run", 0, "test")
        worker.join(30)
        partition_copy.kill_after_batch = original
    assert not worker.is_alive() and not isinstance(outcome[0], Exception), outcome
    with psycopg.connect(legacy, autocommit=True) as conn:
        first = page_data(conn, "live")["run"]["partitions"][0]
    assert first["state"] == "done" and first["share"] == 1.0 and first["rows_done"] == first["rows_in"]


def test_before_any_pass_the_page_says_so(make_db, client):
    empty = make_db("empty")

    def connection() -> Iterator[psycopg.Connection]:
        with psycopg.connect(empty, autocommit=True) as conn:
            yield conn

    app.dependency_overrides[audit_connection] = connection
    html = client.get("/page").text
    assert "No pass has run yet" in html
    assert client.get("/api/data").json()["audit"] is False


class FakeAuthManager:
    def __init__(self, allowed: bool) -> None:
        self.allowed = allowed
        self.asked: list[tuple] = []

    async def get_user_from_token(self, token: str):
        if token != "good":
            raise InvalidTokenError("bad signature")
        return object()

    def is_authorized_dag(self, *, method, access_entity, details, user) -> bool:
        self.asked.append((method, details.id))
        return self.allowed


@pytest.mark.parametrize(
    ("headers", "allowed", "status"),
    [
        ({}, True, 401),  # no token at all
        ({"Authorization": "Bearer forged"}, True, 403),  # a token the auth manager refuses
        ({"Authorization": "Bearer good"}, False, 403),  # a user without read access to the DAG
        ({"Authorization": "Bearer good"}, True, 200),
    ],
)
def test_requests_need_a_token_and_read_access_to_the_dag(monkeypatch, legacy, headers, allowed, status):
    manager = FakeAuthManager(allowed)
    monkeypatch.setattr(security, "get_auth_manager", lambda: manager)
    monkeypatch.setattr(DagModel, "get_team_name", staticmethod(lambda dag_id: None))
    connected: list[str] = []

    def connection() -> Iterator[psycopg.Connection]:
        connected.append("yes")
        with psycopg.connect(legacy, autocommit=True) as conn:
            yield conn

    app.dependency_overrides = {audit_connection: connection}
    try:
        client = TestClient(app)
        for path in ("/page", "/api/data"):
            response = client.get(path, headers=headers)
            assert response.status_code == status, (path, response.text)
    finally:
        app.dependency_overrides = {}
    assert connected == (["yes", "yes"] if status == 200 else [])  # refused before any database work
    if "good" in headers.get("Authorization", ""):
        assert manager.asked == [("GET", "user_migration")] * 2
    # The cookie the UI sets works as the bearer token does (the page's iframe sends it).
    if status == 200:
        app.dependency_overrides = {audit_connection: connection}
        try:
            cookie_client = TestClient(app, cookies={"_token": "good"})
            assert cookie_client.get("/page").status_code == 200
        finally:
            app.dependency_overrides = {}


def test_the_plugin_registers_the_app_a_run_tab_and_a_nav_entry():
    import migration_page

    plugin = migration_page.MigrationPagePlugin
    (entry,) = plugin.fastapi_apps
    assert entry["url_prefix"] == "/user-migration" and repr(entry["app"]) == "user_migration.ui_app.app"
    views = {v["destination"]: v for v in plugin.external_views}
    assert set(views) == {"nav", "dag_run"}
    assert views["dag_run"]["href"] == "/user-migration/page?dag_id={DAG_ID}&run_id={RUN_ID}"
    assert len({v["url_route"] for v in plugin.external_views}) == 2  # Airflow drops a repeated route
    assert re.fullmatch(r"[a-z-]+", views["nav"]["url_route"])
