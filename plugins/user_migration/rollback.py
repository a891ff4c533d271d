"""Undo a cutover, or restore the legacy tables from a backup.

carry_back: after a cutover the application wrote to the new tables; make the legacy tables
writable again and carry every change made since the cutover back into them (new users, changed
passwords, last_login, flags and other fields, deleted users), recording each carried-back row in
migration_audit.rollback_rows, then mark the cutover rolled back so sync passes resume. The new
tables are locked against writes (EXCLUSIVE: reads go on) from the start until the commit, so no
write the application makes to them meanwhile is lost; it waits and lands after the commit, which
is why the application is switched back to the legacy tables before carry_back runs. With two
databases a failure between the legacy commit and the target's is finished by running it again.

restore: bring the legacy tables back to a backup run, refusing unless every file matches the
sha256 in its manifest. The files are staged in temp tables, then, in the same transaction, only
the rows that differ are deleted, updated or inserted: the application's other tables that point
at the users keep their rows, and no id sequence moves back.
"""

from __future__ import annotations

import datetime as dt
import gzip
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from user_migration import audit, privileges, validation_reuse
from user_migration.backup import verify_backup
from user_migration.config import FIELDS, LinkTable, Settings
from user_migration.cutover import active_cutover, set_legacy_read_only
from user_migration.db import (
    copy_batches,
    fetch_batches,
    legacy_select_list,
    read_sql,
    safe_error,
    users_table,
)
from user_migration.errors import MigrationError
from user_migration.faults import between_commits
from user_migration.fingerprint import fingerprint_sql
from user_migration.partition_copy import TARGET_LINKS
from user_migration.transforms import LegacyRow, NewUser, Transformer

CARRIED_FIELDS = [f for f in FIELDS if f != "id"]
# The audit detail of a changed user whose change an interrupted attempt carried (its fields are lost).
CARRIED_EARLIER = "already in the legacy table: carried by an earlier attempt"


BATCH = 10_000
READ_ONLY_TRIGGER = "user_migration_read_only"  # as make_legacy_read_only.sql names it
# The tables the application writes after the cutover; carry_back holds them against writes.
NEW_TABLES = (
    "account_newuser",
    "account_newuser_groups",
    "account_newuser_user_permissions",
    "account_profile",
)


def cutover_settings(target: psycopg.Connection, cutover_run: str, settings: Settings) -> Settings:
    """``settings`` with the transform settings and mapping of the cutover's run.

    A row counts as changed since the cutover when it differs from its legacy row transformed as
    that run transformed it; the rollback DAG's defaults (NP, fix) would see every phone changed.
    """
    try:
        return settings.with_transform_of(audit.run_params(target, cutover_run))
    except LookupError as exc:
        raise MigrationError(str(exc)) from None


def carry_back(
    legacy: psycopg.Connection, target: psycopg.Connection, settings: Settings, by: str, rollback_run: str
) -> dict[str, Any]:
    """Roll back the active cutover; one transaction per database (one in all when they are the same).

    The new tables are held against writes first (``_hold_new_tables``), until the commit. With two
    databases the legacy side commits first, then the target marks the cutover rolled back; if that
    second commit fails, running carry_back again finishes the job (``resumed`` in the result):
    rows already carried are left as they are, nothing is inserted twice.
    Deleted users go first and inserted ones last, so keys freed by one change are free for the next;
    then the group and permission links of every user in the target are made the target's. SQL finds
    the rows that changed since the cutover (their fingerprint differs from the sync state's) and
    they are read a batch at a time, so memory does not grow with the table.
    """
    cut = active_cutover(target)
    if cut is None:
        raise MigrationError("there is no active cutover to roll back (migration_audit.cutovers)")
    settings = cutover_settings(target, cut["run_id"], settings)
    same = legacy is target
    counts = {"inserted": 0, "updated": 0, "deleted": 0, "links_added": 0, "links_removed": 0}
    legacy_committed = resumed = False
    try:
        # The target's transaction encloses the legacy one: the legacy side commits first, and a retry
        # after a failed target commit finds the cutover still active and carries nothing twice.
        with target.transaction():
            _hold_new_tables(target, settings)
            with nullcontext() if same else legacy.transaction():
                resumed, counts = _carry_legacy_side(
                    legacy, target, settings, cut["id"], rollback_run, counts
                )
            legacy_committed = not same
            if legacy_committed:
                between_commits()
            target.execute(
                "UPDATE migration_audit.cutovers SET state = 'rolled_back', rolled_back_at = now(), "
                "rolled_back_by = %s WHERE id = %s",
                (by, cut["id"]),
            )
            validation_reuse.note_write(target, "ROLLBACK")
    except psycopg.errors.InsufficientPrivilege as exc:
        if legacy_committed:
            raise
        raise MigrationError(privileges.switch_refusal("carry_back", legacy, exc)) from None
    except psycopg.Error as exc:
        if not legacy_committed:
            raise
        raise MigrationError(_half_done(cut["id"], exc)) from None
    return {"cutover_id": cut["id"], "cutover_run_id": cut["run_id"], "resumed": resumed, **counts}


def _carry_legacy_side(
    legacy: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    cutover_id: int,
    rollback_run: str,
    counts: dict[str, int],
) -> tuple[bool, dict[str, int]]:
    """Carry the changes back into the legacy tables, unless an earlier attempt did; (resumed, counts)."""
    if _carried_already(legacy, settings, cutover_id):
        # The legacy side of an earlier attempt committed, and its marker with it: all was
        # carried then. Carrying again would overwrite what the application has written to
        # the legacy tables since; only the target's side is left to finish. Its per-row
        # audit went with the failed target commit: one row says so.
        target.execute(
            "INSERT INTO migration_audit.rollback_rows (cutover_id, run_id, source_id, action, detail) "
            "VALUES (%s, %s, 0, 'resumed', %s) ON CONFLICT DO NOTHING",
            (cutover_id, rollback_run, CARRIED_EARLIER),
        )
        return True, counts
    resumed = not _legacy_read_only(legacy, settings)
    set_legacy_read_only(legacy, settings, None)
    carry = _Carrier(legacy, target, settings, cutover_id, rollback_run, resumed)
    counts = _carry(carry, target, counts)
    _mark_carried(legacy, settings, cutover_id, rollback_run)
    return resumed, counts


def _half_done(cutover_id: int, exc: psycopg.Error) -> str:
    """What to do when the legacy side committed and the target's commit failed."""
    return (
        f"rollback half done: the legacy tables are carried back and writable, but the target database "
        f"failed before its commit ({safe_error(exc)}), so cutover {cutover_id} is still marked active. Run "
        "the rollback again once the target database is reachable: it finishes the target's side without carrying anything again "
        "and marks the cutover rolled back"
    )


def _carry(carry: _Carrier, target: psycopg.Connection, counts: dict[str, int]) -> dict[str, int]:
    """Deletes, then updates, then inserts (keys freed by one are free for the next), then links."""
    for ids in fetch_batches(
        target, "rollback_deleted", sql.SQL(read_sql("rollback/deleted_users.sql")), size=BATCH
    ):
        counts["deleted"] += carry.delete([row[0] for row in ids])
    changed = sql.SQL(read_sql("rollback/changed_users.sql")).format(fingerprint=fingerprint_sql())
    for rows in fetch_batches(target, "rollback_changed", changed, {"new": False}, BATCH):
        counts["updated"] += carry.update([NewUser(*row) for row in rows])
    for rows in fetch_batches(target, "rollback_new", changed, {"new": True}, BATCH):
        counts["inserted"] += carry.insert([NewUser(*row) for row in rows])
    if counts["inserted"]:
        carry.advance_sequence()
    counts.update(carry.links())
    return counts


def _marker_table(settings: Settings) -> sql.Identifier:
    return sql.Identifier(settings.mapping.schema, "user_migration_rollbacks")


def _carried_already(legacy: psycopg.Connection, settings: Settings, cutover_id: int) -> bool:
    """Whether a carry_back of this cutover has committed its legacy side (see _mark_carried)."""
    table = _marker_table(settings)
    if legacy.execute("SELECT to_regclass(%s)", (table.as_string(legacy),)).fetchone()[0] is None:
        return False
    return legacy.execute(
        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE cutover_id = %s)").format(table), (cutover_id,)
    ).fetchone()[0]


def _mark_carried(legacy: psycopg.Connection, settings: Settings, cutover_id: int, run: str) -> None:
    """In the legacy transaction: a marker that commits (or not) with everything carried back."""
    table = _marker_table(settings)
    legacy.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {} (cutover_id bigint PRIMARY KEY, run_id text NOT NULL, "
            "carried_at timestamptz NOT NULL DEFAULT now())"
        ).format(table)
    )
    legacy.execute(
        sql.SQL("INSERT INTO {} (cutover_id, run_id) VALUES (%s, %s) ON CONFLICT DO NOTHING").format(table),
        (cutover_id, run),
    )


def _legacy_read_only(legacy: psycopg.Connection, settings: Settings) -> bool:
    """Whether the cutover's read-only trigger is on the legacy users table (gone: a rollback's legacy side committed)."""
    return legacy.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = %s::regclass AND tgname = %s)",
        (users_table(settings.mapping).as_string(legacy), READ_ONLY_TRIGGER),
    ).fetchone()[0]


def _hold_new_tables(target: psycopg.Connection, settings: Settings) -> None:
    """Lock the new tables against writes until the carry-back commits: a write after its reads would be lost.

    EXCLUSIVE mode lets the application read on; its writes wait, then land after the commit. Gives
    up after ``lock_timeout_ms`` rather than queueing the application behind a long transaction.
    """
    tables = [
        name
        for name in NEW_TABLES
        if target.execute("SELECT to_regclass(%s)", (name,)).fetchone()[0] is not None
    ]
    target.execute(
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{settings.lock_timeout_ms}ms"))
    )
    try:
        with target.transaction():
            target.execute(
                sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(
                    sql.SQL(", ").join(map(sql.Identifier, tables))
                )
            )
    except psycopg.errors.LockNotAvailable:
        oids = [target.execute("SELECT %s::regclass::oid", (name,)).fetchone()[0] for name in tables]
        rows = target.execute(read_sql("cutover/legacy_lock_holders.sql"), {"tables": oids}).fetchall()
        holders = "; ".join(
            f"pid {pid} ({app}, {state}, in a transaction for {secs} s)" for pid, app, state, secs in rows
        )
        raise MigrationError(
            f"rollback gave up, nothing changed: {', '.join(tables)} could not be locked against writes within "
            f"{settings.lock_timeout_ms} ms ({holders or 'no session holds them now'}). The cutover stays active "
            "and the legacy tables read-only; stop the application's writes to the new tables (switch it back "
            "first), then retry, or raise lock_timeout_ms"
        ) from None
    target.execute("SET LOCAL lock_timeout = '30s'")


class _Carrier:
    """Writes target changes into the legacy tables and records each in migration_audit.rollback_rows."""

    def __init__(
        self,
        legacy: psycopg.Connection,
        target: psycopg.Connection,
        settings: Settings,
        cutover_id: int,
        run: str,
        resumed: bool = False,
    ) -> None:
        self.legacy, self.target, self.cutover_id, self.run = legacy, target, cutover_id, run
        self.resumed = resumed  # the legacy side of an earlier attempt committed, its target side did not
        mapping = settings.mapping
        self.mapping = mapping
        self.users = sql.Identifier(mapping.schema, mapping.users_table)
        self.id_column = sql.Identifier(mapping.column("id"))
        self.mapped = [(f, mapping.column(f)) for f in CARRIED_FIELDS if mapping.column(f) is not None]
        self.limits = _column_limits(legacy, settings)
        self.transformer = Transformer(settings.phone_region, settings.invalid_phone, today=dt.date.max)
        self._staging = False

    def _record(self, records: list[tuple[int, str, str | None]]) -> None:
        with self.target.cursor() as cur:
            cur.executemany(
                "INSERT INTO migration_audit.rollback_rows (cutover_id, run_id, source_id, action, detail) "
                "VALUES (%s, %s, %s, %s, %s)",
                [(self.cutover_id, self.run, i, action, detail) for i, action, detail in records],
            )

    def delete(self, ids: list[int]) -> int:
        """Users deleted in the target, with their links (which would otherwise block the delete)."""
        mapping = self.mapping
        for link in (mapping.groups, mapping.permissions):
            if link is not None:
                self.legacy.execute(
                    sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(
                        sql.Identifier(mapping.schema, link.table), sql.Identifier(link.user_column)
                    ),
                    (ids,),
                )
        deleted = self.legacy.execute(
            sql.SQL("DELETE FROM {} WHERE {} = ANY(%s)").format(self.users, self.id_column), (ids,)
        ).rowcount
        self._record([(i, "delete", None) for i in ids])
        return deleted

    def update(self, users: list[NewUser], new: bool = False) -> int:
        """Changed users: only the fields whose value differs from the legacy row's transformed value.

        ``new``: users created after the cutover that an earlier attempt already inserted.
        """
        current = {user.id: user for user in users}
        select = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(
            legacy_select_list(self.mapping), self.users, self.id_column
        )
        records: list[tuple[int, str, str | None]] = []
        by_fields: dict[tuple[str, ...], list[tuple[Any, ...]]] = {}
        for values in self.legacy.execute(select, (list(current),)).fetchall():
            was, _, _ = self.transformer.transform(LegacyRow(*values))
            now = current[values[0]]
            fields = tuple(f for f, _ in self.mapped if was is None or getattr(was, f) != getattr(now, f))
            if not fields:
                if self.resumed and not new:  # its audit row went with the failed target commit: write it now
                    records.append((values[0], "update", CARRIED_EARLIER))
                continue
            by_fields.setdefault(fields, []).append(
                (
                    values[0],
                    *(
                        _fit(getattr(now, f), self.limits.get(self.mapping.column(f)), f, values[0])
                        for f in fields
                    ),
                )
            )
            records.append((values[0], "update", ",".join(fields)))
        for fields, rows in by_fields.items():
            self._update(fields, rows)
        self._record(records)
        return len(records)

    def _update(self, fields: tuple[str, ...], rows: list[tuple[Any, ...]]) -> None:
        """One UPDATE for the users of a batch that changed the same fields: rows are (id, *values)."""
        legacy, columns = self.legacy, [sql.Identifier(self.mapping.column(f)) for f in fields]
        if not self._staging:
            legacy.execute(
                sql.SQL(
                    "CREATE TEMP TABLE IF NOT EXISTS rollback_updates ON COMMIT DROP AS "
                    "SELECT * FROM {} WITH NO DATA"
                ).format(self.users)
            )
            self._staging = True
        legacy.execute("TRUNCATE rollback_updates")
        with (
            legacy.cursor() as cur,
            cur.copy(
                sql.SQL("COPY rollback_updates ({}) FROM STDIN").format(
                    sql.SQL(", ").join([self.id_column, *columns])
                )
            ) as copy,
        ):
            for row in rows:
                copy.write_row(row)
        update = sql.SQL("UPDATE {} AS u SET {} FROM rollback_updates AS r WHERE u.{} = r.{}").format(
            self.users,
            sql.SQL(", ").join(sql.SQL("{} = r.{}").format(c, c) for c in columns),
            self.id_column,
            self.id_column,
        )
        try:
            with legacy.transaction():
                legacy.execute(update)
        except psycopg.errors.UniqueViolation as exc:
            # The key's value is personal data (a username, an email): name the constraint and the ids.
            ids = ", ".join(str(row[0]) for row in rows[:20]) + (" ..." if len(rows) > 20 else "")
            raise MigrationError(
                f"rollback stopped, nothing changed: carrying back changed {', '.join(fields)} of users {ids} "
                f"breaks the legacy unique key {exc.diag.constraint_name}; two users probably swapped values "
                "after the cutover (one took the other's old value). Give one of them a temporary value in "
                "the new table, run the rollback, then set it back in the legacy table"
            ) from None

    def insert(self, users: list[NewUser]) -> int:
        """Users the application created after the cutover, with their ids.

        One already in the legacy table that the sync state does not know was put there by an earlier
        attempt whose target commit failed: it is brought up to date instead of inserted twice.
        """
        present = {
            row[0]
            for row in self.legacy.execute(
                sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(
                    self.id_column, self.users, self.id_column
                ),
                ([user.id for user in users],),
            ).fetchall()
        }
        known = {
            row[0]
            for row in self.target.execute(
                "SELECT source_id FROM migration_audit.source_state WHERE source_id = ANY(%s)",
                (list(present),),
            ).fetchall()
        }
        carried = {user.id for user in users if user.id in present and user.id not in known}
        if carried:
            self.update([user for user in users if user.id in carried], new=True)
        fresh = [user for user in users if user.id not in carried]
        columns = [self.mapping.column("id")] + [column for _, column in self.mapped]
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self.users,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        )
        for user in fresh:
            values = [user.id] + [
                _fit(getattr(user, f), self.limits.get(c), f, user.id) for f, c in self.mapped
            ]
            try:
                with self.legacy.transaction():
                    self.legacy.execute(insert, values)
            except psycopg.errors.UniqueViolation as exc:
                raise MigrationError(
                    f"rollback stopped, nothing changed: new user {user.id} cannot be carried back, the legacy "
                    f"table already holds its key ({exc.diag.constraint_name}); resolve that row by hand and "
                    "run the rollback again"
                ) from None
        self._record([(user.id, "insert", None) for user in users])
        return len(users)

    def links(self) -> dict[str, int]:
        """Make the legacy links of every user in the target equal to the target's links.

        Users only in the legacy table (rejected by the migration) keep theirs; deleted users lost
        theirs with them. Links keep the target's id unless the legacy table already uses it. Each
        user whose links changed is recorded once per link table, with how many were added and removed.
        """
        legacy, target, mapping = self.legacy, self.target, self.mapping
        legacy.execute(
            "CREATE TEMP TABLE IF NOT EXISTS rollback_scope (id bigint PRIMARY KEY) ON COMMIT DROP"
        )
        legacy.execute(
            "CREATE TEMP TABLE IF NOT EXISTS rollback_links (id bigint, user_id bigint, other_id bigint) "
            "ON COMMIT DROP"
        )
        legacy.execute(
            "CREATE TEMP TABLE IF NOT EXISTS rollback_link_changes (user_id bigint, added int, removed int) "
            "ON COMMIT DROP"
        )
        legacy.execute("TRUNCATE rollback_scope")
        copy_batches(
            target,
            "rollback_scope",
            sql.SQL("SELECT id FROM account_newuser ORDER BY id"),
            None,
            legacy,
            "COPY rollback_scope (id) FROM STDIN",
            BATCH,
        )
        legacy.execute("ANALYZE rollback_scope")
        totals = {"links_added": 0, "links_removed": 0}
        for key, link in (("groups", mapping.groups), ("permissions", mapping.permissions)):
            if link is not None:
                added, removed = self._carry_link_table(TARGET_LINKS[key], link)
                totals["links_added"] += added
                totals["links_removed"] += removed
        return totals

    def _carry_link_table(self, target_table: tuple[str, str], link: LinkTable) -> tuple[int, int]:
        """One link table: stage the target's links, apply carry_links.sql, record each user's change."""
        legacy, mapping = self.legacy, self.mapping
        table, other = target_table
        legacy.execute("TRUNCATE rollback_links, rollback_link_changes")
        copy_batches(
            self.target,
            "rollback_links",
            sql.SQL("SELECT id, newuser_id, {} FROM {} ORDER BY id").format(
                sql.Identifier(other), sql.Identifier(table)
            ),
            None,
            legacy,
            "COPY rollback_links (id, user_id, other_id) FROM STDIN",
            BATCH,
        )
        legacy.execute("ANALYZE rollback_links")
        statements = sql.SQL(read_sql("rollback/carry_links.sql")).format(
            link=sql.Identifier(mapping.schema, link.table),
            qualified=sql.Literal(sql.Identifier(mapping.schema, link.table).as_string(legacy)),
            user=sql.Identifier(link.user_column),
            other=sql.Identifier(link.other_column),
        )
        try:
            with legacy.transaction():
                legacy.execute(statements)
                legacy.execute("SET CONSTRAINTS ALL IMMEDIATE")  # a missing group fails here, by name
        except psycopg.errors.ForeignKeyViolation as exc:
            raise MigrationError(
                f"rollback stopped, nothing changed: a link in {table} cannot be carried back to "
                f"{mapping.schema}.{link.table} ({exc.diag.message_detail or exc.diag.constraint_name}); "
                "create what it points at on the legacy side, or remove the link, and run the rollback again"
            ) from None
        per_user = sql.SQL(
            "SELECT user_id, sum(added), sum(removed) FROM rollback_link_changes GROUP BY user_id ORDER BY user_id"
        )
        added = removed = 0
        for rows in fetch_batches(legacy, "rollback_link_changes", per_user, size=BATCH):
            self._record([(uid, f"links:{link.table}", f"+{a} -{r}") for uid, a, r in rows])
            added += sum(row[1] for row in rows)
            removed += sum(row[2] for row in rows)
        return added, removed

    def advance_sequence(self) -> None:
        advance_sequence(self.legacy, self.users, self.mapping.column("id"))


def _column_limits(legacy: psycopg.Connection, settings: Settings) -> dict[str, int]:
    return {
        name: limit
        for name, limit in legacy.execute(
            "SELECT column_name, character_maximum_length FROM information_schema.columns "
            "WHERE table_schema = %s AND table_name = %s AND character_maximum_length IS NOT NULL",
            (settings.mapping.schema, settings.mapping.users_table),
        ).fetchall()
    }


def _fit(value: Any, limit: int | None, field: str, user_id: int) -> Any:
    if limit is not None and isinstance(value, str) and len(value) > limit:
        raise MigrationError(
            f"rollback stopped, nothing changed: user {user_id}'s {field} has {len(value)} characters, the legacy "
            f"column allows {limit}; widen the legacy column or fix the row, then run the rollback again"
        )
    return value


def restore(
    legacy: psycopg.Connection, target: psycopg.Connection | None, settings: Settings, folder: Path
) -> dict[str, Any]:
    """Bring the legacy tables back to the backup in ``folder``, changing only the rows that differ.

    Deleting and re-inserting everything would cascade into (or break the keys of) the application's
    tables that point at the users and move id sequences back; a difference touches none of that.
    The backup is staged in temp tables dropped with the transaction, so no copy of the password
    hashes outlives it, whatever fails. Refuses, changing nothing, when rows of other tables point
    at users the backup lacks.
    """
    tables, entries = _backup_entries(folder, settings)
    try:
        with legacy.transaction():
            loaded, changes = _restore_in(legacy, settings, folder, tables, entries)
    except psycopg.errors.InsufficientPrivilege as exc:
        raise MigrationError(privileges.switch_refusal("restore", legacy, exc)) from None
    except psycopg.errors.LockNotAvailable:
        raise MigrationError(
            f"restore gave up, nothing changed: the legacy tables could not be locked within "
            f"{settings.lock_timeout_ms} ms (a long transaction writes to them); retry when the application "
            "is quieter, or raise lock_timeout_ms"
        ) from None
    except (psycopg.errors.UniqueViolation, psycopg.errors.ForeignKeyViolation) as exc:
        # The key's value may be personal data (a username, an email): name the table and constraint.
        raise MigrationError(
            f"restore stopped, nothing changed: the backup's rows break {exc.diag.constraint_name} of "
            f"{exc.diag.table_name} against the rows kept or the tables around them; fix the rows that "
            "changed since the backup by hand, or restore a later backup"
        ) from None
    if target is not None:
        cut = active_cutover(target)
        if cut is not None:
            target.execute(
                "UPDATE migration_audit.cutovers SET state = 'rolled_back', rolled_back_at = now(), "
                "rolled_back_by = %s WHERE id = %s",
                (f"restore from {folder.name}", cut["id"]),
            )
            validation_reuse.note_write(target, "ROLLBACK")
    return {"backup": str(folder), "restored": loaded, "changes": changes}


def _backup_entries(
    folder: Path, settings: Settings
) -> tuple[list[tuple[str, sql.Identifier]], dict[str, dict[str, Any]]]:
    """The tables to restore and the verified backup's manifest entry of each; refuses a missing file."""
    manifest = verify_backup(folder)
    tables = _restore_tables(settings)
    entries = {entry["table"]: entry for entry in manifest["tables"]}
    missing = [key for key, _ in tables if key not in entries]
    if missing:
        raise MigrationError(f"backup {folder} has no file for {', '.join(missing)}; refusing to restore")
    return tables, entries


def _restore_in(
    legacy: psycopg.Connection,
    settings: Settings,
    folder: Path,
    tables: list[tuple[str, sql.Identifier]],
    entries: dict[str, dict[str, Any]],
) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """In the caller's transaction: stage, lock, check, apply the difference; (rows loaded, changes)."""
    staged = [
        _stage(legacy, live, entries[key], folder, f"user_migration_restore_{n}")
        for n, (key, live) in enumerate(tables)
    ]
    loaded: dict[str, int] = {}
    for (key, _), table in zip(tables, staged, strict=True):
        loaded[key] = table.rows
    _lock_live_tables(legacy, settings, staged)
    for table in staged:
        _refuse_lost_references(legacy, table, staged)
    set_legacy_read_only(legacy, settings, None)
    changes = _apply_difference(legacy, dict(zip(loaded, staged, strict=True)))
    legacy.execute("SET CONSTRAINTS ALL IMMEDIATE")  # a backup link to a vanished group fails here
    for table in staged:
        legacy.execute(sql.SQL("DROP TABLE {}").format(table.staging))
    return loaded, changes


def _lock_live_tables(legacy: psycopg.Connection, settings: Settings, staged: list[_Staged]) -> None:
    """Hold the live tables against writes (EXCLUSIVE), waiting at most lock_timeout_ms for them."""
    legacy.execute(
        sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(f"{settings.lock_timeout_ms}ms"))
    )
    legacy.execute(
        sql.SQL("LOCK TABLE {} IN EXCLUSIVE MODE").format(sql.SQL(", ").join(t.live for t in staged))
    )
    legacy.execute("SET LOCAL lock_timeout = '30s'")


def _apply_difference(legacy: psycopg.Connection, staged: dict[str, _Staged]) -> dict[str, dict[str, int]]:
    """Delete, update and insert the rows where the live tables differ from the staged backup.

    Deletes run links first, users last (the reverse of the table order); inserts users first.
    """
    changes: dict[str, dict[str, int]] = {}
    for key, table in reversed(staged.items()):
        changes[key] = {"deleted": legacy.execute(table.statement("restore_delete.sql")).rowcount}
    for key, table in staged.items():
        changes[key]["updated"] = (
            legacy.execute(table.statement("restore_update.sql")).rowcount if table.others else 0
        )
        changes[key]["inserted"] = legacy.execute(table.statement("restore_insert.sql")).rowcount
        if len(table.key) == 1:
            advance_sequence(legacy, table.live, table.key[0])
    return changes


@dataclass(frozen=True)
class _Staged:
    """One live table and the temp table holding its backup; composes the difference statements."""

    live: sql.Identifier
    staging: sql.Identifier
    qualified: str  # the live table's quoted, qualified name, for regclass literals
    key: list[str]
    others: list[str]
    rows: int

    def statement(self, name: str) -> sql.Composed:
        def joined(template: str, columns: list[str], sep: str) -> sql.Composed:
            return sql.SQL(sep).join(sql.SQL(template).format(c=sql.Identifier(c)) for c in columns)

        return sql.SQL(read_sql(f"rollback/{name}")).format(
            live=self.live,
            staging=self.staging,
            match=joined("l.{c} = s.{c}", self.key, " AND "),
            assign=joined("{c} = s.{c}", self.others, ", "),
            differs=joined("l.{c} IS DISTINCT FROM s.{c}", self.others, " OR "),
            columns=joined("{c}", self.key + self.others, ", "),
            key=joined("{c}", self.key, ", "),
        )


def _stage(
    legacy: psycopg.Connection, live: sql.Identifier, entry: dict[str, Any], folder: Path, name: str
) -> _Staged:
    """Load one backup file into a temp table (dropped at commit or rollback) shaped like ``live``."""
    qualified = live.as_string(legacy)
    columns = [
        r[0]
        for r in legacy.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            (qualified,),
        ).fetchall()
    ]
    if columns != entry["columns"]:
        raise MigrationError(
            f"backup file {entry['path']} has columns {entry['columns']}, the live table {qualified} has "
            f"{columns}; refusing to restore into a table whose shape changed"
        )
    key = [
        r[0]
        for r in legacy.execute(
            "SELECT a.attname FROM pg_index AS i CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k (attnum, n) "
            "JOIN pg_attribute AS a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
            "WHERE i.indrelid = %s::regclass AND i.indisprimary ORDER BY k.n",
            (qualified,),
        ).fetchall()
    ]
    if not key:
        raise MigrationError(
            f"the live table {qualified} has no primary key, so its rows cannot be matched with the backup's; "
            "add one (Django tables have one on id) and restore again"
        )
    staging = sql.Identifier(name)
    legacy.execute(
        sql.SQL("CREATE TEMP TABLE {} ON COMMIT DROP AS SELECT * FROM {} WITH NO DATA").format(staging, live)
    )
    with (
        legacy.cursor().copy(
            sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv, HEADER true)").format(staging)
        ) as copy,
        gzip.open(folder / entry["path"], "rb") as fh,
    ):
        while chunk := fh.read(1 << 20):
            copy.write(chunk)
    rows = legacy.execute(sql.SQL("SELECT count(*) FROM {}").format(staging)).fetchone()[0]
    if rows != entry["rows"]:
        raise MigrationError(
            f"backup file {entry['path']} loaded {rows} rows, its manifest says {entry['rows']}; refusing"
        )
    legacy.execute(
        sql.SQL("CREATE UNIQUE INDEX ON {} ({})").format(
            staging, sql.SQL(", ").join(map(sql.Identifier, key))
        )
    )
    legacy.execute(sql.SQL("ANALYZE {}").format(staging))
    return _Staged(live, staging, qualified, key, [c for c in columns if c not in key], rows)


def _refuse_lost_references(legacy: psycopg.Connection, table: _Staged, staged: list[_Staged]) -> None:
    """Raise, naming the table, the constraint and a count, if other tables' rows point at rows the backup lacks."""
    keys = legacy.execute(
        read_sql("rollback/restore_referencing_keys.sql"),
        {"table": table.qualified, "restored": [t.qualified for t in staged]},
    ).fetchall()
    for schema, name, referencing, constraint, fk_columns, pk_columns in keys:
        count = legacy.execute(
            sql.SQL(
                "SELECT count(*) FROM {} AS r WHERE {} AND NOT EXISTS (SELECT 1 FROM {} AS s WHERE {})"
            ).format(
                sql.Identifier(schema, name),
                sql.SQL(" AND ").join(
                    sql.SQL("r.{} IS NOT NULL").format(sql.Identifier(c)) for c in fk_columns
                ),
                table.staging,
                sql.SQL(" AND ").join(
                    sql.SQL("s.{} = r.{}").format(sql.Identifier(p), sql.Identifier(f))
                    for f, p in zip(fk_columns, pk_columns, strict=True)
                ),
            )
        ).fetchone()[0]
        if count:
            raise MigrationError(
                f"restore refused, nothing changed: {count} row(s) of {referencing} point at rows of "
                f"{table.qualified} that the backup does not have (foreign key {constraint}); restoring would "
                f"delete those rows or break the key. Delete or re-point them in {referencing}, or restore a "
                "later backup"
            )


def advance_sequence(conn: psycopg.Connection, table: sql.Identifier, column: str) -> None:
    """Move the sequence of ``table``.``column`` past the column's largest value, never back (ids not reused)."""
    conn.execute(
        sql.SQL(read_sql("rollback/advance_sequence.sql")).format(
            qualified=sql.Literal(table.as_string(conn)),
            column=sql.Literal(column),
            table=table,
            ident=sql.Identifier(column),
        )
    )


def _restore_tables(settings: Settings) -> list[tuple[str, sql.Identifier]]:
    """(the backup manifest's name, the live table) of the users table, then the link tables."""
    mapping = settings.mapping
    return [(f"{mapping.schema}.{name}", sql.Identifier(mapping.schema, name)) for name in _names(settings)]


def _names(settings: Settings) -> list[str]:
    mapping = settings.mapping
    return [mapping.users_table] + [link.table for link in (mapping.groups, mapping.permissions) if link]
