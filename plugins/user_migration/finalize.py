"""After the copy: deferred indexes built, profiles for migrated users, id sequences past the copied ids."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Mapping

import psycopg
from psycopg import sql

from user_migration import capture, deferred_indexes, validation_reuse
from user_migration.config import LegacyMapping, Settings
from user_migration.db import foreign_keys, read_sql
from user_migration.partition_copy import record_drift_check

log = logging.getLogger(__name__)

PROFILE_TABLE = "account_profile"
# The tables the validation reads and the application queries after the cutover.
LOADED_TABLES = (
    "account_newuser",
    "account_newuser_groups",
    "account_newuser_user_permissions",
    PROFILE_TABLE,
)
# The target tables whose ids come from the legacy side; their sequences must pass the legacy ids.
SEQUENCE_TABLES = ("account_newuser", "account_newuser_groups", "account_newuser_user_permissions")


def init_profiles(
    target: psycopg.Connection, legacy_floors: Mapping[str, int | None] | None = None
) -> dict[str, object]:
    """Create the missing profiles and advance sequences in one transaction; idempotent.

    ``legacy_floors`` (target table -> highest id its legacy table holds or held, see
    ``legacy_id_floors``) keeps the ids of rejected and deleted legacy rows out of the sequences' way;
    without it the sequences only pass the ids in the target.

    The first fill of an empty account_profile runs without its foreign keys and adds them back
    before the commit: one join to validate instead of one check per row
    (docs/decisions/0005-profiles-without-foreign-key-on-first-fill.md). Later passes add a few
    profiles and keep the keys. The table is locked for the transaction either way; if anything
    fails the rollback restores the keys with the rest.
    """
    now = dt.datetime.now(dt.UTC)
    with target.transaction():
        first_fill = target.execute(
            sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(sql.Identifier(PROFILE_TABLE))
        ).fetchone()[0]
        foreign_keys = _drop_foreign_keys(target) if first_fill else []
        created = target.execute(read_sql("finalize/create_profiles.sql"), {"now": now}).rowcount
        for name, definition in foreign_keys:
            # The definition is pg_get_constraintdef() of the key dropped above: server-written SQL.
            target.execute(
                sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} {}").format(
                    sql.Identifier(PROFILE_TABLE), sql.Identifier(name), sql.SQL(definition)
                )
            )
        sequences = advance_sequences(target, legacy_floors)
        profiles = target.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(PROFILE_TABLE))
        ).fetchone()[0]
    return {
        "profiles_created": created,
        "profiles_total": profiles,
        "sequences": sequences,
        "foreign_keys_rebuilt": [name for name, _ in foreign_keys],
    }


def advance_sequences(
    target: psycopg.Connection, legacy_floors: Mapping[str, int | None] | None = None
) -> dict[str, int]:
    """Move the id sequences past the target's ids and the legacy floors; never back. Returns table -> value."""
    floors = {name: (legacy_floors or {}).get(name) for name in SEQUENCE_TABLES}
    return dict(target.execute(read_sql("finalize/advance_sequences.sql"), floors).fetchall())


def init_profiles_for(
    target: psycopg.Connection, ids: list[int], legacy_floors: Mapping[str, int | None] | None = None
) -> int:
    """init_profiles for the given users only (the cutover's final sync, under its lock); returns profiles created.

    Looks up the given ids through the indexes instead of anti-joining the whole table.
    """
    created = target.execute(
        read_sql("finalize/create_profiles_for.sql"), {"now": dt.datetime.now(dt.UTC), "ids": ids}
    ).rowcount
    advance_sequences(target, legacy_floors)
    return created


def _drop_foreign_keys(target: psycopg.Connection) -> list[tuple[str, str]]:
    """Drop account_profile's foreign keys; returns (name, definition) to add each back."""
    target.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(sql.Identifier(PROFILE_TABLE)))
    keys = foreign_keys(target, PROFILE_TABLE)
    for name, _ in keys:
        target.execute(
            sql.SQL("ALTER TABLE {} DROP CONSTRAINT {}").format(
                sql.Identifier(PROFILE_TABLE), sql.Identifier(name)
            )
        )
    return keys


def legacy_id_floors(legacy: psycopg.Connection, mapping: LegacyMapping) -> dict[str, int | None]:
    """Target table -> the highest id its legacy table holds or has handed out (None: nothing to pass).

    Read on the legacy connection: max(id) and the last value of the id column's sequence, so the ids
    of rejected and deleted users stay reserved. A role that may not read a sequence gets max(id)
    alone for that table, and the log says so once.
    """
    sources = {"account_newuser": (mapping.users_table, mapping.column("id"))}
    for name, link in (
        ("account_newuser_groups", mapping.groups),
        ("account_newuser_user_permissions", mapping.permissions),
    ):
        if link is not None:
            sources[name] = (link.table, "id")  # link ids are copied as they are (copy/merge_links.sql)
    floors: dict[str, int | None] = {}
    unreadable: list[str] = []
    query = read_sql("finalize/legacy_id_floor.sql")
    with legacy.transaction():  # a savepoint where the caller holds the legacy transaction (cutover)
        rows = {
            name: legacy.execute(
                sql.SQL(query).format(table=sql.Identifier(mapping.schema, table), id=sql.Identifier(column)),
                {"qualified": sql.Identifier(mapping.schema, table).as_string(legacy), "column": column},
            ).fetchone()
            for name, (table, column) in sources.items()
        }
    for name, (max_id, has_sequence, readable, last_value) in rows.items():
        table = sources[name][0]
        if has_sequence and not readable:
            unreadable.append(f"{mapping.schema}.{table}")
        values = [v for v in (max_id, last_value) if v is not None]
        floors[name] = max(values) if values else None
    if unreadable:
        log.warning(
            "the legacy role may not read the id sequence of %s: the target's sequences pass their max id "
            "only, so ids of users deleted at the top of the legacy table may be handed out again; grant "
            "SELECT on those sequences to the migration role to reserve them too",
            ", ".join(unreadable),
        )
    return floors


def finalize_target(
    source: psycopg.Connection, target: psycopg.Connection, settings: Settings, run_id: str | None = None
) -> dict[str, object]:
    """The step after every partition has copied: indexes a first load deferred, then profiles.

    With ``run_id``, a pass that compared every row makes the change log trusted (capture.py).
    """
    indexes = deferred_indexes.build(source, target, settings)
    profiles = init_profiles(target, legacy_id_floors(source, settings.mapping))
    captured = capture.complete_pass(source, target, settings.mapping, run_id) if run_id else False
    drift_checked = record_drift_check(target, run_id) if run_id and not settings.dry_run else False
    # After the load and the profiles: a first load's bulk writes are not noted one by one.
    write_triggers = validation_reuse.install_write_triggers(target)
    return {
        "indexes": indexes,
        **profiles,
        "change_capture": captured,
        "drift_checked": drift_checked,
        "write_triggers": write_triggers,
        "vacuum_analyze_seconds": vacuum_analyze(target),
    }


def vacuum_analyze(target: psycopg.Connection) -> float:
    """VACUUM (ANALYZE) the loaded tables: planner statistics and the visibility map; returns seconds.

    Freshly loaded tables have neither until autovacuum gets to them, which makes the validation's
    checks and the application's first queries slow (docs/decisions/0006-vacuum-analyze-after-the-load.md).
    VACUUM skips pages already all-visible, so later passes pay only for what they changed.
    It cannot run inside a transaction: the connection is put in autocommit mode for it.
    """
    started = time.perf_counter()
    autocommit = target.autocommit
    target.autocommit = True  # psycopg refuses if the caller has a transaction open: never commit theirs
    try:
        for name in LOADED_TABLES:
            target.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(name)))
    finally:
        target.autocommit = autocommit
    return round(time.perf_counter() - started, 3)
