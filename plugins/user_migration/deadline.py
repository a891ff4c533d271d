"""The pass deadline: a DAG-level DeadlineAlert when a run of user_migration takes too long.

The limit is ``USER_MIGRATION_PASS_DEADLINE_MINUTES`` (default 120; ``off``: no alert), counted from when the run
was queued (DAGRUN_QUEUED_AT: a backfill's logical dates lie in the past, so counting from them
would miss every deadline at once). When it passes, Airflow's triggerer awaits
``notify_overdue_pass``, which always logs a warning (logger ``user_migration.deadline``, in the
triggerer's log) and, when configured in the triggerer's environment, also:

- ``USER_MIGRATION_ALERT_WEBHOOK``: POSTs the alert as JSON to that URL (chat or incident tools);
- ``USER_MIGRATION_ALERT_EMAIL``: e-mails it (comma-separated addresses) through the SMTP
  connection ``USER_MIGRATION_SMTP_CONN_ID`` (default ``smtp_default``), by the smtp provider.

The alert names the DAG, the run, when it was queued and the limit: no personal data. A channel
that fails is logged and makes the callback fail (visible in the deadline's state); the log line is
written first, so the alert is never lost. Imported when the DAG is parsed: standard library only.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import urllib.request
from typing import Any

log = logging.getLogger("user_migration.deadline")

DEADLINE_ENV = "USER_MIGRATION_PASS_DEADLINE_MINUTES"
WEBHOOK_ENV = "USER_MIGRATION_ALERT_WEBHOOK"
EMAIL_ENV = "USER_MIGRATION_ALERT_EMAIL"
SMTP_CONN_ENV = "USER_MIGRATION_SMTP_CONN_ID"
DEFAULT_MINUTES = 120.0


def pass_deadline() -> dt.timedelta | None:
    """How long a pass may run before the alert, from USER_MIGRATION_PASS_DEADLINE_MINUTES; None
    (no alert) when it is ``off``."""
    raw = os.environ.get(DEADLINE_ENV, "").strip()
    if not raw:
        return dt.timedelta(minutes=DEFAULT_MINUTES)
    if raw.lower() in ("off", "none"):
        return None
    try:
        minutes = float(raw)
    except ValueError:
        minutes = -1.0
    if not 0 < minutes <= 7 * 24 * 60:
        raise ValueError(
            f"environment variable {DEADLINE_ENV} must be a number of minutes above 0 and at most 10080 "
            f"(a week) or off, got {raw!r}; fix or unset it (default {DEFAULT_MINUTES:g})"
        )
    return dt.timedelta(minutes=minutes)


def deadline_alert():
    """The DAG's ``deadline`` argument: one DeadlineAlert, or None when switched off.

    ``airflow dags test`` (dag.test()) of Airflow 3.3.2 cannot finish a run of a DAG with a deadline
    (DagRun.update_state looks the serialized alerts up as if they were ids), so tools/airflow_env's
    dags_test switches it off; the scheduler handles it as documented.
    """
    interval = pass_deadline()
    if interval is None:
        return None
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    return DeadlineAlert(
        reference=DeadlineReference.DAGRUN_QUEUED_AT,
        interval=interval,
        callback=AsyncCallback(notify_overdue_pass, kwargs={"limit_minutes": interval.total_seconds() / 60}),
        name="pass_overdue",
    )


def alert_text(context: dict[str, Any] | None, limit_minutes: float) -> tuple[str, dict[str, Any]]:
    """One sentence and a JSON body for the alert, from the deadline's simple context."""
    run = (context or {}).get("dag_run") or {}
    deadline = (context or {}).get("deadline") or {}
    facts = {
        "dag_id": run.get("dag_id", "user_migration"),
        "run_id": run.get("dag_run_id") or run.get("run_id"),
        "state": run.get("state"),
        "queued_at": run.get("queued_at"),
        "deadline": str(deadline.get("deadline_time")) if deadline.get("deadline_time") else None,
        "limit_minutes": limit_minutes,
    }
    text = (
        f"user migration pass {facts['run_id']} of DAG {facts['dag_id']} is still {facts['state'] or 'running'} "
        f"{limit_minutes:g} minutes after it was queued ({facts['queued_at']}). Look at its running task in "
        f"the Airflow UI; a cutover waiting for approval, a lock wait or a much larger delta are the usual "
        f"causes. The limit is {DEADLINE_ENV}."
    )
    return text, facts


def _post_webhook(url: str, body: dict[str, Any]) -> None:
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _send_email(to: list[str], subject: str, text: str, conn_id: str) -> None:
    from airflow.providers.smtp.hooks.smtp import SmtpHook

    with SmtpHook(smtp_conn_id=conn_id) as smtp:
        smtp.send_email_smtp(to=to, subject=subject, html_content=f"<p>{text}</p>")


async def notify_overdue_pass(
    context: dict[str, Any] | None = None, limit_minutes: float = DEFAULT_MINUTES
) -> str:
    """The DeadlineAlert's callback (an AsyncCallback, run by the triggerer).

    Returns the alert's facts as a JSON string, not a dict: Airflow 3.3.2's triggerer stores the
    return value as is in the Text column ``callback.output`` (TriggererCallback.handle_event), and a
    dict there makes the commit fail and the whole triggerer process exit, leaving the callback
    'running' (or 'queued') for good. See docs/operations.md, "The deadline alert".
    """
    text, facts = alert_text(context, limit_minutes)
    log.warning("DEADLINE MISSED: %s", text)
    failures = []
    if url := os.environ.get(WEBHOOK_ENV, "").strip():
        try:
            await asyncio.to_thread(_post_webhook, url, {"text": text, **facts})
        except Exception as exc:
            failures.append(f"webhook {WEBHOOK_ENV} failed: {type(exc).__name__}: {exc}")
    if to := [a.strip() for a in os.environ.get(EMAIL_ENV, "").split(",") if a.strip()]:
        conn_id = os.environ.get(SMTP_CONN_ENV, "").strip() or "smtp_default"
        subject = f"[user_migration] pass {facts['run_id']} exceeded {limit_minutes:g} min"
        try:
            await asyncio.to_thread(_send_email, to, subject, text, conn_id)
        except Exception as exc:
            failures.append(
                f"e-mail through SMTP connection '{conn_id}' failed: {type(exc).__name__}: {exc}; check that "
                f"connection or unset {EMAIL_ENV}"
            )
    for failure in failures:
        log.error("deadline alert channel: %s", failure)
    if failures:
        raise RuntimeError("; ".join(failures))
    return json.dumps(facts)
