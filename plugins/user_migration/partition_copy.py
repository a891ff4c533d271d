"""Copy one id partition of legacy users into the target: stream, transform, COPY, account.

A partition is one target transaction: its users, links, rejects, field fixes, batch records and
counts commit together or not at all, so a killed or retried attempt leaves nothing half-done.
Re-running a partition changes nothing that is already right: a range with no target rows yet is
loaded straight into account_newuser with COPY (the fast path of a first load); otherwise rows go
through a temporary stage table and are merged (insert new, update changed, keep identical, remove
vanished). Memory stays bounded by ``batch_size``: rows are read with a server-side cursor.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration.config import FIELDS, LinkTable, Settings
from user_migration.db import MigrationError, legacy_select_list, read_sql, safe_error, users_table
from user_migration.faults import kill_after_batch
from user_migration.transforms import LegacyRow, NewUser, Reject, Transformer, jsonable_row

USER_COLUMNS = NewUser._fields
TARGET_LINKS = {
    "groups": ("account_newuser_groups", "group_id"),
    "permissions": ("account_newuser_user_permissions", "permission_id"),
}


@dataclass
class PartitionResult:
    partition_no: int
    lo: int
    hi: int
    rows_in: int = 0
    migrated: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    displaced: int = 0
    rejected: int = 0
    fixed: int = 0
    links_in: int = 0
    links_inserted: int = 0
    links_removed: int = 0
    batches: int = 0
    seconds: float = 0.0
    path: str = ""
    rejected_by_reason: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _legacy_names(settings: Settings) -> list[str]:
    """The legacy column name of each canonical field (the canonical name where unmapped)."""
    return [settings.mapping.column(name) or name for name in FIELDS]


def _mark(
    target: psycopg.Connection, run_id: str, partition: dict[str, Any], state: str, error: str | None
) -> None:
    with target.transaction():
        target.execute(
            """
            INSERT INTO migration_audit.partitions (run_id, partition_no, lo_id, hi_id, state, error)
            VALUES (%(run_id)s, %(no)s, %(lo)s, %(hi)s, %(state)s, %(error)s)
            ON CONFLICT (run_id, partition_no) DO UPDATE SET
                state = EXCLUDED.state,
                error = EXCLUDED.error,
                attempts = migration_audit.partitions.attempts + (EXCLUDED.state = 'running')::int,
                started_at = CASE WHEN EXCLUDED.state = 'running' THEN clock_timestamp()
                                  ELSE migration_audit.partitions.started_at END,
                finished_at = CASE WHEN EXCLUDED.state = 'running' THEN NULL ELSE clock_timestamp() END
            """,
            {
                "run_id": run_id,
                "no": partition["partition_no"],
                "lo": partition["lo"],
                "hi": partition["hi"],
                "state": state,
                "error": error,
            },
        )


def copy_partition(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    partition: dict[str, Any],
) -> PartitionResult:
    """Move one partition; safe to retry or re-run. Raises MigrationError without row values."""
    _mark(target, run_id, partition, "running", None)
    try:
        result = _copy(source, target, settings, run_id, partition)
    except Exception as exc:
        for conn in (source, target):
            if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                conn.rollback()
        reason = safe_error(exc)
        if not target.closed and not target.broken:
            _mark(target, run_id, partition, "failed", reason)
        raise MigrationError(
            f"partition {partition['partition_no']} (ids {partition['lo']}..{partition['hi']}) failed: {reason}. "
            "Nothing of this attempt was kept; a retry starts the partition again"
        ) from None
    return result


def _copy(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    partition: dict[str, Any],
) -> PartitionResult:
    started = time.perf_counter()
    lo, hi, no = partition["lo"], partition["hi"], partition["partition_no"]
    mapping = settings.mapping
    transformer = Transformer(
        settings.phone_region, settings.invalid_phone, today=dt.date.fromisoformat(partition["as_of"])
    )
    now = dt.datetime.now(dt.UTC)
    result = PartitionResult(no, lo, hi)
    legacy_names = _legacy_names(settings)
    dry_run = settings.dry_run

    with target.transaction():
        losers = {
            source_id: (reason, kept_id)
            for source_id, reason, kept_id in target.execute(
                "SELECT source_id, reason, kept_id FROM migration_audit.plan_duplicates "
                "WHERE run_id = %s AND source_id BETWEEN %s AND %s",
                (run_id, lo, hi),
            )
        }
        for table in ("rejected_rows", "field_fixes"):
            target.execute(
                sql.SQL(
                    "DELETE FROM migration_audit.{} WHERE run_id = %s AND source_id BETWEEN %s AND %s"
                ).format(sql.Identifier(table)),
                (run_id, lo, hi),
            )
        target.execute(
            "DELETE FROM migration_audit.batches WHERE run_id = %s AND partition_no = %s", (run_id, no)
        )
        if dry_run:
            result.path = "dry_run"
            load_table = None
        elif (
            not partition.get("initial_load")
            or target.execute(
                "SELECT EXISTS (SELECT 1 FROM account_newuser WHERE id BETWEEN %s AND %s)", (lo, hi)
            ).fetchone()[0]
        ):
            # The target held users when the run was planned (or this range was loaded already): merge.
            result.path = "merge"
            target.execute(
                "CREATE TEMP TABLE stage_users ON COMMIT DROP AS "
                "SELECT id, password, last_login, is_superuser, email, username, full_name, date_of_birth, "
                "phone_number, is_active, is_staff FROM account_newuser WITH NO DATA"
            )
            load_table = sql.Identifier("stage_users")
        else:
            result.path = "load"
            load_table = sql.Identifier("account_newuser")

        users_copy = (
            sql.SQL("COPY {} ({}) FROM STDIN").format(
                load_table,
                sql.SQL(", ").join(
                    map(
                        sql.Identifier,
                        [*USER_COLUMNS, *(["joined_at", "updated_at"] if result.path == "load" else [])],
                    )
                ),
            )
            if load_table is not None
            else None
        )
        stamps = (now, now) if result.path == "load" else ()

        with source.transaction():
            source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            query = sql.SQL("SELECT {} FROM {} WHERE {} BETWEEN %s AND %s ORDER BY {}").format(
                legacy_select_list(mapping),
                users_table(mapping),
                sql.Identifier(mapping.column("id")),
                sql.Identifier(mapping.column("id")),
            )
            with source.cursor(name=f"partition_{no}") as cursor, target.cursor() as out:
                cursor.itersize = settings.batch_size
                cursor.execute(query, (lo, hi))
                batch_no = 0
                while rows := cursor.fetchmany(settings.batch_size):
                    batch_started = time.perf_counter()
                    good: list[NewUser] = []
                    rejects: list[tuple[Any, ...]] = []
                    fixes: list[tuple[Any, ...]] = []
                    for values in rows:
                        row = LegacyRow(*values)
                        user, reject, row_fixes = transformer.transform(row)
                        if user is not None and row.id in losers:
                            reason, kept_id = losers[row.id]
                            field_name = "email" if reason == "duplicate_email" else "username"
                            user, reject, row_fixes = (
                                None,
                                Reject(reason, f"same {field_name} as user {kept_id}, which is kept"),
                                [],
                            )
                        if user is None:
                            rejects.append(
                                (
                                    run_id,
                                    row.id,
                                    reject.reason,
                                    reject.detail,
                                    Jsonb(jsonable_row(dict(zip(legacy_names, values, strict=True)))),
                                    now,
                                )
                            )
                            result.rejected_by_reason[reject.reason] = (
                                result.rejected_by_reason.get(reject.reason, 0) + 1
                            )
                            continue
                        good.append(user)
                        for fix in row_fixes:
                            fixes.append(
                                (run_id, row.id, fix.field, fix.original_value, fix.new_value, fix.reason)
                            )
                    if users_copy is not None and good:
                        with out.copy(users_copy) as copy:
                            for user in good:
                                copy.write_row((*user, *stamps))
                    if rejects:
                        with out.copy(
                            "COPY migration_audit.rejected_rows (run_id, source_id, reason, detail, source_row, rejected_at) FROM STDIN"
                        ) as copy:
                            for item in rejects:
                                copy.write_row(item)
                    if fixes:
                        with out.copy(
                            "COPY migration_audit.field_fixes (run_id, source_id, field, original_value, new_value, reason) FROM STDIN"
                        ) as copy:
                            for item in fixes:
                                copy.write_row(item)
                    out.execute(
                        "INSERT INTO migration_audit.batches (run_id, partition_no, batch_no, first_id, last_id, "
                        "rows_in, rows_ok, rejected, seconds) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                        (
                            run_id,
                            no,
                            batch_no,
                            rows[0][0],
                            rows[-1][0],
                            len(rows),
                            len(good),
                            len(rejects),
                            time.perf_counter() - batch_started,
                        ),
                    )
                    kill_after_batch(batch_no)
                    batch_no += 1
                    result.rows_in += len(rows)
                    result.migrated += len(good)
                    result.rejected += len(rejects)
                    result.fixed += len(fixes)
                result.batches = batch_no

            if result.path == "merge":
                params = {"lo": lo, "hi": hi, "now": now}
                # Removals first: a key a vanished or displaced row holds may be taken by a merged row.
                result.removed = target.execute(read_sql("copy/remove_vanished_users.sql"), params).rowcount
                result.displaced = target.execute(read_sql("copy/displace_conflicting_users.sql")).rowcount
                result.inserted, result.updated = target.execute(
                    read_sql("copy/merge_users.sql"), params
                ).fetchone()
                result.unchanged = result.migrated - result.inserted - result.updated
            elif result.path == "load":
                result.inserted = result.migrated

            for key, link in (("groups", mapping.groups), ("permissions", mapping.permissions)):
                if link is not None:
                    _copy_links(
                        source, target, mapping.schema, link, TARGET_LINKS[key], lo, hi, result, dry_run
                    )

        result.seconds = round(time.perf_counter() - started, 3)
        target.execute(
            """
            UPDATE migration_audit.partitions SET
                state = 'done', rows_in = %(rows_in)s, inserted = %(inserted)s, updated = %(updated)s,
                unchanged = %(unchanged)s, removed = %(removed)s, displaced = %(displaced)s, rejected = %(rejected)s, fixed = %(fixed)s,
                links_in = %(links_in)s, finished_at = clock_timestamp(), seconds = %(seconds)s, error = NULL
            WHERE run_id = %(run_id)s AND partition_no = %(partition_no)s
            """,
            {**result.as_dict(), "run_id": run_id},
        )
    return result


def _copy_links(
    source: psycopg.Connection,
    target: psycopg.Connection,
    schema: str,
    link: LinkTable,
    target_link: tuple[str, str],
    lo: int,
    hi: int,
    result: PartitionResult,
    dry_run: bool,
) -> None:
    """Bring the target's links of this range in line with the legacy link table."""
    query = sql.SQL(
        "SELECT id, {user}, {other} FROM {table} WHERE {user} BETWEEN %s AND %s ORDER BY id"
    ).format(
        user=sql.Identifier(link.user_column),
        other=sql.Identifier(link.other_column),
        table=sql.Identifier(schema, link.table),
    )
    table, other = target_link
    if not dry_run:
        target.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_links (id bigint, user_id bigint, other_id integer) ON COMMIT DROP"
        )
        target.execute("TRUNCATE stage_links")
    count = 0
    if dry_run:
        count_query = sql.SQL("SELECT count(*) FROM {table} WHERE {user} BETWEEN %s AND %s").format(
            user=sql.Identifier(link.user_column), table=sql.Identifier(schema, link.table)
        )
        count = source.execute(count_query, (lo, hi)).fetchone()[0]
    else:
        with (
            source.cursor(name=f"links_{link.table}") as cur,
            target.cursor().copy("COPY stage_links (id, user_id, other_id) FROM STDIN") as copy,
        ):
            cur.itersize = 10_000
            cur.execute(query, (lo, hi))
            for row in cur:
                copy.write_row(row)
                count += 1
    result.links_in += count
    if dry_run:
        return
    names = {"links": sql.Identifier(table), "other": sql.Identifier(other)}
    params = {"lo": lo, "hi": hi}
    result.links_removed += target.execute(
        sql.SQL(read_sql("copy/remove_stale_links.sql")).format(**names), params
    ).rowcount
    result.links_inserted += target.execute(
        sql.SQL(read_sql("copy/merge_links.sql")).format(**names), params
    ).rowcount
