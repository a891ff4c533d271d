"""user_migration: move legacy Django users (account_user) into the new schema (account_newuser).

Wiring only: every task is an operator from plugins/user_migration, and nothing here touches a
database or imports a heavy library, so parsing stays cheap.
"""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

from airflow.sdk import DAG, TriggerRule

from user_migration.assets import CUTOVER_ALIAS, TARGET_USERS_ALIAS
from user_migration.deadline import deadline_alert
from user_migration.operators import (
    POOL,
    CutoverApprovalOperator,
    CutoverOperator,
    FinalizeTargetOperator,
    GreatExpectationsValidationOperator,
    LegacyBackupOperator,
    MigrationPlanOperator,
    MigrationReportOperator,
    PartitionCopyOperator,
    TargetSchemaOperator,
)
from user_migration.setting_specs import PASS_PARAMS, dag_params

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
    # Every setting's type, bounds and description: user_migration.setting_specs (one place).
    params=dag_params(PASS_PARAMS),
) as dag:
    backup = LegacyBackupOperator(task_id="backup")
    ddl = TargetSchemaOperator(task_id="ddl")
    plan = MigrationPlanOperator(task_id="plan")
    copy = PartitionCopyOperator.partial(
        task_id="copy",
        map_index_template="ids {{ task.partition['lo'] }}-{{ task.partition['hi'] }}",
    ).expand(partition=plan.output)
    finalize = FinalizeTargetOperator(task_id="finalize")
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

    backup >> ddl >> plan >> copy >> finalize >> validate >> approve >> cutover >> report
    validate >> report
