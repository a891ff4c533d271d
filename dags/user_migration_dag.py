"""user_migration: move legacy Django users (account_user) into the new schema (account_newuser).

Wiring only: every task is an operator from plugins/user_migration, and nothing here touches a
database or imports a heavy library, so parsing stays cheap.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from airflow.sdk import DAG, Param, TriggerRule

from user_migration.assets import CUTOVER_ALIAS, TARGET_USERS_ALIAS
from user_migration.deadline import deadline_alert
from user_migration.operators import (
    POOL,
    CutoverApprovalOperator,
    CutoverOperator,
    GreatExpectationsValidationOperator,
    LegacyBackupOperator,
    MigrationPlanOperator,
    MigrationReportOperator,
    PartitionCopyOperator,
    ProfileInitOperator,
    TargetSchemaOperator,
)

DOC = (Path(__file__).parent / "user_migration_dag.md").read_text()


def _schedule() -> str | None:
    value = os.environ.get("USER_MIGRATION_SCHEDULE", "@hourly").strip()
    return None if value.lower() in ("", "none", "manual") else value


with DAG(
    dag_id="user_migration",
    description="Migrate legacy account_user rows into account_newuser, auditably",
    doc_md=DOC,
    # Every run is a sync pass; USER_MIGRATION_SCHEDULE (a cron or preset, "none" for manual only)
    # overrides the hourly default. New DAGs start paused, so nothing runs until a user unpauses it.
    schedule=_schedule(),
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    # A pass running longer than USER_MIGRATION_PASS_DEADLINE_MINUTES (default 120) since it was
    # queued raises an alert: a log line in the triggerer, plus a webhook or e-mail when configured.
    deadline=deadline_alert(),
    tags=["migration", "users", "postgres"],
    default_args={
        "owner": "data-platform",
        "retries": 2,
        "retry_delay": dt.timedelta(seconds=20),
        "pool": POOL,
    },
    params={
        "batch_size": Param(
            10_000,
            type="integer",
            minimum=1,
            maximum=1_000_000,
            description="Rows read, transformed and written per batch inside a partition.",
        ),
        "batch_seconds": Param(
            0.75,
            type="number",
            minimum=0,
            maximum=600,
            description=(
                "Seconds each batch should take: the batch size adapts to it (between batch_min_rows and "
                "batch_max_rows), so a loaded legacy server gets smaller batches. 0 keeps batch_size fixed."
            ),
        ),
        "batch_min_rows": Param(
            100,
            type="integer",
            minimum=1,
            maximum=1_000_000,
            description="Fewest rows of a time-boxed batch.",
        ),
        "batch_max_rows": Param(
            0,
            type="integer",
            minimum=0,
            maximum=1_000_000,
            description="Most rows of a time-boxed batch; 0 means ten times batch_size.",
        ),
        "max_snapshot_seconds": Param(
            120,
            type="number",
            minimum=0,
            maximum=86_400,
            description=(
                "After this long a partition ends its legacy read snapshot (which holds back vacuum on the "
                "legacy tables) and reads on from the last id in a new one; its target transaction stays one."
            ),
        ),
        "throttle_check_ms": Param(
            1000,
            type="integer",
            minimum=0,
            maximum=600_000,
            description=(
                "How often, at most, a partition reads the manual throttle (tools/throttle.py) and the "
                "legacy server's state between batches."
            ),
        ),
        "throttle_active_backends_pause": Param(
            64,
            type="integer",
            minimum=0,
            description="Pause between batches while more legacy backends than this run a statement (0: off).",
        ),
        "throttle_active_backends_stop": Param(
            256,
            type="integer",
            minimum=0,
            description="Stop the partition (retried later) above this many active legacy backends (0: off).",
        ),
        "throttle_lock_waiters_pause": Param(
            10,
            type="integer",
            minimum=0,
            description="Pause between batches while more legacy backends than this wait on a lock (0: off).",
        ),
        "throttle_lock_waiters_stop": Param(
            100,
            type="integer",
            minimum=0,
            description="Stop the partition (retried later) above this many legacy lock waiters (0: off).",
        ),
        "throttle_replay_lag_pause": Param(
            30,
            type="number",
            minimum=0,
            description=(
                "Pause while a legacy standby's replay lag exceeds this many seconds (0: off). Needs "
                "pg_monitor (pg_read_all_stats) for the migration role; without it the lag is not checked."
            ),
        ),
        "throttle_replay_lag_stop": Param(
            600,
            type="number",
            minimum=0,
            description="Stop the partition (retried later) above this replay lag in seconds (0: off).",
        ),
        "throttle_probe_sql": Param(
            None,
            type=["null", "string"],
            description=(
                "Optional custom probe: one SELECT returning one number, run read-only on the legacy "
                "server between batches (2 s timeout); compared with throttle_probe_pause and _stop."
            ),
        ),
        "throttle_probe_pause": Param(
            1,
            type="number",
            minimum=0,
            description="Pause while the custom probe returns more than this (0: off).",
        ),
        "throttle_probe_stop": Param(
            100,
            type="number",
            minimum=0,
            description="Stop the partition (retried later) when the custom probe returns more than this (0: off).",
        ),
        "throttle_max_pause_seconds": Param(
            1800,
            type="integer",
            minimum=0,
            maximum=604_800,
            description=(
                "A partition paused by the legacy server's state longer than this stops and is retried, "
                "giving back its target transaction (0: wait as long as it takes). A pause by hand waits."
            ),
        ),
        "partitions": Param(
            2,
            type="integer",
            minimum=1,
            maximum=256,
            description="Id-range partitions copied as parallel mapped tasks (the pool bounds how many run at once).",
        ),
        "phone_region": Param(
            "NP",
            type="string",
            pattern="^[A-Za-z]{2}$",
            description="ISO 3166 region used to read phone numbers written without a country code.",
        ),
        "invalid_phone": Param(
            "fix",
            type="string",
            enum=["fix", "reject"],
            description="fix: migrate the user with an empty phone and record the original; reject: reject the user.",
        ),
        "dry_run": Param(
            False,
            type="boolean",
            description="Back up, plan and apply the transforms, record rejects and fixes; write nothing to the target tables.",
        ),
        "full_reconcile": Param(
            False,
            type="boolean",
            description=(
                "Compare every legacy row with the sync state instead of reading the change log (the safety "
                "net; a pass does this by itself whenever the log cannot be trusted)."
            ),
        ),
        "max_reject_ratio": Param(
            0.10,
            type="number",
            minimum=0,
            maximum=1,
            description="Validation fails when more than this share of source rows is rejected.",
        ),
        "legacy_mapping": Param(
            {},
            type="object",
            description=(
                "Overrides of include/config/legacy_mapping.json for legacy tables named differently, e.g. "
                '{"users_table": "users", "columns": {"date_of_birth": "dob", "phone_number": "ph_number"}}.'
            ),
        ),
        "cutover": Param(
            False,
            type="boolean",
            description=(
                "After a passing validation: lock the legacy tables, run the final sync, prove equality and "
                "make the legacy tables read-only. With dry_run it is a rehearsal that changes nothing."
            ),
        ),
        "require_approval": Param(
            True,
            type="boolean",
            description=(
                "Cutover: wait for a person to Approve in Airflow (Required actions) before locking the legacy "
                "tables. Only for unattended tests and demos: false cuts over without asking. A rehearsal "
                "(dry_run) never asks."
            ),
        ),
        "approval_timeout_minutes": Param(
            60,
            type="integer",
            minimum=1,
            maximum=10_080,
            description=(
                "Cutover: how long the approval waits for an answer; without one the answer is Reject and the "
                "legacy tables stay writable. Later passes queue behind the waiting run (max_active_runs=1)."
            ),
        ),
        "lock_timeout_ms": Param(
            3000,
            type="integer",
            minimum=10,
            maximum=600_000,
            description="Cutover: how long one attempt waits for the legacy tables' lock (application writes pause meanwhile).",
        ),
        "cutover_attempts": Param(
            5,
            type="integer",
            minimum=1,
            maximum=50,
            description="Cutover: attempts to take the lock, with exponential backoff, before giving up cleanly.",
        ),
        "lock_wait_seconds": Param(
            60,
            type="integer",
            minimum=0,
            maximum=86_400,
            description="How long a run waits for another run (any deployment) to stop writing the target; a backfill run instead waits its turn by rescheduling.",
        ),
        "lease_stale_minutes": Param(
            30,
            type="integer",
            minimum=1,
            maximum=10_080,
            description=(
                "Outer bound: a run holding the writer lease that takes no advisory lock (one running older "
                "code) is presumed dead after this long without activity; its lease is taken over."
            ),
        ),
        "lease_grace_seconds": Param(
            120,
            type="integer",
            minimum=30,
            maximum=86_400,
            description=(
                "The writer lease of a run whose task died (its process and connections gone) is taken over at "
                "once; one with no task running is taken over after this long since its last task ended. Keep it "
                "above retry_delay (20 s) plus the scheduler's hand-off between two tasks."
            ),
        ),
        "backup_keep": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            maximum=100_000,
            description=(
                "Backup retention: keep at least this many of the newest backups (0: no count rule). Empty: "
                "USER_MIGRATION_BACKUP_KEEP, else 24. A backup is deleted only when it is beyond this count AND "
                "older than backup_keep_days; the backups before the first load and of a cutover, and the "
                "newest complete one, are never deleted."
            ),
        ),
        "backup_keep_days": Param(
            None,
            type=["null", "integer"],
            minimum=0,
            maximum=3_650,
            description=(
                "Backup retention: keep every backup younger than this many days (0: no age rule). Empty: "
                "USER_MIGRATION_BACKUP_KEEP_DAYS, else 7."
            ),
        ),
        "legacy_conn_id": Param(
            "legacy_db", type="string", description="Airflow connection of the legacy database."
        ),
        "target_conn_id": Param(
            "target_db",
            type="string",
            description="Airflow connection of the target database; the legacy one when it is not defined.",
        ),
    },
) as dag:
    backup = LegacyBackupOperator(task_id="backup")
    ddl = TargetSchemaOperator(task_id="ddl")
    plan = MigrationPlanOperator(task_id="plan")
    copy = PartitionCopyOperator.partial(
        task_id="copy",
        map_index_template="ids {{ task.partition['lo'] }}-{{ task.partition['hi'] }}",
    ).expand(partition=plan.output)
    profiles = ProfileInitOperator(task_id="profiles")
    validate = GreatExpectationsValidationOperator(task_id="validate", retries=0)
    # Skipped (with the cutover) unless Param cutover; a Reject or a timeout skips the cutover.
    approve = CutoverApprovalOperator(task_id="approve_cutover", retries=0)
    cutover = CutoverOperator(task_id="cutover", retries=0, outlets=[CUTOVER_ALIAS])
    # The report ends every pass that validated: after a cutover, or a skipped one (not requested,
    # rejected, timed out). Not after a failed validation or a failed cutover (the run failed and the
    # audit trail says why), nor when the whole pass was skipped after an earlier cutover.
    report = MigrationReportOperator(
        task_id="report",
        trigger_rule=TriggerRule.NONE_FAILED_MIN_ONE_SUCCESS,
        outlets=[TARGET_USERS_ALIAS],
    )

    backup >> ddl >> plan >> copy >> profiles >> validate >> approve >> cutover >> report
    validate >> report
