"""The plan of a run: id partitions for the copy, and which rows lose to a duplicate.

Duplicates are decided once, globally, before any partition runs: SQL finds the few rows that can
share an email or username with another row, the transform rules decide which of those are valid,
and the lowest valid id of each group wins. Partitions only read that decision, so the outcome never
depends on batch size, partition count or the order partitions run in.

A quiet pass takes the last plan's decision over instead of scanning the table again, when it can
prove that the legacy table did not change since that plan's snapshot (reusable_decision): the
decision is a function of the rows and the transform rules only. The plan records which run's
decision it took, or why it scanned (plans.duplicates_from, plans.duplicates_note).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import sqlite3
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration import capture, deferred_indexes, deferred_keys
from user_migration.config import LegacyMapping, Settings
from user_migration.db import legacy_select_list, read_sql, users_table
from user_migration.transforms import (
    DOB_IN_FUTURE,
    DUPLICATE_EMAIL,
    DUPLICATE_USERNAME,
    INVALID_DATE_OF_BIRTH,
    LegacyRow,
    Transformer,
    email_key,
)

# Characters for which PostgreSQL's lower(btrim(x)) under "C" equals Python's x.strip().lower().
ASCII_BLANK = " \t\n\r\x0b\x0c"
PLAIN_EMAIL_PATTERN = "^[ -~" + ASCII_BLANK + "]*$"
STREAM_ROWS = 10_000
# The claims among a batch's keys (given as one JSON array, whatever the batch size).
EMAIL_CLAIMS = "SELECT key, id FROM email_claims WHERE key IN (SELECT value FROM json_each(?))"
USERNAME_CLAIMS = "SELECT key, id FROM username_claims WHERE key IN (SELECT value FROM json_each(?))"


@dataclass(frozen=True)
class Reuse:
    """Whether a plan takes over the last plan's duplicate decision: ``base`` is that run, or None."""

    base: str | None
    note: str
    duplicates: int = 0


@dataclass(frozen=True)
class Duplicate:
    source_id: int
    reason: str
    kept_id: int


def _format(name: str, mapping: LegacyMapping) -> sql.Composed:
    return sql.SQL(read_sql(f"plan/{name}.sql")).format(
        users=users_table(mapping),
        id=sql.Identifier(mapping.column("id")),
        email=sql.Identifier(mapping.column("email")),
        username=sql.Identifier(mapping.column("username")),
        select_list=legacy_select_list(mapping),
    )


def partition_ranges(
    conn: psycopg.Connection, mapping: LegacyMapping, partitions: int
) -> tuple[int, list[tuple[int, int]]]:
    """(source row count, inclusive id ranges covering min..max); one empty range for an empty table."""
    count, low, high = conn.execute(_format("source_stats", mapping)).fetchone()
    if not count:
        return 0, [(0, 0)]
    fractions = [i / partitions for i in range(1, partitions)]
    bounds: list[int] = []
    if fractions:
        bounds = conn.execute(_format("partition_bounds", mapping), {"fractions": fractions}).fetchone()[0]
    ranges: list[tuple[int, int]] = []
    start = low
    for bound in [*sorted(set(bounds)), high]:
        if bound < start:
            continue
        ranges.append((start, bound))
        start = bound + 1
    return count, ranges


class DuplicateLedger:
    """Who first claimed each email key and username, and who lost to them: on disk, not in memory.

    The rule is sequential (a loser claims nothing), and the candidates grow with the table, so they
    live in a private SQLite file (folder 0700, deleted on close; it holds emails and usernames),
    looked up once per batch: memory stays the size of one batch
    (docs/decisions/0003-duplicate-ledger-in-sqlite.md).
    """

    def __init__(self) -> None:
        self._folder = tempfile.mkdtemp(prefix="user-migration-plan-")
        self._db = sqlite3.connect(os.path.join(self._folder, "ledger.sqlite3"), isolation_level=None)
        self._db.executescript(read_sql("plan/ledger.sqlite.sql"))
        self.losers = 0

    def __enter__(self) -> DuplicateLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._db.close()
        shutil.rmtree(self._folder, ignore_errors=True)

    def _claims(self, query: str, keys: list[str]) -> dict[str, int]:
        return dict(self._db.execute(query, (json.dumps(keys, ensure_ascii=False),)))

    def decide(self, batch: list[tuple[int, str, str]]) -> None:
        """Decide a batch of valid candidates (id, email key, username), given in id order."""
        if not batch:
            return
        emails = self._claims(EMAIL_CLAIMS, [email for _, email, _ in batch])
        usernames = self._claims(USERNAME_CLAIMS, [username for _, _, username in batch])
        losers: list[tuple[int, str, int]] = []
        winners: list[tuple[int, str, str]] = []
        for row_id, email, username in batch:  # the lowest valid id of a key claims it
            if email in emails:
                losers.append((row_id, DUPLICATE_EMAIL, emails[email]))
            elif username in usernames:
                losers.append((row_id, DUPLICATE_USERNAME, usernames[username]))
            else:
                emails[email] = usernames[username] = row_id
                winners.append((row_id, email, username))
        db = self._db
        db.execute("BEGIN")
        db.executemany("INSERT INTO email_claims (key, id) VALUES (?, ?)", ((e, i) for i, e, _ in winners))
        db.executemany("INSERT INTO username_claims (key, id) VALUES (?, ?)", ((u, i) for i, _, u in winners))
        db.executemany("INSERT INTO losers (id, reason, kept_id) VALUES (?, ?, ?)", losers)
        db.execute("COMMIT")
        self.losers += len(losers)

    def __iter__(self) -> Iterator[Duplicate]:
        for row in self._db.execute("SELECT id, reason, kept_id FROM losers ORDER BY id"):
            yield Duplicate(*row)


def find_duplicates(
    conn: psycopg.Connection, mapping: LegacyMapping, transformer: Transformer, ledger: DuplicateLedger
) -> None:
    """Record in ``ledger`` the rows that lose to a lower valid id with the same email key or username.

    Both queries stream through server-side cursors in id order and the decisions go to the ledger a
    batch at a time, so memory holds one batch of candidates, never all of them.
    """
    unusual_keys: set[str] = set()
    with conn.cursor(name="plan_unusual_emails", row_factory=_legacy_rows) as cur:
        cur.itersize = STREAM_ROWS
        cur.execute(_format("unusual_emails", mapping), {"plain": PLAIN_EMAIL_PATTERN})
        for row in cur:
            user, _, _ = transformer.transform(row)
            if user is not None:
                unusual_keys.add(email_key(user.email))

    params = {"plain": PLAIN_EMAIL_PATTERN, "blank": ASCII_BLANK, "keys": sorted(unusual_keys)}
    batch: list[tuple[int, str, str]] = []
    with conn.cursor(name="plan_duplicate_candidates", row_factory=_legacy_rows) as cur:
        cur.itersize = STREAM_ROWS
        cur.execute(_format("duplicate_candidates", mapping), params)
        for row in cur:  # in id order
            user, _reject, _ = transformer.transform(row)
            if user is None:
                continue  # rejected for its own reason; it claims nothing
            batch.append((row.id, email_key(user.email), user.username))
            if len(batch) >= STREAM_ROWS:
                ledger.decide(batch)
                batch = []
    ledger.decide(batch)


def log_entries(source: psycopg.Connection, mapping: LegacyMapping) -> int:
    """The change log's entries for users visible in the caller's snapshot (markers excluded)."""
    return source.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE source_id IS NOT NULL").format(capture.log_table(mapping))
    ).fetchone()[0]


def _log_markers(source: psycopg.Connection, mapping: LegacyMapping) -> int:
    """TRUNCATE markers in the change log, in the caller's snapshot."""
    return source.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE source_id IS NULL").format(capture.log_table(mapping))
    ).fetchone()[0]


def reusable_decision(
    target: psycopg.Connection, run_id: str, transform_settings: int, as_of: dt.date
) -> Reuse:
    """Whether the last plan's duplicate decision still holds, with the reason either way.

    Call it only in a pass that reads a trusted change log which is empty in the plan's snapshot.
    The decision is a function of the legacy rows and the transform rules: it holds when neither
    changed since that plan's snapshot (plan/reusable_duplicates.sql says how the first is proved).
    The rules are the transform settings and the pass date, through the date-of-birth rule only:
    a row rejected as born in the future may be valid a day later.
    """
    row = target.execute(
        read_sql("plan/reusable_duplicates.sql"),
        {"run_id": run_id, "dob_reason": INVALID_DATE_OF_BIRTH, "dob_future": DOB_IN_FUTURE},
    ).fetchone()
    if row is None:
        return Reuse(None, "full scan: no earlier plan to take the decision from")
    (
        base,
        duplicates,
        logged,
        consumed,
        consumed_since,
        settings,
        base_as_of,
        stored,
        planned,
        done,
        future,
    ) = row
    why_not = None
    if logged is None:
        why_not = f"plan of run {base} did not record the change log it saw"
    elif consumed != logged:
        why_not = (
            f"run {base}'s partitions consumed {consumed} change-log entries, its plan saw {logged}: "
            "the legacy table changed after that plan"
        )
    elif consumed_since:
        why_not = f"runs after {base} consumed {consumed_since} change-log entries"
    elif settings != transform_settings:
        why_not = f"the transform settings differ from run {base}'s"
    elif stored != duplicates:
        why_not = f"run {base} holds {stored} of its {duplicates} duplicate decisions"
    elif base_as_of > as_of.isoformat():  # a worker's clock behind the base plan's (Celery)
        why_not = f"run {base} was planned on {base_as_of}, a later date than this pass's {as_of}"
    elif base_as_of != as_of.isoformat() and (done != planned or future):
        why_not = f"run {base} was planned on {base_as_of}: " + (
            f"{future} rows rejected as born in the future may be valid now"
            if future
            else "it did not finish"
        )
    if why_not is not None:
        return Reuse(None, f"full scan: {why_not}")
    return Reuse(
        base,
        f"taken over from run {base}: the change log was empty and no change was consumed since its plan, "
        "under the same transform settings",
        duplicates,
    )


def _legacy_rows(cursor: psycopg.Cursor):
    def make(values: tuple[Any, ...]) -> LegacyRow:
        return LegacyRow(*values)

    return make


def _reuse_if_log_empty(
    source: psycopg.Connection,
    target: psycopg.Connection,
    mapping: LegacyMapping,
    logged: int | None,
    run_id: str,
    transform_settings: int,
    as_of: dt.date,
) -> Reuse:
    """In a pass reading the log, in the plan's snapshot: scan unless the log is empty, markers too."""
    markers = _log_markers(source, mapping)
    if logged:
        return Reuse(None, f"full scan: the change log holds {logged} entries")
    if markers:  # a TRUNCATE after capture.prepare's look: the table may be anything
        return Reuse(None, f"full scan: the change log holds {markers} TRUNCATE markers")
    return reusable_decision(target, run_id, transform_settings, as_of)


def _cover_known_ids(
    target: psycopg.Connection, ranges: list[tuple[int, int]], count: int
) -> tuple[list[tuple[int, int]], bool]:
    """Widen the ranges to every id the target and the sync state hold; and whether the target is empty."""
    held, known_min, known_max = target.execute(read_sql("plan/target_ids.sql")).fetchone()
    if known_min is not None and not count:
        ranges = [(known_min, known_max)]
    elif known_min is not None:
        ranges[0] = (min(ranges[0][0], known_min), ranges[0][1])
        ranges[-1] = (ranges[-1][0], max(ranges[-1][1], known_max))
    return ranges, held == 0


def _record_duplicates(
    target: psycopg.Connection, run_id: str, reuse: Reuse, ledger: DuplicateLedger
) -> None:
    """The plan's losers: copied from the base plan it took over, else from this scan's ledger."""
    if reuse.base is not None:
        target.execute(
            "INSERT INTO migration_audit.plan_duplicates (run_id, source_id, reason, kept_id) "
            "SELECT %s, source_id, reason, kept_id FROM migration_audit.plan_duplicates WHERE run_id = %s",
            (run_id, reuse.base),
        )
        return
    with (
        target.cursor() as cur,
        cur.copy(
            "COPY migration_audit.plan_duplicates (run_id, source_id, reason, kept_id) FROM STDIN"
        ) as copy,
    ):
        for dup in ledger:
            copy.write_row((run_id, dup.source_id, dup.reason, dup.kept_id))


@dataclass
class _Snapshot:
    """What the plan read in its source snapshot: the rows, their ranges, the log seen, the reuse."""

    count: int
    ranges: list[tuple[int, int]]
    logged: int | None
    reuse: Reuse


def _capture_mode(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    own_snapshot: bool,
) -> capture.Mode:
    """Build indexes a failed run left deferred, and prepare change capture (none in a dry run)."""
    mode = capture.Mode("full", "dry run: no change capture", installed=False)
    if not settings.dry_run:
        deferred_indexes.build(source, target, settings)  # left by a run that failed before its build
        if own_snapshot:  # before any snapshot the partitions read in (see capture.prepare)
            mode = capture.prepare(
                source, target, settings.mapping, settings.full_reconcile, run_id, settings.lock_timeout_ms
            )
    return mode


def _read_snapshot(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    mode: capture.Mode,
    run_id: str,
    as_of: dt.date,
    own_snapshot: bool,
    transform_settings: int,
    transformer: Transformer,
    ledger: DuplicateLedger,
) -> _Snapshot:
    """In one source snapshot: the ranges, the log seen, and the duplicates (taken over or scanned)."""
    mapping = settings.mapping
    logged: int | None = None
    reuse = Reuse(None, f"full scan: the pass compares every row ({mode.reason})")
    with source.transaction():
        if own_snapshot:
            source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        count, ranges = partition_ranges(source, mapping, settings.partitions)
        if mode.installed:  # what this snapshot saw of the log, for a later plan's proof
            logged = log_entries(source, mapping)
        if not own_snapshot:
            reuse = Reuse(None, "full scan: planned inside the caller's transaction")
        elif mode.changes == "log":
            reuse = _reuse_if_log_empty(source, target, mapping, logged, run_id, transform_settings, as_of)
        if count and reuse.base is None:
            find_duplicates(source, mapping, transformer, ledger)
    return _Snapshot(count, ranges, logged, reuse)


def _partitions(
    ranges: list[tuple[int, int]], as_of: dt.date, initial_load: bool, mode: capture.Mode
) -> list[dict[str, Any]]:
    """The plan's partitions, one per id range, each with what its copy needs to know."""
    return [
        {
            "partition_no": no,
            "lo": lo,
            "hi": hi,
            "as_of": as_of.isoformat(),
            "initial_load": initial_load,
            "changes": mode.changes,
            "capture": mode.installed,
        }
        for no, (lo, hi) in enumerate(ranges)
    ]


def _replace_plan_row(
    target: psycopg.Connection,
    run_id: str,
    snap: _Snapshot,
    partitions: list[dict[str, Any]],
    duplicates: int,
    mode: capture.Mode,
    transform_settings: int,
) -> None:
    """Delete an earlier attempt's plan of ``run_id`` and its duplicates, and insert this one's row."""
    count, ranges, reuse = snap.count, snap.ranges, snap.reuse
    target.execute("DELETE FROM migration_audit.plan_duplicates WHERE run_id = %s", (run_id,))
    target.execute("DELETE FROM migration_audit.plans WHERE run_id = %s", (run_id,))
    target.execute(
        "INSERT INTO migration_audit.plans (run_id, source_rows, min_id, max_id, partitions, duplicates, "
        "changes, changes_reason, capture_markers, log_entries, transform_settings, duplicates_from, "
        "duplicates_note) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
        (
            run_id,
            count,
            ranges[0][0] if count else None,
            ranges[-1][1] if count else None,
            Jsonb(partitions),
            duplicates,
            mode.changes,
            mode.reason,
            list(mode.markers),
            snap.logged,
            transform_settings,
            reuse.base,
            reuse.note,
        ),
    )


def make_plan(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    as_of: dt.date,
    own_snapshot: bool = True,
) -> dict[str, Any]:
    """Compute and record the plan of ``run_id`` (replacing an earlier attempt's); returns it.

    With ``own_snapshot=False`` the caller holds the source transaction (the cutover, under its lock).
    """
    transformer = Transformer(settings.phone_region, settings.invalid_phone, today=as_of)
    mode = _capture_mode(source, target, settings, run_id, own_snapshot)
    transform_settings = settings.transform_fingerprint()
    with DuplicateLedger() as ledger:
        snap = _read_snapshot(
            source,
            target,
            settings,
            mode,
            run_id,
            as_of,
            own_snapshot,
            transform_settings,
            transformer,
            ledger,
        )
        reuse = snap.reuse
        duplicates = reuse.duplicates if reuse.base is not None else ledger.losers
        # An empty target is loaded with plain COPY; once it holds users, partitions merge instead. The
        # ranges also cover every id already in the target and in the sync state, so users deleted from
        # the legacy table leave, and so does the state of a deleted reject above every legacy id (the
        # cutover's proof counts state rows against legacy rows).
        initial_load = False
        if not settings.dry_run:
            snap.ranges, initial_load = _cover_known_ids(target, snap.ranges, snap.count)
        partitions = _partitions(snap.ranges, as_of, initial_load, mode)
        with target.transaction():
            _replace_plan_row(target, run_id, snap, partitions, duplicates, mode, transform_settings)
            _record_duplicates(target, run_id, reuse, ledger)
            first_load = initial_load and own_snapshot and snap.count
            deferred = deferred_indexes.defer(target, run_id) if first_load else []
        # After the plan's commit, each in a short transaction of its own: dropping a key locks
        # the application's auth_group or auth_permission (deferred_keys.defer).
        deferred_link_keys = (
            deferred_keys.defer(target, run_id, settings.lock_timeout_ms) if first_load else []
        )
    return {
        "source_rows": snap.count,
        "changes": mode.changes,
        "changes_reason": mode.reason,
        "duplicates": duplicates,
        "duplicates_from": reuse.base,
        "duplicates_note": reuse.note,
        "partitions": partitions,
        "deferred_indexes": deferred,
        "deferred_keys": deferred_link_keys,
    }
