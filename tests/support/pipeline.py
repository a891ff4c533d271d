"""The DAG's stages called in order without a scheduler, for fast tests of their logic.

The end-to-end tests run the same stages through Airflow (tests/test_e2e_dag.py); this runner
exists so that invariants (idempotency, batch/partition independence) can be checked in seconds.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from user_migration import audit
from user_migration.backup import run_backup
from user_migration.config import Settings
from user_migration.db import check_legacy_tables, ensure_audit_schema
from user_migration.finalize import finalize_target
from user_migration.partition_copy import copy_partition
from user_migration.plan import make_plan
from user_migration.schema import apply_schema


def run_stages(
    legacy_dsn: str,
    target_dsn: str,
    settings: Settings,
    run_id: str,
    backup_root: Path,
    as_of: dt.date | None = None,
    partition_order: list[int] | None = None,
    after_plan: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """backup, ddl, plan, copy (every partition, in ``partition_order``), finalize; returns reconcile()
    with the backup folder, the plan's partitions and each copied partition's result. ``after_plan``
    runs between the plan and the copy (the application writing meanwhile)."""
    as_of = as_of or dt.date.today()
    with (
        psycopg.connect(legacy_dsn, autocommit=True) as legacy,
        psycopg.connect(target_dsn, autocommit=True) as target,
    ):
        ensure_audit_schema(target)
        audit.start_run(target, run_id, "user_migration", None, settings.dry_run, settings.public())
        check_legacy_tables(legacy, settings.mapping, "legacy_db")
        backup = run_backup(legacy, settings.mapping, backup_root, run_id)
        audit.set_backup(target, run_id, backup.folder)
        if not settings.dry_run:
            apply_schema(target, run_id)
        plan = make_plan(legacy, target, settings, run_id, as_of)
        partitions = plan["partitions"]
        if after_plan is not None:
            after_plan()
        order = partition_order if partition_order is not None else range(len(partitions))
        copied = [copy_partition(legacy, target, settings, run_id, partitions[index]) for index in order]
        if not settings.dry_run:
            finalize_target(legacy, target, settings, run_id)
        result = audit.reconcile(target, run_id)
        result["backup_folder"] = backup.folder
        result["partition_list"] = partitions
        result["partition_results"] = [r.as_dict() for r in copied]
        return result


def snapshot(target_dsn: str) -> dict[str, list[tuple]]:
    """Everything migrated, in a comparable form (timestamps of the migration itself left out)."""
    with psycopg.connect(target_dsn) as conn:
        return {
            "users": conn.execute(
                "SELECT id, password, last_login, is_superuser, email, username, full_name, date_of_birth, "
                "phone_number, is_active, is_staff FROM account_newuser ORDER BY id"
            ).fetchall(),
            "groups": conn.execute(
                "SELECT id, newuser_id, group_id FROM account_newuser_groups ORDER BY id"
            ).fetchall(),
            "permissions": conn.execute(
                "SELECT id, newuser_id, permission_id FROM account_newuser_user_permissions ORDER BY id"
            ).fetchall(),
            "profiles": conn.execute("SELECT user_id FROM account_profile ORDER BY user_id").fetchall(),
        }


def rejects(target_dsn: str, run_id: str) -> dict[int, tuple[str, str]]:
    with psycopg.connect(target_dsn) as conn:
        return {
            source_id: (reason, detail)
            for source_id, reason, detail in conn.execute(
                "SELECT source_id, reason, detail FROM migration_audit.run_rejects WHERE run_id = %s",
                (run_id,),
            ).fetchall()
        }
