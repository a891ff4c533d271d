"""A first load into an empty account_newuser runs without the table's secondary indexes.

Keeping three unique btrees on random strings up to date row by row is most of what a first load
costs the server: for 1M users, INSERT ... SELECT into the indexed table took 22.9 s here, against
3.3 s into the table with its primary key only plus 5.8 s to build the four indexes afterwards.
So the plan of a first load drops them (recording their definitions in
migration_audit.deferred_indexes, in the plan's transaction), the partitions load, and the
finalize step builds them again before profiles and validation. The primary key stays, so retried
partitions are still idempotent.

The plan already made the moving rows unique, but a legacy row can change between the plan and the
copy; with the indexes in place the copy would have settled that in its merge. Here the build
settles it: of rows sharing a key the lowest id stays (the rule the plan applies), the others leave
the target, are rejected with the reason and are read again by the next pass. A run that fails
before the build leaves the records behind, and the next plan (or cutover) builds them first.
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration.config import FIELDS, Settings
from user_migration.db import legacy_select_list, users_table
from user_migration.transforms import DUPLICATE_EMAIL, DUPLICATE_USERNAME, jsonable_row

TABLE = "account_newuser"
# pg_get_indexdef() ends in "USING btree (<key>)": the key expression, written by the server.
_KEY = re.compile(r"USING \w+ \((?P<key>.*)\)$")


def defer(target: psycopg.Connection, run_id: str) -> list[str]:
    """Drop the secondary indexes of account_newuser, recording how to build them; returns their names.

    Call inside the plan's transaction, and only when account_newuser is empty.
    """
    indexes = target.execute(
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
    for name, definition, unique in indexes:
        target.execute(
            "INSERT INTO migration_audit.deferred_indexes (index_name, definition, is_unique, run_id) "
            "VALUES (%s, %s, %s, %s) ON CONFLICT (index_name) DO NOTHING",
            (name, definition, unique, run_id),
        )
        target.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(name)))
    return [name for name, _, _ in indexes]


def build(source: psycopg.Connection, target: psycopg.Connection, settings: Settings) -> dict[str, Any]:
    """Build every deferred index, first settling rows that share a unique key; idempotent.

    ``source`` is read only for the rejected rows' legacy values; it may be the target connection.
    """
    started = dt.datetime.now(dt.UTC)
    built: list[str] = []
    settled: dict[str, int] = {}
    with target.transaction():
        records = target.execute(
            "SELECT index_name, definition, run_id FROM migration_audit.deferred_indexes "
            "ORDER BY index_name FOR UPDATE"
        ).fetchall()
        if not records:
            return {"built": [], "settled": {}}
        target.execute(sql.SQL("LOCK TABLE {} IN SHARE ROW EXCLUSIVE MODE").format(sql.Identifier(TABLE)))
        for name, definition, run_id in records:
            if target.execute("SELECT to_regclass(%s) IS NULL", (name,)).fetchone()[0]:
                # The definition comes from pg_get_indexdef() of the index this module dropped.
                try:
                    with target.transaction():  # a savepoint: a refused build leaves the rest intact
                        target.execute(definition)
                except psycopg.errors.UniqueViolation:
                    settled[name] = _settle(source, target, settings, name, definition, run_id)
                    target.execute(definition)
            target.execute("DELETE FROM migration_audit.deferred_indexes WHERE index_name = %s", (name,))
            built.append(name)
    seconds = (dt.datetime.now(dt.UTC) - started).total_seconds()
    return {"built": built, "settled": settled, "seconds": round(seconds, 3)}


def _settle(
    source: psycopg.Connection,
    target: psycopg.Connection,
    settings: Settings,
    name: str,
    definition: str,
    run_id: str,
) -> int:
    """Reject every row but the lowest id of each key the unique index ``name`` would refuse."""
    match = _KEY.search(definition)
    if match is None:
        raise ValueError(f"cannot read the key of deferred index {name}: {definition!r}")
    key = sql.SQL(match.group("key"))  # server-written SQL from pg_get_indexdef, not user input
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
        (DUPLICATE_USERNAME, "username") if "username" in match.group("key") else (DUPLICATE_EMAIL, "email")
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
