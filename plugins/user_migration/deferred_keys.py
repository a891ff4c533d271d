"""A first load fills the empty link tables without their foreign keys; the finalize step adds them.

A link row written with its two foreign keys in place (to account_newuser, and to auth_group or
auth_permission; both deferred) queues two checks that run at the partition's commit, a
``SELECT ... FOR KEY SHARE`` of the referenced row each, and two partitions locking the same few
group rows turn those locks into multixacts. Adding a key to a loaded table checks every row with
one join instead (docs/decisions/0014-fk-deferred-link-load.md).

So after the plan of a first load commits, each of the link tables' foreign keys is dropped in a
short transaction of its own (only of an empty link table, and only keys exactly as the versioned DDL makes them: ``LINK_KEYS``; any other
stays) and records each in migration_audit.deferred_keys. The link tables' indexes stay: merging
and removing links look rows up through them. Before the deferred indexes are built
(deferred_indexes.build, which calls ``restore``), each key comes back in two steps:

1. ``ADD CONSTRAINT ... NOT VALID`` in a short transaction of its own. It takes SHARE ROW
   EXCLUSIVE on the link table and on the referenced one (auth_group is the legacy side's: its
   writes wait for that moment only, and ``lock_timeout`` bounds the wait). From its commit on,
   every new write is checked, so the rows the validation could refuse are a fixed set.
2. ``VALIDATE CONSTRAINT``: one join over the table, under SHARE UPDATE EXCLUSIVE on the link
   table and ROW SHARE on the referenced one (the application's writes go on). The record is
   deleted in the same transaction. If it refuses:
   - links whose user is not in account_newuser (removed after its links were copied: a duplicate
     settled or displaced, a vanished user) are what ON DELETE CASCADE removes on a normal load.
     They are moved to migration_audit.quarantined_links with the reason, logged and counted,
     then the key is validated;
   - links whose group or permission does not exist are refused, as a normal load's commit
     refuses them: MigrationError names the rows and the fix, the key stays NOT VALID and
     recorded, and the next finalize (or plan) validates it.

Every step is idempotent: a key that exists (valid or not) is not added again, a valid one is not
validated again. The statements come from ``LINK_KEYS`` (code), never from a record's text: a
record whose name or definition ``LINK_KEYS`` does not give is refused before anything runs.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql

from user_migration.db import MigrationError, foreign_keys

log = logging.getLogger(__name__)

USERS = "account_newuser"
# Rows named in a refusal, at most.
SHOWN = 10
QUARANTINE_REASON = "user_missing"


@dataclass(frozen=True)
class LinkKey:
    """A foreign key of a link table as include/sql/target/001_create_new_schema.sql makes it."""

    table: str
    name: str
    column: str
    references: str
    cascade: bool

    @property
    def definition(self) -> str:
        """The key as pg_get_constraintdef() writes it (the referenced table on the search path)."""
        cascade = " ON DELETE CASCADE" if self.cascade else ""
        return (
            f"FOREIGN KEY ({self.column}) REFERENCES {self.references}(id){cascade} "
            "DEFERRABLE INITIALLY DEFERRED"
        )

    @property
    def other_column(self) -> str:
        return "group_id" if self.table == "account_newuser_groups" else "permission_id"

    def add_statement(self) -> sql.Composed:
        return sql.SQL(
            "ALTER TABLE {table} ADD CONSTRAINT {name} FOREIGN KEY ({column}) REFERENCES {references} (id)"
            "{cascade} DEFERRABLE INITIALLY DEFERRED NOT VALID"
        ).format(
            table=sql.Identifier(self.table),
            name=sql.Identifier(self.name),
            column=sql.Identifier(self.column),
            references=sql.Identifier(self.references),
            cascade=sql.SQL(" ON DELETE CASCADE" if self.cascade else ""),
        )

    def validate_statement(self) -> sql.Composed:
        return sql.SQL("ALTER TABLE {} VALIDATE CONSTRAINT {}").format(
            sql.Identifier(self.table), sql.Identifier(self.name)
        )


def _keys() -> dict[str, LinkKey]:
    keys = {}
    for table, other, references in (
        ("account_newuser_groups", "group_id", "auth_group"),
        ("account_newuser_user_permissions", "permission_id", "auth_permission"),
    ):
        for key in (
            LinkKey(table, f"{table}_newuser_id_fkey", "newuser_id", USERS, True),
            LinkKey(table, f"{table}_{other}_fk", other, references, False),
        ):
            keys[key.name] = key
    return keys


LINK_KEYS = _keys()
LINK_TABLES = tuple(dict.fromkeys(key.table for key in LINK_KEYS.values()))


# Dropping a key takes ACCESS EXCLUSIVE on the referenced table too, and while the request waits,
# every reader of that table queues behind it: for auth_group and auth_permission (the application's
# tables) each try waits at most DROP_LOCK_MS, in a transaction that commits at once.
DROP_LOCK_MS = 100
DROP_TRIES = 5
DROP_BACKOFF_SECONDS = 0.2


def defer(target: psycopg.Connection, run_id: str, lock_timeout_ms: int = 3000) -> list[str]:
    """Drop the foreign keys of the empty link tables, recording them; returns their names.

    Call after the plan of a first load committed, outside a transaction: each key is dropped and
    recorded in a transaction of its own that commits at once, so no lock on the application's
    auth_group or auth_permission outlives the statement. A key to one of those tables is tried
    ``DROP_TRIES`` times, each waiting at most ``DROP_LOCK_MS`` (never more than ``lock_timeout_ms``)
    for the lock: if it is never granted the key stays in place (the load is slower, not wrong).
    """
    deferred: list[str] = []
    for table in LINK_TABLES:
        if target.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(table))
        ).fetchone()[0]:
            continue
        for name, definition in foreign_keys(target, table):
            key = LINK_KEYS.get(name)
            if key is None or key.table != table or key.definition != definition:
                continue
            if _drop(target, key, run_id, min(lock_timeout_ms, DROP_LOCK_MS)):
                deferred.append(name)
    return deferred


def _drop(target: psycopg.Connection, key: LinkKey, run_id: str, lock_timeout_ms: int) -> bool:
    """Drop and record one key, in short tries; False when its tables stayed locked every time."""
    for attempt in range(1, DROP_TRIES + 1):
        try:
            with target.transaction():
                target.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
                target.execute(
                    "INSERT INTO migration_audit.deferred_keys (constraint_name, table_name, definition, run_id) "
                    "VALUES (%s, %s, %s, %s) ON CONFLICT (constraint_name) DO NOTHING",
                    (key.name, key.table, key.definition, run_id),
                )
                target.execute(
                    sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                        sql.Identifier(key.table), sql.Identifier(key.name)
                    )
                )
            return True
        except psycopg.errors.LockNotAvailable:
            if attempt < DROP_TRIES:
                time.sleep(DROP_BACKOFF_SECONDS * attempt)
    log.warning(
        "foreign key %s stays in place for this first load: %s or %s was not free within %d ms in %d tries",
        key.name,
        key.table,
        key.references,
        lock_timeout_ms,
        DROP_TRIES,
    )
    return False


def restore(target: psycopg.Connection, lock_timeout_ms: int = 3000) -> dict[str, Any]:
    """Add back and validate every deferred key; idempotent. Returns the keys and the links quarantined.

    Raises MigrationError, before anything runs, for a record ``LINK_KEYS`` does not give, and, with
    the key left NOT VALID, for links whose group or permission does not exist.
    """
    records = target.execute(
        "SELECT constraint_name, table_name, definition, run_id FROM migration_audit.deferred_keys "
        "ORDER BY constraint_name"
    ).fetchall()
    if not records:
        return {"restored": [], "quarantined": {}}
    _check_records(records)
    started = time.perf_counter()
    restored: list[str] = []
    quarantined: dict[str, int] = {}
    refused: list[str] = []
    for name, _, _, run_id in records:
        key = LINK_KEYS[name]
        with target.transaction():
            target.execute("SELECT set_config('lock_timeout', %s, true)", (f"{lock_timeout_ms}ms",))
            if _locked_record(target, name) and _state(target, key) is None:
                try:
                    target.execute(key.add_statement())
                except psycopg.errors.LockNotAvailable:
                    raise MigrationError(
                        f"could not add foreign key {name} back: {key.table} or {key.references} was not free "
                        f"within {lock_timeout_ms} ms. Nothing changed; retry the finalize when the "
                        "application is quieter, or raise lock_timeout_ms"
                    ) from None
        try:
            with target.transaction():
                if not _locked_record(target, name):
                    continue  # another finalize completed it
                if _state(target, key) is False:
                    moved = _validate(target, key, run_id)
                    if moved:
                        quarantined[name] = moved
                target.execute(
                    "DELETE FROM migration_audit.deferred_keys WHERE constraint_name = %s", (name,)
                )
        except _Refused as exc:
            refused.append(str(exc))  # the other keys are still added and validated
            continue
        restored.append(name)
    if refused:
        raise MigrationError(" ".join(refused))
    return {
        "restored": restored,
        "quarantined": quarantined,
        "seconds": round(time.perf_counter() - started, 3),
    }


class _Refused(Exception):
    """Links whose group or permission does not exist: the key stays NOT VALID."""


def _locked_record(target: psycopg.Connection, name: str) -> bool:
    return (
        target.execute(
            "SELECT 1 FROM migration_audit.deferred_keys WHERE constraint_name = %s FOR UPDATE", (name,)
        ).fetchone()
        is not None
    )


def _state(target: psycopg.Connection, key: LinkKey) -> bool | None:
    """None: the key does not exist; else whether it is validated."""
    row = target.execute(
        "SELECT convalidated FROM pg_constraint WHERE conrelid = to_regclass(%s) AND conname = %s",
        (key.table, key.name),
    ).fetchone()
    return None if row is None else row[0]


def _validate(target: psycopg.Connection, key: LinkKey, run_id: str) -> int:
    """VALIDATE the key; on refusal quarantine links of missing users or refuse. Returns links quarantined."""
    try:
        with target.transaction():  # a savepoint: the usual case scans the table once
            target.execute(key.validate_statement())
        return 0
    except psycopg.errors.ForeignKeyViolation:
        pass
    if key.references != USERS:
        _refuse(target, key)
    moved = _quarantine(target, key, run_id)
    target.execute(key.validate_statement())
    return moved


def _missing(key: LinkKey) -> sql.Composed:
    """The link rows whose referenced row does not exist."""
    return sql.SQL(
        "SELECT l.id, l.newuser_id, l.{other} FROM {table} AS l "
        "WHERE NOT EXISTS (SELECT 1 FROM {references} AS r WHERE r.id = l.{column})"
    ).format(
        table=sql.Identifier(key.table),
        other=sql.Identifier(key.other_column),
        references=sql.Identifier(key.references),
        column=sql.Identifier(key.column),
    )


def _quarantine(target: psycopg.Connection, key: LinkKey, run_id: str) -> int:
    """Move the links whose user is not in account_newuser to migration_audit.quarantined_links."""
    rows = target.execute(_missing(key) + sql.SQL(" ORDER BY l.id")).fetchall()
    detail = (
        f"user not in {USERS} when foreign key {key.name} was added back after the first load (it left "
        "the target after its links were copied, while the key was not in place); ON DELETE CASCADE "
        "removes such a link on a normal load"
    )
    with target.cursor() as cur:
        cur.executemany(
            "INSERT INTO migration_audit.quarantined_links "
            "(run_id, link_table, link_id, newuser_id, other_id, reason, detail) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, link_table, link_id) DO NOTHING",
            [(run_id, key.table, i, user, other, QUARANTINE_REASON, detail) for i, user, other in rows],
        )
    target.execute(
        sql.SQL("DELETE FROM {} WHERE id = ANY(%s)").format(sql.Identifier(key.table)),
        ([row[0] for row in rows],),
    )
    log.warning(
        "%d link row(s) of %s whose user is not in %s moved to migration_audit.quarantined_links "
        "(reason %s) before foreign key %s was validated",
        len(rows),
        key.table,
        USERS,
        QUARANTINE_REASON,
        key.name,
    )
    return len(rows)


def _refuse(target: psycopg.Connection, key: LinkKey) -> None:
    """Raise, naming the links whose group or permission does not exist (the savepoint rolled back)."""
    count = target.execute(sql.SQL("SELECT count(*) FROM ({}) AS m").format(_missing(key))).fetchone()[0]
    rows = target.execute(_missing(key) + sql.SQL(" ORDER BY l.id LIMIT {}").format(SHOWN)).fetchall()
    shown = ", ".join(f"link {i} (user {user}, {key.other_column} {other})" for i, user, other in rows)
    more = f" and {count - len(rows)} more" if count > len(rows) else ""
    raise _Refused(
        f"{count} row(s) of {key.table} reference a {key.references} row that does not exist, so foreign key "
        f"{key.name} cannot be validated (a normal load's commit refuses them alike): {shown}{more}. "
        f"Create the missing {key.references} rows, or delete those links from the legacy link table "
        f"and from {key.table}; then retry the finalize (or run the next pass, whose plan validates "
        f"the key first). The key is in place NOT VALID meanwhile: no new such link can be written."
    )


def _check_records(records: list[tuple[str, str, str, str]]) -> None:
    """Refuse, before anything runs, a record whose name or definition LINK_KEYS does not give."""
    for name, table, definition, _ in records:
        key = LINK_KEYS.get(name)
        if key is None or key.table != table:
            shown = name if len(name) <= 63 else name[:60] + "..."
            raise MigrationError(
                f"migration_audit.deferred_keys holds a foreign key {shown!r} of {table!r} that is not one "
                "of the link tables' keys the migration defers (deferred_keys.LINK_KEYS); refusing to add "
                "any deferred key. Find out who wrote that record, then delete it"
            )
        if definition != key.definition:
            raise MigrationError(
                f"the definition recorded for deferred foreign key {name} in migration_audit.deferred_keys "
                "is not the one the versioned DDL gives it; refusing to add any deferred key. Find out who "
                f"changed that record, then set its definition back to: {key.definition}"
            )
