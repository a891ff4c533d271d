"""user_migration_rollback: undo a cutover, or restore the legacy tables from a backup. Manual only."""

from __future__ import annotations

import datetime as dt

from airflow.sdk import DAG

from user_migration.operators import POOL, RollbackOperator
from user_migration.setting_specs import ROLLBACK_PARAMS, dag_params

with DAG(
    dag_id="user_migration_rollback",
    description="Undo the user migration's cutover, or restore the legacy tables from a verified backup",
    doc_md="""
# user_migration_rollback

Triggered by hand; type `ROLLBACK` in **confirm**. Run it as the switch role
(`include/sql/roles/switch_privilege.sql`). Detail and every message: `docs/operations.md`.

- **carry_back** (after a cutover): first stop the application's writes to the new tables (deploy
  the legacy user model, or maintenance mode). It locks the new tables against writes, makes the
  legacy tables writable again (removing the read-only and capture triggers) and carries every change
  made in the new tables since the cutover back into them (new users, changed passwords,
  last_login, flags and other fields, deleted users, group and permission links). Each carried-back
  row is recorded in `migration_audit.rollback_rows`; the cutover is marked rolled back and passes
  resume. With two databases, "rollback half done" means the legacy side committed and the target
  did not: run it again; it carries nothing twice and marks the cutover rolled back.
- **restore**: brings the legacy tables back to the backup of run **backup_run_id**, refusing unless
  every file matches the sha256 in its manifest. Files are staged in temp tables, then only the rows
  that differ are deleted, updated or inserted, in one transaction; it refuses, changing nothing,
  when rows of other tables point at users the backup lacks. An active cutover is marked rolled back.

While a cutover is active, both use the settings its run recorded in `migration_audit.runs.params`
(legacy mapping, phone_region, invalid_phone), not this DAG's defaults. After either, the next pass
of `user_migration` compares every row.
""",
    schedule=None,
    start_date=dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
    catchup=False,
    max_active_runs=1,
    tags=["migration", "users", "postgres", "rollback"],
    default_args={"owner": "data-platform", "retries": 0, "pool": POOL},
    params=dag_params(
        ROLLBACK_PARAMS,
        descriptions={
            "legacy_mapping": (
                "Leave empty after a cutover: the rollback uses the mapping, phone_region and invalid_phone "
                "the cutover's run recorded. Without a cutover (restore only): the legacy_mapping the migration used."
            ),
        },
    ),
) as dag:
    RollbackOperator(task_id="rollback")
