"""Key conflicts of a merge: target users elsewhere holding an email or username a staged user
takes. Stale holders leave (their own partition writes their current values); a real holder wins
and the staged user is rejected for this pass, decided again by the next plan.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration.config import FIELDS, LegacyMapping, Settings
from user_migration.db import legacy_select_list, read_sql, users_table
from user_migration.transforms import (
    DUPLICATE_EMAIL,
    DUPLICATE_USERNAME,
    LegacyRow,
    NewUser,
    Transformer,
    email_key,
    jsonable_row,
)

if TYPE_CHECKING:
    from user_migration.partition_copy import PartitionResult

REJECTED_COPY = "COPY migration_audit.rejected_rows (run_id, source_id, reason, detail, source_row, rejected_at) FROM STDIN"


def legacy_names(settings: Settings) -> list[str]:
    """The legacy column name of each canonical field (the canonical name where unmapped)."""
    return [settings.mapping.column(name) or name for name in FIELDS]


def settle_conflicts(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    transformer: Transformer,
    result: PartitionResult,
    run_id: str,
    now: dt.datetime,
) -> None:
    """Target users elsewhere holding a key a staged user takes: stale holders leave, real ones win.

    The plan makes the moving rows unique, so a holder whose legacy row is gone, rejected or now
    has another key is stale: it is removed, and its own partition writes its current values. A
    holder that still has the key means a legacy row changed after the plan: the staged row is
    rejected for this pass, and the next pass's plan decides between them.
    """
    target.execute("ANALYZE stage_users")
    conflicts = target.execute(read_sql("copy/find_key_conflicts.sql")).fetchall()
    if not conflicts:
        return
    select = _legacy_rows_sql(settings.mapping)
    holders = sorted({holder for holder, _, _, _ in conflicts})
    stale, valid_users = _stale_holders(source, target, transformer, select, holders, run_id)
    if stale:
        # Still-valid holders move out of the way in place; the rest (and any that cannot) leave.
        result.holders_updated = _update_in_place(
            target, [valid_users[h] for h in stale if h in valid_users], now
        )
        result.displaced = target.execute(
            read_sql("copy/displace_stale_holders.sql"), {"ids": stale}
        ).rowcount
    losing = _losing_staged(conflicts, set(stale))
    if losing:
        _reject_for_this_pass(source, target, settings, result, select, losing, run_id, now)


def _legacy_rows_sql(mapping: LegacyMapping) -> sql.Composed:
    """The legacy users of a list of ids (%s), in legacy_select_list's columns."""
    return sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(
        legacy_select_list(mapping), users_table(mapping), sql.Identifier(mapping.column("id"))
    )


def _stale_holders(
    source: psycopg.Connection,
    target: psycopg.Connection,
    transformer: Transformer,
    select: sql.Composed,
    holders: list[int],
    run_id: str,
) -> tuple[list[int], dict[int, NewUser]]:
    """(holders whose keys in the target are not their legacy row's any more, valid holders' users).

    A holder is valid when its legacy row transforms and the plan did not make it a loser.
    """
    current = {
        holder: (email_key(email), username)
        for holder, email, username in target.execute(
            "SELECT id, email, username FROM account_newuser WHERE id = ANY(%s)", (holders,)
        ).fetchall()
    }
    holder_losers = {
        source_id
        for (source_id,) in target.execute(
            "SELECT source_id FROM migration_audit.plan_duplicates WHERE run_id = %s AND source_id = ANY(%s)",
            (run_id, holders),
        ).fetchall()
    }
    still_valid: dict[int, tuple[str, str]] = {}
    valid_users: dict[int, NewUser] = {}
    for values in source.execute(select, (holders,)).fetchall():
        user, _, _ = transformer.transform(LegacyRow(*values))
        if user is not None and user.id not in holder_losers:
            still_valid[user.id] = (email_key(user.email), user.username)
            valid_users[user.id] = user
    return [h for h in holders if still_valid.get(h) != current.get(h)], valid_users


def _losing_staged(conflicts: list[tuple], stale: set[int]) -> dict[int, tuple[str, str, int]]:
    """Staged users whose key a real (not stale) holder keeps: id -> (reason, detail, holder)."""
    losing: dict[int, tuple[str, str, int]] = {}
    for holder, staged, same_email, _ in conflicts:
        if holder not in stale and staged not in losing:
            reason, field_name = (
                (DUPLICATE_EMAIL, "email") if same_email else (DUPLICATE_USERNAME, "username")
            )
            losing[staged] = (
                reason,
                f"same {field_name} as user {holder}, which holds it; decided again next pass",
                holder,
            )
    return losing


def _reject_for_this_pass(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    result: PartitionResult,
    select: sql.Composed,
    losing: dict[int, tuple[str, str, int]],
    run_id: str,
    now: dt.datetime,
) -> None:
    """The losing staged users leave the stage and the target; their state, fixes and rejects follow."""
    ids = sorted(losing)
    target.execute("DELETE FROM stage_users WHERE id = ANY(%s)", (ids,))
    result.removed += target.execute("DELETE FROM account_newuser WHERE id = ANY(%s)", (ids,)).rowcount
    target.execute(
        "UPDATE stage_state AS s SET outcome = 'R', fingerprint = NULL, kept_id = h.holder "
        "FROM unnest(%s::bigint[], %s::bigint[]) AS h (id, holder) WHERE s.source_id = h.id",
        (ids, [losing[i][2] for i in ids]),
    )
    result.fixed -= target.execute(
        "DELETE FROM migration_audit.field_fixes WHERE run_id = %s AND source_id = ANY(%s)", (run_id, ids)
    ).rowcount
    names = legacy_names(settings)
    rows = source.execute(select, (ids,)).fetchall()  # before the COPY: it may be the same connection
    with target.cursor() as out, out.copy(REJECTED_COPY) as copy:
        for values in rows:
            reason, detail, _ = losing[values[0]]
            source_row = Jsonb(jsonable_row(dict(zip(names, values, strict=True))))
            copy.write_row((run_id, values[0], reason, detail, source_row, now))
            result.migrated -= 1
            result.count_reject(reason)


def _update_in_place(target: psycopg.Connection, users: list[NewUser], now: dt.datetime) -> int:
    """Stale holders still valid under another key take their current values in place; returns how many.

    Deleting them would take what lives only in the target (profile, addresses, activity,
    notifications: ON DELETE CASCADE) with them. One whose new key another holder still has is tried
    again once that one moved; one whose key stays taken (a swap, a staged user) is displaced.
    """
    updated, pending = 0, users
    while pending:
        refused = []
        for user in pending:
            try:
                with target.transaction():  # a savepoint: a refused update leaves the rest intact
                    updated += target.execute(
                        read_sql("copy/update_stale_holder.sql"), {**user._asdict(), "now": now}
                    ).rowcount
            except psycopg.errors.UniqueViolation:
                refused.append(user)
        if len(refused) == len(pending):
            break
        pending = refused
    return updated
