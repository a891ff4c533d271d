"""The migration yields to the application: time-boxed batches, bounded snapshots, a throttle.

A partition runs against a live legacy database. Between two batches (never inside one: a batch is
a few hundred milliseconds of work and holds nothing the application waits for) it

- sizes the next batch so that a batch takes about ``batch_seconds`` (BatchSizer): a fixed row count
  is seconds of work on a loaded server and a few milliseconds on an idle one;
- ends its legacy snapshot after ``max_snapshot_seconds`` and reads on in a new one (Snapshot): a
  REPEATABLE READ snapshot held for a whole partition holds back vacuum on the legacy tables;
- asks the throttle (Throttle.gate) whether to go on: the state an operator set by hand in
  migration_audit.throttle ('run', 'pause', 'slow'), and the legacy server's state (active
  backends, backends waiting on locks, standby replay lag, an optional custom probe). Above a pause
  threshold it waits, re-checking with backoff, having first ended its legacy snapshot (so that a
  pause holds no snapshot and no lock on the legacy side); above a stop threshold it raises
  ThrottleStop, a retryable error: the partition's target transaction rolls back, nothing is kept.

The throttle reads from connections of its own (autocommit, application_name
user_migration_throttle): the manual state must be seen even though the partition's target
transaction is open, and a failing probe must not abort the partition's read.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from user_migration.config import Settings
from user_migration.db import first_line, read_sql
from user_migration.errors import MigrationError

log = logging.getLogger(__name__)

APPLICATION_NAME = "user_migration_throttle"
# Waits while paused: first re-check after BACKOFF_FIRST s, doubling up to BACKOFF_MAX s. A pause set
# by hand is polled every MANUAL_POLL s at most, so a resume is seen within about a second.
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0
MANUAL_POLL = 1.0
# How long a custom probe may run; it runs between batches, so it must be cheap.
PROBE_TIMEOUT_MS = 2000
# A 'slow' sleep this long or longer ends the legacy snapshot first, as a pause does.
SLOW_RELEASE_MS = 1000
# A running partition's progress (migration_audit.partition_progress) is written at most this often.
PROGRESS_EVERY = 1.0
# Batch size steps at most this factor up or down per batch: one odd batch does not swing it.
MAX_STEP = 2.0


class ThrottleStop(MigrationError):
    """The legacy server is past a stop threshold: the partition stops, rolls back and is retried."""


@dataclass(frozen=True)
class Reading:
    """One signal's value against its thresholds (0: that threshold is off)."""

    signal: str
    value: float
    pause: float
    stop: float
    unit: str = ""

    @property
    def stops(self) -> bool:
        return self.stop > 0 and self.value > self.stop

    @property
    def pauses(self) -> bool:
        return self.pause > 0 and self.value > self.pause

    def describe(self, threshold: float) -> str:
        return f"{self.signal} is {self.value:g}{self.unit}, above the threshold {threshold:g}{self.unit}"


class BatchSizer:
    """Rows to read next so that a batch takes about ``batch_seconds``, within the bounds.

    The rate of the last batch (rows per second, fetch + transform + write) times the target time,
    stepped by at most MAX_STEP either way. With batch_seconds 0, or when ``adaptive`` is off (the
    cutover, under its lock, wants the fixed size), every batch asks for batch_size rows.
    """

    def __init__(self, settings: Settings, adaptive: bool = True) -> None:
        self.target = settings.batch_seconds if adaptive else 0.0
        self.low, self.high = settings.batch_bounds()
        self.size = settings.batch_size

    def record(self, rows: int, seconds: float) -> None:
        if self.target <= 0 or rows <= 0:
            return
        wanted = rows / max(seconds, 1e-4) * self.target
        wanted = min(max(wanted, self.size / MAX_STEP), self.size * MAX_STEP)
        self.size = int(min(max(wanted, self.low), self.high))


class Snapshot:
    """The partition's legacy read transaction (REPEATABLE READ, READ ONLY), renewed when too old.

    The caller opened it (inside ``with source.transaction()``); ``end`` commits it and ``ensure``
    begins the next one, by plain COMMIT/BEGIN statements: psycopg's transaction block only sends
    BEGIN and COMMIT itself, so the block's own COMMIT then ends the last snapshot. A named cursor
    of the old snapshot must be closed before ``end``. Without ``own`` (the cutover holds the
    transaction, under its lock) nothing is ever renewed.
    """

    def __init__(self, conn: psycopg.Connection, own: bool, max_seconds: float) -> None:
        self.conn, self.own, self.max_seconds = conn, own, max_seconds
        self.number = 1
        self.started = time.monotonic()
        self.active = True

    def expired(self) -> bool:
        return self.own and self.active and time.monotonic() - self.started >= self.max_seconds

    def end(self) -> None:
        if self.own and self.active:
            self.conn.execute("COMMIT")
            self.active = False

    def ensure(self) -> None:
        if not self.active:
            self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self.number += 1
            self.started = time.monotonic()
            self.active = True
            log.info("legacy read continues in snapshot %s", self.number)


def reopen(conn: psycopg.Connection) -> psycopg.Connection:
    """A new autocommit connection to the server and database of ``conn``, as the throttle's own."""
    params = {
        option.keyword.decode(): option.val.decode() for option in conn.pgconn.info if option.val is not None
    }
    params.update(application_name=APPLICATION_NAME, connect_timeout="10")
    params.pop("fallback_application_name", None)
    return psycopg.connect(**params, autocommit=True)


class Throttle:
    """Between batches: go on, sleep, pause or stop, as the operator and the legacy server say.

    The state is read at most every ``throttle_check_ms`` (a read costs about a millisecond: well
    under 1% of a batch of ``batch_seconds``), and at every re-check while paused.
    """

    def __init__(
        self,
        settings: Settings,
        run_id: str,
        partition_no: int,
        legacy: psycopg.Connection,
        target: psycopg.Connection,
        enabled: bool = True,
    ) -> None:
        self.settings = settings
        self.run_id, self.partition_no = run_id, partition_no
        self.enabled = enabled
        self._legacy_main, self._target_main = legacy, target
        self._legacy: psycopg.Connection | None = None
        self._target: psycopg.Connection | None = None
        self._next_check = 0.0
        self._manual: tuple[str, int, str | None] = ("run", 0, None)
        self._told: set[str] = set()  # signals found unreadable, logged once
        self._privileged: bool | None = None
        self.waited = 0.0
        self._progress_at = 0.0
        self._progress: dict[str, Any] | None = None  # not written yet (see progress)

    # --- between batches --------------------------------------------------------------------------

    def gate(self, release: Callable[[], None] | None = None) -> float:
        """Wait as long as the throttle says; returns the seconds waited. Raises ThrottleStop.

        ``release`` ends the legacy snapshot (and closes its cursor); it is called once before the
        first wait of a pause, so a paused partition holds no snapshot and no lock on the legacy side.
        """
        if not self.enabled:
            return 0.0
        started = time.monotonic()
        if started >= self._next_check:
            self._next_check = started + self.settings.throttle_check_ms / 1000
            readings = self._check()
            paused_on = [r for r in readings if r.pauses]
            if self._manual[0] == "pause" or paused_on:
                if release is not None:
                    release()
                self._write_progress()
                self._pause(paused_on)
        if self._manual[0] == "slow" and self._manual[1] > 0:
            self._write_progress()
            if release is not None and self._manual[1] >= SLOW_RELEASE_MS:
                release()  # a long sleep holds no legacy snapshot either
            time.sleep(self._manual[1] / 1000)
        waited = time.monotonic() - started
        self.waited += waited
        return waited

    def _check(self) -> list[Reading]:
        """Read the manual state and the server's signals; raise ThrottleStop past a stop threshold."""
        self._read_manual()
        readings = self._signals()
        for reading in readings:
            if reading.stops:
                self._stop(reading)
        return readings

    def _pause(self, paused_on: list[Reading]) -> None:
        """Wait, re-checking with backoff, until neither the operator nor a signal asks to pause."""
        began = time.monotonic()
        for reading in paused_on:
            self.event("pause", reading, reading.pause, reading.describe(reading.pause) + ": pausing")
        delay = BACKOFF_FIRST
        while True:
            manual = self._manual[0] == "pause"
            time.sleep(min(delay, MANUAL_POLL) if manual else delay)
            delay = min(delay * 2, BACKOFF_MAX)
            readings = self._check()
            paused_on = [r for r in readings if r.pauses]
            if self._manual[0] != "pause" and not paused_on:
                break
            limit = self.settings.throttle_max_pause_seconds
            if paused_on and limit and time.monotonic() - began > limit:
                reading = paused_on[0]
                self._stop(
                    reading,
                    f"{reading.describe(reading.pause)} for more than throttle_max_pause_seconds={limit}",
                )
        seconds = time.monotonic() - began
        self.event("resume", None, None, f"going on after {seconds:.1f} s paused")
        self._next_check = time.monotonic() + self.settings.throttle_check_ms / 1000

    def _stop(self, reading: Reading, why: str | None = None) -> None:
        why = why or reading.describe(reading.stop)
        self.event("stop", reading, reading.stop, why)
        raise ThrottleStop(
            f"the throttle stopped it: {why} on the legacy server (the task's retry starts it again "
            f"once the server is calmer; if the server is fine, raise the Param throttle_{reading.signal}_stop "
            "or throttle_max_pause_seconds, 0 turns them off)"
        )

    # --- the manual state --------------------------------------------------------------------------

    def _read_manual(self) -> None:
        conn = self._own_target()
        if conn is None:
            return
        try:
            row = conn.execute(read_sql("throttle/manual_state.sql")).fetchone()
        except psycopg.Error as exc:
            self._unreadable("manual", f"migration_audit.throttle cannot be read: {first_line(exc)}")
            return
        state = ("run", 0, None) if row is None else (row[0], int(row[1]), row[2])
        if state != self._manual:
            detail = f"state {state[0]}" + (f", {state[1]} ms between batches" if state[0] == "slow" else "")
            detail += f", set by {state[2]}" if state[2] else ""
            self._manual = state
            self.event("manual", None, None, detail)

    # --- the legacy server's state -----------------------------------------------------------------

    def _signals(self) -> list[Reading]:
        s = self.settings
        wanted_activity = any(
            (
                s.throttle_active_backends_pause,
                s.throttle_active_backends_stop,
                s.throttle_lock_waiters_pause,
                s.throttle_lock_waiters_stop,
            )
        )
        wanted_lag = s.throttle_replay_lag_pause or s.throttle_replay_lag_stop
        if not (wanted_activity or wanted_lag or s.throttle_probe_sql):
            return []
        conn = self._own_legacy()
        if conn is None:
            return []
        readings: list[Reading] = []
        if self._privileged is None:
            self._privileged = bool(conn.execute(read_sql("throttle/stats_privilege.sql")).fetchone()[0])
        if wanted_activity:
            readings.extend(self._activity(conn))
        if wanted_lag:
            readings.extend(self._replay_lag(conn))
        if s.throttle_probe_sql:
            value = self._probe(conn, s.throttle_probe_sql)
            if value is not None:
                readings.append(Reading("probe", value, s.throttle_probe_pause, s.throttle_probe_stop))
        return readings

    def _activity(self, conn: psycopg.Connection) -> list[Reading]:
        """Active backends and lock waiters (of this role's sessions only, unless it may see all)."""
        s = self.settings
        if not self._privileged:
            self._unreadable(
                "active_backends",
                "this role sees the state of its own sessions only: active backends and lock waiters "
                "count those; grant it pg_monitor to count every session",
            )
        active, waiting = conn.execute(read_sql("throttle/legacy_activity.sql")).fetchone()
        return [
            Reading(
                "active_backends",
                active,
                s.throttle_active_backends_pause,
                s.throttle_active_backends_stop,
            ),
            Reading("lock_waiters", waiting, s.throttle_lock_waiters_pause, s.throttle_lock_waiters_stop),
        ]

    def _replay_lag(self, conn: psycopg.Connection) -> list[Reading]:
        """The standby replay lag, or none when this role may not read it (said once)."""
        s = self.settings
        if not self._privileged:
            self._unreadable(
                "replay_lag",
                "standby replay lag cannot be read by this role (pg_stat_replication needs "
                "pg_read_all_stats): not checked; grant the role pg_monitor to check it",
            )
            return []
        lag = conn.execute(read_sql("throttle/replay_lag.sql")).fetchone()[0]
        return [
            Reading(
                "replay_lag",
                float(lag),
                s.throttle_replay_lag_pause,
                s.throttle_replay_lag_stop,
                " s",
            )
        ]

    def _probe(self, conn: psycopg.Connection, query: str) -> float | None:
        """The custom probe's number, read-only and time-limited; None when the role may not run it."""
        try:
            with conn.transaction():
                conn.execute("SET TRANSACTION READ ONLY")
                conn.execute("SELECT set_config('statement_timeout', %s, true)", (str(PROBE_TIMEOUT_MS),))
                rows = conn.execute(query.encode(), prepare=False).fetchall()
        except psycopg.errors.InsufficientPrivilege as exc:
            self._unreadable("probe", f"throttle_probe_sql may not run as this role: {first_line(exc)}")
            return None
        except psycopg.Error as exc:
            raise MigrationError(
                f"throttle_probe_sql failed on the legacy server: {first_line(exc)}; fix the query (a "
                "read-only SELECT returning one number, quick enough for "
                f"{PROBE_TIMEOUT_MS} ms) or clear the Param"
            ) from None
        if len(rows) != 1 or len(rows[0]) != 1:
            self._bad_probe()
        value = rows[0][0]
        try:
            return 0.0 if value is None else float(value)
        except (TypeError, ValueError):
            return self._bad_probe()

    @staticmethod
    def _bad_probe() -> float:
        raise MigrationError(
            "throttle_probe_sql must return exactly one row of one number; change the query "
            "(e.g. SELECT count(*) FROM pg_stat_activity WHERE state = 'active')"
        )

    # --- connections and records -------------------------------------------------------------------

    def _own_legacy(self) -> psycopg.Connection | None:
        if self._legacy is None and "legacy connection" not in self._told:
            try:
                self._legacy = reopen(self._legacy_main)
            except psycopg.Error as exc:
                self._unreadable(
                    "legacy connection", f"cannot open the throttle's legacy connection: {first_line(exc)}"
                )
        return self._legacy

    def _own_target(self) -> psycopg.Connection | None:
        if self._target is None and "target connection" not in self._told:
            try:
                self._target = reopen(self._target_main)
            except psycopg.Error as exc:
                self._unreadable(
                    "target connection", f"cannot open the throttle's target connection: {first_line(exc)}"
                )
        return self._target

    def _unreadable(self, signal: str, detail: str) -> None:
        """Say once per partition that a signal cannot be read; the others are still checked."""
        if signal in self._told:
            return
        self._told.add(signal)
        self.event("unreadable", None, None, detail, signal=signal, level=logging.WARNING)

    def event(
        self,
        event: str,
        reading: Reading | None,
        threshold: float | None,
        detail: str,
        signal: str | None = None,
        level: int = logging.INFO,
    ) -> None:
        """Log what the throttle did, in the task log and in migration_audit.throttle_events."""
        log.log(level, "partition %s throttle %s: %s", self.partition_no, event, detail)
        conn = self._target
        if conn is None:
            return
        params: dict[str, Any] = {
            "run_id": self.run_id,
            "partition_no": self.partition_no,
            "event": event,
            "signal": reading.signal if reading else signal,
            "value": reading.value if reading else None,
            "threshold": threshold,
            "detail": detail,
        }
        try:
            conn.execute(read_sql("throttle/record_event.sql"), params)
        except psycopg.Error as exc:
            log.warning("could not record a throttle event in migration_audit: %s", first_line(exc))

    def progress(
        self, path: str, rows_done: int, rows_planned: int | None, batches: int, force: bool = False
    ) -> None:
        """Record how far the partition got: at most every PROGRESS_EVERY s, when ``force``, and
        before the throttle makes it wait (so a paused partition shows where it stopped).

        From the throttle's own connection: the migration page sees it while the partition's
        transaction is open. A failed write is logged and forgotten; it never stops the copy.
        """
        if not self.enabled:
            return
        self._progress = {
            "run_id": self.run_id,
            "partition_no": self.partition_no,
            "path": path,
            "rows_done": rows_done,
            "rows_planned": rows_planned,
            "batches": batches,
        }
        if force or time.monotonic() - self._progress_at >= PROGRESS_EVERY:
            self._write_progress()

    def _write_progress(self) -> None:
        params, self._progress = self._progress, None
        if params is None:
            return
        conn = self._own_target()
        if conn is None:
            return
        self._progress_at = time.monotonic()
        try:
            conn.execute(read_sql("copy/record_progress.sql"), params)
        except psycopg.Error as exc:
            log.warning("could not record the partition's progress in migration_audit: %s", first_line(exc))

    def close(self) -> None:
        for conn in (self._legacy, self._target):
            if conn is not None:
                conn.close()
        self._legacy = self._target = None
