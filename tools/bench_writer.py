"""The application, for `make bench`: inserts, updates and deletes legacy users, timing every statement.

Adapted from tests/support/legacy_writer.py for large tables and for figures: it does not hold every id in
memory (10M ids would take ~400 MB), it can pace itself to a steady rate like a web application's
traffic instead of writing flat out, and it records the latency of every statement, so the bench
can report p50/p99/max and the longest wait the cutover caused. Each statement is its own
transaction, like a web request; a delete removes the user's links first, in one transaction.

With ``--read-share`` a share of the statements are reads instead (a user by id with their group
ids, as a page would load it): the application of the throttle bench (tools/bench_throttle.py);
without it the writer only writes, as before.

Usage: ``python tools/bench_writer.py --dsn DSN --out OUT.json [--stop-file F] [--count N]
[--rate STATEMENTS_PER_S] [--read-share 0.5] [--seed S] [--schema SCHEMA]``. It stops when the stop file appears or after
``--count`` statements; OUT.json holds the wall-clock start and one ``[offset s, seconds, op, status]``
(status ok, read_only or error; the first few error messages are kept)
per statement (no personal data: the rows it writes are made up).
"""

from __future__ import annotations

import argparse
import json
import random
import secrets
import time
from pathlib import Path

import psycopg

OPS = ("insert", "insert", "update", "update", "update", "delete")
MAX_ERRORS_KEPT = 20


def _insert(conn: psycopg.Connection, rng: random.Random, tag: str, n: int) -> int:
    dirty = rng.random() < 0.2
    return conn.execute(
        "INSERT INTO account_user (password, last_login, is_superuser, email, username, full_name, "
        "date_of_birth, phone_number, is_active, is_staff) "
        "VALUES (%s, NULL, false, %s, %s, %s, '1990-05-05', %s, true, false) RETURNING id",
        (
            f"pbkdf2_sha256$600000$w{tag}{n}$hash{n}=",
            "not-an-email" if dirty else f"writer{tag}-{n}@example.com",
            f"writer{tag}-{n}",
            f"Writer {n}",
            f"98{rng.choice('0124')}{rng.randrange(10**7):07d}",
        ),
    ).fetchone()[0]


def _update(conn: psycopg.Connection, rng: random.Random, tag: str, n: int, user_id: int) -> None:
    field, value = rng.choice(
        [
            ("full_name", f"Renamed {n}"),
            ("phone_number", f"985{rng.randrange(10**7):07d}"),
            ("email", f"moved{tag}-{n}@Example.org"),
            ("password", f"pbkdf2_sha256$600000$new{n}$hash="),
            ("is_active", rng.random() < 0.5),
        ]
    )
    conn.execute(f"UPDATE account_user SET {field} = %s WHERE id = %s", (value, user_id))


def _read(conn: psycopg.Connection, user_id: int) -> None:
    conn.execute(
        "SELECT u.id, u.email, u.username, u.full_name, u.phone_number, u.is_active, "
        "array(SELECT g.group_id FROM account_user_groups AS g WHERE g.user_id = u.id) "
        "FROM account_user AS u WHERE u.id = %s",
        (user_id,),
    ).fetchall()


def _delete(conn: psycopg.Connection, user_id: int) -> None:
    with conn.transaction():
        conn.execute("DELETE FROM account_user_groups WHERE user_id = %s", (user_id,))
        conn.execute("DELETE FROM account_user_user_permissions WHERE user_id = %s", (user_id,))
        conn.execute("DELETE FROM account_user WHERE id = %s", (user_id,))


def run(
    dsn: str,
    out: Path,
    stop_file: Path | None = None,
    count: int | None = None,
    rate: float = 0.0,
    seed: int = 1,
    schema: str | None = None,
    read_share: float = 0.0,
) -> None:
    """Write until stopped; save the per-statement timings to ``out``."""
    rng = random.Random(seed)
    tag = f"{seed}x{secrets.token_hex(3)}"  # usernames stay unique across runs on one database
    options = f"-c search_path={schema}" if schema else None
    ops: list[list] = []
    errors: list[str] = []
    error_count = 0
    with psycopg.connect(dsn, autocommit=True, application_name="bench_writer", options=options) as conn:
        high = conn.execute("SELECT coalesce(max(id), 1) FROM account_user").fetchone()[0]
        wall_start, start = time.time(), time.perf_counter()
        n = 0
        while (count is None or n < count) and not (stop_file and stop_file.exists()):
            if rate > 0:  # a steady arrival rate; a slow statement is followed by a catch-up burst
                delay = start + n / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
            n += 1
            # Drawn only when asked for: without reads the writer's sequence is the one it always had.
            op = "read" if read_share > 0 and rng.random() < read_share else rng.choice(OPS)
            began = time.perf_counter()
            status = "ok"
            try:
                if op == "read":
                    _read(conn, rng.randint(1, high))
                elif op == "insert":
                    high = max(high, _insert(conn, rng, tag, n))
                elif op == "update":
                    _update(conn, rng, tag, n, rng.randint(1, high))
                else:
                    _delete(conn, rng.randint(1, high))  # may hit a deleted id: a request for a gone user
            except psycopg.errors.ReadOnlySqlTransaction:
                status = "read_only"  # the cutover made the legacy tables read-only: expected after it
            except psycopg.Error as exc:
                status = "error"
                error_count += 1
                if len(errors) < MAX_ERRORS_KEPT:
                    errors.append(exc.diag.message_primary or type(exc).__name__)
            ops.append([round(began - start, 6), round(time.perf_counter() - began, 6), op, status])
    out.write_text(
        json.dumps({"wall_start": wall_start, "ops": ops, "errors": errors, "error_count": error_count})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-file", type=Path)
    parser.add_argument("--count", type=int)
    parser.add_argument("--rate", type=float, default=0.0, help="statements per second; 0: as fast as it can")
    parser.add_argument(
        "--read-share", type=float, default=0.0, help="share of statements that are reads (0: writes only)"
    )
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--schema", help="search_path for the writes (the bench's trigger-cost copy)")
    args = parser.parse_args()
    if args.stop_file is None and args.count is None:
        parser.error("give --stop-file or --count")
    run(args.dsn, args.out, args.stop_file, args.count, args.rate, args.seed, args.schema, args.read_share)


if __name__ == "__main__":
    main()
