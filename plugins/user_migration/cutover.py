"""The cutover: a switch from the legacy tables to the new ones whose pause does not grow with the table.

1. Hold the new tables against other writers (EXCLUSIVE, reads go on) for the whole switch.
2. Catch up from the change log (capture.py) without locking the legacy tables, until the backlog
   is small; again after step 3, whose full scans take time in proportion to the table.
3. Verify in full, still without the legacy lock: the target's count and checksum equal the sync
   state's (and, for a rehearsal or on demand, every legacy row's hash equals the state's unless
   the log names it). Count the legacy users in one snapshot.
4. Lock the legacy tables in EXCLUSIVE mode (reads go on, writes wait) with a ``lock_timeout`` and
   bounded retries with backoff, so a busy table makes the cutover give up cleanly.
5. Apply the last changes in the log, and prove equality incrementally: the sums verified in 3 plus
   what the final sync changed (summed by triggers on the target tables from their transition
   tables), and the legacy count of 3 plus the log's inserts and deletes since.
6. Make the legacy tables read-only (writes fail naming the new table), record the cutover,
   commit. The capture triggers stay (they never fire again) until a rollback drops them. The pause is steps 4 to 6, from the lock request (writes queue behind it
   while it waits for open writes) to the legacy commit: work proportional to the last changes.
With ``dry_run`` every step runs, then everything is rolled back and the pause is reported.

With a separate target database the target commits first, recording the cutover as 'switching',
then the legacy side, then the cutover becomes 'active'. If the legacy commit fails, the next run
(or a retry) finds 'switching' with a writable legacy table and marks it 'abandoned'
(resolve_pending): passes go on and the cutover can be tried again; nothing is left half-switched.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration import capture, privileges, validation_reuse
from user_migration.config import Settings
from user_migration.db import read_sql
from user_migration.errors import MigrationError
from user_migration.finalize import init_profiles_for, legacy_id_floors
from user_migration.fingerprint import fingerprint_sql, row_hash_sql, target_checksum_sql
from user_migration.partition_copy import copy_partition

READ_ONLY_FUNCTION = "user_migration_read_only"
READ_ONLY_TRIGGER = "user_migration_read_only"
NEW_TABLE = "account_newuser"
NEW_TABLES = ("account_newuser", "account_newuser_groups", "account_newuser_user_permissions")


class CutoverRefused(MigrationError):
    """The cutover cannot happen now; nothing was changed."""


@dataclass(frozen=True)
class CutoverOptions:
    lock_timeout_ms: int = 3000
    attempts: int = 5
    backoff_seconds: float = 0.5
    dry_run: bool = False
    # Catch up without the lock until at most this many users wait in the change log; after the full
    # verification, until at most final_backlog do (those are applied under the lock).
    max_backlog: int = 1000
    final_backlog: int = 50
    catch_up_rounds: int = 20
    # Hash every legacy row against the sync state before the lock; None: only when rehearsing.
    full_verify: bool | None = None


@dataclass(frozen=True)
class _Job:
    legacy: psycopg.Connection
    target: psycopg.Connection
    settings: Settings
    run_id: str
    as_of: dt.date
    cut_by: str
    options: CutoverOptions

    @property
    def same(self) -> bool:
        return self.legacy is self.target


def legacy_tables(settings: Settings) -> list[sql.Identifier]:
    mapping = settings.mapping
    names = [mapping.users_table] + [link.table for link in (mapping.groups, mapping.permissions) if link]
    return [sql.Identifier(mapping.schema, name) for name in names]


def legacy_lock_order(settings: Settings) -> list[sql.Identifier]:
    """The legacy tables in the order a cutover locks them: the link tables first, the users last.

    LOCK TABLE takes its tables one by one, and a transaction that writes them in the other order
    deadlocks with it. Django deletes a user's links before the user, in one transaction; the
    cutover takes that order, and retries the attempt PostgreSQL aborts after any other deadlock.
    """
    tables = legacy_tables(settings)
    return tables[1:] + tables[:1]


def active_cutover(target: psycopg.Connection) -> dict[str, Any] | None:
    if target.execute("SELECT to_regclass('migration_audit.cutovers')").fetchone()[0] is None:
        return None  # no run has written to this target yet
    row = target.execute(
        "SELECT id, run_id, cut_at, cut_by FROM migration_audit.cutovers WHERE state = 'active'"
    ).fetchone()
    return None if row is None else {"id": row[0], "run_id": row[1], "cut_at": row[2], "cut_by": row[3]}


def legacy_is_read_only(legacy: psycopg.Connection, settings: Settings) -> bool:
    users = legacy_tables(settings)[0]
    return legacy.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s)",
        (users.as_string(legacy), READ_ONLY_TRIGGER),
    ).fetchone()[0]


def resolve_pending(legacy: psycopg.Connection, target: psycopg.Connection, settings: Settings) -> str | None:
    """Finish a cutover left 'switching' by a failed legacy commit; returns its new state, if any.

    The legacy side commits its read-only triggers and nothing else, so they tell whether it did.
    """
    if target.execute("SELECT to_regclass('migration_audit.cutovers')").fetchone()[0] is None:
        return None
    row = target.execute("SELECT id FROM migration_audit.cutovers WHERE state = 'switching'").fetchone()
    if row is None:
        return None
    state = "active" if legacy_is_read_only(legacy, settings) else "abandoned"
    with target.transaction():
        target.execute(
            "UPDATE migration_audit.cutovers SET state = %s, details = coalesce(details, '{}'::jsonb) || %s "
            "WHERE id = %s",
            (
                state,
                Jsonb({"resolved": f"the legacy side {'had' if state == 'active' else 'had not'} committed"}),
                row[0],
            ),
        )
    return state


def set_legacy_read_only(legacy: psycopg.Connection, settings: Settings, run_id: str | None) -> None:
    """Install (run_id given) or remove (None) the read-only triggers on every legacy table.

    Making the tables writable again (a rollback) also drops the change capture left in place at the
    cutover: passes then resume with a full comparison that installs it afresh.
    """
    function = sql.Identifier(settings.mapping.schema, READ_ONLY_FUNCTION)
    if run_id is None:
        capture.remove(legacy, settings.mapping)
    for table in legacy_tables(settings):
        if run_id is None:
            legacy.execute(sql.SQL(read_sql("cutover/make_legacy_writable.sql")).format(table=table))
        else:
            legacy.execute(
                sql.SQL(read_sql("cutover/make_legacy_read_only.sql")).format(
                    function=function, table=table, target=sql.Literal(NEW_TABLE), run_id=sql.Literal(run_id)
                )
            )


def _lock_holders(conn: psycopg.Connection, tables: list[sql.Identifier]) -> str:
    oids = [
        conn.execute("SELECT %s::regclass::oid", (table.as_string(conn),)).fetchone()[0] for table in tables
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
    # The rehearsal is options.dry_run (everything rolled back); the sync itself must run for real,
    # even when the DAG run is a dry run, or it would consume the log without applying it.
    job = _Job(legacy, target, dataclasses.replace(settings, dry_run=False), run_id, as_of, cut_by, options)
    resolve_pending(legacy, target, settings)
    _check_ready(job)
    for attempt in range(1, options.attempts + 1):
        locking: list[str] = []  # which tables the attempt was locking when it failed
        try:
            return _attempt(job, attempt, locking)
        except psycopg.errors.InsufficientPrivilege as exc:
            action = "cutover rehearsal" if options.dry_run else "cutover"
            raise CutoverRefused(privileges.switch_refusal(action, legacy, exc)) from None
        except (psycopg.errors.LockNotAvailable, psycopg.errors.DeadlockDetected) as exc:
            # A deadlock: an application transaction wrote one legacy table, the cutover locked
            # another, then each waited for the other's. PostgreSQL aborts the cutover's attempt
            # (it waited first), the application's transaction goes on, and the next attempt locks.
            if attempt == options.attempts:
                raise CutoverRefused(_gave_up(job, exc, locking[-1] if locking else "legacy")) from None
            time.sleep(options.backoff_seconds * 2 ** (attempt - 1))
    raise AssertionError("unreachable")


def _gave_up(job: _Job, exc: psycopg.Error, locking: str) -> str:
    """Why the last attempt failed, naming the tables it waited for and who held them.

    ``locking``: "new" (the new tables, on the target), "before" (another table, while catching up
    before the legacy lock), "legacy" (the legacy tables) or "held" (a lock needed while the legacy
    tables were held, under the 30 s timeout of that step).
    """
    attempts = job.options.attempts
    timeout = "30 s" if locking == "held" else f"{job.options.lock_timeout_ms} ms"
    other = "an application transaction" if locking == "legacy" else "another transaction"
    why = (
        f"deadlocked with {other} each time"
        if isinstance(exc, psycopg.errors.DeadlockDetected)
        else f"could not be locked within {timeout}"
    )
    if locking == "new":
        holders = _lock_holders(job.target, [sql.Identifier(name) for name in NEW_TABLES])
        return (
            f"cutover gave up: the new tables ({', '.join(NEW_TABLES)}) {why} in {attempts} attempts "
            f"({holders}). Nothing was changed and the legacy tables stay writable; nothing but the "
            "migration should write the new tables before the cutover: end those sessions, then retry"
        )
    if locking == "before":
        return (
            f"cutover gave up: while it caught up before locking the legacy tables, a table it needed "
            f"(a profile or audit table, or a group or permission its links name) {why} (last of "
            f"{attempts} attempts). Nothing was changed and the legacy tables stay writable; look for "
            "long transactions on the target database, then retry"
        )
    if locking == "held":
        return (
            f"cutover gave up: while it held the legacy tables, a table it needed {why} (last of "
            f"{attempts} attempts). Nothing was changed and the legacy tables stay writable; look for "
            "long transactions on the target database, then retry"
        )
    holders = _lock_holders(job.legacy, legacy_tables(job.settings))
    return (
        f"cutover gave up: the legacy tables {why} in {attempts} attempts ({holders}). Nothing was "
        "changed and the tables stay writable; retry when the application is quieter, or raise "
        "lock_timeout_ms"
    )


def _check_ready(job: _Job) -> None:
    target, run_id = job.target, job.run_id
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
    if target.execute(
        "SELECT EXISTS (SELECT 1 FROM migration_audit.source_state WHERE transform_settings IS DISTINCT FROM %s)",
        (job.settings.transform_fingerprint(),),
    ).fetchone()[0]:
        raise CutoverRefused(
            "cutover refused: the last pass transformed rows under other settings (phone_region, invalid_phone "
            "or legacy_mapping) than this run's, and the final sync would mix the two. Run a pass with these "
            "settings first, then cut over"
        )
    trusted, reason = capture.trust(target)
    status = capture.status(job.legacy, job.settings.mapping)
    if not (trusted and status.installed and not status.truncated):
        why = reason if not trusted else "a capture trigger is missing or disabled, or a table was truncated"
        raise CutoverRefused(
            f"cutover refused: the change log cannot be trusted ({why}). Run a pass first: it compares every "
            "row and re-arms change capture; then cut over"
        )


def _between_commits() -> None:
    """With two databases: the target has committed the cutover as 'switching', the legacy side not yet."""


@dataclass
class _Unlocked:
    """What the cutover did and read before it asked for the legacy tables' lock."""

    rounds: int
    caught_up: int
    before: Any  # the target's verified sums (see _verify_target)
    legacy_mismatches: Any  # None without the full legacy verification
    counted: int
    seen: list[int]


def _attempt(job: _Job, attempt: int, locking: list[str]) -> dict[str, Any]:
    legacy, target, options = job.legacy, job.target, job.options
    with legacy.transaction(force_rollback=options.dry_run):
        with nullcontext() if job.same else target.transaction(force_rollback=options.dry_run):
            locking.append("new")
            ready = _before_the_lock(job, locking)
            # Writes queue behind the lock from the moment it is asked for, not only once it is held.
            locking.append("legacy")
            requested = time.monotonic()
            legacy.execute(
                sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(legacy_lock_order(job.settings))
                )
            )
            locked = time.monotonic()
            locking.append("held")
            _set_lock_timeout(job, "30s")
            entries = _last_entries(job)
            final = _apply(job, [e for e in entries if e[2] is not None], f"{job.run_id}:cutover")
            proof = _prove(job, ready.before, _legacy_now(ready.counted, set(ready.seen), entries))
            result = {
                "dry_run": options.dry_run,
                "lock_attempts": attempt,
                "catch_up": {"rounds": ready.rounds, "users": ready.caught_up},
                "final_sync": final,
                "full_verification": ready.legacy_mismatches is not None,
                **proof,
            }
            if not options.dry_run:
                # The capture triggers stay until a rollback makes the tables writable: dropping them
                # here would wait for every open read, and the read-only triggers fire before them.
                set_legacy_read_only(legacy, job.settings, job.run_id)
                target.execute(read_sql("cutover/untrack_changes.sql"))
                result["cutover_id"] = _record(job, proof, attempt, result)
        _between_commits()
    pause = time.monotonic() - requested
    result["write_pause_seconds"] = round(pause, 3)
    result["lock_wait_seconds"] = round(locked - requested, 3)
    if not options.dry_run:
        with target.transaction():
            target.execute(
                "UPDATE migration_audit.cutovers SET state = 'active', pause_seconds = %s WHERE id = %s",
                (pause, result["cutover_id"]),
            )
    return result


def _before_the_lock(job: _Job, locking: list[str]) -> _Unlocked:
    """Hold the new tables, catch up, verify, track, catch up again, count the legacy users.

    All without the legacy lock, in the attempt's transactions: what is left for the lock is the
    few changes made since the last catch-up.
    """
    legacy, target, options = job.legacy, job.target, job.options
    full_verify = options.dry_run if options.full_verify is None else options.full_verify
    _set_lock_timeout(job, f"{options.lock_timeout_ms}ms")
    target.execute(
        sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(map(sql.Identifier, NEW_TABLES)))
    )
    locking.append("before")  # the new tables are held: what fails from here is another table
    # Before anything is written (ALTER TABLE refuses a table with deferred checks pending)
    # and outside the write pause; rolled back with the attempt, committed with the cutover.
    validation_reuse.disable_write_triggers(target)
    rounds, caught_up = _catch_up(job, options.max_backlog, "catch-up")
    before = _verify_target(target)
    legacy_mismatches = _verify_legacy(job) if full_verify else None
    target.execute(sql.SQL(read_sql("cutover/track_changes.sql")).format(fingerprint=fingerprint_sql()))
    # The verification takes time in proportion to the table (17 s at 10M users): the writes
    # made meanwhile are caught up now, tracked, so that the lock waits for the last few only.
    tracked_rounds, tracked_users = _catch_up(job, options.final_backlog, "catch-up-tracked")
    counted, seen = legacy.execute(
        sql.SQL(read_sql("cutover/legacy_snapshot.sql")).format(
            users=legacy_tables(job.settings)[0], log=capture.log_table(job.settings.mapping)
        )
    ).fetchone()
    return _Unlocked(
        rounds + tracked_rounds, caught_up + tracked_users, before, legacy_mismatches, counted, seen
    )


def _last_entries(job: _Job) -> list[tuple[Any, ...]]:
    """Under the lock: the change log's entries, refusing if capture was removed or a table truncated."""
    legacy, mapping = job.legacy, job.settings.mapping
    if not capture.status(legacy, mapping).installed:
        raise CutoverRefused(
            "cutover refused: a change-capture trigger was dropped or disabled while it ran; nothing was "
            "changed. Run a pass (it compares every row and re-arms capture), then cut over"
        )
    entries = legacy.execute(
        sql.SQL("SELECT seq, source, source_id, op FROM {}").format(capture.log_table(mapping))
    ).fetchall()
    if any(entry[2] is None for entry in entries):
        raise CutoverRefused(
            "cutover refused: a legacy table was truncated while it ran; nothing was changed. Run a "
            "pass (it compares every row), then cut over"
        )
    return entries


def _set_lock_timeout(job: _Job, value: str) -> None:
    for conn in {id(job.legacy): job.legacy, id(job.target): job.target}.values():
        conn.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(value)))


def _apply(job: _Job, entries: list[tuple[Any, ...]], sync_run: str) -> dict[str, int]:
    """Apply the users the log names (links included), then consume those entries; returns counts."""
    ids = sorted({entry[2] for entry in entries})
    counts = {"users": len(ids), "inserted": 0, "updated": 0, "removed": 0, "rejected": 0}
    if not ids:
        return counts
    partition = {
        "partition_no": 0,
        "lo": ids[0],
        "hi": ids[-1],
        "as_of": job.as_of.isoformat(),
        "initial_load": False,
        "ids": ids,
    }
    done = copy_partition(job.legacy, job.target, job.settings, sync_run, partition, own_snapshot=False)
    init_profiles_for(job.target, ids, legacy_id_floors(job.legacy, job.settings.mapping))
    capture.consume(job.legacy, job.settings.mapping, [entry[0] for entry in entries])
    counts.update(inserted=done.inserted, updated=done.updated, removed=done.removed, rejected=done.rejected)
    return counts


def _catch_up(job: _Job, backlog: int, name: str) -> tuple[int, int]:
    """Apply the log without the legacy lock until at most ``backlog`` users wait; returns (rounds, users)."""
    rounds = users = 0
    log = capture.log_table(job.settings.mapping)
    while rounds < job.options.catch_up_rounds:
        entries = job.legacy.execute(
            sql.SQL("SELECT seq, source, source_id, op FROM {} WHERE source_id IS NOT NULL").format(log)
        ).fetchall()
        if len({entry[2] for entry in entries}) <= backlog:
            break
        rounds += 1
        users += _apply(job, entries, f"{job.run_id}:{name}-{rounds}")["users"]
    return rounds, users


def _verify_target(target: psycopg.Connection) -> dict[str, Any]:
    """The full verification before the lock: the target equals the sync state; returns both's sums."""
    moved, rejected, state_sum = target.execute(read_sql("cutover/state_sums.sql")).fetchone()
    rows, target_sum = target.execute(target_checksum_sql()).fetchone()
    if rows != moved or target_sum != state_sum:
        raise CutoverRefused(
            f"cutover refused: the target ({rows} users, checksum {target_sum}) differs from the sync state "
            f"({moved} moved, checksum {state_sum}): it was changed outside a pass. Run a pass with "
            "full_reconcile to repair it, then cut over"
        )
    return {
        "moved": moved,
        "rejected": rejected,
        "state_sum": state_sum,
        "rows": rows,
        "target_sum": target_sum,
    }


def _verify_legacy(job: _Job) -> int:
    """Every legacy row's hash equals the sync state's, unless the change log names the row.

    One legacy statement (one snapshot) against the state, which the target lock keeps still;
    a difference means the log missed a change, and the cutover is refused.
    """
    mapping = job.settings.mapping
    id_column = sql.Identifier(mapping.column("id"))
    query = sql.SQL(read_sql("cutover/legacy_hashes.sql")).format(
        users=legacy_tables(job.settings)[0],
        id=id_column,
        log=capture.log_table(mapping),
        row_hash=row_hash_sql(mapping),
    )
    mismatched = 0
    with (
        job.legacy.cursor(name="cutover_legacy_hashes") as src,
        job.target.cursor(name="cutover_state_hashes") as state,
    ):
        src.itersize = state.itersize = 50_000
        src.execute(query)
        state.execute("SELECT source_id, row_hash FROM migration_audit.source_state ORDER BY source_id")
        left, right = next(src, None), next(state, None)
        while left is not None or right is not None:
            if right is None or (left is not None and left[0] < right[0]):
                mismatched += 0 if left[2] else 1  # a legacy row the state lacks
                left = next(src, None)
            elif left is None or right[0] < left[0]:
                mismatched += 1  # a state row whose legacy row vanished unlogged
                right = next(state, None)
            else:
                if not left[2] and bytes(left[1]) != bytes(right[1]):
                    mismatched += 1
                left, right = next(src, None), next(state, None)
    if mismatched:
        raise CutoverRefused(
            f"cutover refused: {mismatched} legacy rows differ from the sync state although the change log does "
            "not name them (a change was not captured). Nothing was changed; run a pass with full_reconcile, "
            "then cut over"
        )
    return mismatched


def _legacy_now(counted: int, seen: set[int], entries: list[tuple[Any, ...]]) -> int:
    """The legacy users now: the count of the snapshot plus the users appeared or vanished since."""
    delta = 0
    for seq, source, source_id, op in entries:
        if seq not in seen and source == capture.USERS and source_id is not None:
            delta += {"I": 1, "D": -1}.get(op, 0)
    return counted + delta


def _prove(job: _Job, before: dict[str, Any], legacy_rows: int) -> dict[str, Any]:
    """legacy = moved + rejected and equal checksums, from the verified sums plus the final deltas."""
    deltas = {
        subject: (rows, moved, rejected, checksum)
        for subject, rows, moved, rejected, checksum in job.target.execute(
            "SELECT subject, sum(rows), sum(moved), sum(rejected), sum(checksum) FROM cutover_deltas GROUP BY subject"
        ).fetchall()
    }
    state = deltas.get("state", (0, 0, 0, 0))
    target = deltas.get("target", (0, 0, 0, 0))
    moved, rejected = before["moved"] + state[1], before["rejected"] + state[2]
    source_checksum = before["state_sum"] + state[3]
    target_rows, target_checksum = before["rows"] + target[0], before["target_sum"] + target[3]
    proof = {
        "source_rows": legacy_rows,
        "target_rows": target_rows,
        "rejected_rows": rejected,
        "source_checksum": str(source_checksum),
        "target_checksum": str(target_checksum),
    }
    problems = []
    if moved + rejected != legacy_rows:
        problems.append(f"migrated {moved} + rejected {rejected} != legacy rows {legacy_rows}")
    if moved != target_rows:
        problems.append(f"{moved} legacy rows should be in the target, it has {target_rows}")
    if source_checksum != target_checksum:
        problems.append(
            f"checksum of the transformed legacy rows {source_checksum} != target's {target_checksum}"
        )
    if problems:
        raise CutoverRefused("cutover refused, source and target differ: " + "; ".join(problems))
    return proof


def _record(job: _Job, proof: dict[str, Any], attempt: int, result: dict[str, Any]) -> int:
    state = "active" if job.same else "switching"
    return job.target.execute(
        "INSERT INTO migration_audit.cutovers (run_id, state, cut_by, source_rows, target_rows, "
        "rejected_rows, source_checksum, target_checksum, pause_seconds, lock_attempts, details) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (
            job.run_id,
            state,
            job.cut_by,
            proof["source_rows"],
            proof["target_rows"],
            proof["rejected_rows"],
            proof["source_checksum"],
            proof["target_checksum"],
            0.0,
            attempt,
            Jsonb({"final_sync": result["final_sync"], "catch_up": result["catch_up"]}),
        ),
    ).fetchone()[0]
