"""Copy one id partition of legacy users into the target: stream, transform, COPY, account.

A partition is one target transaction: its users, links, rejects, field fixes, batch records, sync
state and counts commit together or not at all, so a killed or retried attempt leaves nothing
half-done, and re-running a partition changes nothing that is already right.

Three paths (PATHS below describes each, with the dry run and the cutover's change set):
- load: the target was empty when the run was planned; rows are COPY'd straight into
  account_newuser (the fast path of a first load).
- full merge: the target holds users but this range has no sync state yet; every row is staged and
  merged (insert new, update changed, leave identical rows alone, remove vanished ones).
- delta merge (every later sync pass): a hash of each legacy row, computed in SQL and compared with
  migration_audit.source_state, finds the new, changed and deleted rows; only those, the rows
  rejected last time and the rows whose duplicate decision changed are read and transformed.
  A pass that reads the change log instead (log) carries the unchanged rejects over by reference
  when reading them again could only give the same answer (copy/carry_rejects.sql, decision 0013).
  A range whose state was written under other transform settings (phone region, invalid-phone
  rule, mapping) takes the full merge instead: every row is transformed again. Ids where the
  state and the target disagree (drift: a target row deleted by hand, a displaced holder, a row
  the state does not know) are re-processed too, so drift is repaired rather than stuck.
Memory stays bounded by the batch size: rows are read with server-side cursors. The batch loop
yields to the application (throttle.py): time-boxed batches, a throttle between batches, and a
legacy snapshot renewed after max_snapshot_seconds (the target transaction stays one).
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Container, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration import capture
from user_migration.config import LegacyMapping, Settings
from user_migration.copy_conflicts import REJECTED_COPY, legacy_names, settle_conflicts
from user_migration.copy_links import copy_links
from user_migration.copy_readers import IdReader, RangeReader
from user_migration.db import (
    MigrationError,
    legacy_select_list,
    read_sql,
    safe_error,
    users_table,
)
from user_migration.faults import batch_read, kill_after_batch
from user_migration.fingerprint import fingerprint, row_hash_sql
from user_migration.lease import hold as hold_lease
from user_migration.throttle import BatchSizer, Snapshot, Throttle
from user_migration.transforms import (
    DOB_IN_FUTURE,
    DUPLICATE_EMAIL,
    DUPLICATE_USERNAME,
    INVALID_DATE_OF_BIRTH,
    LegacyRow,
    NewUser,
    Reject,
    Transformer,
    email_key,
    jsonable_row,
)


@dataclass(frozen=True)
class CopyPath:
    """One way of copying a partition: what each step asks of it. ``name`` is what the audit records."""

    name: str
    # COPY straight into account_newuser, the sync state straight into place (a first load).
    loads: bool = False
    # Stage the users and the sync state, then merge them into account_newuser and the state.
    merges: bool = False
    # Find the changed rows by comparing every row's hash with the sync state; link the whole range.
    compares_full_state: bool = False
    # Find the changed rows in the change log; carry the unchanged rejects over unread.
    from_log: bool = False
    # A given change set (the cutover's): duplicates decided among its rows, its log consumed by the caller.
    change_set: bool = False
    # State written under other transform settings sends the range to the full merge instead.
    full_on_new_transform: bool = False

    @property
    def reads_changes_only(self) -> bool:
        """Reads only the changed rows (delta, log, changes): the range's other state stays."""
        return self.compares_full_state or self.from_log or self.change_set


# Every path by the name _choose_path picks and the audit records (the dry run writes nothing).
PATHS = {
    entry.name: entry
    for entry in (
        CopyPath("dry_run"),
        CopyPath("load", loads=True),
        CopyPath("merge", merges=True),
        CopyPath("delta", merges=True, compares_full_state=True, full_on_new_transform=True),
        CopyPath("log", merges=True, from_log=True, full_on_new_transform=True),
        CopyPath("changes", merges=True, change_set=True),
    )
}
USER_COLUMNS = NewUser._fields
TARGET_LINKS = {
    "groups": ("account_newuser_groups", "group_id"),
    "permissions": ("account_newuser_user_permissions", "permission_id"),
}
FIXES_COPY = "COPY migration_audit.field_fixes (run_id, source_id, field, original_value, new_value, reason) FROM STDIN"
STATE_COPY = "COPY stage_state (source_id, row_hash, outcome, fingerprint, kept_id) FROM STDIN"
# A first load writes the sync state straight into place; the merges stage it (they may revise it).
STATE_LOAD_COPY = (
    "COPY migration_audit.source_state (source_id, row_hash, outcome, fingerprint, kept_id, run_id, "
    "transform_settings) FROM STDIN"
)
TRANSFORM_CHANGED = "transform settings changed since the last pass: every row re-transformed"
# The users' and state rows' COPY in binary (~3x less Python than text and ~30% less server, the
# text formatting and parsing of timestamps above all), with the types psycopg dumps each value as:
# the target's columns' own (a varchar or char(1) takes text's binary form, which is its own).
USER_TYPES = ("int8", "text", "timestamptz", "bool", "text", "text", "text", "date", "text", "bool", "bool")
STAMP_TYPES = ("timestamptz", "timestamptz")
STATE_TYPES = ("int8", "bytea", "text", "int8", "int8")
STATE_TAIL_TYPES = ("text", "int8")
BINARY = " (FORMAT BINARY)"
# Binary only when every legacy column comes as these types (pg_type oids), whose Python values the
# binary dumpers take exactly as text COPY's input would: not, say, a naive last_login (a
# timestamp column: text COPY reads it in the session's time zone, binary refuses it), an integer
# flag or a numeric id. Anything else keeps text COPY, as before.
_INTEGERS, _STRINGS = frozenset({20, 21, 23}), frozenset({25, 1042, 1043})
BINARY_SAFE_TYPES = (
    _INTEGERS,  # id
    _STRINGS,  # password
    frozenset({1184}),  # last_login: timestamptz
    frozenset({16}),  # is_superuser
    _STRINGS,  # email
    _STRINGS,  # username
    _STRINGS,  # full_name
    frozenset({1082}),  # date_of_birth: date
    _STRINGS,  # phone_number
    frozenset({16}),  # is_active
    frozenset({16}),  # is_staff
    frozenset({17}),  # the row hash: bytea
)


@dataclass
class PartitionResult:
    partition_no: int
    lo: int
    hi: int
    rows_in: int = 0
    read: int = 0
    migrated: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    removed: int = 0
    displaced: int = 0
    # Stale key holders still valid under another key, given their current values in place.
    holders_updated: int = 0
    # Ids whose sync state and target row disagreed (find_drift.sql), re-processed by this pass.
    drift_repaired: int = 0
    # When the partition compared sync state and target in full: the other writes noted then
    # (copy/drift_due.sql); None when a log pass left the comparison out, or none applies.
    drift_writes: int | None = None
    rejected: int = 0
    fixed: int = 0
    links_in: int = 0
    links_inserted: int = 0
    links_removed: int = 0
    batches: int = 0
    seconds: float = 0.0
    # Legacy snapshots the rows were read in (max_snapshot_seconds), and seconds the throttle held it.
    snapshots: int = 1
    throttled_seconds: float = 0.0
    path: str = ""
    # Why a range with sync state took the full merge path instead of the delta.
    full_because: str = ""
    rejected_by_reason: dict[str, int] = field(default_factory=dict)
    # Change-log entries read in the partition's snapshot: deleted once the target has committed.
    consumed: list[int] = field(default_factory=list, repr=False)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["consumed"] = len(self.consumed)
        return data

    def count_reject(self, reason: str) -> None:
        self.rejected += 1
        self.rejected_by_reason[reason] = self.rejected_by_reason.get(reason, 0) + 1


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
    own_snapshot: bool = True,
    lease_run_id: str | None = None,
) -> PartitionResult:
    """Move one partition; safe to retry or re-run. Raises MigrationError without row values.

    With ``own_snapshot=False`` the caller holds the source transaction (the cutover, under its
    lock); source and target may then be one connection. With ``lease_run_id`` the partition's
    transaction holds the writer lease of that run (see lease.py) until it commits.
    """
    if lease_run_id:
        partition = {**partition, "lease_run_id": lease_run_id}
    if own_snapshot:
        _mark(target, run_id, partition, "running", None)
    # Under the cutover's lock (own_snapshot=False) nothing yields: the application waits for it.
    throttle = Throttle(settings, run_id, partition["partition_no"], source, target, enabled=own_snapshot)
    try:
        try:
            result = _copy(_Job.start(source, target, settings, run_id, partition, own_snapshot, throttle))
        except psycopg.errors.UniqueViolation:
            if not partition.get("initial_load") or not own_snapshot:
                raise
            # A legacy row changed after the plan; the plain load cannot settle that, the merge can.
            _rollback(source, target)
            merge = {**partition, "initial_load": False}
            result = _copy(_Job.start(source, target, settings, run_id, merge, own_snapshot, throttle))
    except Exception as exc:
        if not own_snapshot:
            raise
        _rollback(source, target)
        reason = safe_error(exc)
        if not target.closed and not target.broken:
            _mark(target, run_id, partition, "failed", reason)
        raise MigrationError(
            f"partition {partition['partition_no']} (ids {partition['lo']}..{partition['hi']}) failed: {reason}. "
            "Nothing of this attempt was kept; a retry starts the partition again"
        ) from None
    finally:
        throttle.close()
    if own_snapshot:
        # After the target's commit: a crash before this line leaves the entries to be applied again.
        capture.consume(source, settings.mapping, result.consumed)
    return result


def _rollback(*conns: psycopg.Connection) -> None:
    for conn in conns:
        if not conn.closed and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()


class Claims:
    """Who took each email key and username among the rows of one change set, lowest id first.

    A pass's plan decides duplicates over the whole table; the cutover's final sync has no plan and
    decides among the changed rows themselves (the unchanged holders of a key keep it, see
    settle_conflicts). Rows arrive in id order, so the first claimant is the lowest id.
    """

    def __init__(self) -> None:
        self.emails: dict[str, int] = {}
        self.usernames: dict[str, int] = {}

    def claim(self, user: NewUser | tuple) -> tuple[str, int] | None:
        """None when ``user`` may keep its keys; else (duplicate reason, id of the holder)."""
        # By position: ``user`` may be a NewUser or fast_user's plain tuple in its order.
        user_id, username = user[0], user[5]
        email = email_key(user[4])
        if email in self.emails:
            return DUPLICATE_EMAIL, self.emails[email]
        if username in self.usernames:
            return DUPLICATE_USERNAME, self.usernames[username]
        self.emails[email] = self.usernames[username] = user_id
        return None


class _Batch:
    """One batch's output, written with COPY in one go."""

    def __init__(self) -> None:
        self.good: list[tuple] = []  # NewUser or Transformer.fast_user's plain tuple
        self.rejects: list[tuple[Any, ...]] = []
        self.fixes: list[tuple[Any, ...]] = []
        self.state: list[tuple[Any, ...]] = []
        self.rejected_ids: list[int] = []


@dataclass
class _Job:
    """One attempt at one partition: what every step of _copy reads, and the result it fills in."""

    source: psycopg.Connection
    target: psycopg.Connection
    settings: Settings
    run_id: str
    partition: dict[str, Any]
    own_snapshot: bool
    throttle: Throttle
    result: PartitionResult
    transformer: Transformer
    now: dt.datetime
    select: sql.Composed
    id_column: sql.Identifier
    transform_settings: int  # Settings.transform_fingerprint(), recorded with every state row
    path: CopyPath = field(init=False)  # set by _choose_path, once the attempt is cleared

    @classmethod
    def start(
        cls,
        source: psycopg.Connection,
        target: psycopg.Connection,
        settings: Settings,
        run_id: str,
        partition: dict[str, Any],
        own_snapshot: bool,
        throttle: Throttle,
    ) -> _Job:
        mapping = settings.mapping
        return cls(
            source,
            target,
            settings,
            run_id,
            partition,
            own_snapshot,
            throttle,
            PartitionResult(partition["partition_no"], partition["lo"], partition["hi"]),
            Transformer(
                settings.phone_region, settings.invalid_phone, today=dt.date.fromisoformat(partition["as_of"])
            ),
            dt.datetime.now(dt.UTC),
            sql.SQL("SELECT {}, {} AS row_hash FROM {}").format(
                legacy_select_list(mapping), row_hash_sql(mapping), users_table(mapping)
            ),
            sql.Identifier(mapping.column("id")),
            settings.transform_fingerprint(),
        )

    @property
    def lo(self) -> int:
        return self.partition["lo"]

    @property
    def hi(self) -> int:
        return self.partition["hi"]


@dataclass
class _Rows:
    """Which legacy rows a partition reads: ``process`` (ids, None: the whole range) and ``deleted``."""

    process: list[int] | None = None
    deleted: list[int] = field(default_factory=list)


def _copy(job: _Job) -> PartitionResult:
    """The partition's one target transaction: clear the attempt, stage, read, write, merge, links."""
    started = time.perf_counter()
    source, target, settings, partition = job.source, job.target, job.settings, job.partition
    with target.transaction():
        if partition.get("lease_run_id"):
            hold_lease(target, partition["lease_run_id"])
        _clear_attempt(job)
        job.path = _choose_path(job)
        job.result.path = job.path.name
        users_copy, stamps = _prepare_staging(job)
        with source.transaction():
            if job.own_snapshot:
                source.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            snapshot = Snapshot(source, job.own_snapshot, settings.max_snapshot_seconds)
            rows = _rows_to_read(job)
            rejected_ids = _copy_batches(job, rows, snapshot, users_copy, stamps)
            _merge_and_link(job, rows, rejected_ids)
        job.result.seconds = round(time.perf_counter() - started, 3)
        target.execute(read_sql("copy/partition_done.sql"), {**job.result.as_dict(), "run_id": job.run_id})
    return job.result


def _clear_attempt(job: _Job) -> None:
    """What an earlier attempt of this partition left in the run's audit (it is redone whole)."""
    for table in ("rejected_rows", "field_fixes"):
        job.target.execute(
            sql.SQL(
                "DELETE FROM migration_audit.{} WHERE run_id = %s AND source_id BETWEEN %s AND %s"
            ).format(sql.Identifier(table)),
            (job.run_id, job.lo, job.hi),
        )
    for table in ("batches", "carried_rejects"):
        job.target.execute(
            sql.SQL("DELETE FROM migration_audit.{} WHERE run_id = %s AND partition_no = %s").format(
                sql.Identifier(table)
            ),
            (job.run_id, job.result.partition_no),
        )


def _choose_path(job: _Job) -> CopyPath:
    """dry_run, load (an empty range of a first load), changes (a given change set), log, delta or merge."""
    target, lo, hi, partition = job.target, job.lo, job.hi, job.partition
    if job.settings.dry_run:
        return PATHS["dry_run"]
    if (
        partition.get("initial_load")
        and not target.execute(
            "SELECT EXISTS (SELECT 1 FROM account_newuser WHERE id BETWEEN %s AND %s)", (lo, hi)
        ).fetchone()[0]
    ):
        return PATHS["load"]
    has_state = target.execute(
        "SELECT EXISTS (SELECT 1 FROM migration_audit.source_state WHERE source_id BETWEEN %s AND %s)",
        (lo, hi),
    ).fetchone()[0]
    if partition.get("ids") is not None:
        path = PATHS["changes"]
    elif has_state and partition.get("changes") == "log":
        path = PATHS["log"]
    else:
        path = PATHS["delta" if has_state else "merge"]
    if path.full_on_new_transform and _transform_changed(target, lo, hi, job.transform_settings):
        job.result.full_because = TRANSFORM_CHANGED
        return PATHS["merge"]
    return path


def _prepare_staging(job: _Job) -> tuple[sql.Composed | None, tuple]:
    """Temp tables of the merging paths; returns the users' COPY statement and the load's time stamps."""
    target, path = job.target, job.path
    if path.loads:
        target.execute(
            "DELETE FROM migration_audit.source_state WHERE source_id BETWEEN %s AND %s", (job.lo, job.hi)
        )
    elif path.merges:
        target.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_state "
            "(source_id bigint, row_hash bytea, outcome char(1), fingerprint bigint, kept_id bigint) "
            "ON COMMIT DROP"
        )
        target.execute("TRUNCATE stage_state")
    if path.merges:
        target.execute("DROP TABLE IF EXISTS pg_temp.stage_users")  # never a table of that name elsewhere
        target.execute(
            "CREATE TEMP TABLE stage_users ON COMMIT DROP AS "
            "SELECT id, password, last_login, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff FROM account_newuser WITH NO DATA"
        )
    if path.loads:
        columns = [*USER_COLUMNS, "joined_at", "updated_at"]
        users_copy = sql.SQL("COPY account_newuser ({}) FROM STDIN").format(
            sql.SQL(", ").join(map(sql.Identifier, columns))
        )
        return users_copy, (job.now, job.now)
    if path.merges:
        users_copy = sql.SQL("COPY stage_users ({}) FROM STDIN").format(
            sql.SQL(", ").join(map(sql.Identifier, USER_COLUMNS))
        )
        return users_copy, ()
    return None, ()


def _rows_to_read(job: _Job) -> _Rows:
    """The ids the path reads and the ids deleted from the legacy table; the log's entries first.

    The change-log entries are read first, so that they are those visible in the snapshot the rows
    are read in (copy_partition consumes them once the target has committed).
    """
    source, target, mapping, result = job.source, job.target, job.settings.mapping, job.result
    lo, hi, path = job.lo, job.hi, job.path
    log_ids: list[int] = []
    if job.partition.get("capture") and not path.change_set:
        result.consumed, log_ids = capture.entries_in_range(source, mapping, lo, hi)
    if path.compares_full_state:
        drift = _drift_checked(job)
        reread = _losers(target, job.run_id, lo, hi).keys() | drift
        process, deleted, result.unchanged, result.rows_in = _delta(source, target, mapping, lo, hi, reread)
        return _Rows(process, deleted + _target_only(drift, process, deleted))
    if path.from_log:
        drift = _drift_checked(job) if _drift_due(job) else set()
        carried = _carry_rejects(job, sorted({*log_ids, *drift}))
        process, deleted, result.rows_in = _from_log(
            source, target, mapping, (lo, hi), log_ids, carried.reread | drift
        )
        result.unchanged = result.rows_in - len(process) - carried.count
        return _Rows(process, deleted + _target_only(drift, process, deleted))
    if path.change_set:
        process, deleted = _split_changes(source, target, mapping, job.partition["ids"])
        result.rows_in = len(process)
        return _Rows(process, deleted)
    return _Rows()


def _copy_batches(
    job: _Job, rows: _Rows, snapshot: Snapshot, users_copy: sql.Composed | None, stamps: tuple
) -> list[int]:
    """Read, transform and write batch after batch, yielding to the throttle; returns the rejected ids."""
    reader = _open_reader(job, rows, snapshot)
    out_spec = _Output(users_copy, stamps, (job.run_id, job.transform_settings), legacy_names(job.settings))
    claims = Claims() if job.path.change_set else None
    sizer = BatchSizer(job.settings, adaptive=job.own_snapshot)
    planned = None if rows.process is None else len(rows.process)
    job.throttle.progress(job.path.name, 0, planned, 0, force=True)
    rejected_ids: list[int] = []
    batch_no = 0
    with job.target.cursor() as out:
        waited = job.throttle.gate(reader.release)  # a pause set before the start holds it too
        while True:
            if batch_no and snapshot.expired():
                reader.release()  # the next fetch goes on from the last id, in a new snapshot
            asked, started = sizer.size, time.perf_counter()
            fetched = reader.fetch(asked)
            if not fetched:
                break
            batch = _copy_one_batch(job, out, out_spec, reader, fetched, batch_no, claims)
            if job.path.merges:
                rejected_ids += batch.rejected_ids
            seconds = time.perf_counter() - started
            _record_batch(out, job, batch_no, fetched, batch, (seconds, asked, snapshot.number, waited))
            sizer.record(len(fetched), seconds)
            kill_after_batch(batch_no)
            batch_no += 1
            job.result.read += len(fetched)
            job.throttle.progress(job.path.name, job.result.read, planned, batch_no)
            waited = job.throttle.gate(reader.release)
    _finish_reading(job, reader, snapshot, rows, batch_no, planned)
    return rejected_ids


@dataclass
class _Output:
    """How a partition writes its batches: the users' COPY (None: no users written), the load's time
    stamps, the load's state tail (run id, transform settings), the legacy column names (rejects),
    and whether in binary (decided on the first batch's column types)."""

    users_copy: sql.Composed | None
    stamps: tuple
    state_tail: tuple[str, int]
    legacy_names: list[str]
    binary: bool | None = None


def _open_reader(job: _Job, rows: _Rows, snapshot: Snapshot) -> RangeReader | IdReader:
    """The listed ids' reader (a delta, the log, a change set), else the whole range's."""
    if rows.process is not None:
        return IdReader(job.source, snapshot, job.select, job.id_column, rows.process)
    name = f"partition_{job.result.partition_no}"
    return RangeReader(job.source, snapshot, job.select, job.id_column, (job.lo, job.hi), name)


def _copy_one_batch(
    job: _Job,
    out: psycopg.Cursor,
    spec: _Output,
    reader: RangeReader | IdReader,
    fetched: list[tuple],
    batch_no: int,
    claims: Claims | None,
) -> _Batch:
    """Transform one batch of legacy rows and COPY it out."""
    batch_read(batch_no, fetched)
    if spec.binary is None:
        spec.binary = binary_copy_ok(reader.description)
    # The plan's losers of this batch only (rows come in id order): memory stays bounded by the
    # batch, however many duplicates the partition holds.
    losers = _losers(job.target, job.run_id, fetched[0][0], fetched[-1][0])
    batch = _transform_batch(
        fetched, job.transformer, losers, spec.legacy_names, job.run_id, job.now, job.result, claims
    )
    _write_batch(out, batch, spec.users_copy, spec.stamps, job.path, spec.state_tail, spec.binary)
    return batch


def _record_batch(
    out: psycopg.Cursor,
    job: _Job,
    batch_no: int,
    fetched: list[tuple],
    batch: _Batch,
    timing: tuple[float, int, int, float],
) -> None:
    """The batch's row in migration_audit.batches; ``timing``: (seconds, size asked, snapshot, waited)."""
    seconds, asked, snapshot_no, waited = timing
    out.execute(
        read_sql("copy/record_batch.sql"),
        (
            job.run_id,
            job.result.partition_no,
            batch_no,
            fetched[0][0],
            fetched[-1][0],
            len(fetched),
            len(batch.good),
            len(batch.rejects),
            seconds,
            asked,
            snapshot_no,
            round(waited, 3),
        ),
    )


def _finish_reading(
    job: _Job,
    reader: RangeReader | IdReader,
    snapshot: Snapshot,
    rows: _Rows,
    batch_no: int,
    planned: int | None,
) -> None:
    """Close the reader, keep a snapshot for the merge and the links, and fill in the reading's counts."""
    result = job.result
    result.batches = batch_no
    job.throttle.progress(job.path.name, result.read, planned, batch_no, force=True)
    reader.close()
    snapshot.ensure()  # the merge and the links read on in the last snapshot
    result.snapshots = snapshot.number
    result.throttled_seconds = round(job.throttle.waited, 3)
    if rows.process is None:
        result.rows_in = result.read


def _merge_and_link(job: _Job, rows: _Rows, rejected_ids: list[int]) -> None:
    """Merge the staged users and record the sync state (merging paths), then bring the links in line."""
    source, target, settings, result, path = job.source, job.target, job.settings, job.result, job.path
    if path.merges:
        _merge(
            source,
            target,
            settings,
            job.transformer,
            result,
            path,
            rows.deleted,
            rejected_ids,
            job.run_id,
            job.now,
        )
        _save_state(target, path, job.lo, job.hi, rows.deleted, job.run_id, job.transform_settings)
    elif path.loads:
        result.inserted = result.migrated
    # The log and change paths touch the links of the users they processed; the others the range's.
    scope = (
        None if rows.process is None or path.compares_full_state else sorted({*rows.process, *rows.deleted})
    )
    mapping = settings.mapping
    for key, link in (("groups", mapping.groups), ("permissions", mapping.permissions)):
        if link is not None:
            copy_links(
                source,
                target,
                mapping.schema,
                link,
                TARGET_LINKS[key],
                (job.lo, job.hi, scope),
                result,
                settings.dry_run,
            )


def binary_copy_ok(description: list[Any] | None) -> bool:
    """Whether rows read with this cursor description may be written with binary COPY."""
    return (
        description is not None
        and len(description) == len(BINARY_SAFE_TYPES)
        and all(
            column.type_code in types for column, types in zip(description, BINARY_SAFE_TYPES, strict=True)
        )
    )


def _transform_changed(target: psycopg.Connection, lo: int, hi: int, transform_settings: int) -> bool:
    """Whether any state row of ids lo..hi was written under other transform settings than these."""
    return target.execute(
        "SELECT EXISTS (SELECT 1 FROM migration_audit.source_state WHERE source_id BETWEEN %s AND %s "
        "AND transform_settings IS DISTINCT FROM %s)",
        (lo, hi, transform_settings),
    ).fetchone()[0]


# account_newuser's write triggers (include/sql/validation/install_write_triggers.sql).
WRITE_TRIGGERS = 4


def _drift_due(job: _Job) -> bool:
    """Whether a log pass must compare sync state and target over its whole range (decision 0013).

    Only a write to the target that no partition made can make them disagree. It is left out while
    the last run that compared everything stands: the same count of other writes noted since, and
    the write triggers in place. Param full_reconcile (a delta pass) always compares.
    """
    triggers, foreign, verified = job.target.execute(read_sql("copy/drift_due.sql")).fetchone()
    return (
        job.settings.full_reconcile or triggers != WRITE_TRIGGERS or verified is None or foreign != verified
    )


def _drift_checked(job: _Job) -> set[int]:
    """The range's drifted ids (find_drift.sql), with the other writes noted as it compared."""
    job.result.drift_writes = job.target.execute(read_sql("copy/drift_due.sql")).fetchone()[1]
    drift = _drift(job.target, job.lo, job.hi)
    job.result.drift_repaired = len(drift)
    return drift


def record_drift_check(target: psycopg.Connection, run_id: str) -> bool:
    """Once every partition of the run has copied: whether each compared everything, which makes the
    run the drift comparison's proof for the next passes (copy/record_drift_check.sql)."""
    return target.execute(read_sql("copy/record_drift_check.sql"), {"run_id": run_id}).fetchone() is not None


def _drift(target: psycopg.Connection, lo: int, hi: int) -> set[int]:
    """Ids of lo..hi whose sync state and target row disagree: the delta re-processes them."""
    return {row[0] for row in target.execute(read_sql("copy/find_drift.sql"), {"lo": lo, "hi": hi})}


def _target_only(drift: set[int], process: list[int], deleted: list[int]) -> list[int]:
    """Drifted ids with neither a legacy row nor a state row: target rows of no user, to remove."""
    if not drift:
        return []
    return sorted(drift - set(process) - set(deleted))


def _losers(target: psycopg.Connection, run_id: str, lo: int, hi: int) -> dict[int, tuple[str, int]]:
    """The plan's decisions for ids lo..hi: source id -> (duplicate reason, id of the row kept)."""
    return {
        source_id: (reason, kept_id)
        for source_id, reason, kept_id in target.execute(
            "SELECT source_id, reason, kept_id FROM migration_audit.plan_duplicates "
            "WHERE run_id = %s AND source_id BETWEEN %s AND %s",
            (run_id, lo, hi),
        )
    }


def _delta(
    source: psycopg.Connection,
    target: psycopg.Connection,
    mapping: LegacyMapping,
    lo: int,
    hi: int,
    reread: Container[int],
) -> tuple[list[int], list[int], int, int]:
    """(ids to read and transform, ids deleted from the legacy table, unchanged rows, legacy rows in range).

    A merge join of two id-ordered streams: the legacy rows' hashes, and the last pass's state.
    Ids in ``reread`` (duplicate decisions, drift) are read even when their hash did not change.
    """
    id_column = sql.Identifier(mapping.column("id"))
    query = sql.SQL("SELECT {}, {} FROM {} WHERE {} BETWEEN %s AND %s ORDER BY {}").format(
        id_column, row_hash_sql(mapping), users_table(mapping), id_column, id_column
    )
    process: list[int] = []
    deleted: list[int] = []
    skipped = rows_in = 0
    with (
        source.cursor(name="delta_source") as src,
        target.cursor(name="delta_state") as state,
    ):
        src.itersize = state.itersize = 50_000
        src.execute(query, (lo, hi))
        state.execute(
            "SELECT source_id, row_hash, outcome FROM migration_audit.source_state "
            "WHERE source_id BETWEEN %s AND %s ORDER BY source_id",
            (lo, hi),
        )
        left, right = next(src, None), next(state, None)
        while left is not None or right is not None:
            if right is None or (left is not None and left[0] < right[0]):
                process.append(left[0])  # new in the legacy table
                rows_in += 1
                left = next(src, None)
            elif left is None or right[0] < left[0]:
                deleted.append(right[0])  # gone from the legacy table
                right = next(state, None)
            else:
                rows_in += 1
                if bytes(left[1]) != bytes(right[1]) or right[2] == "R" or left[0] in reread:
                    process.append(left[0])
                else:
                    skipped += 1
                left, right = next(src, None), next(state, None)
    return process, deleted, skipped, rows_in


def _present(source: psycopg.Connection, mapping: LegacyMapping, ids: list[int]) -> set[int]:
    """The ids among ``ids`` that the legacy table holds now."""
    id_column = sql.Identifier(mapping.column("id"))
    query = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(id_column, users_table(mapping), id_column)
    return {row[0] for row in source.execute(query, (ids,)).fetchall()}


def _known(target: psycopg.Connection, ids: list[int]) -> list[int]:
    """The ids among ``ids`` that the sync state knows (moved or rejected by an earlier pass)."""
    return [
        row[0]
        for row in target.execute(
            "SELECT source_id FROM migration_audit.source_state WHERE source_id = ANY(%s) ORDER BY source_id",
            (ids,),
        ).fetchall()
    ]


def _from_log(
    source: psycopg.Connection,
    target: psycopg.Connection,
    mapping: LegacyMapping,
    bounds: tuple[int, int],
    log_ids: list[int],
    reread: Iterable[int],
) -> tuple[list[int], list[int], int]:
    """(ids to read and transform, ids deleted from the legacy table, legacy rows in range).

    The same rows the hash comparison of _delta would pick, found without reading the unchanged
    ones: those the change log names and ``reread`` (the rejects and duplicate losers this pass does
    not carry over, drift); the rejects carried over (_carry_rejects) give the same answer unread.
    """
    lo, hi = bounds
    candidates = sorted({*log_ids, *reread})
    present = _present(source, mapping, candidates)
    deleted = _known(target, [i for i in candidates if i not in present])
    id_column = sql.Identifier(mapping.column("id"))
    rows_in = source.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE {} BETWEEN %s AND %s").format(users_table(mapping), id_column),
        (lo, hi),
    ).fetchone()[0]
    return sorted(present), deleted, rows_in


@dataclass
class _Carried:
    """Rejects a log pass takes over unread (count), and the rejects and losers it reads again (reread)."""

    count: int
    reread: set[int]


def _carry_rejects(job: _Job, changed: list[int]) -> _Carried:
    """Carry the range's unchanged rejects over by reference (copy/carry_rejects.sql says which).

    They count in this pass's rejects, by the reason their reading run recorded, and are listed in
    migration_audit.carried_rejects (read through the view run_rejects). ``changed``: the ids the
    change log names and drift, read again whatever they were.
    """
    target, result = job.target, job.result
    target.execute("DROP TABLE IF EXISTS pg_temp.carried")  # never a table of that name elsewhere
    target.execute(
        read_sql("copy/carry_rejects.sql"),
        {
            "run_id": job.run_id,
            "lo": job.lo,
            "hi": job.hi,
            "reread": changed,
            "transform_settings": job.transform_settings,
            "dob_reason": INVALID_DATE_OF_BIRTH,
            "dob_future": DOB_IN_FUTURE,
            "as_of": job.partition["as_of"],
        },
    )
    target.execute(
        "INSERT INTO migration_audit.carried_rejects (run_id, partition_no, from_run_id, source_ids) "
        "SELECT %s, %s, from_run_id, array_agg(source_id ORDER BY source_id) FROM carried GROUP BY from_run_id",
        (job.run_id, result.partition_no),
    )
    count = 0
    for reason, n in target.execute("SELECT reason, count(*) FROM carried GROUP BY reason ORDER BY reason"):
        result.rejected += n
        result.rejected_by_reason[reason] = result.rejected_by_reason.get(reason, 0) + n
        count += n
    # The range's other rejects and the plan's losers not carried: read again.
    reread = target.execute(
        "SELECT source_id FROM migration_audit.source_state AS s "
        "WHERE outcome = 'R' AND source_id BETWEEN %(lo)s AND %(hi)s "
        "AND NOT EXISTS (SELECT 1 FROM carried AS c WHERE c.source_id = s.source_id) "
        "UNION SELECT source_id FROM migration_audit.plan_duplicates AS d "
        "WHERE run_id = %(run_id)s AND source_id BETWEEN %(lo)s AND %(hi)s "
        "AND NOT EXISTS (SELECT 1 FROM carried AS c WHERE c.source_id = d.source_id)",
        {"lo": job.lo, "hi": job.hi, "run_id": job.run_id},
    ).fetchall()
    return _Carried(count, {row[0] for row in reread})


def _split_changes(
    source: psycopg.Connection, target: psycopg.Connection, mapping: LegacyMapping, ids: list[int]
) -> tuple[list[int], list[int]]:
    """(ids to read and transform, ids deleted) of a change set, with the rows that lost a key to it.

    A row rejected as a duplicate is decided again when the user holding its key changed.
    """
    dependants = target.execute(
        "SELECT source_id FROM migration_audit.source_state WHERE kept_id = ANY(%s)", (ids,)
    ).fetchall()
    candidates = sorted({*ids, *(row[0] for row in dependants)})
    present = _present(source, mapping, candidates)
    return sorted(present), _known(target, [i for i in candidates if i not in present])


def _transform_batch(
    rows: list[tuple],
    transformer: Transformer,
    losers: dict[int, tuple[str, int]],
    legacy_names: list[str],
    run_id: str,
    now: dt.datetime,
    result: PartitionResult,
    claims: Claims | None = None,
) -> _Batch:
    batch = _Batch()
    good, state = batch.good, batch.state
    fast_user = transformer.fast_user
    no_fixes: list = []
    fast = 0
    for values in rows:
        row_hash = values[-1]
        # The usual row moves untouched but its phone: fast_user answers it as a plain tuple,
        # without LegacyRow, NewUser or a list of fixes; transform() answers the rest.
        user = fast_user(values)
        if user is not None and claims is None and user[0] not in losers:
            good.append(user)
            state.append((user[0], row_hash, "M", fingerprint(user), None))
            fast += 1
            continue
        row = LegacyRow(*values[:-1])
        if user is not None:
            reject, row_fixes = None, no_fixes
        else:
            user, reject, row_fixes = transformer.transform(row)
        kept_id = None
        if user is not None and claims is not None:
            lost = claims.claim(user)
            if lost is not None:
                losers = {**losers, row.id: lost}
        if user is not None and row.id in losers:
            reason, kept_id = losers[row.id]
            field_name = "email" if reason == DUPLICATE_EMAIL else "username"
            user, reject, row_fixes = (
                None,
                Reject(reason, f"same {field_name} as user {kept_id}, which is kept"),
                [],
            )
        if user is None:
            source_row = Jsonb(jsonable_row(dict(zip(legacy_names, values[:-1], strict=True))))
            batch.rejects.append((run_id, row.id, reject.reason, reject.detail, source_row, now))
            batch.state.append((row.id, row_hash, "R", None, kept_id))
            batch.rejected_ids.append(row.id)
            result.count_reject(reject.reason)
            continue
        batch.good.append(user)
        batch.state.append((row.id, row_hash, "M", fingerprint(user), None))
        result.migrated += 1
        for fix in row_fixes:
            batch.fixes.append((run_id, row.id, fix.field, fix.original_value, fix.new_value, fix.reason))
            result.fixed += 1
    result.migrated += fast
    return batch


def _write_batch(
    out: psycopg.Cursor,
    batch: _Batch,
    users_copy: sql.Composed | None,
    stamps: tuple,
    path: CopyPath,
    state_tail: tuple[str, int],
    binary: bool = False,
) -> None:
    """COPY one batch out; ``state_tail`` is (run_id, transform settings) of a first load's state rows.

    With ``binary`` (binary_copy_ok) the users and the state go in binary COPY; the few rejects and
    fixes (JSON, text) always in text.
    """
    if users_copy is not None and batch.good:
        statement = users_copy + sql.SQL(BINARY) if binary else users_copy
        with out.copy(statement) as copy:
            if binary:
                copy.set_types(USER_TYPES + STAMP_TYPES if stamps else USER_TYPES)
            write = copy.write_row
            for user in batch.good:
                write((*user, *stamps))
    for statement, items in ((REJECTED_COPY, batch.rejects), (FIXES_COPY, batch.fixes)):
        if items:
            with out.copy(statement) as copy:
                for item in items:
                    copy.write_row(item)
    if path.loads and batch.state:
        with out.copy(STATE_LOAD_COPY + BINARY if binary else STATE_LOAD_COPY) as copy:
            if binary:
                copy.set_types(STATE_TYPES + STATE_TAIL_TYPES)
            write = copy.write_row
            for item in batch.state:
                write((*item, *state_tail))
    elif path.merges and batch.state:
        with out.copy(STATE_COPY + BINARY if binary else STATE_COPY) as copy:
            if binary:
                copy.set_types(STATE_TYPES)
            write = copy.write_row
            for item in batch.state:
                write(item)


def _merge(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    transformer: Transformer,
    result: PartitionResult,
    path: CopyPath,
    deleted: list[int],
    rejected_ids: list[int],
    run_id: str,
    now: dt.datetime,
) -> None:
    """Bring account_newuser in line with stage_users for this partition."""
    # Removals first: a key that a vanished or displaced row holds may be taken by a merged row.
    if not path.reads_changes_only:
        result.removed = target.execute(
            read_sql("copy/remove_vanished_users.sql"), {"lo": result.lo, "hi": result.hi}
        ).rowcount
    else:
        result.removed = target.execute(
            "DELETE FROM account_newuser WHERE id = ANY(%s)", (deleted + rejected_ids,)
        ).rowcount
    settle_conflicts(source, target, settings, transformer, result, run_id, now)
    result.inserted, result.updated = target.execute(
        read_sql("copy/merge_users.sql"), {"now": now}
    ).fetchone()
    result.unchanged += result.migrated - result.inserted - result.updated


def _save_state(
    target: psycopg.Connection,
    path: CopyPath,
    lo: int,
    hi: int,
    deleted: list[int],
    run_id: str,
    transform_settings: int,
) -> None:
    """Record what this pass saw of each legacy row of the range (for the next pass's delta)."""
    if path.reads_changes_only:
        target.execute("DELETE FROM migration_audit.source_state WHERE source_id = ANY(%s)", (deleted,))
    else:
        target.execute("DELETE FROM migration_audit.source_state WHERE source_id BETWEEN %s AND %s", (lo, hi))
    target.execute(
        "INSERT INTO migration_audit.source_state (source_id, row_hash, outcome, fingerprint, kept_id, run_id, "
        "transform_settings) SELECT source_id, row_hash, outcome, fingerprint, kept_id, %s, %s FROM stage_state "
        "ON CONFLICT (source_id) DO UPDATE SET row_hash = EXCLUDED.row_hash, outcome = EXCLUDED.outcome, "
        "fingerprint = EXCLUDED.fingerprint, kept_id = EXCLUDED.kept_id, run_id = EXCLUDED.run_id, "
        "transform_settings = EXCLUDED.transform_settings",
        (run_id, transform_settings),
    )
