"""The cutover: a short, safe switch from the legacy tables to the new ones.

1. Lock the legacy tables in EXCLUSIVE mode (reads go on, writes wait) with a ``lock_timeout`` and
   bounded retries with backoff: a busy table makes the cutover give up cleanly instead of making
   the application's writes queue behind a long lock.
2. In that same transaction, run the final delta sync (plan and every partition) and prove
   equality: the order-independent checksum of the transformed legacy rows equals the target's,
   and the counts reconcile with the rejects.
3. Make the legacy tables read-only (writes fail with a message naming the new table), record the
   cutover in migration_audit.cutovers, commit. With ``dry_run`` everything is rolled back and the
   report says how long writes would have paused.
When legacy and target are the same database (the default) this is one transaction on one
connection; otherwise the target commits first, then the legacy side.
"""

from __future__ import annotations

import datetime as dt
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration.config import Settings
from user_migration.db import read_sql
from user_migration.errors import MigrationError
from user_migration.finalize import init_profiles
from user_migration.partition_copy import copy_partition, target_checksum_sql
from user_migration.plan import make_plan

READ_ONLY_FUNCTION = "user_migration_read_only"
NEW_TABLE = "account_newuser"


class CutoverRefused(MigrationError):
    """The cutover cannot happen now; nothing was changed."""


@dataclass(frozen=True)
class CutoverOptions:
    lock_timeout_ms: int = 3000
    attempts: int = 5
    backoff_seconds: float = 0.5
    dry_run: bool = False


def legacy_tables(settings: Settings) -> list[sql.Identifier]:
    mapping = settings.mapping
    names = [mapping.users_table] + [link.table for link in (mapping.groups, mapping.permissions) if link]
    return [sql.Identifier(mapping.schema, name) for name in names]


def active_cutover(target: psycopg.Connection) -> dict[str, Any] | None:
    if target.execute("SELECT to_regclass('migration_audit.cutovers')").fetchone()[0] is None:
        return None  # no run has written to this target yet
    row = target.execute(
        "SELECT id, run_id, cut_at, cut_by FROM migration_audit.cutovers WHERE state = 'active'"
    ).fetchone()
    return None if row is None else {"id": row[0], "run_id": row[1], "cut_at": row[2], "cut_by": row[3]}


def set_legacy_read_only(legacy: psycopg.Connection, settings: Settings, run_id: str | None) -> None:
    """Install (run_id given) or remove (None) the read-only triggers on every legacy table."""
    function = sql.Identifier(settings.mapping.schema, READ_ONLY_FUNCTION)
    for table in legacy_tables(settings):
        if run_id is None:
            legacy.execute(sql.SQL(read_sql("cutover/make_legacy_writable.sql")).format(table=table))
        else:
            legacy.execute(
                sql.SQL(read_sql("cutover/make_legacy_read_only.sql")).format(
                    function=function, table=table, target=sql.Literal(NEW_TABLE), run_id=sql.Literal(run_id)
                )
            )


def _lock_holders(conn: psycopg.Connection, settings: Settings) -> str:
    oids = [
        conn.execute("SELECT %s::regclass::oid", (table.as_string(conn),)).fetchone()[0]
        for table in legacy_tables(settings)
    ]
    rows = conn.execute(read_sql("cutover/legacy_lock_holders.sql"), {"tables": oids}).fetchall()
    if not rows:
        return "no session holds them now"
    return "; ".join(
        f"pid {pid} ({app}, {state}, in a transaction for {secs} s)" for pid, app, state, secs in rows
    )


def run_cutover(
    legacy: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    as_of: dt.date,
    cut_by: str,
    options: CutoverOptions,
) -> dict[str, Any]:
    """Cut over (or rehearse it); returns what happened. Raises CutoverRefused, changing nothing."""
    same = legacy is target
    validation = target.execute(
        "SELECT count(*), coalesce(bool_and(success), false) FROM migration_audit.validation_results "
        "WHERE run_id = %s",
        (run_id,),
    ).fetchone()
    if validation[0] == 0 or not validation[1]:
        raise CutoverRefused(
            f"cutover refused: the validation of run '{run_id}' did not pass ({validation[0]} checks recorded); "
            "run a pass whose validate task succeeds first"
        )
    current = active_cutover(target)
    if current:
        raise CutoverRefused(
            f"cutover refused: already cut over by run '{current['run_id']}' at {current['cut_at']}; "
            "roll it back with the user_migration_rollback DAG first"
        )
    sync_run = f"{run_id}:cutover"
    tables = legacy_tables(settings)
    for attempt in range(1, options.attempts + 1):
        try:
            return _attempt(
                legacy, target, settings, run_id, sync_run, as_of, cut_by, options, attempt, same, tables
            )
        except psycopg.errors.LockNotAvailable:
            holders = _lock_holders(target if same else legacy, settings)
            if attempt == options.attempts:
                raise CutoverRefused(
                    f"cutover gave up: the legacy tables could not be locked within {options.lock_timeout_ms} ms "
                    f"in {options.attempts} attempts ({holders}). Nothing was changed and the tables stay "
                    "writable; retry when the application is quieter, or raise lock_timeout_ms"
                ) from None
            time.sleep(options.backoff_seconds * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _attempt(
    legacy: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    sync_run: str,
    as_of: dt.date,
    cut_by: str,
    options: CutoverOptions,
    attempt: int,
    same: bool,
    tables: list[sql.Identifier],
) -> dict[str, Any]:
    with legacy.transaction(force_rollback=options.dry_run):
        legacy.execute(
            sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{options.lock_timeout_ms}ms"))
        )
        legacy.execute(sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(tables)))
        locked = time.monotonic()
        legacy.execute("SET LOCAL lock_timeout = '30s'")
        # One database: the target work nests in the legacy transaction (savepoints), one commit.
        with nullcontext() if same else target.transaction(force_rollback=options.dry_run):
            plan = make_plan(legacy, target, settings, sync_run, as_of, own_snapshot=False)
            synced = [
                copy_partition(legacy, target, settings, sync_run, partition, own_snapshot=False).as_dict()
                for partition in plan["partitions"]
            ]
            init_profiles(target)
            proof = _prove_equal(legacy, target, settings, sync_run)
            pause = time.monotonic() - locked
            result = {
                "dry_run": options.dry_run,
                "lock_attempts": attempt,
                "write_pause_seconds": round(pause, 3),
                "final_sync": {
                    "run_id": sync_run,
                    "inserted": sum(p["inserted"] for p in synced),
                    "updated": sum(p["updated"] for p in synced),
                    "removed": sum(p["removed"] for p in synced),
                    "rejected": sum(p["rejected"] for p in synced),
                },
                **proof,
            }
            if not options.dry_run:
                set_legacy_read_only(legacy, settings, run_id)
                target.execute(
                    "INSERT INTO migration_audit.cutovers (run_id, state, cut_by, source_rows, target_rows, "
                    "rejected_rows, source_checksum, target_checksum, pause_seconds, lock_attempts, details) "
                    "VALUES (%s, 'active', %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                    (
                        run_id,
                        cut_by,
                        proof["source_rows"],
                        proof["target_rows"],
                        proof["rejected_rows"],
                        proof["source_checksum"],
                        proof["target_checksum"],
                        pause,
                        attempt,
                        Jsonb({"final_sync": result["final_sync"]}),
                    ),
                )
    return result


def _prove_equal(
    legacy: psycopg.Connection, target: psycopg.Connection, settings: Settings, sync_run: str
) -> dict[str, Any]:
    """Counts and checksums of the transformed legacy rows and of the target; raises if they differ."""
    mapping = settings.mapping
    source_rows = legacy.execute(
        sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(mapping.schema, mapping.users_table))
    ).fetchone()[0]
    state_rows, moved, source_checksum = target.execute(
        "SELECT count(*), count(*) FILTER (WHERE outcome = 'M'), "
        "coalesce(sum(fingerprint::numeric) FILTER (WHERE outcome = 'M'), 0) FROM migration_audit.source_state"
    ).fetchone()
    rejected = target.execute(
        "SELECT count(*) FROM migration_audit.rejected_rows WHERE run_id = %s", (sync_run,)
    ).fetchone()[0]
    target_rows, target_checksum = target.execute(target_checksum_sql()).fetchone()
    proof = {
        "source_rows": source_rows,
        "target_rows": target_rows,
        "rejected_rows": rejected,
        "source_checksum": str(source_checksum),
        "target_checksum": str(target_checksum),
    }
    problems = []
    if state_rows != source_rows:
        problems.append(f"the sync state covers {state_rows} legacy rows, the legacy table has {source_rows}")
    if moved != target_rows:
        problems.append(f"{moved} legacy rows should be in the target, it has {target_rows}")
    if moved + rejected != source_rows:
        problems.append(f"migrated {moved} + rejected {rejected} != legacy rows {source_rows}")
    if source_checksum != target_checksum:
        problems.append(
            f"checksum of the transformed legacy rows {source_checksum} != target's {target_checksum}"
        )
    if problems:
        raise CutoverRefused("cutover refused, source and target differ: " + "; ".join(problems))
    return proof
