"""The copy's Python hot loop alone: CPU seconds to transform and COPY N bench rows, and their digest.

Needs a database left by ``tools/bench.py --keep`` (its legacy users and its plan's duplicate
decisions). Rows are fetched once (not timed); then ``_transform_batch`` and ``_write_batch`` run
batch after batch (10,000 rows) as a first load does, into unindexed temporary copies of the
target tables, in a transaction rolled back. Printed: process CPU of the transforms and of the
writes, per run and per 1M rows, and an md5 of every table written (users, sync state with the
fingerprints, rejects, fixes), which must not change when only speed does.

Usage: ``python tools/copy_cpu.py --dsn postgresql://.../user_migration_bench [--rows 200000]
[--repeat 3] [--text]`` (``--text``: text COPY, as before binary COPY).
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "plugins")]

from user_migration import partition_copy as pc  # noqa: E402
from user_migration.config import Settings  # noqa: E402
from user_migration.db import legacy_select_list, users_table  # noqa: E402
from user_migration.fingerprint import row_hash_sql  # noqa: E402

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
TODAY = dt.date(2026, 11, 29)
TEMP_TABLES = {
    "h_users": "account_newuser",
    "h_rejected": "migration_audit.rejected_rows",
    "h_fixes": "migration_audit.field_fixes",
    "h_state": "migration_audit.source_state",
}
DIGEST = (
    "SELECT (SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM h_users AS t), "
    "(SELECT md5(string_agg(t::text, '|' ORDER BY source_id)) FROM h_state AS t), "
    "(SELECT md5(string_agg((t.run_id, t.source_id, t.reason, t.detail, t.source_row)::text, '|' "
    "ORDER BY source_id)) FROM h_rejected AS t), "
    "(SELECT md5(string_agg(t::text, '|' ORDER BY source_id, field)) FROM h_fixes AS t)"
)


def write_to_scratch(users: str, rejected: str, fixes: str, state: str) -> sql.Composed:
    """Point the copy's COPY statements at scratch tables, under the same statements' shape; returns
    the users' COPY (the copy builds that one per job). Names are trusted (this tool's own)."""
    pc.REJECTED_COPY = pc.REJECTED_COPY.replace("migration_audit.rejected_rows", rejected)
    pc.FIXES_COPY = pc.FIXES_COPY.replace("migration_audit.field_fixes", fixes)
    pc.STATE_LOAD_COPY = pc.STATE_LOAD_COPY.replace("migration_audit.source_state", state)
    return sql.SQL("COPY {} ({}) FROM STDIN").format(
        sql.SQL(users),
        sql.SQL(", ").join(map(sql.Identifier, [*pc.USER_COLUMNS, "joined_at", "updated_at"])),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="the database a bench run kept (--keep)")
    parser.add_argument("--rows", type=int, default=200_000, help="legacy ids 1..N")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--text", action="store_true", help="text COPY instead of binary")
    args = parser.parse_args(argv)
    settings = Settings()
    mapping = settings.mapping
    conn = psycopg.connect(args.dsn, autocommit=True)
    select = sql.SQL("SELECT {}, {} AS row_hash FROM {} WHERE id <= %s ORDER BY id").format(
        legacy_select_list(mapping), row_hash_sql(mapping), users_table(mapping)
    )
    cursor = conn.execute(select, (args.rows,))
    rows = cursor.fetchall()
    binary = not args.text and pc.binary_copy_ok(cursor.description)
    losers = dict(
        (source_id, (reason, kept))
        for source_id, reason, kept in conn.execute(
            "SELECT source_id, reason, kept_id FROM migration_audit.plan_duplicates WHERE source_id <= %s "
            "AND run_id = (SELECT max(run_id) FROM migration_audit.plan_duplicates)",
            (args.rows,),
        )
    )
    users_copy = write_to_scratch(*TEMP_TABLES)
    transformer = pc.Transformer("NP", "fix", today=TODAY)
    names = pc.legacy_names(settings)
    print(f"{len(rows):,} rows, {len(losers):,} duplicate losers, {'binary' if binary else 'text'} COPY")
    for _ in range(args.repeat):
        conn.execute("BEGIN")
        for temp, like in TEMP_TABLES.items():
            conn.execute(f"CREATE TEMP TABLE {temp} (LIKE {like}) ON COMMIT DROP")
        result = pc.PartitionResult(0, 1, args.rows)
        transform_cpu = write_cpu = 0.0
        with conn.cursor() as out:
            for start in range(0, len(rows), 10_000):
                fetched = rows[start : start + 10_000]
                first, last = fetched[0][0], fetched[-1][0]
                batch_losers = {i: losers[i] for i in range(first, last + 1) if i in losers}
                started = time.process_time()
                batch = pc._transform_batch(fetched, transformer, batch_losers, names, "h", NOW, result)
                transformed = time.process_time()
                pc._write_batch(out, batch, users_copy, (NOW, NOW), pc.PATHS["load"], ("h", 1), binary)
                transform_cpu += transformed - started
                write_cpu += time.process_time() - transformed
        digest = conn.execute(DIGEST).fetchone()
        conn.execute("ROLLBACK")
        per_million = (transform_cpu + write_cpu) * 1e6 / len(rows)
        print(
            f"transform {transform_cpu:.2f} + write {write_cpu:.2f} = {transform_cpu + write_cpu:.2f} CPU-s "
            f"({per_million:.1f} per 1M rows); migrated {result.migrated:,}, rejected {result.rejected:,}, "
            f"fixed {result.fixed:,}; md5 users/state/rejects/fixes {' '.join(d[:8] for d in digest)}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
