"""Backup retention on real passes, a real PostgreSQL and real folders.

Pinned (first load, cutover) backups survive pruning to N; the days rule; nothing outside the root,
behind a symlink or of a running run is touched; only a newer complete backup lets one go; the
report task prunes, records why in migration_audit, and names the backup covering its run.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path

import psycopg
import pytest
from support.pipeline import run_stages

from user_migration import audit
from user_migration.backup import run_folder_name
from user_migration.config import BACKUP_DIR_ENV, Settings
from user_migration.cutover import CutoverOptions, run_cutover
from user_migration.retention import prune_backups
from user_migration.rollback import carry_back


def finished_pass(dsn: str, run_id: str, root: Path, settings: Settings | None = None) -> str:
    """One pass through the stages, finished as the report task would; returns its backup folder."""
    result = run_stages(dsn, dsn, settings or Settings(), run_id, root)
    with psycopg.connect(dsn, autocommit=True) as conn:
        audit.finish_run(conn, run_id, "success", {})
    return result["backup_folder"]


def age(dsn: str, run_id: str, days: float) -> None:
    """Make a run look ``days`` old in the audit trail (its start is what retention measures)."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "UPDATE migration_audit.runs SET started_at = now() - make_interval(secs => %s) WHERE run_id = %s",
            (days * 86_400, run_id),
        )


def folders(root: Path) -> set[str]:
    return {p.name for p in root.iterdir()}


def test_report_prunes_to_n_keeping_first_load_and_cutover_and_names_the_covering_backup(
    legacy, backup_dir, monkeypatch
):
    from user_migration.operators import MigrationReportOperator

    finished_pass(legacy, "dry-0", backup_dir, Settings(dry_run=True))  # before the first load, wrote nothing
    finished_pass(legacy, "pass-1", backup_dir)  # the first load
    finished_pass(legacy, "pass-2", backup_dir)
    run_stages(legacy, legacy, Settings(), "pass-3", backup_dir)
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) "
            "VALUES ('pass-3', 'every_source_row_accounted', true)"
        )
        run_cutover(conn, conn, Settings(), "pass-3", dt.date.today(), "test", CutoverOptions())
        audit.finish_run(conn, "pass-3", "success", {})
        carry_back(conn, conn, Settings(), "test", "rollback-1")  # the cutover stays recorded, rolled back
    for n in range(4, 8):
        finished_pass(legacy, f"pass-{n}", backup_dir)
    run_stages(legacy, legacy, Settings(), "pass-8", backup_dir)
    assert folders(backup_dir) == {"dry-0"} | {f"pass-{n}" for n in range(1, 9)}

    # The report task of pass-8, as Airflow runs it (settings from Params, root from the environment).
    monkeypatch.setenv(BACKUP_DIR_ENV, str(backup_dir))
    settings = Settings.from_params({"backup_keep": 2, "backup_keep_days": 0})
    with psycopg.connect(legacy, autocommit=True) as target:
        summary = MigrationReportOperator(task_id="report").run({"run_id": "pass-8"}, settings, target)
        recorded = target.execute(
            "SELECT folder, backup_run_id, reason, bytes, run_id FROM migration_audit.backup_deletions "
            "ORDER BY folder"
        ).fetchall()
        stored = target.execute(
            "SELECT summary FROM migration_audit.runs WHERE run_id = 'pass-8'"
        ).fetchone()[0]

    # Pinned: the first load (pass-1, not the older dry run) and the cutover (pass-3); then the newest two.
    assert folders(backup_dir) == {"pass-1", "pass-3", "pass-7", "pass-8"}
    deleted = {"dry-0", "pass-2", "pass-4", "pass-5", "pass-6"}
    assert {d["folder"] for d in summary["retention"]["deleted"]} == deleted
    assert {p["folder"]: p["reason"] for p in summary["retention"]["pinned"]} == {
        "pass-1": "pinned: the backup taken before the first load",
        "pass-3": "pinned: the backup of a run that cut over",
    }
    assert [r[0] for r in recorded] == sorted(deleted)
    assert all(r[1] == r[0] and r[4] == "pass-8" and r[3] > 0 for r in recorded)
    assert all("beyond the newest 2 backups; the complete backup pass-8 is newer" in r[2] for r in recorded)
    assert stored["retention"]["deleted"] == summary["retention"]["deleted"]

    # A retried report task deletes nothing more and still reports what the first attempt deleted.
    with psycopg.connect(legacy, autocommit=True) as target:
        again = MigrationReportOperator(task_id="report").run({"run_id": "pass-8"}, settings, target)
    assert again["retention"]["deleted"] == summary["retention"]["deleted"]
    assert folders(backup_dir) == {"pass-1", "pass-3", "pass-7", "pass-8"}

    covering = str(backup_dir.resolve() / "pass-8")
    assert summary["covering_backup"] == covering
    report = json.loads((backup_dir / "pass-8" / "report.json").read_text())
    assert report["covering_backup"] == covering
    markdown = (backup_dir / "pass-8" / "report.md").read_text()
    assert f"- backup covering this run: {covering}" in markdown
    assert "| pass-2 | pass-2 | beyond the newest 2 backups" in markdown
    assert "- pinned: pass-3 (pinned: the backup of a run that cut over)" in markdown


def test_days_rule_keeps_young_backups_beyond_n_and_a_dry_run_deletes_nothing(legacy, backup_dir):
    for n in range(1, 6):
        finished_pass(legacy, f"pass-{n}", backup_dir)
    for run_id, days in (("pass-1", 30), ("pass-2", 10), ("pass-3", 8), ("pass-4", 3)):
        age(legacy, run_id, days)
    with psycopg.connect(legacy, autocommit=True) as conn:
        rehearsal = prune_backups(conn, backup_dir, "pass-5", keep=1, keep_days=7, apply=False)
        assert {d["folder"] for d in rehearsal["deleted"]} == {"pass-2", "pass-3"}
        assert folders(backup_dir) == {f"pass-{n}" for n in range(1, 6)}  # dry run: nothing deleted
        assert conn.execute("SELECT count(*) FROM migration_audit.backup_deletions").fetchone()[0] == 0

        result = prune_backups(conn, backup_dir, "pass-5", keep=1, keep_days=7)
    # pass-1: first load (30 days old); pass-4 is beyond the newest 1 but 3 days old; pass-5 newest.
    assert folders(backup_dir) == {"pass-1", "pass-4", "pass-5"}
    assert [d["reason"] for d in result["deleted"]] == [
        "beyond the newest 1 backups and older than 7 days; the complete backup pass-5 is newer"
    ] * 2
    assert result["kept_by_reason"]["younger than 7 days"] == 1


def test_nothing_outside_the_root_behind_a_symlink_or_of_a_running_run_is_touched(
    legacy, backup_dir, tmp_path
):
    elsewhere = tmp_path / "other-root"
    finished_pass(legacy, "pass-1", backup_dir)
    finished_pass(legacy, "old-root", elsewhere)  # USER_MIGRATION_BACKUP_DIR was changed since
    finished_pass(legacy, "linked", backup_dir)
    finished_pass(legacy, "nested-link", backup_dir)
    run_stages(legacy, legacy, Settings(), "crashed", backup_dir)  # still 'running'
    finished_pass(legacy, "pass-6", backup_dir)
    for days, run_id in enumerate(("crashed", "nested-link", "linked", "old-root", "pass-1"), start=60):
        age(legacy, run_id, days)  # in the order they ran, all long ago
    # A run folder swapped for a symlink to a folder outside the root.
    outside = tmp_path / "outside"
    (backup_dir / "linked").rename(outside)
    (backup_dir / "linked").symlink_to(outside)
    # A symlink inside a folder retention deletes: the link goes, never what it points at.
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("not a backup")
    (backup_dir / "nested-link" / "escape").symlink_to(victim)
    # Not of this audit trail: a folder (another deployment's backup?) and a file.
    (backup_dir / "stranger").mkdir()
    (backup_dir / "stranger" / "manifest.json").write_text("{}")
    (backup_dir / "notes.txt").write_text("x")

    with psycopg.connect(legacy, autocommit=True) as conn:
        result = prune_backups(conn, backup_dir, "pass-6", keep=0, keep_days=0)

    assert [d["folder"] for d in result["deleted"]] == ["nested-link"]
    assert folders(backup_dir) == {"pass-1", "linked", "crashed", "pass-6", "stranger", "notes.txt"}
    assert (backup_dir / "linked").is_symlink() and (outside / "manifest.json").is_file()
    assert (victim / "keep.txt").read_text() == "not a backup"
    assert (elsewhere / "old-root" / "manifest.json").is_file()
    assert result["skipped"] == [
        {"folder": "linked", "run_id": "linked", "reason": "not a real folder (a symlink?)"}
    ]
    assert result["kept_by_reason"]["the run is still running"] == 1


def test_only_a_newer_complete_backup_lets_an_older_one_go(legacy, backup_dir):
    for n in range(1, 5):
        finished_pass(legacy, f"pass-{n}", backup_dir)
        age(legacy, f"pass-{n}", 10 - n)
    finished_pass(legacy, "pass-5", backup_dir)
    # The two newest backups are damaged: pass-3 is the newest complete one and covers pass-5.
    (backup_dir / "pass-4" / "account_user.csv.gz").write_bytes(b"truncated")
    os.unlink(backup_dir / "pass-5" / "manifest.json")
    with psycopg.connect(legacy, autocommit=True) as conn:
        result = prune_backups(conn, backup_dir, "pass-5", keep=0, keep_days=0)
        assert folders(backup_dir) == {"pass-1", "pass-3", "pass-4", "pass-5"}
        assert result["newest_complete"] == "pass-3"
        assert result["covering_backup"] == str(backup_dir.resolve() / "pass-3")
        assert result["kept_by_reason"]["no newer complete backup replaces it"] == 2

        # With no complete backup at all, nothing but leftovers may go.
        (backup_dir / "pass-3" / "manifest.json").write_text("not json")
        (backup_dir / "pass-1" / "manifest.json").unlink()
        (backup_dir / ".pruning-pass-0").mkdir()  # what an interrupted deletion leaves
        result = prune_backups(conn, backup_dir, "pass-5", keep=0, keep_days=0)
    assert folders(backup_dir) == {"pass-1", "pass-3", "pass-4", "pass-5"}
    assert result["covering_backup"] is None
    # The run's deletions so far: pass-2 by the first call, the leftover by this one.
    assert [(d["folder"], d["reason"][:24]) for d in result["deleted"]] == [
        ("pass-2", "only pinned and the newe"),
        (".pruning-pass-0", "leftover of an interrupt"),
    ]


def test_run_folder_names_match_what_retention_looks_for():
    # retention finds a run's folder by run_folder_name: the same function the backup writes with.
    assert run_folder_name("scheduled__2026-01-01T00:00:00+00:00") == "scheduled__2026-01-01T00_00_00_00_00"


def test_a_report_on_a_worker_that_cannot_see_the_backup_fails_and_writes_nothing(
    legacy, backup_dir, tmp_path, monkeypatch
):
    """Celery: the report may run on another worker than the backup. Without a shared backup folder
    it must not write its report into a folder of its own, nor prune backups it cannot see."""
    from user_migration.config import ConfigError
    from user_migration.operators import MigrationReportOperator

    folder = Path(finished_pass(legacy, "pass-1", backup_dir))
    run_stages(legacy, legacy, Settings(), "pass-2", backup_dir)
    elsewhere = tmp_path / "only-on-the-backup-worker"
    os.rename(backup_dir / "pass-2", elsewhere)  # this worker does not see the folder
    monkeypatch.setenv(BACKUP_DIR_ENV, str(backup_dir))
    with (
        psycopg.connect(legacy, autocommit=True) as target,
        pytest.raises(ConfigError, match="must name one folder that every worker shares"),
    ):
        MigrationReportOperator(task_id="report").run(
            {"run_id": "pass-2"}, Settings.from_params({"backup_keep": 0, "backup_keep_days": 0}), target
        )
    assert folders(backup_dir) == {folder.name}  # no report folder made up, pass-1 not pruned
    assert not (backup_dir / "pass-2").exists()
