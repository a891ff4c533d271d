"""Which tables each task reads and writes, named the way OpenLineage names PostgreSQL tables.

The operators report these through the OpenLineage provider's operator interface
(``get_openlineage_facets_on_complete``), so a lineage backend (Marquez, DataHub, ...) draws the
migration: the legacy tables in, the new tables and the ``migration_audit`` tables out.

OpenLineage's naming for PostgreSQL: namespace ``postgres://host:port``, name
``database.schema.table``. Host, port and database come from the task's Airflow connection (as
MigrationDbHook.connection_params returns them); user and password never go into a name.

Only tables that carry the migration's data or its record are named. Bookkeeping every task touches
(task_attempts, the writer lease, the throttle, the change-capture log) is left out: it would tie
every task to every other one and draw nothing.

Plain module: no Airflow or OpenLineage import, so it is unit-tested without either.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from user_migration.config import LegacyMapping

# Where a table lives: the legacy connection or the target connection.
LEGACY = "legacy"
TARGET = "target"
AUDIT_SCHEMA = "migration_audit"

# The legacy tables, resolved through the mapping (settings.mapping) when a task reports them.
LEGACY_USERS = (LEGACY, "users")
LEGACY_GROUPS = (LEGACY, "groups")
LEGACY_PERMISSIONS = (LEGACY, "permissions")
LEGACY_ALL = (LEGACY_USERS, LEGACY_GROUPS, LEGACY_PERMISSIONS)


def _target(table: str, schema: str = "public") -> tuple[str, str, str]:
    return (TARGET, schema, table)


def _audit(table: str) -> tuple[str, str, str]:
    return (TARGET, AUDIT_SCHEMA, table)


NEW_USERS = _target("account_newuser")
NEW_GROUPS = _target("account_newuser_groups")
NEW_PERMISSIONS = _target("account_newuser_user_permissions")
NEW_PROFILES = _target("account_profile")
NEW_USER_TABLES = (NEW_USERS, NEW_GROUPS, NEW_PERMISSIONS)

RUNS = _audit("runs")
PLANS = _audit("plans")
PLAN_DUPLICATES = _audit("plan_duplicates")
PARTITIONS = _audit("partitions")
BATCHES = _audit("batches")
REJECTED_ROWS = _audit("rejected_rows")
FIELD_FIXES = _audit("field_fixes")
SOURCE_STATE = _audit("source_state")
VALIDATION_RESULTS = _audit("validation_results")
SCHEMA_MIGRATIONS = _audit("schema_migrations")
CUTOVERS = _audit("cutovers")
ROLLBACK_ROWS = _audit("rollback_rows")

# Operator kind (the operators' ``lineage_kind``) -> (inputs, outputs).
LINEAGE: dict[str, tuple[tuple[tuple[str, ...], ...], tuple[tuple[str, ...], ...]]] = {
    # Reads every legacy table into the backup files; records the run and its backup.
    "backup": (LEGACY_ALL, (RUNS,)),
    # Creates the new tables; no data read.
    "ddl": ((), (*NEW_USER_TABLES, NEW_PROFILES, SCHEMA_MIGRATIONS)),
    # Id ranges and duplicate decisions from the legacy users and the ids already migrated.
    "plan": ((LEGACY_USERS, NEW_USERS), (PLANS, PLAN_DUPLICATES)),
    # One partition: legacy rows (with their links) transformed into the new tables, rejects recorded.
    "copy": (
        (*LEGACY_ALL, PLANS, PLAN_DUPLICATES),
        (*NEW_USER_TABLES, PARTITIONS, BATCHES, REJECTED_ROWS, FIELD_FIXES, SOURCE_STATE),
    ),
    # Finalize: a profile per migrated user; the legacy users table gives the id floor of the sequences.
    "finalize": ((LEGACY_USERS, NEW_USERS), (NEW_PROFILES,)),
    # Reconciles the audit counts and runs the GX suite on the new tables; never reads legacy rows.
    "validate": (
        (*NEW_USER_TABLES, NEW_PROFILES, PLANS, PARTITIONS, REJECTED_ROWS, FIELD_FIXES, SOURCE_STATE),
        (VALIDATION_RESULTS,),
    ),
    # Final sync under the legacy tables' lock, proven by checksums; records the cutover.
    "cutover": (
        (*LEGACY_ALL, SOURCE_STATE, VALIDATION_RESULTS),
        (*NEW_USER_TABLES, SOURCE_STATE, CUTOVERS),
    ),
    # The pass's summary from the audit trail; written back to its run row (and report files).
    "report": ((PLANS, PARTITIONS, REJECTED_ROWS, FIELD_FIXES, VALIDATION_RESULTS, NEW_USERS), (RUNS,)),
    # Carries the new tables back to the legacy ones (or restores a backup into them).
    "rollback": ((*NEW_USER_TABLES, SOURCE_STATE, CUTOVERS), (*LEGACY_ALL, ROLLBACK_ROWS, CUTOVERS)),
}


@dataclass(frozen=True)
class Table:
    """One OpenLineage dataset: ``namespace`` and ``name`` as the PostgreSQL naming rule has them."""

    namespace: str
    name: str


def location(connection: dict[str, Any]) -> tuple[str, int, str]:
    """(host, port, database) of a connection's parameters; nothing else of them is read.

    A Unix socket directory is not a host name: it is named ``localhost``, as libpq does. Of a
    multi-host connection (``host=a,b``) the first host and port name the database.
    """
    host = str(connection.get("host") or "localhost").split(",")[0].strip() or "localhost"
    if host.startswith("/"):
        host = "localhost"
    port = str(connection.get("port") or 5432).split(",")[0].strip() or "5432"
    database = connection.get("dbname") or "postgres"
    return host, int(port), str(database)


def namespace(connection: dict[str, Any]) -> str:
    host, port, _ = location(connection)
    return f"postgres://{host}:{port}"


def table(connection: dict[str, Any], schema: str, name: str) -> Table:
    _, _, database = location(connection)
    return Table(namespace(connection), f"{database}.{schema}.{name}")


def _legacy_table(mapping: LegacyMapping, which: str) -> str | None:
    if which == "users":
        return mapping.users_table
    link = mapping.groups if which == "groups" else mapping.permissions
    return link.table if link is not None else None


def task_tables(
    kind: str,
    mapping: LegacyMapping,
    legacy: dict[str, Any],
    target: dict[str, Any],
    dry_run: bool = False,
) -> tuple[list[Table], list[Table]]:
    """(inputs, outputs) of an operator of ``kind`` for one run's mapping and connections.

    A legacy link table the mapping leaves out (groups or permissions: null) is not named. A dry
    run writes only the audit trail, so its outputs are the ``migration_audit`` tables alone.
    """
    if kind not in LINEAGE:
        raise KeyError(f"no lineage for operator kind {kind!r}; known: {', '.join(sorted(LINEAGE))}")

    def resolve(refs: tuple[tuple[str, ...], ...], outputs: bool) -> list[Table]:
        tables: list[Table] = []
        for ref in refs:
            if ref[0] == LEGACY:
                name = _legacy_table(mapping, ref[1])
                if name is None:
                    continue
                found = table(legacy, mapping.schema, name)
            else:
                _, schema, name = ref
                if outputs and dry_run and schema != AUDIT_SCHEMA:
                    continue
                found = table(target, schema, name)
            if found not in tables:
                tables.append(found)
        return tables

    inputs, outputs = LINEAGE[kind]
    return resolve(inputs, outputs=False), resolve(outputs, outputs=True)
