"""Things break on purpose while a migration runs; the final state is asserted row by row.

- the copy process is SIGKILLed in the middle of a partition, then the partition is re-run;
- the database connection (target or legacy) is terminated mid-partition, then retried;
- the backup folder cannot be written (not a folder, read-only, full): the run stops at the backup,
  before any DDL or copy, naming the folder, and leaves no half-written backup;
- a backup altered, truncated or incomplete after it was written is refused by verify_backup;
- the migrated data is broken after the copy: the Great Expectations suite says which check and by
  how much.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psycopg
import pytest
from support import fixture_users as fx
from support.fault_tools import (
    REPO,
    RUN,
    assert_fixture_outcome,
    find_leaks,
    finish_run,
    nothing_committed,
    partition_states,
    personal_values,
    prepare_run,
    wait_for_no_sessions,
)
from support.pipeline import run_stages

from user_migration import lease, partition_copy
from user_migration.backup import MANIFEST, verify_backup
from user_migration.config import Settings
from user_migration.errors import MigrationError
from user_migration.faults import KILL_AT_BATCH_ENV
from user_migration.finalize import finalize_target
from user_migration.partition_copy import copy_partition

pytestmark = pytest.mark.faults


CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{plugins!r}]
    from user_migration.config import Settings
    from user_migration.db import connect
    from user_migration.partition_copy import copy_partition

    legacy, target, run_id, partition, batch_size = sys.argv[1:6]
    source = connect(legacy, name="legacy_db", autocommit=True)
    dest = connect(target, name="target_db", autocommit=True)
    copy_partition(source, dest, Settings(partitions=2, batch_size=int(batch_size)), run_id, json.loads(partition))
    print("the copy finished: the fault did not fire")
    """
).format(plugins=str(REPO / "plugins"))


def test_sigkill_mid_partition_commits_nothing_and_the_rerun_is_exact(legacy, backup_dir, tmp_path):
    """The copy process dies with SIGKILL after its second batch (of five) of partition 0."""
    settings = Settings(partitions=2, batch_size=3, batch_seconds=0)  # fixed batches of 3 rows
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    victim = partitions[0]
    assert (victim["lo"], victim["hi"]) == (1, 15)  # 15 legacy rows: batches 0..4 of 3 rows
    marker = tmp_path / "killed.marker"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, legacy, legacy, RUN, json.dumps(victim), "3"],
        env={**os.environ, KILL_AT_BATCH_ENV: f"1:{marker}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stdout + child.stderr
    assert marker.read_text().startswith("killed after batch 1 in pid ")
    wait_for_no_sessions(legacy)

    # Two batches were written inside the partition's transaction; the kill threw them all away.
    assert nothing_committed(legacy, victim) == {
        "users": 0,
        "groups": 0,
        "rejected_rows": 0,
        "field_fixes": 0,
        "batches": 0,
    }
    # The attempt is on record: marked running before its transaction began, never finished.
    assert partition_states(legacy) == [(0, "running", 1, None)]

    # The re-run (Airflow's retry of the task) of the killed partition, then the rest of the run.
    finish_run(legacy, settings, partitions)
    assert partition_states(legacy) == [(0, "done", 2, 15), (1, "done", 1, 14)]
    with psycopg.connect(legacy) as conn:
        batches = conn.execute(
            "SELECT batch_no, first_id, last_id, rows_in FROM migration_audit.batches "
            "WHERE run_id = %s AND partition_no = 0 ORDER BY batch_no",
            (RUN,),
        ).fetchall()
    assert batches == [(0, 1, 3, 3), (1, 4, 6, 3), (2, 7, 9, 3), (3, 10, 12, 3), (4, 13, 15, 3)]
    assert_fixture_outcome(legacy, RUN)


LEASE_TASK_CHILD = textwrap.dedent(
    """
    import json, sys
    sys.path[:0] = [{plugins!r}]
    from user_migration import lease
    from user_migration.config import Settings
    from user_migration.db import connect
    from user_migration.partition_copy import copy_partition

    legacy, target, run_id, partition, batch_size = sys.argv[1:6]
    source = connect(legacy, name="legacy_db", autocommit=True)
    dest = connect(target, name="target_db", autocommit=True)
    settings = Settings(partitions=2, batch_size=int(batch_size))
    with lease.active(dest, run_id):  # as _MigrationOperator.execute holds it around a task
        copy_partition(source, dest, settings, run_id, json.loads(partition), lease_run_id=run_id)
    print("the copy finished: the fault did not fire")
    """
).format(plugins=str(REPO / "plugins"))


def test_sigkill_of_the_whole_run_mid_copy_then_a_new_run_takes_the_lease_at_once(
    legacy, backup_dir, tmp_path
):
    """The run holding the writer lease dies with SIGKILL mid-partition; the next run does not wait
    lease_stale_minutes (30) for it: the lease is taken over within seconds and the pass ends exact."""
    settings = Settings(partitions=2, batch_size=3)
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    with (  # the dead run's first task takes the lease
        psycopg.connect(legacy, autocommit=True) as backup_task,
        lease.active(backup_task, RUN, holds=False),
    ):
        lease.acquire(backup_task, RUN, "user_migration", wait_seconds=1, stale_minutes=30)
    marker = tmp_path / "killed.marker"
    child = subprocess.run(
        [sys.executable, "-c", LEASE_TASK_CHILD, legacy, legacy, RUN, json.dumps(partitions[0]), "3"],
        env={**os.environ, KILL_AT_BATCH_ENV: f"1:{marker}"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert child.returncode == -9, child.stdout + child.stderr
    assert marker.read_text().startswith("killed after batch 1 in pid ")
    wait_for_no_sessions(legacy)

    # A new run (another deployment, or the next scheduled pass) asks for the lease: the default grace
    # (120 s) has not passed since the dead run's task began, so only its missing lock tells.
    nxt = "next-run"
    with psycopg.connect(legacy, autocommit=True) as conn:
        started = time.monotonic()
        with lease.active(conn, nxt, holds=False):
            took = lease.acquire(conn, nxt, "user_migration", wait_seconds=60, stale_minutes=30)
        waited = time.monotonic() - started
        assert waited < 5, f"took {waited:.1f} s"
        assert took is not None and took.startswith(f"took over the writer lease of run '{RUN}'")
        assert "its task died" in took
        # The dead run's retry, should Airflow start one, is refused: it no longer holds the lease.
        with pytest.raises(MigrationError, match=f"run '{RUN}' does not hold the writer lease"):
            lease.active(conn, RUN).__enter__()

    # The new run's pass, holding the lease in every task, leaves the target exact.
    partitions = prepare_run(legacy, legacy, settings, nxt, backup_dir)
    with (
        psycopg.connect(legacy, autocommit=True) as source,
        psycopg.connect(legacy, autocommit=True) as target,
    ):
        for partition in partitions:
            with lease.active(target, nxt):
                copy_partition(source, target, settings, nxt, partition, lease_run_id=nxt)
        with lease.active(target, nxt):
            finalize_target(source, target, settings)
            lease.release(target, nxt)
    assert_fixture_outcome(legacy, nxt)


@pytest.mark.parametrize("side", ["target", "legacy"])
def test_connection_terminated_mid_partition_then_retry_is_exact(
    legacy, backup_dir, monkeypatch, pg_server, side
):
    """pg_terminate_backend() on one of the copy's connections right after batch 1 of partition 0."""
    settings = Settings(partitions=2, batch_size=3)
    partitions = prepare_run(legacy, legacy, settings, RUN, backup_dir)
    source = psycopg.connect(legacy, autocommit=True)
    target = psycopg.connect(legacy, autocommit=True)
    victim_pid = (target if side == "target" else source).info.backend_pid
    terminated: list[int] = []

    def terminate(batch_no: int) -> None:
        if batch_no != 1 or terminated:
            return
        with psycopg.connect(pg_server, autocommit=True) as admin:
            assert admin.execute("SELECT pg_terminate_backend(%s, 5000)", (victim_pid,)).fetchone()[0]
        terminated.append(batch_no)

    monkeypatch.setattr(partition_copy, "kill_after_batch", terminate)
    try:
        with pytest.raises(MigrationError) as failure:
            copy_partition(source, target, settings, RUN, partitions[0])
    finally:
        source.close()
        target.close()
    assert terminated == [1]
    message = str(failure.value)
    assert message.startswith("partition 0 (ids 1..15) failed: ")
    assert "Nothing of this attempt was kept" in message
    assert find_leaks(message, personal_values()) == []
    assert nothing_committed(legacy, partitions[0]) == {
        "users": 0,
        "groups": 0,
        "rejected_rows": 0,
        "field_fixes": 0,
        "batches": 0,
    }
    # With the target gone the failure cannot be recorded; the attempt stays 'running'.
    state = "running" if side == "target" else "failed"
    assert partition_states(legacy) == [(0, state, 1, None)]

    monkeypatch.undo()
    finish_run(legacy, settings, partitions)  # the retry, on new connections
    assert partition_states(legacy) == [(0, "done", 2, 15), (1, "done", 1, 14)]
    assert_fixture_outcome(legacy, RUN)


# --- the backup folder cannot be written ------------------------------------------------------------


def assert_stopped_at_backup(legacy_dsn: str, legacy_rows: int = len(fx.ROWS)) -> None:
    """Nothing after the backup ran: no target tables, no plan, no partition; the legacy table intact."""
    with psycopg.connect(legacy_dsn) as conn:
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM migration_audit.plans").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM migration_audit.partitions").fetchone()[0] == 0
        assert conn.execute("SELECT count(*) FROM account_user").fetchone()[0] == legacy_rows


def test_backup_folder_below_a_regular_file_fails_naming_the_folder(legacy, tmp_path):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where a folder should be")
    root = blocker / "backups"
    with pytest.raises(MigrationError) as failure:
        run_stages(legacy, legacy, Settings(), RUN, root)
    assert str(failure.value) == (
        f"backup folder {root} is not writable (Not a directory); fix its permissions or set "
        "USER_MIGRATION_BACKUP_DIR to a writable folder. Nothing was migrated"
    )
    assert_stopped_at_backup(legacy)
    assert blocker.read_text() == "a file where a folder should be"


def test_backup_folder_that_is_a_file_fails_naming_the_folder(legacy, tmp_path):
    root = tmp_path / "backups"
    root.write_text("x")
    with pytest.raises(MigrationError) as failure:
        run_stages(legacy, legacy, Settings(), RUN, root)
    assert str(failure.value) == (
        f"backup folder {root} is a file, not a folder; remove it or set USER_MIGRATION_BACKUP_DIR to a "
        "writable folder. Nothing was migrated"
    )
    assert_stopped_at_backup(legacy)
    assert root.read_text() == "x"


@contextlib.contextmanager
def tmpfs(path: Path, size: str, read_only: bool = False):
    path.mkdir(parents=True, exist_ok=True)
    options = f"size={size},mode=0700" + (",ro" if read_only else "")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount permission): {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_backup_folder_on_a_read_only_filesystem_fails_naming_the_folder(legacy, tmp_path):
    with tmpfs(tmp_path / "ro", "64k", read_only=True) as root:
        with pytest.raises(MigrationError) as failure:
            run_stages(legacy, legacy, Settings(), RUN, root)
        assert str(failure.value) == (
            f"backup folder {root} is not writable (Read-only file system); fix its permissions or set "
            "USER_MIGRATION_BACKUP_DIR to a writable folder. Nothing was migrated"
        )
        assert list(root.iterdir()) == []
    assert_stopped_at_backup(legacy)


def test_backup_disk_full_fails_naming_the_folder_and_leaves_no_partial_backup(legacy, tmp_path):
    # ~6,000 rows of random hashes: ~500 kB of gzip'd CSV, far more than the 64 kB filesystem holds.
    with psycopg.connect(legacy) as conn:
        conn.execute(
            "INSERT INTO account_user (id, password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) "
            "SELECT 1000 + g, md5(random()::text) || md5(random()::text), false, 'bulk' || g || '@example.com', "
            "'bulk' || g, md5(random()::text), date '1990-01-01', '', true, false FROM generate_series(1, 6000) g"
        )
    with tmpfs(tmp_path / "full", "64k") as root:
        with pytest.raises(MigrationError) as failure:
            run_stages(legacy, legacy, Settings(), RUN, root)
        folder = root / RUN
        assert str(failure.value) == (
            f"cannot write the backup to {folder}: No space left on device. Free space or fix permissions of "
            "that folder, or point USER_MIGRATION_BACKUP_DIR elsewhere; nothing was migrated"
        )
        # The half-written folder is gone: nothing is left that could pass for a backup.
        assert list(root.iterdir()) == []
        # ...and the space is free again for the next attempt.
        assert os.statvfs(root).f_bfree == os.statvfs(root).f_blocks
    assert_stopped_at_backup(legacy, legacy_rows=len(fx.ROWS) + 6000)


# --- a backup altered after it was written ----------------------------------------------------------


@pytest.fixture
def backup_folder(legacy, backup_dir) -> Path:
    run_stages(legacy, legacy, Settings(dry_run=True), RUN, backup_dir)
    folder = backup_dir / RUN
    verify_backup(folder)
    return folder


def test_truncated_backup_file_is_refused_naming_it_and_both_checksums(backup_folder):
    path = backup_folder / "account_user.csv.gz"
    written = hashlib.sha256(path.read_bytes()).hexdigest()
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    now = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(MigrationError) as failure:
        verify_backup(backup_folder)
    assert str(failure.value) == (
        f"backup file {path} does not match its manifest: sha256 is {now}, the manifest says {written}. "
        "Refusing to use it"
    )
    with pytest.raises(EOFError):  # and indeed it no longer decompresses
        gzip.decompress(path.read_bytes())


def test_backup_without_manifest_is_refused(backup_folder):
    (backup_folder / MANIFEST).unlink()
    with pytest.raises(MigrationError) as failure:
        verify_backup(backup_folder)
    assert str(failure.value) == f"{backup_folder} has no manifest.json: it is not a complete backup"


def test_backup_with_a_missing_file_is_refused_naming_it(backup_folder):
    path = backup_folder / "account_user_user_permissions.csv.gz"
    path.unlink()
    with pytest.raises(MigrationError) as failure:
        verify_backup(backup_folder)
    assert str(failure.value) == (
        f"backup file {path} listed in its manifest is missing: the backup is incomplete. Refusing to use it"
    )


def test_backup_with_a_damaged_manifest_is_refused(backup_folder):
    manifest = backup_folder / MANIFEST
    manifest.write_text(manifest.read_text()[:-40])
    with pytest.raises(MigrationError) as failure:
        verify_backup(backup_folder)
    assert str(failure.value) == f"{manifest} is damaged (not the JSON the backup wrote): refusing to use it"


def test_manifest_cannot_point_outside_its_folder(backup_folder, tmp_path):
    outside = tmp_path / "outside.csv.gz"
    outside.write_bytes(b"not a backup")
    manifest = backup_folder / MANIFEST
    data = json.loads(manifest.read_text())
    data["tables"][0]["path"] = "../../outside.csv.gz"
    data["tables"][0]["sha256"] = hashlib.sha256(b"not a backup").hexdigest()
    manifest.write_text(json.dumps(data))
    with pytest.raises(MigrationError, match=r"names a file outside its folder"):
        verify_backup(backup_folder)


# --- the migrated data is broken after the copy -----------------------------------------------------


def test_validation_names_each_broken_check_and_by_how_much(legacy, backup_dir):
    from user_migration.validation import OUTCOME_ORDER, validate_target

    run_stages(legacy, legacy, Settings(), RUN, backup_dir)
    url = legacy.replace("postgresql://", "postgresql+psycopg://", 1)
    assert all(o.success for o in validate_target(url, expected_users=len(fx.MIGRATED)))

    with psycopg.connect(legacy) as conn:
        # A profile lost, and (with the index that forbids it dropped) a second 'alice' differing only in case.
        conn.execute("DELETE FROM account_profile WHERE user_id = 27")
        conn.execute("DROP INDEX account_newuser_email_ci_key")
        conn.execute(
            "INSERT INTO account_newuser (id, password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
            "(99, 'x', false, 'ALICE@example.com', 'alice2', 'Alice Again', '1990-01-02', '', true, false, now(), now())"
        )
        conn.execute("INSERT INTO account_profile (user_id, updated_at) VALUES (99, now())")
    outcomes = {o.name: o for o in validate_target(url, expected_users=len(fx.MIGRATED))}
    assert list(outcomes) == list(OUTCOME_ORDER)
    failed = {name: o.failure_message() for name, o in outcomes.items() if not o.success}
    assert failed == {
        "users_row_count": "users_row_count failed: expected 17, observed 18 (off by +1)",
        "email_unique_ci": "email_unique_ci failed: 2 of 18 rows break it "
        "(account_newuser.email values must be unique ignoring case (lower(email)))",
        "profile_for_every_user": "profile_for_every_user failed: 1 of 18 rows break it "
        "(every account_newuser row must have an account_profile row)",
    }
    # Counts and rule names only: no address, name or hash of the users involved.
    assert (
        find_leaks(" ".join(failed.values()), [*personal_values(), "ALICE@example.com", "Alice Again"]) == []
    )
