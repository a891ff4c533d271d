"""An estimate, not a product path: what a first load would cost if the server moved the usual row.

Issue 18 asks for copy + index build at 10x baseline (b). On 2 cores the copy is CPU-bound (Python
and the server together), so the question is how many CPU seconds a different design would spend.
This script measures one such design on a database ``tools/bench.py --keep`` left, over the legacy
ids 1..N in one go (a real path would go batch by batch, at some extra cost):

1. the server selects the rows that an approximation of ``Transformer.fast_user``'s checks would
   pass (a username with a printable ASCII character, a full name whose first and last characters
   are printable ASCII, the plain email shape with a lower-case domain, dates and lengths in range),
   with their row hash, into a temporary table;
2. Python reads their (id, phone), answers each phone with the phone fast path (the library's rule,
   as the copy does), and COPYs (id, E.164) back (by distinct phone instead: the server's sort and
   key cost ~3 CPU-s more per 1M on the bench, where nearly every phone is distinct);
3. the server inserts those users and their sync state (the fingerprint in SQL,
   include/sql/cutover/row_fingerprint.sql) into scratch tables with primary keys only;
4. Python transforms and writes the other rows as the copy does (``_transform_batch`` and
   ``_write_batch``), the plan's duplicate losers among them rejected as the copy rejects them.

The scratch tables have the keys, check and partial indexes the real ones have during a first load
(``account_newuser``: its primary key; the sync state: its key, its check and its two partial
indexes). The per-batch work of the copy (batch records, the duplicate lookups, the throttle's
checks) is not done here, so the estimate flatters this design by that much.

The SQL checks are NOT the product's rules (no domain check, no proof of equality): a real path
would need them proven to imply ``fast_user``'s. Links are not moved here; the copy's link work
(about 3.5 server CPU-s per 1M users on the bench) would be the same in both designs.

Prints CPU seconds per 1M legacy rows for each step: the server backend's (from /proc, so a local
server only) and this process's. Compare with ``tools/copy_cpu.py`` and the bench's copy stage.

Usage: ``python tools/inserver_estimate.py --dsn postgresql://.../user_migration_bench [--rows 500000]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path[:0] = [str(Path(__file__).resolve().parent.parent / "plugins")]

from copy_cpu import write_to_scratch  # noqa: E402

from user_migration import partition_copy as pc  # noqa: E402
from user_migration.config import Settings  # noqa: E402
from user_migration.db import legacy_select_list  # noqa: E402
from user_migration.fingerprint import fingerprint_sql, row_hash_sql  # noqa: E402
from user_migration.transforms import MAX_LENGTH, OLDEST_DATE_OF_BIRTH  # noqa: E402

NOW = dt.datetime(2026, 11, 29, 12, 0, tzinfo=dt.UTC)
TODAY = dt.date(2026, 11, 29)
ATEXT = "A-Za-z0-9!#$%%&''*+/=?^_`{|}~-"  # %% : the statement has parameters
# An approximation of fast_user's checks but the phone's (see the module docstring).
USUAL_ROW = f"""
    username ~ '[!-~]' AND full_name ~ '^[!-~](.*[!-~])?$' AND length(email) <= 254
    AND email ~ '^[{ATEXT}]+(\\.[{ATEXT}]+)*@[a-z0-9.-]+$' AND length(split_part(email, '@', 1)) <= 64
    AND password IS NOT NULL AND is_superuser IS NOT NULL AND is_active IS NOT NULL AND is_staff IS NOT NULL
    AND date_of_birth BETWEEN '{OLDEST_DATE_OF_BIRTH.isoformat()}' AND '{TODAY.isoformat()}'
    AND length(password) <= {MAX_LENGTH["password"]} AND length(username) <= {MAX_LENGTH["username"]}
    AND length(full_name) <= {MAX_LENGTH["full_name"]}
"""
COLUMNS = "id, password, last_login, is_superuser, email, username, full_name, date_of_birth"


class Meter:
    """CPU seconds of this process and of one server backend, step by step."""

    def __init__(self, conn: psycopg.Connection, rows: int) -> None:
        self.stat = Path(f"/proc/{conn.info.backend_pid}/stat")
        self.per_million = 1e6 / rows
        self.totals = [0.0, 0.0]
        self.mark = self._now()

    def _now(self) -> tuple[float, float]:
        fields = self.stat.read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK"), time.process_time()

    def step(self, label: str) -> None:
        now = self._now()
        server, python = (
            (now[0] - self.mark[0]) * self.per_million,
            (now[1] - self.mark[1]) * self.per_million,
        )
        self.totals[0] += server
        self.totals[1] += python
        print(f"{label:58} server {server:5.2f}  python {python:5.2f}  (CPU-s per 1M rows)", flush=True)
        self.mark = self._now()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True, help="the database a bench run kept (--keep)")
    parser.add_argument("--rows", type=int, default=500_000, help="legacy ids 1..N (one partition: 500,000)")
    args = parser.parse_args(argv)
    settings = Settings()
    mapping = settings.mapping
    conn = psycopg.connect(args.dsn, autocommit=True)
    conn.execute("DROP SCHEMA IF EXISTS inserver_estimate CASCADE")
    conn.execute("CREATE SCHEMA inserver_estimate")
    conn.execute(
        "CREATE TABLE inserver_estimate.u (LIKE account_newuser INCLUDING DEFAULTS, PRIMARY KEY (id))"
    )
    # The sync state as during a first load: LIKE ... INCLUDING ALL copies its key, check and indexes.
    conn.execute("CREATE TABLE inserver_estimate.s (LIKE migration_audit.source_state INCLUDING ALL)")
    for name, like in (
        ("rejected", "migration_audit.rejected_rows"),
        ("fixes", "migration_audit.field_fixes"),
    ):
        conn.execute(f"CREATE TABLE inserver_estimate.{name} (LIKE {like} INCLUDING DEFAULTS)")
    transformer = pc.Transformer("NP", "fix", today=TODAY)
    plan_run = conn.execute("SELECT max(run_id) FROM migration_audit.plan_duplicates").fetchone()[0]
    meter = Meter(conn, args.rows)
    started = time.perf_counter()
    with conn.transaction():
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE usual ON COMMIT DROP AS SELECT {}, {} AS row_hash FROM account_user "
                "WHERE id BETWEEN 1 AND %s AND "
            ).format(legacy_select_list(mapping), row_hash_sql(mapping))
            + sql.SQL(USUAL_ROW),
            (args.rows,),
        )
        meter.step("1. server: usual rows and their row hash into a temp table")
        phones = conn.execute(
            "SELECT id, phone_number FROM usual WHERE phone_number IS NOT NULL AND phone_number <> ''"
        ).fetchall()
        conn.execute("CREATE TEMP TABLE phones (id bigint, e164 text) ON COMMIT DROP")
        fast = transformer._fast_phone
        with conn.cursor().copy("COPY phones (id, e164) FROM STDIN") as copy:
            for user_id, phone in phones:
                answer = fast(phone) if phone.strip() else None
                if answer is not None and answer[1] is None:
                    copy.write_row((user_id, answer[0]))
        meter.step(f"2. python: {len(phones):,} phones answered, COPY back by id")
        inserted = conn.execute(
            f"INSERT INTO inserver_estimate.u ({COLUMNS}, phone_number, is_active, is_staff, joined_at, updated_at) "
            f"SELECT {', '.join('u.' + c.strip() for c in COLUMNS.split(','))}, coalesce(p.e164, ''), "
            "u.is_active, u.is_staff, %(now)s, %(now)s FROM usual AS u LEFT JOIN phones AS p ON p.id = u.id "
            "WHERE (p.e164 IS NOT NULL OR u.phone_number IS NULL OR u.phone_number = '') "
            "AND NOT EXISTS (SELECT 1 FROM migration_audit.plan_duplicates AS d "
            "WHERE d.run_id = %(plan)s AND d.source_id = u.id)",
            {"now": NOW, "plan": plan_run},
        ).rowcount
        meter.step(f"3a. server: {inserted:,} users inserted")
        conn.execute(
            sql.SQL(
                "INSERT INTO inserver_estimate.s (source_id, row_hash, outcome, fingerprint, run_id, transform_settings) "
                "SELECT id, row_hash, 'M', {fingerprint}, 'estimate', 1 FROM (SELECT n.*, u.row_hash "
                "FROM inserver_estimate.u AS n JOIN usual AS u ON u.id = n.id) AS moved"
            ).format(fingerprint=fingerprint_sql())
        )
        meter.step("3b. server: their sync state, fingerprint in SQL")
        rest = conn.execute(
            sql.SQL(
                "SELECT {}, {} AS row_hash FROM account_user AS l WHERE id BETWEEN 1 AND %s "
                "AND NOT EXISTS (SELECT 1 FROM inserver_estimate.u AS n WHERE n.id = l.id) ORDER BY id"
            ).format(legacy_select_list(mapping), row_hash_sql(mapping)),
            (args.rows,),
        ).fetchall()
        users_copy = write_to_scratch(
            "inserver_estimate.u",
            "inserver_estimate.rejected",
            "inserver_estimate.fixes",
            "inserver_estimate.s",
        )
        result = pc.PartitionResult(0, 1, args.rows)
        names = pc.legacy_names(settings)
        with conn.cursor() as out:
            for start in range(0, len(rest), 10_000):
                fetched = rest[start : start + 10_000]
                losers = pc._losers(conn, plan_run, fetched[0][0], fetched[-1][0])
                batch = pc._transform_batch(fetched, transformer, losers, names, "e", NOW, result)
                pc._write_batch(out, batch, users_copy, (NOW, NOW), pc.PATHS["load"], ("estimate", 1), True)
        meter.step(
            f"4. both: the other {len(rest):,} rows read, transformed and written as the copy does "
            f"({result.rejected:,} rejected)"
        )
    wall = time.perf_counter() - started
    moved = conn.execute("SELECT count(*) FROM inserver_estimate.u").fetchone()[0]
    conn.execute("DROP SCHEMA inserver_estimate CASCADE")
    server, python = meter.totals
    print(
        f"total: server {server:.2f} + python {python:.2f} = {server + python:.2f} CPU-s per 1M rows "
        f"({moved:,} users moved, {wall:.2f} s wall for {args.rows:,} rows; links not included)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
