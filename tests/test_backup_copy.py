"""backup._copy_out, the backup's COPY reader on libpq directly: same bytes as psycopg's Copy, server
errors raised as psycopg raises them, and an interrupted COPY leaves the connection usable."""

from __future__ import annotations

import signal
import time

import psycopg
import pytest
from psycopg import sql

from user_migration import backup

ODD_TEXT = (
    "SELECT g, 'line\nbreak \"quoted\", comma; ünï ' || g, NULL::text, now() FROM generate_series(1, {}) g"
)


# 10^10 rows, streamed as they are made (a single generate_series would be materialised first).
ENDLESS = "SELECT a.g * b.g FROM generate_series(1, 100000) a(g), generate_series(1, 100000) b(g)"


def copy_of(query: str, rows: int) -> sql.Composed:
    return sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, HEADER true)").format(sql.SQL(query.format(rows)))


def collect(conn: psycopg.Connection, statement: sql.Composable) -> tuple[int, list[bytes]]:
    chunks: list[bytes] = []
    rows = backup._copy_out(conn, statement, lambda chunk: chunks.append(bytes(chunk)))
    return rows, chunks


@pytest.fixture
def dsn(make_db) -> str:
    return make_db("copy")


@pytest.fixture
def conn(dsn):
    with psycopg.connect(dsn) as conn:
        conn.execute("SET TIME ZONE 'UTC'")
        yield conn


def test_same_bytes_and_row_count_as_psycopg_copy(conn, monkeypatch):
    monkeypatch.setattr(backup, "WRITE_CHUNK", 64 << 10)  # several chunks, each split at a row's end
    conn.execute(
        "CREATE TEMP TABLE frozen AS " + ODD_TEXT.format(20_000).replace("now()", "'2026-01-01'::date")
    )
    statement = sql.SQL("COPY frozen TO STDOUT WITH (FORMAT csv, HEADER true)")
    with conn.cursor() as cur, cur.copy(statement) as copy:
        expected = b"".join(bytes(block) for block in copy)
    rows, chunks = collect(conn, statement)
    assert rows == 20_000
    assert len(chunks) > 3
    assert b"".join(chunks) == expected
    assert all(chunk.endswith(b"\n") for chunk in chunks)


def test_empty_result_gives_the_header_and_zero_rows(conn):
    rows, chunks = collect(conn, copy_of("SELECT 1 AS one WHERE false", 0))
    assert (rows, b"".join(chunks)) == (0, b"one\n")


def test_server_error_before_any_row_is_raised_and_the_connection_recovers(conn):
    with pytest.raises(psycopg.errors.UndefinedTable):
        collect(conn, sql.SQL("COPY no_such_table TO STDOUT"))
    conn.rollback()
    assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_server_error_mid_stream_is_raised_and_the_connection_recovers(conn):
    failing = "SELECT CASE WHEN g < {} THEN g ELSE 1 / (g - g) END FROM generate_series(1, 400000) g"
    with pytest.raises(psycopg.errors.DivisionByZero):
        collect(conn, copy_of(failing, 300_000))
    conn.rollback()
    assert conn.execute("SELECT 41 + 1").fetchone() == (42,)


def test_interrupted_copy_is_cancelled_and_the_transaction_can_roll_back(conn, monkeypatch):
    """Without the cancel, the reader would drain the whole endless COPY (here until the 20 s statement
    timeout); with it, the server stops at once. The bound is on a hang, not on speed."""
    monkeypatch.setattr(backup, "WRITE_CHUNK", 64 << 10)

    class Stop(Exception):
        pass

    def stop(chunk: bytearray) -> None:
        raise Stop  # as a task being stopped would, in the middle of a long COPY

    with conn.transaction():
        conn.execute("CREATE TABLE kept (n int)")
    conn.execute("SET statement_timeout = '20s'")
    started = time.monotonic()
    with pytest.raises(Stop), conn.transaction():
        conn.execute("INSERT INTO kept VALUES (1)")
        backup._copy_out(conn, copy_of(ENDLESS, 0), stop)
    assert time.monotonic() - started < 15
    assert conn.execute("SELECT count(*) FROM kept").fetchone() == (0,)  # rolled back, connection fine


def test_a_signal_while_the_copy_waits_for_a_lock_interrupts_it(conn, dsn):
    """A stopped task gets SIGTERM, whose handler raises: the wait must be interruptible even before
    the first row (here the COPY waits behind another session's lock), and leave the connection usable."""
    conn.execute("CREATE TABLE locked (n int)")
    conn.execute("SET lock_timeout = '10s'")  # if the wait cannot be interrupted, fail instead of hanging
    conn.commit()
    holder = psycopg.connect(dsn, autocommit=True)
    try:
        holder.execute("BEGIN")
        holder.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")

        class Stopped(Exception):
            pass

        def handler(signum, frame):
            raise Stopped

        previous = signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        started = time.monotonic()
        try:
            with pytest.raises(Stopped), conn.transaction():
                collect(conn, sql.SQL("COPY locked TO STDOUT"))
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
        assert time.monotonic() - started < 5  # interrupted in the wait, not when the lock timed out
        assert conn.execute("SELECT 41 + 1").fetchone() == (42,)
        waiting = holder.execute(
            "SELECT count(*) FROM pg_locks WHERE relation = 'locked'::regclass AND NOT granted"
        ).fetchone()
        assert waiting == (0,), "the cancelled COPY still waits for the lock"
    finally:
        holder.close()
