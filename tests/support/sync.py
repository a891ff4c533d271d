"""A sync pass as the DAG runs it, with a recorded validation, the cutover, the expected target
computed independently of the pipeline, and the application writer run beside them."""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import psycopg

from support import fixture_users as fx
from support.pipeline import run_stages, snapshot
from user_migration.config import Settings
from user_migration.cutover import CutoverOptions, run_cutover
from user_migration.transforms import Transformer, email_key

WRITER = Path(__file__).with_name("legacy_writer.py")
SETTINGS = Settings(partitions=3, batch_size=5)


def expected_target(dsn: str, as_of: dt.date) -> dict[int, tuple]:
    """The transform of the legacy table as it is now, computed independently of the pipeline."""
    transformer = Transformer("NP", "fix", today=as_of)
    with psycopg.connect(dsn) as conn:
        rows = conn.execute(
            "SELECT id, password, last_login, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff FROM account_user ORDER BY id"
        ).fetchall()
    from user_migration.transforms import LegacyRow

    seen_email, seen_username, out = set(), set(), {}
    for row in rows:
        user, _, _ = transformer.transform(LegacyRow(*row))
        if user is None:
            continue
        if email_key(user.email) in seen_email or user.username in seen_username:
            continue
        seen_email.add(email_key(user.email))
        seen_username.add(user.username)
        out[user.id] = tuple(user)
    return out


def migrated(dsn: str) -> dict[int, tuple]:
    return {row[0]: tuple(row) for row in snapshot(dsn)["users"]}


def validated_pass(dsn: str, run_id: str, backup_dir: Path, target: str | None = None) -> dict:
    """A pass plus a recorded successful validation (the GX suite itself is tested elsewhere);
    into ``target`` when given, else into the legacy database."""
    result = run_stages(dsn, target or dsn, SETTINGS, run_id, backup_dir)
    with psycopg.connect(target or dsn) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) "
            "VALUES (%s, 'every_source_row_accounted', %s)",
            (run_id, result["migrated"] + result["rejected"] == result["source_rows"]),
        )
    return result


def cutover(dsn: str, run_id: str, **options) -> dict:
    with psycopg.connect(dsn, autocommit=True) as conn:
        return run_cutover(conn, conn, SETTINGS, run_id, dt.date.today(), "test", CutoverOptions(**options))


def cut_over_two_databases(make_db, backup_dir: Path, run_id: str = "sep-1") -> tuple[str, str]:
    """The fixture's legacy tables in one database, cut over by a validated pass into another."""
    legacy_db, target_db = make_db("src"), make_db("dst")
    fx.load(legacy_db)
    validated_pass(legacy_db, run_id, backup_dir, target=target_db)
    with (
        psycopg.connect(legacy_db, autocommit=True) as src,
        psycopg.connect(target_db, autocommit=True) as dst,
    ):
        run_cutover(src, dst, SETTINGS, run_id, dt.date.today(), "test", CutoverOptions())
    return legacy_db, target_db


def start_writer(dsn: str, tmp_path: Path, seed: int = 1, script: Path = WRITER):
    """Run an application writer (``legacy_writer.py`` by default) until the returned finish() stops it
    and returns what it did."""
    stop, out = tmp_path / f"stop-{script.stem}-{seed}", tmp_path / f"{script.stem}-{seed}.json"
    proc = subprocess.Popen([sys.executable, str(script), dsn, str(stop), str(out), str(seed)])

    def finish() -> dict:
        stop.touch()
        proc.wait(timeout=60)
        return json.loads(out.read_text())

    return finish
