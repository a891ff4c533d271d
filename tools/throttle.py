"""Slow down, pause or resume a running migration by hand, without killing it.

Running partitions read migration_audit.throttle on the target database between batches (about
once a second) from a connection of their own, and log every change they see in the task log and in
migration_audit.throttle_events. No Airflow needed: this works against the target DSN alone.

    python tools/throttle.py pause  --dsn postgresql://migrator@target/app
    python tools/throttle.py slow   --ms 200 --dsn ...
    python tools/throttle.py resume --dsn ...
    python tools/throttle.py status --dsn ...

The DSN may also come from USER_MIGRATION_TARGET_DSN. The same by SQL: include/sql/throttle/set_state.sql.
A pause holds each running partition's target transaction open (its locks on the target, the writer
lease) but no snapshot and no lock on the legacy side; resume, or let the tasks time out.
"""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))

import psycopg

from user_migration.db import read_sql

DSN_ENV = "USER_MIGRATION_TARGET_DSN"
STATES = {"pause": "pause", "resume": "run", "slow": "slow"}


def set_state(dsn: str, state: str, sleep_ms: int, set_by: str) -> tuple:
    """Write the throttle row; returns it as stored (state, sleep_ms, set_by, set_at)."""
    with psycopg.connect(dsn, autocommit=True, application_name="user_migration_throttle_cli") as conn:
        return conn.execute(
            read_sql("throttle/set_state.sql"), {"state": state, "sleep_ms": sleep_ms, "set_by": set_by}
        ).fetchone()


def status(dsn: str) -> tuple[tuple | None, list[tuple]]:
    """The throttle row (None: never set, i.e. 'run') and the last ten throttle events."""
    with psycopg.connect(dsn, autocommit=True, application_name="user_migration_throttle_cli") as conn:
        row = conn.execute(read_sql("throttle/manual_state.sql")).fetchone()
        events = conn.execute(
            "SELECT at, run_id, partition_no, event, signal, value, threshold, detail "
            "FROM migration_audit.throttle_events ORDER BY id DESC LIMIT 10"
        ).fetchall()
    return row, events


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=[*STATES, "status"])
    parser.add_argument("--ms", type=int, default=200, help="slow: milliseconds to sleep between batches")
    parser.add_argument("--dsn", default=os.environ.get(DSN_ENV), help=f"target database (or {DSN_ENV})")
    parser.add_argument("--by", default=getpass.getuser(), help="who sets it, for the audit")
    args = parser.parse_args(argv)
    if not args.dsn:
        parser.error(f"give the target database with --dsn or {DSN_ENV}")
    if args.action == "slow" and not 1 <= args.ms <= 600_000:
        parser.error("--ms must be from 1 to 600000")
    try:
        if args.action == "status":
            row, events = status(args.dsn)
            print(
                f"state: {row[0]} ({row[1]} ms), set by {row[2]} at {row[3]}"
                if row
                else "state: run (never set)"
            )
            for event in events:
                print(" | ".join("" if value is None else str(value) for value in event))
            return 0
        sleep_ms = args.ms if args.action == "slow" else 0
        row = set_state(args.dsn, STATES[args.action], sleep_ms, args.by)
    except psycopg.errors.UndefinedTable:
        print(
            "migration_audit.throttle does not exist on this database: run a migration task once "
            "(it creates the audit schema), or check --dsn points at the target",
            file=sys.stderr,
        )
        return 2
    except psycopg.Error as exc:
        message = exc.diag.message_primary if exc.diag and exc.diag.message_primary else type(exc).__name__
        print(f"could not set the throttle: {message}; check --dsn and the role's rights", file=sys.stderr)
        return 2
    print(f"throttle set to {row[0]}" + (f" ({row[1]} ms between batches)" if row[0] == "slow" else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
