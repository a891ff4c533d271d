"""What an approver sees before a cutover: this pass's figures from migration_audit, as Markdown.

Counts, reasons, check results, timings and run ids only: never a row, an email, a phone number or a
password hash (the approval's body is stored in Airflow's metadata database and shown in the UI).
"""

from __future__ import annotations

import contextlib
from typing import Any

import psycopg
from psycopg import sql

from user_migration import audit

APPROVE, REJECT = "Approve", "Reject"


def cutover_figures(
    target: psycopg.Connection, run_id: str, legacy: psycopg.Connection | None = None, mapping=None
) -> dict[str, Any]:
    """This pass's figures for the approval: rows, rejects by reason, reconciliation, changes,
    the newest rehearsal's measured pause, and (given the legacy side) the changes waiting for the
    cutover's final sync."""
    numbers = audit.reconcile(target, run_id)
    checks = audit.validation_results(target, run_id)
    accounted = next((c for c in checks if c["name"] == audit.ACCOUNTED_CHECK), None)
    rehearsal = target.execute(
        """
        SELECT run_id, finished_at, summary -> 'cutover'
        FROM migration_audit.runs
        WHERE summary -> 'cutover' ->> 'state' = 'rehearsed'
        ORDER BY finished_at DESC NULLS LAST LIMIT 1
        """
    ).fetchone()
    figures: dict[str, Any] = {
        "run_id": run_id,
        "source_rows": numbers["source_rows"],
        "migrated": numbers["migrated"],
        "rejected": numbers["rejected"],
        "rejected_by_reason": numbers["rejected_by_reason"],
        "fixed_fields": numbers["fixed_fields"],
        "partitions": f"{numbers['partitions_done']}/{numbers['partitions']}",
        "changes": {k: numbers[k] for k in ("inserted", "updated", "unchanged", "removed", "drift_repaired")},
        "checks": {"passed": sum(1 for c in checks if c["success"]), "total": len(checks)},
        "reconciliation": None if accounted is None else accounted["observed"],
        "rehearsal": None
        if rehearsal is None
        else {
            "run_id": rehearsal[0],
            "finished_at": rehearsal[1].isoformat() if rehearsal[1] else None,
            "write_pause_seconds": (rehearsal[2] or {}).get("write_pause_seconds"),
        },
        "waiting_changes": None,
    }
    if legacy is not None and mapping is not None:
        from user_migration import capture

        # No change log yet (autocommit: nothing to roll back): the figure stays unknown.
        with contextlib.suppress(psycopg.Error):
            figures["waiting_changes"] = legacy.execute(
                sql.SQL("SELECT count(DISTINCT source_id) FROM {} WHERE source_id IS NOT NULL").format(
                    capture.log_table(mapping)
                )
            ).fetchone()[0]
    return figures


def render_body(figures: dict[str, Any], timeout_minutes: int) -> str:
    """The approval's Markdown body."""
    reasons = figures["rejected_by_reason"]
    rec = figures["reconciliation"] or {}
    rehearsal = figures["rehearsal"]
    changes = figures["changes"]
    lines = [
        f"Run **{figures['run_id']}** passed validation ({figures['checks']['passed']}/"
        f"{figures['checks']['total']} checks). **Approve** locks the legacy users tables, runs the final "
        "sync, proves equality and makes the legacy tables **read-only**. **Reject** leaves them writable; "
        f"without an answer within {timeout_minutes} min the answer is **Reject**.",
        "",
        "| figure | value |",
        "| --- | ---: |",
        f"| legacy rows read | {figures['source_rows']} |",
        f"| migrated | {figures['migrated']} |",
        f"| rejected | {figures['rejected']} |",
        f"| fixed fields | {figures['fixed_fields']} |",
        f"| partitions done | {figures['partitions']} |",
        f"| this pass: inserted / updated / removed / unchanged | {changes['inserted']} / {changes['updated']} / "
        f"{changes['removed']} / {changes['unchanged']} |",
    ]
    if rec:
        lines.append(
            f"| reconciliation: read = in target + rejected | {rec.get('rows_in')} = {rec.get('in_target')} + "
            f"{rec.get('rejected')} |"
        )
    if figures["waiting_changes"] is not None:
        lines.append(f"| users changed since, for the final sync | {figures['waiting_changes']} |")
    if rehearsal and rehearsal.get("write_pause_seconds") is not None:
        lines.append(
            f"| rehearsal {rehearsal['run_id']}: writes paused | {rehearsal['write_pause_seconds']} s |"
        )
    else:
        lines.append("| rehearsal | none ran: trigger with cutover and dry_run first to measure the pause |")
    lines += ["", "Rejected rows by reason:", ""]
    lines += [f"- {reason}: {n}" for reason, n in reasons.items()] or ["- none"]
    return "\n".join(lines)
