"""The migration's data-aware side: which assets its runs update, and what their events carry.

The target's location (host, port, database) comes from an Airflow connection, known only when a
task runs, while a task's outlets are fixed when the DAG is parsed. So the tasks declare an
``AssetAlias`` (a fixed, logical name) as their outlet and, at run time, attach the event to the
concrete ``Asset`` whose URI is the postgres provider's ``postgres://host:port/database/schema/table``
form of the real table (``outlet_events[alias].add(asset, extra=...)``). Airflow records the asset,
links it to the alias, and queues every DAG scheduled on the alias or on the asset.

An alias outlet also means no event unless the task adds one: a dry run, a rehearsal or a skipped
cutover emits nothing (a plain ``Asset`` outlet would get an event on every successful task).

Event extras hold counts, checksums (sums over row hashes, not rows), timings and run ids only.
This module is imported when the DAG is parsed: Airflow SDK classes only, no driver.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import Asset, AssetAlias

# Every successful, non-dry-run pass: the target users table was brought up to date.
TARGET_USERS_ALIAS = AssetAlias("user_migration_target_users")
# Only a real cutover (not a rehearsal, not a skip): the legacy tables became read-only.
CUTOVER_ALIAS = AssetAlias("user_migration_cutover")

USERS_TABLE = ("public", "account_newuser")
CUTOVERS_TABLE = ("migration_audit", "cutovers")

# The counts of a pass summary that go into its asset event (all plain numbers or counts by reason).
PASS_COUNTS = (
    "source_rows",
    "migrated",
    "inserted",
    "updated",
    "unchanged",
    "removed",
    "rejected",
    "rejected_by_reason",
    "fixed_fields",
    "drift_repaired",
    "target_users",
    "seconds",
)
CUTOVER_FIELDS = (
    "cutover_id",
    "source_rows",
    "target_rows",
    "rejected_rows",
    "source_checksum",
    "target_checksum",
    "write_pause_seconds",
    "lock_attempts",
)


def table_uri(connection: dict[str, Any], schema: str, table: str) -> str:
    """``postgres://host:port/database/schema/table`` of a table behind a connection's parameters
    (as MigrationDbHook.connection_params returns them; user and password never go into it)."""
    host = connection.get("host") or "localhost"
    if host.startswith("/"):
        # A Unix socket directory is not a host name; name the machine the way libpq does.
        host = "localhost"
    port = connection.get("port") or 5432
    database = connection.get("dbname") or "postgres"
    return f"postgres://{host}:{port}/{database}/{schema}/{table}"


def target_users_asset(connection: dict[str, Any]) -> Asset:
    return Asset(uri=table_uri(connection, *USERS_TABLE))


def cutovers_asset(connection: dict[str, Any]) -> Asset:
    return Asset(uri=table_uri(connection, *CUTOVERS_TABLE))


def pass_extra(summary: dict[str, Any]) -> dict[str, Any]:
    """The event extra of a pass: its run id and counts (no rows, no personal data)."""
    return {"kind": "pass", "run_id": summary["run_id"], **{k: summary.get(k) for k in PASS_COUNTS}}


def cutover_extra(run_id: str, result: dict[str, Any]) -> dict[str, Any]:
    """The event extra of a cutover: run id, row counts, checksums and the measured write pause."""
    return {"kind": "cutover", "run_id": run_id, **{k: result.get(k) for k in CUTOVER_FIELDS}}
