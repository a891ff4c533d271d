"""Undo a cutover, or restore the legacy tables from a backup.

carry_back: after a cutover the application wrote to the new tables; make the legacy tables
writable again and carry every change made since the cutover back into them (new users, changed
passwords, last_login, flags and other fields, deleted users), recording each carried-back row in
migration_audit.rollback_rows, then mark the cutover rolled back so sync passes resume.

restore: reload the legacy tables from a backup run, refusing unless every file matches the sha256
in its manifest; the files are loaded into new tables first, then swapped in, in one transaction.
The swap replaces the tables' contents rather than renaming tables, so foreign keys of the
application's other tables keep pointing at the live table.
"""

from __future__ import annotations

import datetime as dt
import gzip
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from user_migration import audit
from user_migration.backup import verify_backup
from user_migration.config import FIELDS, Settings
from user_migration.cutover import active_cutover, set_legacy_read_only
from user_migration.db import copy_batches, fetch_batches, legacy_select_list, read_sql
from user_migration.errors import MigrationError
from user_migration.partition_copy import TARGET_LINKS, fingerprint_sql
from user_migration.transforms import LegacyRow, NewUser, Transformer

CARRIED_FIELDS = [f for f in FIELDS if f != "id"]


BATCH = 10_000


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
    with legacy.transaction(), nullcontext() if same else target.transaction():
        set_legacy_read_only(legacy, settings, None)
        carry = _Carrier(legacy, target, settings, cut["id"], rollback_run)
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
        target.execute(
            "UPDATE migration_audit.cutovers SET state = 'rolled_back', rolled_back_at = now(), "
            "rolled_back_by = %s WHERE id = %s",
            (by, cut["id"]),
        )
    return {"cutover_id": cut["id"], "cutover_run_id": cut["run_id"], **counts}


class _Carrier:
    """Writes target changes into the legacy tables and records each in migration_audit.rollback_rows."""

    def __init__(
        self,
        legacy: psycopg.Connection,
        target: psycopg.Connection,
        settings: Settings,
        cutover_id: int,
        run: str,
    ) -> None:
        self.legacy, self.target, self.cutover_id, self.run = legacy, target, cutover_id, run
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

    def update(self, users: list[NewUser]) -> int:
        """Changed users: only the fields whose value differs from the legacy row's transformed value."""
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
        """Users the application created after the cutover, with their ids."""
        columns = [self.mapping.column("id")] + [column for _, column in self.mapped]
        insert = sql.SQL("INSERT INTO {} ({}) VALUES ({})").format(
            self.users,
            sql.SQL(", ").join(map(sql.Identifier, columns)),
            sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        )
        for user in users:
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
            if link is None:
                continue
            table, other = TARGET_LINKS[key]
            legacy.execute("TRUNCATE rollback_links, rollback_link_changes")
            copy_batches(
                target,
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
            for rows in fetch_batches(legacy, "rollback_link_changes", per_user, size=BATCH):
                self._record(
                    [(uid, f"links:{link.table}", f"+{added} -{removed}") for uid, added, removed in rows]
                )
                totals["links_added"] += sum(row[1] for row in rows)
                totals["links_removed"] += sum(row[2] for row in rows)
        return totals

    def advance_sequence(self) -> None:
        mapping = self.mapping
        self.legacy.execute(
            sql.SQL("SELECT setval(pg_get_serial_sequence({}, {}), (SELECT max({}) FROM {}))").format(
                sql.Literal(f"{mapping.schema}.{mapping.users_table}"),
                sql.Literal(mapping.column("id")),
                self.id_column,
                self.users,
            )
        )


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
) -> dict:
    """Reload the legacy tables from the backup in ``folder``; refuses a backup that fails its checksums."""
    manifest = verify_backup(folder)
    mapping = settings.mapping
    live = {f"{mapping.schema}.{name}" for name in _names(settings)}
    entries = {entry["table"]: entry for entry in manifest["tables"]}
    missing = live - set(entries)
    if missing:
        raise MigrationError(
            f"backup {folder} has no file for {', '.join(sorted(missing))}; refusing to restore"
        )
    loaded: dict[str, int] = {}
    with legacy.transaction():
        for qualified in _ordered(settings):
            entry = entries[qualified]
            schema, name = qualified.split(".", 1)
            columns = [
                r[0]
                for r in legacy.execute(
                    "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                    "ORDER BY ordinal_position",
                    (schema, name),
                ).fetchall()
            ]
            if columns != entry["columns"]:
                raise MigrationError(
                    f"backup file {entry['path']} has columns {entry['columns']}, the live table {qualified} has "
                    f"{columns}; refusing to restore into a table whose shape changed"
                )
            staging = sql.Identifier(schema, f"{name}__restore")
            legacy.execute(sql.SQL("DROP TABLE IF EXISTS {}").format(staging))
            legacy.execute(
                sql.SQL("CREATE TABLE {} (LIKE {} INCLUDING DEFAULTS)").format(
                    staging, sql.Identifier(schema, name)
                )
            )
            with (
                legacy.cursor().copy(
                    sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv, HEADER true)").format(staging)
                ) as copy,
                gzip.open(folder / entry["path"], "rb") as fh,
            ):
                while chunk := fh.read(1 << 20):
                    copy.write(chunk)
            count = legacy.execute(sql.SQL("SELECT count(*) FROM {}").format(staging)).fetchone()[0]
            if count != entry["rows"]:
                raise MigrationError(
                    f"backup file {entry['path']} loaded {count} rows, its manifest says {entry['rows']}; refusing"
                )
            loaded[qualified] = count
    # The swap: one transaction, children emptied before the parent, the parent filled first.
    with legacy.transaction():
        legacy.execute("SET CONSTRAINTS ALL DEFERRED")
        set_legacy_read_only(legacy, settings, None)
        order = _ordered(settings)
        for qualified in reversed(order):
            schema, name = qualified.split(".", 1)
            legacy.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(schema, name)))
        for qualified in order:
            schema, name = qualified.split(".", 1)
            live_table, staging = sql.Identifier(schema, name), sql.Identifier(schema, f"{name}__restore")
            legacy.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}").format(live_table, staging))
            legacy.execute(sql.SQL("DROP TABLE {}").format(staging))
            legacy.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({}, 'id'), coalesce((SELECT max(id) FROM {}), 0) + 1, false) "
                    "WHERE pg_get_serial_sequence({}, 'id') IS NOT NULL"
                ).format(sql.Literal(qualified), live_table, sql.Literal(qualified))
            )
    if target is not None:
        cut = active_cutover(target)
        if cut is not None:
            target.execute(
                "UPDATE migration_audit.cutovers SET state = 'rolled_back', rolled_back_at = now(), "
                "rolled_back_by = %s WHERE id = %s",
                (f"restore from {folder.name}", cut["id"]),
            )
    return {"backup": str(folder), "restored": loaded}


def _names(settings: Settings) -> list[str]:
    mapping = settings.mapping
    return [mapping.users_table] + [link.table for link in (mapping.groups, mapping.permissions) if link]


def _ordered(settings: Settings) -> list[str]:
    """Parent first, then the link tables."""
    return [f"{settings.mapping.schema}.{name}" for name in _names(settings)]
