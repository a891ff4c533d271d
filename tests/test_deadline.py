"""The pass deadline's notifier: always a log line, a webhook or e-mail when configured."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from user_migration import deadline

CONTEXT = {
    "dag_run": {
        "dag_id": "user_migration",
        "dag_run_id": "scheduled__x",
        "state": "running",
        "queued_at": "t0",
    },
    "deadline": {"id": "d1", "deadline_time": "t1"},
}


def test_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(deadline.DEADLINE_ENV, raising=False)
    assert deadline.pass_deadline() == dt.timedelta(hours=2)
    monkeypatch.setenv(deadline.DEADLINE_ENV, "0.5")
    assert deadline.pass_deadline() == dt.timedelta(seconds=30)
    monkeypatch.setenv(deadline.DEADLINE_ENV, "off")
    assert deadline.pass_deadline() is None and deadline.deadline_alert() is None
    monkeypatch.setenv(deadline.DEADLINE_ENV, "two hours")
    with pytest.raises(ValueError, match="USER_MIGRATION_PASS_DEADLINE_MINUTES must be a number of minutes"):
        deadline.pass_deadline()


def test_without_channels_it_logs(monkeypatch, caplog):
    for name in (deadline.WEBHOOK_ENV, deadline.EMAIL_ENV):
        monkeypatch.delenv(name, raising=False)
    with caplog.at_level(logging.WARNING, logger="user_migration.deadline"):
        output = asyncio.run(deadline.notify_overdue_pass(context=CONTEXT, limit_minutes=120))
    # A str: the triggerer writes it to the Text column callback.output (a dict crashes it).
    assert isinstance(output, str) and json.loads(output)["run_id"] == "scheduled__x"
    assert "DEADLINE MISSED: user migration pass scheduled__x" in caplog.text


def test_webhook_gets_the_alert_as_json(monkeypatch):
    received = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv(deadline.WEBHOOK_ENV, f"http://127.0.0.1:{server.server_port}/hook")
        monkeypatch.delenv(deadline.EMAIL_ENV, raising=False)
        asyncio.run(deadline.notify_overdue_pass(context=CONTEXT, limit_minutes=5))
    finally:
        server.shutdown()
    (body,) = received
    assert body["run_id"] == "scheduled__x" and body["limit_minutes"] == 5
    assert "still running 5 minutes after it was queued" in body["text"]


def test_a_failing_channel_is_logged_and_fails_the_callback(monkeypatch, caplog):
    monkeypatch.setenv(deadline.WEBHOOK_ENV, "http://127.0.0.1:1/nothing-listens")
    monkeypatch.delenv(deadline.EMAIL_ENV, raising=False)
    with (
        caplog.at_level(logging.WARNING, logger="user_migration.deadline"),
        pytest.raises(RuntimeError) as info,
    ):
        asyncio.run(deadline.notify_overdue_pass(context=CONTEXT, limit_minutes=5))
    assert "webhook USER_MIGRATION_ALERT_WEBHOOK failed" in str(info.value)
    assert "DEADLINE MISSED" in caplog.text  # the log line is written before any channel is tried
