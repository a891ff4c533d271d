"""The validate stage's checks: the accounting, partitions, reject ratio and drift, then the Great
Expectations suite (run, or taken over while the target is as a passed suite saw it).

Plain Python over a target connection, so the operator only wires it and tests call it directly.
Every outcome is a dict (name, success, observed, details.message) as migration_audit stores it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from user_migration import audit
from user_migration.config import Settings


@dataclass(frozen=True)
class CheckRun:
    outcomes: list[dict[str, Any]]
    suite_note: str | None  # how the GX suite was run or taken over; None on a dry run
    suite_seconds: float | None

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if not o["success"]]


def run_checks(target: psycopg.Connection, run_id: str, settings: Settings, sqlalchemy_url: str) -> CheckRun:
    """Every check of ``run_id``'s validation, in the order the report lists them."""
    numbers = audit.reconcile(target, run_id)
    outcomes: list[dict[str, Any]] = []

    def check(name: str, success: bool, observed: Any, message: str) -> None:
        outcomes.append(
            {"name": name, "success": success, "observed": observed, "details": {"message": message}}
        )

    outcomes.append(audit.every_source_row_accounted(target, run_id, dry_run=settings.dry_run))
    check(
        "all_partitions_done",
        numbers["partitions_done"] == numbers["partitions"],
        {"done": numbers["partitions_done"], "planned": numbers["partitions"]},
        f"{numbers['partitions_done']} of {numbers['partitions']} partitions done",
    )
    ratio = numbers["rejected"] / numbers["source_rows"] if numbers["source_rows"] else 0.0
    check(
        "reject_ratio_within_limit",
        ratio <= settings.max_reject_ratio,
        {"ratio": round(ratio, 6), "limit": settings.max_reject_ratio},
        f"{numbers['rejected']} of {numbers['source_rows']} rows rejected ({ratio:.2%}), the limit is "
        f"{settings.max_reject_ratio:.2%} (Param max_reject_ratio)",
    )
    if settings.dry_run:
        return CheckRun(outcomes, None, None)
    from user_migration.validation_reuse import note_write, run_suite

    drift = audit.sync_drift(target)
    if any(drift.values()):
        # Drift the write triggers did not see (one disabled and enabled again, a superuser's
        # replica session): noted, so that the next pass compares sync state and target in full and
        # repairs it, as drift_message says (decision 0013).
        note_write(target, "SYNC DRIFT")
    check("no_sync_drift", not any(drift.values()), drift, audit.drift_message(drift))
    suite = run_suite(target, sqlalchemy_url, run_id, numbers["migrated"], force=settings.full_reconcile)
    for outcome in suite.outcomes:
        check(outcome.name, outcome.success, outcome.observed, outcome.failure_message())
        outcomes[-1]["details"]["suite"] = suite.note
    return CheckRun(outcomes, suite.note, suite.seconds)
