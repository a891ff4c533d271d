"""The audit trail in migration_audit: runs, task attempts, validation results, run summaries.

Summaries hold counts, reasons, paths and timings only: never a password hash, email, phone or row.
"""

from __future__ import annotations

import datetime as dt
from collections import Counter
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from user_migration.db import read_sql

ACCOUNTED_CHECK = "every_source_row_accounted"
DRIFT_KINDS = {
    "missing": "migrated per the sync state but missing from account_newuser",
    "rejected": "rejected per the sync state but present in account_newuser",
    "unknown": "in account_newuser without sync state",
}


def start_run(
    conn: psycopg.Connection,
    run_id: str,
    dag_id: str,
    logical_date: dt.datetime | None,
    dry_run: bool,
    settings: dict[str, Any],
) -> None:
    with conn.transaction():
        conn.execute(
            """
            INSERT INTO migration_audit.runs (run_id, dag_id, logical_date, dry_run, params, state)
            VALUES (%s, %s, %s, %s, %s, 'running')
            ON CONFLICT (run_id) DO UPDATE SET state = 'running', params = EXCLUDED.params, finished_at = NULL
            """,
            (run_id, dag_id, logical_date, dry_run, Jsonb(settings)),
        )


def set_backup(conn: psycopg.Connection, run_id: str, path: str | None, note: str | None = None) -> None:
    """Record the run's backup folder, or (path None) why it wrote none."""
    with conn.transaction():
        conn.execute(
            "UPDATE migration_audit.runs SET backup_path = %s, backup_note = %s WHERE run_id = %s",
            (path, note, run_id),
        )


def record_attempt(
    conn: psycopg.Connection,
    run_id: str,
    task_id: str,
    map_index: int,
    try_number: int | None,
    state: str,
    message: str | None = None,
) -> None:
    with conn.transaction():
        conn.execute(
            "INSERT INTO migration_audit.task_attempts (run_id, task_id, map_index, try_number, state, message) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (run_id, task_id, map_index, try_number, state, message),
        )


def store_validation(conn: psycopg.Connection, run_id: str, outcomes: list[dict[str, Any]]) -> None:
    """Replace this run's validation results with ``outcomes`` (name, success, observed, details)."""
    with conn.transaction():
        conn.execute("DELETE FROM migration_audit.validation_results WHERE run_id = %s", (run_id,))
        for item in outcomes:
            conn.execute(
                "INSERT INTO migration_audit.validation_results (run_id, expectation, success, observed, details) "
                "VALUES (%s, %s, %s, %s, %s)",
                (
                    run_id,
                    item["name"],
                    item["success"],
                    Jsonb(item.get("observed")),
                    Jsonb(item.get("details")),
                ),
            )


def reconcile(conn: psycopg.Connection, run_id: str) -> dict[str, Any]:
    """Counts of the run from the audit tables: every source row moved or rejected, exactly once."""
    plan = conn.execute(
        "SELECT source_rows, jsonb_array_length(partitions), changes, changes_reason FROM migration_audit.plans "
        "WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    if plan is None:
        raise LookupError(f"run {run_id} has no plan in migration_audit.plans")
    totals = conn.execute(
        """
        SELECT count(*), count(*) FILTER (WHERE state = 'done'),
               coalesce(sum(rows_in), 0)::bigint, coalesce(sum(inserted), 0)::bigint, coalesce(sum(updated), 0)::bigint,
               coalesce(sum(unchanged), 0)::bigint, coalesce(sum(removed), 0)::bigint, coalesce(sum(fixed), 0)::bigint,
               coalesce(sum(links_in), 0)::bigint, coalesce(sum(attempts), 0)::bigint,
               coalesce(sum(drift_repaired), 0)::bigint
        FROM migration_audit.partitions WHERE run_id = %s
        """,
        (run_id,),
    ).fetchone()
    rejected = _rejected_by_reason(conn, run_id)
    fixes = _fixes_by_field(conn, run_id)
    rows_in = totals[2]
    rejected_total = sum(rejected.values())
    return {
        # Rows the pass read and accounted for; while the application writes, this can differ from
        # the count the plan saw a moment earlier (planned_rows).
        "source_rows": rows_in,
        "planned_rows": plan[0],
        # How the pass found the changed rows: "log" (the change log) or "full" (every row hashed), and why.
        "changes": plan[2],
        "changes_reason": plan[3],
        "partitions": plan[1],
        "partitions_done": totals[1],
        "partition_attempts": totals[9],
        "rows_read": rows_in,
        "migrated": rows_in - rejected_total,
        "inserted": totals[3],
        "updated": totals[4],
        "unchanged": totals[5],
        "removed": totals[6],
        "rejected": rejected_total,
        "rejected_by_reason": rejected,
        "fixed_fields": totals[7],
        "fixed_by_field": fixes,
        "links_read": totals[8],
        "drift_repaired": totals[10],
    }


def _rejected_by_reason(conn: psycopg.Connection, run_id: str) -> dict[str, int]:
    """The run's rejected rows counted by reason."""
    return dict(
        conn.execute(
            "SELECT reason, count(*) FROM migration_audit.run_rejects WHERE run_id = %s GROUP BY reason "
            "ORDER BY reason",
            (run_id,),
        ).fetchall()
    )


def _fixes_by_field(conn: psycopg.Connection, run_id: str) -> dict[str, int]:
    """The run's field fixes counted by "field:reason"."""
    return {
        f"{field}:{reason}": n
        for field, reason, n in conn.execute(
            "SELECT field, reason, count(*) FROM migration_audit.field_fixes WHERE run_id = %s "
            "GROUP BY field, reason ORDER BY field, reason",
            (run_id,),
        ).fetchall()
    }


def every_source_row_accounted(
    conn: psycopg.Connection, run_id: str, *, dry_run: bool = False
) -> dict[str, Any]:
    """The check that every legacy row a partition read is in the target or rejected, exactly once.

    Counted independently of the partitions' own tallies: per partition, rows_in (counted in the
    partition's snapshot) against the target's users in its id range plus the run's rejects there;
    users outside every range count as strays. Returns a validation outcome (name, success,
    observed, details.message) naming each partition that is off and by how much; ids and counts only.
    """
    if dry_run:
        return _accounted_outcome(
            True, {"dry_run": True}, "dry run: nothing was written to the target, so nothing to count"
        )
    rows = conn.execute(read_sql("audit/partition_accounting.sql"), {"run_id": run_id}).fetchall()
    if not rows:
        raise LookupError(f"run {run_id} has no plan in migration_audit.plans")
    problems, off = _partitions_off(rows)
    target_total = rows[0][6]
    outside = target_total - sum(row[4] for row in rows)
    if outside:
        problems.append(f"{outside} users in the target outside every partition's id range")
    observed = {
        "partitions": len(rows),
        "rows_in": sum(row[3] or 0 for row in rows),
        "in_target": target_total,
        "rejected": sum(row[5] for row in rows),
        "outside_ranges": outside,
        "partitions_off": off,
    }
    return _accounted_outcome(not problems, observed, _accounted_message(problems, observed))


def _partitions_off(rows: list[tuple]) -> tuple[list[str], list[dict[str, Any]]]:
    """The partitions (rows of partition_accounting.sql) not finished or off: a sentence and an entry each."""
    problems: list[str] = []
    off: list[dict[str, Any]] = []
    for no, lo, hi, rows_in, in_target, rejected, _ in rows:
        if rows_in is None:
            problems.append(f"partition {no} (ids {lo}..{hi}) has not finished, so its rows are not counted")
            off.append({"partition_no": no, "lo": lo, "hi": hi, "rows_in": None})
            continue
        difference = in_target + rejected - rows_in
        if difference:
            problems.append(
                f"partition {no} (ids {lo}..{hi}): {rows_in} legacy rows read, {in_target} in the target + "
                f"{rejected} rejected (off by {difference:+d})"
            )
            off.append(
                {
                    "partition_no": no,
                    "lo": lo,
                    "hi": hi,
                    "rows_in": rows_in,
                    "in_target": in_target,
                    "rejected": rejected,
                    "difference": difference,
                }
            )
    return problems, off


def _accounted_message(problems: list[str], observed: dict[str, Any]) -> str:
    """The check's message: what is off and what to do, or the sum that holds."""
    if problems:
        return (
            f"{ACCOUNTED_CHECK} failed: " + "; ".join(problems) + ". The target no longer matches what the "
            "partitions read: run another pass (it reads those ranges again and repairs them); if it stays "
            "off, something other than the migration writes account_newuser"
        )
    accounted = observed["in_target"] + observed["rejected"]
    return (
        f"{observed['rows_in']} legacy rows read by {observed['partitions']} partitions = {accounted} in the "
        "target or rejected, per partition"
    )


def _accounted_outcome(success: bool, observed: dict[str, Any], message: str) -> dict[str, Any]:
    return {
        "name": ACCOUNTED_CHECK,
        "success": success,
        "observed": observed,
        "details": {"message": message},
    }


def finish_run(conn: psycopg.Connection, run_id: str, state: str, summary: dict[str, Any]) -> None:
    with conn.transaction():
        conn.execute(
            "UPDATE migration_audit.runs SET state = %s, finished_at = now(), summary = %s, "
            "source_rows = %s WHERE run_id = %s",
            (state, Jsonb(summary), summary.get("source_rows"), run_id),
        )


def sync_drift(conn: psycopg.Connection) -> dict[str, int]:
    """How many ids the sync state and account_newuser disagree on, by kind (see DRIFT_KINDS)."""
    counts = Counter(
        kind for _, kind in conn.execute(read_sql("copy/find_drift.sql"), {"lo": -(2**63), "hi": 2**63 - 1})
    )
    return {kind: counts[kind] for kind in DRIFT_KINDS}


def drift_message(drift: dict[str, int]) -> str:
    """One sentence naming the drift left (ids only by count) and how it goes away."""
    if not any(drift.values()):
        return "the sync state and account_newuser agree on every id"
    parts = ", ".join(f"{n} {DRIFT_KINDS[kind]}" for kind, n in drift.items() if n)
    return (
        f"sync drift: {parts}; the next pass re-processes these ids (a displaced holder whose own partition "
        "ran first is one cause), so run another pass before the cutover"
    )


def run_params(conn: psycopg.Connection, run_id: str) -> dict[str, Any]:
    """The settings ``run_id`` ran with (Settings.public()), as its backup task recorded them."""
    row = conn.execute("SELECT params FROM migration_audit.runs WHERE run_id = %s", (run_id,)).fetchone()
    if row is None:
        raise LookupError(
            f"run '{run_id}' is not in migration_audit.runs, so the settings it ran with are unknown; "
            "roll back from the target database that run wrote to"
        )
    return row[0]


def run_started_at(conn: psycopg.Connection, run_id: str) -> dt.datetime | None:
    row = conn.execute("SELECT started_at FROM migration_audit.runs WHERE run_id = %s", (run_id,)).fetchone()
    return row[0] if row else None


def validation_results(conn: psycopg.Connection, run_id: str) -> list[dict[str, Any]]:
    return [
        {"name": name, "success": success, "observed": observed}
        for name, success, observed in conn.execute(
            "SELECT expectation, success, observed FROM migration_audit.validation_results WHERE run_id = %s "
            "ORDER BY validated_at, expectation",
            (run_id,),
        ).fetchall()
    ]
