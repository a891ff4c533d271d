"""A first load into an empty account_newuser runs without the table's secondary indexes.

Keeping three unique btrees up to date row by row is most of what a first load costs the server
(docs/decisions/0002-deferred-indexes-on-first-load.md). So the plan of a first load drops them (recording their definitions in
migration_audit.deferred_indexes, in the plan's transaction), the partitions load, and the
finalize step builds them again before profiles and validation. The primary key stays, so retried
partitions are still idempotent.

The plan already made the moving rows unique, but a legacy row can change between the plan and the
copy; with the indexes in place the copy would have settled that in its merge. Here the build
settles it: of rows sharing a key the lowest id stays (the rule the plan applies), the others leave
the target, are rejected with the reason and are read again by the next pass. A run that fails
before the build leaves the records behind, and the next plan (or cutover) builds them first.

Only indexes of the versioned DDL (include/sql/target/*.sql) are deferred, and the build runs the
versioned statement, never the stored text: a record whose name or definition the DDL does not
give is refused before anything runs (whoever can write migration_audit must not be able to run
SQL as the migration role).
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration import deferred_keys
from user_migration.config import FIELDS, Settings
from user_migration.db import MigrationError, legacy_select_list, users_table
from user_migration.schema import TARGET_DDL_DIR, schema_changes
from user_migration.transforms import DUPLICATE_EMAIL, DUPLICATE_USERNAME, jsonable_row

TABLE = "account_newuser"
# The statements of the versioned DDL that create or drop an index of account_newuser (comments
# stripped first). A form this does not read (a partial index, INCLUDE, ...) is never deferred.
_INDEX_DDL = re.compile(
    r"CREATE\s+(?P<unique>UNIQUE\s+)?INDEX\s+(?:IF\s+NOT\s+EXISTS\s+)?(?P<name>\w+)\s+ON\s+(?:ONLY\s+)?"
    rf"(?:\w+\.)?{TABLE}\s*(?:USING\s+(?P<method>\w+)\s*)?\((?P<key>[^;]*?)\)\s*;"
    r"|DROP\s+INDEX\s+(?:CONCURRENTLY\s+)?(?:IF\s+EXISTS\s+)?(?:\w+\.)?(?P<dropped>\w+)",
    re.IGNORECASE | re.DOTALL,
)
_COMMENT = re.compile(r"--[^\n]*")
_PROBE = "user_migration_index_probe"


@dataclass(frozen=True)
class VersionedIndex:
    """A secondary index of account_newuser as the versioned DDL creates it (trusted SQL)."""

    name: str
    unique: bool
    method: str
    key: str
    file: str

    def statement(self, table: sql.Composable) -> sql.Composed:
        """CREATE [UNIQUE] INDEX of this index on ``table``."""
        return sql.SQL("CREATE {unique}INDEX {name} ON {table} USING {method} ({key})").format(
            unique=sql.SQL("UNIQUE " if self.unique else ""),
            name=sql.Identifier(self.name),
            table=table,
            method=sql.Identifier(self.method),
            key=sql.SQL(self.key),  # from the versioned DDL files, which apply_schema runs as they are
        )


def versioned_indexes(folder: Path = TARGET_DDL_DIR) -> dict[str, VersionedIndex]:
    """The secondary indexes of account_newuser the versioned DDL leaves, by name (files in order)."""
    found: dict[str, VersionedIndex] = {}
    for change in schema_changes(folder):
        text = _COMMENT.sub("", change.path.read_text())
        for match in _INDEX_DDL.finditer(text):
            if match.group("dropped"):
                found.pop(match.group("dropped").lower(), None)
                continue
            name = match.group("name").lower()
            found[name] = VersionedIndex(
                name=name,
                unique=bool(match.group("unique")),
                method=(match.group("method") or "btree").lower(),
                key=match.group("key").strip(),
                file=change.path.name,
            )
    return found


def _qualified_table(target: psycopg.Connection) -> str:
    """account_newuser as pg_get_indexdef() names it: schema-qualified, quoted where needed."""
    return target.execute(
        "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class AS c "
        "JOIN pg_namespace AS n ON n.oid = c.relnamespace WHERE c.oid = to_regclass(%s)",
        (TABLE,),
    ).fetchone()[0]


def expected_definitions(target: psycopg.Connection, indexes: dict[str, VersionedIndex]) -> dict[str, str]:
    """Name -> pg_get_indexdef() text each versioned index has on account_newuser.

    The server's own spelling (casts, quoting) is needed to compare with a recorded definition: each
    versioned statement is built on an empty temp copy of the table, read back and rolled back.
    """
    table = _qualified_table(target)
    definitions: dict[str, str] = {}
    with target.transaction(force_rollback=True):
        target.execute(
            sql.SQL("CREATE TEMP TABLE {} (LIKE {}) ON COMMIT DROP").format(
                sql.Identifier(_PROBE), sql.Identifier(TABLE)
            )
        )
        for name, index in indexes.items():
            target.execute(index.statement(sql.Identifier("pg_temp", _PROBE)))
            written = target.execute(
                "SELECT pg_get_indexdef(i.indexrelid) FROM pg_index AS i JOIN pg_class AS c ON c.oid = i.indexrelid "
                "WHERE i.indrelid = %s::regclass AND c.relname = %s",
                (f"pg_temp.{_PROBE}", name),
            ).fetchone()[0]
            # "CREATE [UNIQUE] INDEX <name> ON <probe> USING ...": the real table in the probe's place.
            head, tail = written.split(" USING ", 1)
            definitions[name] = f"{head.rsplit(' ON ', 1)[0]} ON {table} USING {tail}"
    return definitions


def defer(target: psycopg.Connection, run_id: str) -> list[str]:
    """Drop the secondary indexes of account_newuser, recording how to build them; returns their names.

    Call inside the plan's transaction, and only when account_newuser is empty. Only indexes exactly
    as the versioned DDL creates them are deferred; any other stays in place through the load.
    """
    expected = expected_definitions(target, versioned_indexes())
    live = target.execute(
        """
        SELECT c.relname, pg_get_indexdef(i.indexrelid), i.indisunique
        FROM pg_index AS i
        JOIN pg_class AS c ON c.oid = i.indexrelid
        WHERE i.indrelid = to_regclass(%s)
          AND NOT i.indisprimary
          AND NOT EXISTS (SELECT 1 FROM pg_constraint AS k WHERE k.conindid = i.indexrelid)
        ORDER BY c.relname
        """,
        (TABLE,),
    ).fetchall()
    indexes = [(name, d, unique) for name, d, unique in live if expected.get(name) == d]
    for name, definition, unique in indexes:
        target.execute(
            "INSERT INTO migration_audit.deferred_indexes (index_name, definition, is_unique, run_id) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (index_name) DO NOTHING",
            (name, definition, unique, run_id),
        )
        target.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    return [name for name, _, _ in indexes]


def build(source: psycopg.Connection, target: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    """Add back the link tables' deferred foreign keys, then build every deferred index; idempotent.

    The keys come first (deferred_keys.py): the rows an index build settles leave account_newuser,
    and ON DELETE CASCADE then takes their links, as on a normal load. Rows that share a unique key
    are settled before the index is built. ``source`` is read only for the rejected rows' legacy
    values; it may be the target connection.
    """
    started = dt.datetime.now(dt.UTC)
    keys = deferred_keys.restore(target, settings.lock_timeout_ms)
    built: list[str] = []
    settled: dict[str, int] = {}
    with target.transaction():
        records = target.execute(
            "SELECT index_name, definition, run_id FROM migration_audit.deferred_indexes "
            "ORDER BY index_name FOR UPDATE"
        ).fetchall()
        if not records:
            return {"built": [], "settled": {}, "keys": keys}
        versioned = versioned_indexes()
        _check_records(records, versioned, expected_definitions(target, versioned))
        table = sql.Identifier(TABLE)
        target.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(table))
        for name, _, run_id in records:
            index = versioned[name]
            if target.execute("SELECT to_regclass(%s) IS NULL", (name,)).fetchone()[0]:
                try:
                    with target.transaction():  # a savepoint: a refused build leaves the rest intact
                        target.execute(index.statement(table))
                except psycopg.errors.UniqueViolation:
                    settled[name] = _settle(source, target, settings, index, run_id)
                    target.execute(index.statement(table))
            target.execute("DELETE FROM migration_audit.deferred_indexes WHERE index_name = %s", (name,))
            built.append(name)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return {"built": built, "settled": settled, "keys": keys, "seconds": round(seconds, 3)}


def _check_records(
    records: list[tuple[str, str, str]], versioned: dict[str, VersionedIndex], expected: dict[str, str]
) -> None:
    """Refuse, before anything runs, a record the versioned DDL does not give (name or definition)."""
    for name, definition, _ in records:
        if name not in versioned:
            shown = name if len(name) <= 63 else name[:60] + "..."
            raise MigrationError(
                f"migration_audit.deferred_indexes holds an index {shown!r} that no CREATE INDEX on {TABLE} "
                f"in include/sql/target/*.sql defines; refusing to build it (only the versioned DDL's indexes "
                "are built). Find out who wrote that record, then delete it; an index the application needs "
                "goes into a new include/sql/target/NNN_*.sql file"
            )
        if definition != expected[name]:
            raise MigrationError(
                f"the definition recorded for deferred index {name} in migration_audit.deferred_indexes is not "
                f"the one include/sql/target/{versioned[name].file} gives it; refusing to build any deferred "
                "index. Find out who changed that record, then set its definition back to the versioned "
                f"one: {expected[name]}"
            )


def _settle(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    index: VersionedIndex,
    run_id: str,
) -> int:
    """Reject every row but the lowest id of each key the unique ``index`` would refuse."""
    key = sql.SQL(index.key)  # from the versioned DDL, never from the stored record
    losers = target.execute(
        sql.SQL(
            "SELECT id, kept_id FROM (SELECT id, min(id) OVER (PARTITION BY {key}) AS kept_id FROM {table}) AS k "
            "WHERE id <> kept_id ORDER BY id"
        ).format(key=key, table=sql.Identifier(TABLE))
    ).fetchall()
    if not losers:
        return 0
    kept = dict(losers)
    ids = sorted(kept)
    reason, field_name = (
        (DUPLICATE_USERNAME, "username") if "username" in index.key else (DUPLICATE_EMAIL, "email")
    )
    mapping = settings.mapping
    legacy_names = [mapping.column(f) or f for f in FIELDS]
    select = sql.SQL("SELECT {} FROM {} WHERE {} = ANY(%s)").format(
        legacy_select_list(mapping), users_table(mapping), sql.Identifier(mapping.column("id"))
    )
    rows = {values[0]: values for values in source.execute(select, (ids,)).fetchall()}
    now = dt.datetime.now(dt.UTC)
    target.execute("DELETE FROM account_newuser WHERE id = ANY(%s)", (ids,))
    target.execute(
        "UPDATE migration_audit.source_state AS s SET outcome = 'R', fingerprint = NULL, kept_id = k.kept_id "
        "FROM unnest(%s::bigint[], %s::bigint[]) AS k (id, kept_id) WHERE s.source_id = k.id",
        (ids, [kept[i] for i in ids]),
    )
    fixes = Counter(
        source_id
        for (source_id,) in target.execute(
            "DELETE FROM migration_audit.field_fixes WHERE run_id = %s AND source_id = ANY(%s) RETURNING source_id",
            (run_id, ids),
        ).fetchall()
    )
    for source_id in ids:
        values = rows.get(source_id)
        source_row = jsonable_row(dict(zip(legacy_names, values, strict=True))) if values else {}
        detail = (
            f"same {field_name} as user {kept[source_id]}, which is kept; the legacy row changed while "
            "the pass ran, decided again next pass"
        )
        target.execute(
            "INSERT INTO migration_audit.rejected_rows (run_id, source_id, reason, detail, source_row, rejected_at) "
            "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (run_id, source_id) DO NOTHING",
            (run_id, source_id, reason, detail, Jsonb(source_row), now),
        )
        target.execute(
            "UPDATE migration_audit.partitions SET inserted = inserted - 1, rejected = rejected + 1, "
            "fixed = fixed - %s WHERE run_id = %s AND %s BETWEEN lo_id AND hi_id",
            (fixes[source_id], run_id, source_id),
        )
    return len(ids)
