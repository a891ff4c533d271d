"""What the migration page in the Airflow UI shows, read from migration_audit: figures only.

One function, ``page_data``, returns plain JSON-ready data for one run (the newest when none is
named): each partition's progress (rows done of planned, rows/s, time left), rejects by reason and
field fixes, the reconciliation, the history of passes, and cutover readiness (last validation, the
last pass's delta, the lease holder, cutovers and rollbacks, the throttle). It never reads
rejected_rows.source_row or field_fixes' values: no username, email, phone or hash reaches the page.
No Airflow import: the page's tests call it on a plain connection.
"""

from __future__ import annotations

import datetime as dt
import decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row

from user_migration import audit
from user_migration.db import read_sql

DAG_ID = "user_migration"
HISTORY = 30
# A running partition whose progress is older than this is shown as not moving (paused, or stuck).
STALE_SECONDS = 30


def page_data(conn: psycopg.Connection, run_id: str | None = None, dag_id: str = DAG_ID) -> dict[str, Any]:
    """The page's data for ``run_id`` (or the newest run of ``dag_id``); read-only."""
    if conn.execute("SELECT to_regclass('migration_audit.runs')").fetchone()[0] is None:
        return {"audit": False, "run": None, "history": [], "readiness": None, "now": _now(conn)}
    cur = conn.cursor(row_factory=dict_row)
    history = cur.execute(read_sql("ui/run_history.sql"), {"dag_id": dag_id, "limit": HISTORY}).fetchall()
    run = None
    if run_id is None and history:
        run_id = history[0]["run_id"]
    if run_id is not None:
        run = _run(conn, run_id)
    return _jsonable(
        {
            "audit": True,
            "now": _now(conn),
            "run": run,
            "history": history[::-1],  # oldest first, as the chart reads
            "readiness": _readiness(conn, history),
        }
    )


def _now(conn: psycopg.Connection) -> str:
    return conn.execute("SELECT clock_timestamp()").fetchone()[0].isoformat()


def _run(conn: psycopg.Connection, run_id: str) -> dict[str, Any] | None:
    cur = conn.cursor(row_factory=dict_row)
    row = cur.execute(
        "SELECT run_id, dag_id, state, dry_run, started_at, finished_at FROM migration_audit.runs "
        "WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    if row is None:
        return {"run_id": run_id, "found": False}
    partitions = [
        _progress(p, row["state"]) for p in cur.execute(read_sql("ui/partitions.sql"), {"run_id": run_id})
    ]
    try:
        reconciliation = audit.reconcile(conn, run_id)
    except LookupError:  # not planned yet (or a dry run stopped before its plan)
        reconciliation = None
    checks = cur.execute(
        "SELECT expectation, success FROM migration_audit.validation_results WHERE run_id = %s "
        "ORDER BY success, expectation",
        (run_id,),
    ).fetchall()
    return {
        **row,
        "found": True,
        "partitions": partitions,
        "copying": any(p["state"] == "running" for p in partitions),
        "reconciliation": reconciliation,
        "checks": checks,
    }


def _progress(p: dict[str, Any], run_state: str) -> dict[str, Any]:
    """rows/s and time left of a running partition; the rate of a finished one."""
    state = p["state"]
    done, planned, seconds = p["rows_done"] or 0, p["rows_planned"], p["seconds_running"] or 0.0
    if state == "done":  # what it read is what there was
        p = {**p, "rows_planned": done, "planned_estimated": False}
    rate = done / seconds if seconds > 0 and done else None
    left = max(planned - done, 0) / rate if state == "running" and rate and planned is not None else None
    since = p["seconds_since_update"]
    return {
        **p,
        "rows_done": done,
        "rows_per_second": rate,
        "seconds_left": left,
        "share": 1.0 if state == "done" else (min(done / planned, 1.0) if planned else 0.0),
        # Running, but no batch for a while: paused by the throttle, or its task died.
        "stalled": state == "running" and since is not None and since > STALE_SECONDS,
        "run_state": run_state,
    }


def _readiness(conn: psycopg.Connection, history: list[dict[str, Any]]) -> dict[str, Any]:
    cur = conn.cursor(row_factory=dict_row)
    last_pass = next(
        (h for h in history if h["state"] == "success" and not h["dry_run"] and h["partitions"]), None
    )
    lease = cur.execute(
        "SELECT run_id, dag_id, hostname, acquired_at, renewed_at FROM migration_audit.writer_lease "
        "WHERE run_id IS NOT NULL"
    ).fetchone()
    throttle = cur.execute("SELECT state, sleep_ms, set_at FROM migration_audit.throttle").fetchone()
    return {
        "last_validation": cur.execute(read_sql("ui/last_validation.sql")).fetchone(),
        "last_pass": last_pass,
        "lease": lease,
        "cutovers": cur.execute(read_sql("ui/cutovers.sql")).fetchall(),
        "throttle": throttle or {"state": "run", "sleep_ms": 0, "set_at": None},
    }


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (dt.datetime, dt.date)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value
