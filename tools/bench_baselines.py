"""`make bench`'s baselines on the same rows: (a) ``INSERT ... SELECT`` in the database, (b) the seed
project's approach (every row fetched into Python, then multi-row INSERTs, as ``bulk_create``).
"""

from __future__ import annotations

import datetime as dt
import time
from pathlib import Path
from typing import Any

import psycopg
from bench_pipeline import _rate, run_child
from psycopg import sql

from user_migration.config import FIELDS

BASELINE_SCHEMA = "bench_baseline"
ORM_BATCH = 1000  # rows per multi-row INSERT in baseline (b), as bulk_create(batch_size=1000)
USER_COLUMNS = FIELDS  # the legacy user columns, in the pipeline's order


def _stage_orm_baseline(spec, conn, settings):
    """Baseline (b): all rows into Python objects first, then multi-row INSERTs (bulk_create)."""
    from psycopg.rows import dict_row

    table = sql.Identifier(BASELINE_SCHEMA, "newuser_orm")
    columns = [*USER_COLUMNS, "joined_at", "updated_at"]
    row_sql = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    select = sql.SQL("SELECT {} FROM account_user WHERE id <= %s ORDER BY id").format(
        sql.SQL(", ").join(map(sql.Identifier, USER_COLUMNS))
    )

    def insert_sql(n: int) -> sql.Composed:
        return sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(", ").join([row_sql] * n)
        )

    def work():
        fetch_started = time.perf_counter()
        with conn.cursor(row_factory=dict_row) as cur:
            old_users = cur.execute(select, (spec["max_rows"],)).fetchall()  # old_user.objects.all()
        fetch_seconds = time.perf_counter() - fetch_started
        now = dt.datetime.now(dt.UTC)
        seen: set[str] = set()
        new_users = []
        for old in old_users:  # the same skip as baseline (a): first row of each lower(trimmed email)
            key = old["email"].strip().lower()
            if key in seen:
                continue
            seen.add(key)
            new_users.append({**old, "email": old["email"].strip(), "joined_at": now, "updated_at": now})
        full = insert_sql(ORM_BATCH)
        with conn.transaction(), conn.cursor() as cur:  # bulk_create runs in one atomic block
            for start in range(0, len(new_users), ORM_BATCH):
                chunk = new_users[start : start + ORM_BATCH]
                statement = full if len(chunk) == ORM_BATCH else insert_sql(len(chunk))
                cur.execute(statement, [u[c] for u in chunk for c in columns])
        return {
            "rows_read": len(old_users),
            "rows_inserted": len(new_users),
            "fetch_seconds": round(fetch_seconds, 3),
        }

    return work


def baseline_sql(dsn: str, rows: int) -> dict[str, Any]:
    """(a) The in-database limit: INSERT ... SELECT into identically indexed empty tables."""
    columns = ", ".join(USER_COLUMNS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {BASELINE_SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {BASELINE_SCHEMA}")
        for table in ("account_newuser", "account_newuser_groups", "account_newuser_user_permissions"):
            short = table.removeprefix("account_")
            conn.execute(f"CREATE TABLE {BASELINE_SCHEMA}.{short}_sql (LIKE public.{table} INCLUDING ALL)")
        select_list = ", ".join("btrim(email)" if c == "email" else c for c in USER_COLUMNS)
        started = time.perf_counter()
        with conn.transaction():
            users = conn.execute(f"""
                INSERT INTO {BASELINE_SCHEMA}.newuser_sql ({columns}, joined_at, updated_at)
                SELECT {select_list}, now(), now() FROM (
                    SELECT DISTINCT ON (lower(btrim(email))) * FROM public.account_user
                    ORDER BY lower(btrim(email)), id
                ) AS first_of_each_email
                ORDER BY id
            """).rowcount
        users_seconds = time.perf_counter() - started
        started = time.perf_counter()
        links = 0
        with conn.transaction():
            for legacy, short, other in (
                ("account_user_groups", "newuser_groups", "group_id"),
                ("account_user_user_permissions", "newuser_user_permissions", "permission_id"),
            ):
                links += conn.execute(f"""
                    INSERT INTO {BASELINE_SCHEMA}.{short}_sql (id, newuser_id, {other})
                    SELECT l.id, l.user_id, l.{other} FROM public.{legacy} AS l
                    WHERE EXISTS (SELECT 1 FROM {BASELINE_SCHEMA}.newuser_sql AS u WHERE u.id = l.user_id)
                    ORDER BY l.id
                """).rowcount
        links_seconds = time.perf_counter() - started
    total = users_seconds + links_seconds
    return {
        "what": (
            "INSERT INTO (LIKE account_newuser INCLUDING ALL) SELECT the same columns with btrim(email), "
            "now() stamps, DISTINCT ON (lower(btrim(email))) keeping the lowest id, in id order; then "
            "the group/permission links of inserted users into LIKE copies of the link tables. "
            "No transforms, no audit rows."
        ),
        "rows": rows,
        "users_inserted": users,
        "links_inserted": links,
        "users_seconds": round(users_seconds, 3),
        "users_rows_per_s": round(_rate(rows, users_seconds)),
        "links_seconds": round(links_seconds, 3),
        "seconds": round(total, 3),
        "rows_per_s": round(_rate(rows, total)),
    }


def baseline_orm(dsn: str, rows: int, max_rows: int, workdir: Path, args) -> dict[str, Any]:
    """(b) The seed project's approach, in a fresh process: fetch all, then bulk_create."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BASELINE_SCHEMA}")
        conn.execute(f"DROP TABLE IF EXISTS {BASELINE_SCHEMA}.newuser_orm")
        conn.execute(
            f"CREATE TABLE {BASELINE_SCHEMA}.newuser_orm (LIKE public.account_newuser INCLUDING ALL)"
        )
    measured = min(rows, max_rows)
    spec = {
        "dsn": dsn,
        "stage": "orm_baseline",
        "max_rows": measured,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
    }
    out = run_child(spec, workdir, "orm_baseline")
    return {
        "what": (
            f"fresh process: SELECT every row into a list of dicts (fetchall, like objects.all()), skip "
            f"repeated lower(strip(email)) in Python, then one transaction of multi-row INSERT ... VALUES "
            f"of {ORM_BATCH} rows each (like bulk_create) into LIKE account_newuser INCLUDING ALL. "
            "Users only: no transforms, no links, no audit rows."
        ),
        "rows": measured,
        "sampled": measured < rows,
        "seconds": round(out["seconds"], 3),
        "rows_per_s": round(_rate(measured, out["seconds"])),
        "rss_peak_mb": out["rss_peak_mb"],
        "process_seconds": round(out["process_seconds"], 3),
        **out["result"],
    }
