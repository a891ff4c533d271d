"""Change capture: the application's writes to the legacy tables, logged as they happen.

Triggers on the legacy users table and its link tables append the id of every user written to a
change log in the legacy database (include/sql/capture/). A pass then reads the log instead of
hashing every legacy row, and the cutover catches up from it before it locks, so the work under the
lock is the last few changes, not the table (docs/decisions/0001-change-capture-with-triggers.md).

Entries are consumed at least once: a reader takes the entries visible in the snapshot it reads the
rows in, and deletes exactly those after the target has committed; a crash in between re-reads
them, which is harmless since applying a change twice gives the same result.

The log is only trusted after a full comparison (every legacy row hashed against the sync state)
that ran with the triggers in place. It stops being trusted when a trigger is missing or disabled,
after a TRUNCATE, a restore or a rollback, and on demand (Param full_reconcile); the next pass
then compares every row again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from user_migration import privileges
from user_migration.config import LegacyMapping
from user_migration.db import read_sql

LOG_TABLE = "user_migration_changes"
FUNCTION_PREFIX = "user_migration_capture"
TRIGGERS_PER_TABLE = 4
# A deadlock with an application transaction that writes the tables in another order than the
# install takes them costs an attempt (PostgreSQL aborts the install, the application goes on).
INSTALL_ATTEMPTS = 3
USERS = 0  # the users table's number in the log; its link tables follow


@dataclass(frozen=True)
class Captured:
    """A legacy table whose changes are captured: its number in the log and its user id column."""

    source: int
    table: sql.Identifier
    column: str

    def function(self, schema: str) -> sql.Identifier:
        return sql.Identifier(schema, f"{FUNCTION_PREFIX}_{self.source}")


@dataclass(frozen=True)
class Status:
    installed: bool  # every trigger exists and is enabled
    partly: bool  # some exist, or some are disabled
    truncated: bool  # the log holds a TRUNCATE marker


def captured_tables(mapping: LegacyMapping) -> list[Captured]:
    tables = [Captured(USERS, sql.Identifier(mapping.schema, mapping.users_table), mapping.column("id"))]
    for number, link in enumerate((mapping.groups, mapping.permissions), start=1):
        if link is not None:
            tables.append(Captured(number, sql.Identifier(mapping.schema, link.table), link.user_column))
    return tables


def log_table(mapping: LegacyMapping) -> sql.Identifier:
    return sql.Identifier(mapping.schema, LOG_TABLE)


def status(legacy: psycopg.Connection, mapping: LegacyMapping) -> Status:
    tables = captured_tables(mapping)
    oids = [
        legacy.execute("SELECT %s::regclass::oid", (t.table.as_string(legacy),)).fetchone()[0] for t in tables
    ]
    present, enabled = legacy.execute(read_sql("capture/trigger_status.sql"), {"tables": oids}).fetchone()
    usable = log_exists(legacy, mapping) and can_use_log(legacy, mapping)
    truncated = bool(
        usable
        and legacy.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE source_id IS NULL)").format(log_table(mapping))
        ).fetchone()[0]
    )
    wanted = TRIGGERS_PER_TABLE * len(tables)
    installed = usable and enabled == wanted
    return Status(installed=installed, partly=not installed and present > 0, truncated=truncated)


def can_use_log(legacy: psycopg.Connection, mapping: LegacyMapping) -> bool:
    """Whether this role may read and consume the change log (another role may have created it)."""
    return legacy.execute(
        "SELECT has_table_privilege(%s, 'SELECT, DELETE')", (log_table(mapping).as_string(legacy),)
    ).fetchone()[0]


def install(legacy: psycopg.Connection, mapping: LegacyMapping, lock_timeout_ms: int = 3000) -> None:
    """Create the log and (re)create every capture trigger, in one transaction; idempotent.

    CREATE TRIGGER waits for the application's open writes on the table and holds new ones for a
    moment: ``lock_timeout`` bounds that wait, and a timeout leaves nothing half-installed. The link
    tables come first, the users table last, as the cutover locks them (Django deletes a user's
    links, then the user); a deadlock with a transaction in the other order is retried.
    """
    for attempt in range(1, INSTALL_ATTEMPTS + 1):
        try:
            _install(legacy, mapping, lock_timeout_ms)
            return
        except psycopg.errors.DeadlockDetected:
            if attempt == INSTALL_ATTEMPTS:
                raise
            time.sleep(0.2 * attempt)


def _install(legacy: psycopg.Connection, mapping: LegacyMapping, lock_timeout_ms: int) -> None:
    log = log_table(mapping)
    with legacy.transaction():
        legacy.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{lock_timeout_ms}ms")))
        legacy.execute(
            sql.SQL(read_sql("capture/create_log.sql")).format(
                log=log, log_index=sql.Identifier(f"{LOG_TABLE}_source_id_idx")
            )
        )
        tables = captured_tables(mapping)
        for table in tables[1:] + tables[:1]:
            legacy.execute(
                sql.SQL(read_sql("capture/install_triggers.sql")).format(
                    function=table.function(mapping.schema),
                    table=table.table,
                    log=log,
                    column=sql.Identifier(table.column),
                    source=sql.Literal(table.source),
                )
            )


def remove(legacy: psycopg.Connection, mapping: LegacyMapping) -> None:
    """Drop the triggers and the log (in the caller's transaction, if any); idempotent."""
    for table in captured_tables(mapping):
        legacy.execute(
            sql.SQL(read_sql("capture/remove_triggers.sql")).format(
                table=table.table, function=table.function(mapping.schema)
            )
        )
    legacy.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(log_table(mapping)))


def log_exists(legacy: psycopg.Connection, mapping: LegacyMapping) -> bool:
    return (
        legacy.execute("SELECT to_regclass(%s)", (log_table(mapping).as_string(legacy),)).fetchone()[0]
        is not None
    )


def entries_in_range(
    legacy: psycopg.Connection, mapping: LegacyMapping, lo: int, hi: int
) -> tuple[list[int], list[int]]:
    """(sequence numbers, distinct user ids) of the log entries for users lo..hi, in one snapshot."""
    rows = legacy.execute(
        sql.SQL("SELECT seq, source_id FROM {} WHERE source_id BETWEEN %s AND %s").format(log_table(mapping)),
        (lo, hi),
    ).fetchall()
    return [seq for seq, _ in rows], sorted({source_id for _, source_id in rows})


def all_entries(legacy: psycopg.Connection, mapping: LegacyMapping) -> tuple[list[int], list[int]]:
    """(sequence numbers, distinct user ids) of every user entry of the log (markers excluded)."""
    rows = legacy.execute(
        sql.SQL("SELECT seq, source_id FROM {} WHERE source_id IS NOT NULL").format(log_table(mapping))
    ).fetchall()
    return [seq for seq, _ in rows], sorted({source_id for _, source_id in rows})


def consume(legacy: psycopg.Connection, mapping: LegacyMapping, seqs: list[int]) -> None:
    """Delete entries that have been applied (and committed) in the target."""
    if seqs:
        legacy.execute(sql.SQL("DELETE FROM {} WHERE seq = ANY(%s)").format(log_table(mapping)), (seqs,))


def markers(legacy: psycopg.Connection, mapping: LegacyMapping) -> list[int]:
    """Sequence numbers of the TRUNCATE markers now in the log."""
    return [
        seq
        for (seq,) in legacy.execute(
            sql.SQL("SELECT seq FROM {} WHERE source_id IS NULL").format(log_table(mapping))
        ).fetchall()
    ]


# --- trust, recorded in the target's migration_audit.capture -----------------------------------


def trust(target: psycopg.Connection) -> tuple[bool, str | None]:
    row = target.execute(
        "SELECT trusted, reason FROM migration_audit.capture WHERE target = 'target'"
    ).fetchone()
    if row is None:
        return False, "no full comparison has run with change capture in place yet"
    return row[0], row[1]


def set_trust(target: psycopg.Connection, trusted: bool, reason: str | None, run_id: str | None) -> None:
    with target.transaction():
        target.execute(
            "INSERT INTO migration_audit.capture (target, trusted, reason, run_id) VALUES ('target', %s, %s, %s) "
            "ON CONFLICT (target) DO UPDATE SET trusted = EXCLUDED.trusted, reason = EXCLUDED.reason, "
            "run_id = EXCLUDED.run_id, changed_at = now()",
            (trusted, reason, run_id),
        )


def distrust(target: psycopg.Connection, reason: str, run_id: str | None = None) -> None:
    """The log no longer covers every change: the next pass compares every row."""
    set_trust(target, False, reason, run_id)


@dataclass(frozen=True)
class Mode:
    """How a pass finds the changed rows: ``log`` (the change log) or ``full`` (hash every row)."""

    changes: str
    reason: str
    installed: bool
    markers: tuple[int, ...] = ()


def prepare(
    legacy: psycopg.Connection,
    target: psycopg.Connection,
    mapping: LegacyMapping,
    full_reconcile: bool,
    run_id: str,
    lock_timeout_ms: int = 3000,
) -> Mode:
    """Before a pass's plan: make sure the triggers are in place, and choose log or full.

    Must run before any snapshot the pass reads rows in, so that every change after those snapshots
    is in the log. A role that may not create triggers gets full passes, and says so.
    """
    if log_exists(legacy, mapping) and not can_use_log(legacy, mapping):
        return Mode(
            "full",
            f"change capture unavailable: the change log {log_table(mapping).as_string(legacy)} belongs to another "
            "role and this one may not read and delete its entries (grant it SELECT and DELETE on the log)",
            installed=False,
        )
    state = status(legacy, mapping)
    if not state.installed:
        try:
            install(legacy, mapping, lock_timeout_ms)
        except psycopg.errors.InsufficientPrivilege as exc:
            if state.partly:  # replacing a trigger that is there means dropping it: the owner only
                why = (
                    f"a capture trigger is disabled or half-installed and this role may not replace it "
                    f"({privileges.denied(exc)}); only the legacy tables' owner may drop a trigger: drop the "
                    "user_migration_capture_* triggers as the owner, or run one pass as the switch role "
                    f"({privileges.SWITCH_SCRIPT})"
                )
            else:
                why = (
                    f"this role may not create the change log and its triggers ({privileges.denied(exc)}); "
                    "grant it TRIGGER on the legacy tables and CREATE on their schema, as "
                    f"{privileges.PASS_SCRIPT} does"
                )
            return Mode("full", f"change capture unavailable: {why}", installed=False)
        # Whatever was there before (nothing, a part, disabled triggers), changes may have gone
        # unlogged: only a full comparison with the triggers now in place re-arms the log.
        distrust(
            target,
            "a capture trigger was missing or disabled"
            if state.partly
            else "change capture was (re)installed",
            run_id,
        )
    elif state.truncated:
        distrust(target, "a legacy table was truncated", run_id)
    trusted, reason = trust(target)
    if full_reconcile:
        return Mode("full", "full_reconcile requested", True, tuple(markers(legacy, mapping)))
    if not trusted or not state.installed:
        why = reason or "change capture was just installed"
        return Mode("full", why, True, tuple(markers(legacy, mapping)))
    return Mode("log", "the change log is trusted", True)


def complete_pass(
    legacy: psycopg.Connection, target: psycopg.Connection, mapping: LegacyMapping, run_id: str
) -> bool:
    """After every partition of ``run_id`` committed: a full comparison re-arms the log; returns trust.

    The triggers were in place before the partitions' snapshots (the plan installed them), and each
    partition consumed the entries its snapshot saw: from now on the log holds every change the
    state lacks. TRUNCATE markers seen by the plan are covered by that comparison too.
    """
    row = target.execute(
        "SELECT p.changes, p.capture_markers, p.partitions -> 0 ->> 'capture', "
        "jsonb_array_length(p.partitions) = (SELECT count(*) FROM migration_audit.partitions AS d "
        "WHERE d.run_id = p.run_id AND d.state = 'done') "
        "FROM migration_audit.plans AS p WHERE p.run_id = %s",
        (run_id,),
    ).fetchone()
    if row is None or row[2] != "true" or not row[3] or not status(legacy, mapping).installed:
        return False  # a partition not done (marked success by hand?), or a trigger gone meanwhile
    if row[0] == "full":
        if row[1]:
            consume(legacy, mapping, list(row[1]))
        set_trust(target, True, None, run_id)
    return True


def log_is_empty(legacy: psycopg.Connection, mapping: LegacyMapping) -> bool:
    return not legacy.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(log_table(mapping))
    ).fetchone()[0]


def quiet_since_backup(
    legacy: psycopg.Connection, target: psycopg.Connection, mapping: LegacyMapping, run_id: str
) -> tuple[str, str] | None:
    """(run id, folder) of the last backup when nothing changed since it was taken, else None.

    Nothing changed when the log is trusted, in place and empty now, and the run that took the
    backup and every run since consumed no entry: an entry committed after that backup's snapshot
    would have been consumed by one of them, or would still be in the log.
    """
    trusted, _ = trust(target)
    if not trusted or not status(legacy, mapping).installed or not log_is_empty(legacy, mapping):
        return None
    row = target.execute(read_sql("audit/quiet_since_backup.sql"), {"run_id": run_id}).fetchone()
    return None if row is None else (row[0], row[1])
