"""The stages on a real PostgreSQL, without a scheduler: exact outcomes and the invariants users rely on."""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import stat
import uuid

import psycopg
import pytest
from psycopg import sql
from support import fixture_users as fx
from support.pipeline import rejects, run_stages, snapshot

from user_migration.backup import verify_backup
from user_migration.config import Settings, load_mapping
from user_migration.db import ensure_audit_schema
from user_migration.errors import MigrationError
from user_migration.finalize import legacy_id_floors
from user_migration.partition_copy import copy_partition
from user_migration.schema import apply_schema


def test_fixture_outcome_row_by_row(legacy, backup_dir):
    result = run_stages(legacy, legacy, Settings(partitions=3, batch_size=4), "run-1", backup_dir)

    assert result["source_rows"] == len(fx.ROWS)
    assert result["migrated"] == len(fx.MIGRATED)
    assert result["rejected"] == len(fx.REJECTED)
    got_rejects = rejects(legacy, "run-1")
    assert set(got_rejects) == set(fx.REJECTED)
    for source_id, (reason, detail) in fx.REJECTED.items():
        assert got_rejects[source_id][0] == reason, source_id
        if detail is not None:
            assert got_rejects[source_id][1] == detail, source_id

    legacy_rows = {row[0]: row for row in fx.ROWS}
    snap = snapshot(legacy)
    assert [u[0] for u in snap["users"]] == sorted(fx.MIGRATED)
    for user in snap["users"]:
        source = legacy_rows[user[0]]
        email, full_name, phone = fx.MIGRATED[user[0]]
        assert user[4:7] == (email, source[5], full_name)  # username exactly as given
        assert user[8] == phone
        assert user[1] == source[1], "password hash must move byte for byte"
        assert (user[2], user[3], user[7], user[9], user[10]) == (
            source[2],
            source[3],
            source[7],
            source[9],
            source[10],
        )
    assert snap["groups"] == fx.MIGRATED_GROUP_LINKS
    assert snap["permissions"] == fx.MIGRATED_PERMISSION_LINKS
    assert [p[0] for p in snap["profiles"]] == sorted(fx.MIGRATED)

    with psycopg.connect(legacy) as conn:
        fixes = set(
            conn.execute(
                "SELECT source_id, field, original_value, new_value, reason FROM migration_audit.field_fixes "
                "WHERE run_id = 'run-1'"
            ).fetchall()
        )
        assert fixes == fx.FIXES
        # The rejected row is kept whole, under its legacy column names, so it can be fixed and re-imported.
        row = conn.execute(
            "SELECT source_row FROM migration_audit.rejected_rows WHERE run_id = 'run-1' AND source_id = 9"
        ).fetchone()[0]
        assert row == {
            "id": 9,
            "password": fx.pw(9),
            "last_login": None,
            "is_superuser": False,
            "email": "heidi@example.com",
            "username": "heidi",
            "full_name": "Heidi Klum",
            "date_of_birth": "1899-12-31",
            "phone_number": "",
            "is_active": True,
            "is_staff": False,
        }
        # The id sequence is past the copied ids: the application's next user cannot collide.
        next_id = conn.execute(
            "INSERT INTO account_newuser (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
            "('x', false, 'new@example.com', 'new', 'New', '2000-01-01', '', true, false, now(), now()) RETURNING id"
        ).fetchone()[0]
        assert next_id == 41
        conn.rollback()


def test_second_run_changes_nothing(legacy, backup_dir):
    run_stages(legacy, legacy, Settings(partitions=2, batch_size=5), "run-1", backup_dir)
    before = snapshot(legacy)
    with psycopg.connect(legacy) as conn:
        stamps = conn.execute("SELECT id, joined_at, updated_at FROM account_newuser ORDER BY id").fetchall()
    second = run_stages(legacy, legacy, Settings(partitions=2, batch_size=5), "run-2", backup_dir)
    assert snapshot(legacy) == before
    assert (second["inserted"], second["updated"], second["removed"]) == (0, 0, 0)
    assert second["unchanged"] == len(fx.MIGRATED)
    assert set(rejects(legacy, "run-2")) == set(fx.REJECTED)
    with psycopg.connect(legacy) as conn:
        assert (
            conn.execute("SELECT id, joined_at, updated_at FROM account_newuser ORDER BY id").fetchall()
            == stamps
        )


@pytest.mark.parametrize(
    ("partitions", "batch_size", "order"),
    [(1, 10_000, None), (4, 1, None), (5, 3, [4, 2, 0, 3, 1]), (16, 2, None)],
)
def test_outcome_independent_of_batches_partitions_and_order(
    make_db, backup_dir, partitions, batch_size, order
):
    reference_db, other_db = make_db("ref"), make_db("other")
    fx.load(reference_db)
    fx.load(other_db)
    run_stages(reference_db, reference_db, Settings(partitions=2, batch_size=7), "ref", backup_dir / "a")
    result = run_stages(
        other_db,
        other_db,
        Settings(partitions=partitions, batch_size=batch_size),
        "other",
        backup_dir / "b",
        partition_order=order if order and len(order) == partitions else None,
    )
    assert snapshot(other_db) == snapshot(reference_db)
    assert rejects(other_db, "other") == rejects(reference_db, "ref")
    assert result["migrated"] + result["rejected"] == len(fx.ROWS)


def test_separate_target_database(make_db, backup_dir):
    legacy_db, target_db = make_db("src"), make_db("dst")
    fx.load(legacy_db)
    result = run_stages(legacy_db, target_db, Settings(), "sep", backup_dir)
    assert result["migrated"] == len(fx.MIGRATED)
    snap = snapshot(target_db)
    assert [u[0] for u in snap["users"]] == sorted(fx.MIGRATED)
    assert snap["groups"] == fx.MIGRATED_GROUP_LINKS
    with psycopg.connect(legacy_db) as conn:
        # Nothing was written to the legacy database.
        assert conn.execute(
            "SELECT to_regclass('account_newuser'), to_regnamespace('migration_audit')"
        ).fetchone() == (
            None,
            None,
        )


def test_retried_partition_after_failure_leaves_no_trace(legacy, backup_dir):
    """A partition that dies mid-way commits nothing; its retry gives the exact result."""
    settings = Settings(partitions=1, batch_size=3)
    with psycopg.connect(legacy, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "setup")
        # Sabotage: a check constraint that the 20th user breaks, in the middle of the partition.
        conn.execute("ALTER TABLE account_newuser ADD CONSTRAINT sabotage CHECK (id <> 20)")
    from user_migration.plan import make_plan

    with (
        psycopg.connect(legacy, autocommit=True) as src,
        psycopg.connect(legacy, autocommit=True) as dst,
    ):
        import datetime as dt

        plan = make_plan(src, dst, settings, "retry", dt.date.today())
        with pytest.raises(MigrationError) as failure:
            copy_partition(src, dst, settings, "retry", plan["partitions"][0])
        message = str(failure.value)
        assert "constraint sabotage" in message and "victor" not in message and "@" not in message
        assert dst.execute("SELECT count(*) FROM account_newuser").fetchone()[0] == 0
        assert dst.execute("SELECT count(*) FROM migration_audit.rejected_rows").fetchone()[0] == 0
        assert dst.execute(
            "SELECT state, attempts FROM migration_audit.partitions WHERE run_id = 'retry'"
        ).fetchone() == ("failed", 1)
        dst.execute("ALTER TABLE account_newuser DROP CONSTRAINT sabotage")
        copy_partition(src, dst, settings, "retry", plan["partitions"][0])
        assert dst.execute(
            "SELECT state, attempts, rows_in, inserted FROM migration_audit.partitions WHERE run_id = 'retry'"
        ).fetchone() == ("done", 2, len(fx.ROWS), len(fx.MIGRATED))
        # Copying the same partition again (a re-run) changes nothing.
        copy_partition(src, dst, settings, "retry", plan["partitions"][0])
    assert [u[0] for u in snapshot(legacy)["users"]] == sorted(fx.MIGRATED)
    assert set(rejects(legacy, "retry")) == set(fx.REJECTED)


def test_legacy_changes_flow_on_the_next_run(legacy, backup_dir):
    run_stages(legacy, legacy, Settings(), "one", backup_dir)
    with psycopg.connect(legacy) as conn:
        conn.execute(
            "UPDATE account_user SET full_name = 'Niaj N' WHERE id = 13"
        )  # now valid: wins 'shared@'
        conn.execute("UPDATE account_user SET phone_number = '9841111111' WHERE id = 12")
        conn.execute("DELETE FROM account_user_user_permissions WHERE user_id = 40")
        conn.execute("DELETE FROM account_user WHERE id = 40")
    result = run_stages(legacy, legacy, Settings(), "two", backup_dir)
    got = rejects(legacy, "two")
    assert got[14] == ("duplicate_email", "same email as user 13, which is kept")
    assert 13 not in got and 15 in got
    users = {u[0]: u for u in snapshot(legacy)["users"]}
    assert 13 in users and 14 not in users and 40 not in users
    assert users[12][8] == "+9779841111111"
    assert result["removed"] == 2  # 14 (now a duplicate) and 40 (deleted)
    assert result["migrated"] + result["rejected"] == len(fx.ROWS) - 1
    with psycopg.connect(legacy) as conn:
        paths = conn.execute(
            "SELECT sum(transformed), sum(unchanged) FROM migration_audit.partitions WHERE run_id = 'two'"
        ).fetchone()
    # The second pass read only the changed row 12, the rows rejected last time (13 among them) and
    # the row whose duplicate decision changed (14): not the whole table.
    assert paths == (1 + len(fx.REJECTED) + 1, len(fx.MIGRATED) - 3)


def test_dry_run_writes_nothing_to_target_tables(legacy, backup_dir):
    result = run_stages(legacy, legacy, Settings(dry_run=True), "dry", backup_dir)
    assert result["migrated"] == len(fx.MIGRATED) and result["rejected"] == len(fx.REJECTED)
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None


def test_backup_manifest_checksums_and_modes(legacy, backup_dir):
    result = run_stages(legacy, legacy, Settings(), "manual__2026-01-01T00:00:00+00:00", backup_dir)
    folder = backup_dir / "manual__2026-01-01T00_00_00_00_00"
    assert result["backup_folder"] == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    manifest = json.loads((folder / "manifest.json").read_text())
    by_table = {t["table"]: t for t in manifest["tables"]}
    assert {k: v["rows"] for k, v in by_table.items()} == {
        "public.account_user": len(fx.ROWS),
        "public.account_user_groups": len(fx.GROUP_LINKS),
        "public.account_user_user_permissions": len(fx.PERMISSION_LINKS),
    }
    for entry in manifest["tables"]:
        path = folder / entry["path"]
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert hashlib.sha256(path.read_bytes()).hexdigest() == entry["sha256"]
    assert by_table["public.account_user"]["columns"][:3] == ["id", "password", "last_login"]
    assert manifest["server_version"]
    with gzip.open(folder / "account_user.csv.gz", "rt") as fh:
        lines = fh.read().splitlines()
    assert lines[0].startswith("id,password,last_login")
    assert len(lines) == len(fx.ROWS) + 1
    assert verify_backup(folder)["run_id"] == "manual__2026-01-01T00:00:00+00:00"

    tampered = folder / "account_user_groups.csv.gz"
    tampered.write_bytes(tampered.read_bytes() + b"x")
    with pytest.raises(MigrationError, match=r"account_user_groups\.csv\.gz does not match its manifest"):
        verify_backup(folder)


def test_schema_is_applied_once_and_edits_are_refused(legacy, tmp_path):
    ddl_dir = tmp_path / "ddl"
    ddl_dir.mkdir()
    (ddl_dir / "001_one.sql").write_text("CREATE TABLE one_table (id int);")
    with psycopg.connect(legacy, autocommit=True) as conn:
        ensure_audit_schema(conn)
        assert apply_schema(conn, "r1", ddl_dir) == ["001"]
        assert apply_schema(conn, "r2", ddl_dir) == []
        (ddl_dir / "002_two.sql").write_text("CREATE TABLE two_table (id int);")
        assert apply_schema(conn, "r3", ddl_dir) == ["002"]
        (ddl_dir / "001_one.sql").write_text("CREATE TABLE one_table (id bigint);")
        with pytest.raises(MigrationError, match=r"001_one\.sql was edited after it was applied"):
            apply_schema(conn, "r4", ddl_dir)
        # A failing change rolls back whole: nothing half-applied, nothing recorded.
        (ddl_dir / "001_one.sql").write_text("CREATE TABLE one_table (id int);")
        (ddl_dir / "003_bad.sql").write_text("CREATE TABLE three_table (id int); SELECT 1/0;")
        with pytest.raises(psycopg.errors.DivisionByZero):
            apply_schema(conn, "r5", ddl_dir)
        assert conn.execute("SELECT to_regclass('three_table')").fetchone()[0] is None
        assert conn.execute("SELECT count(*) FROM migration_audit.schema_migrations").fetchone()[0] == 2


def test_renamed_legacy_table_via_mapping(make_db, backup_dir):
    """A legacy table named `users` with `dob` and `ph_number` columns and no flags: configuration only."""
    dsn = make_db("renamed")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE users (uid bigint PRIMARY KEY, pass text NOT NULL, mail text, login text NOT NULL, "
            "name text, dob date, ph_number text)"
        )
        conn.execute(
            "INSERT INTO users VALUES "
            "(1, 'h1', 'a@example.com', 'a', 'A', '1990-01-01', '9841234567'),"
            "(2, 'h2', 'b@example.com', 'b', 'B', NULL, ''),"
            "(3, 'h3', NULL, 'c', 'C', '1990-01-01', ''),"
            "(4, 'h4', 'd@example.com', 'd', %s, '1990-01-01', '')",
            ("x" * 300,),
        )
    mapping = load_mapping(
        {
            "users_table": "users",
            "columns": {
                "id": "uid",
                "password": "pass",
                "email": "mail",
                "username": "login",
                "full_name": "name",
                "date_of_birth": "dob",
                "phone_number": "ph_number",
                "last_login": None,
                "is_superuser": None,
                "is_staff": None,
                "is_active": None,
            },
            "groups": None,
            "permissions": None,
        }
    )
    result = run_stages(dsn, dsn, Settings(mapping=mapping), "renamed", backup_dir)
    assert (result["migrated"], result["rejected"]) == (1, 3)
    assert rejects(dsn, "renamed") == {
        2: ("invalid_date_of_birth", "date_of_birth is missing"),
        3: ("invalid_email", "email is empty"),
        4: ("value_too_long", "full_name has 300 characters, the limit is 255"),
    }
    user = snapshot(dsn)["users"][0]
    assert user == (1, "h1", None, False, "a@example.com", "a", "A", user[7], "+9779841234567", True, False)
    with psycopg.connect(dsn) as conn:
        source_row = conn.execute(
            "SELECT source_row FROM migration_audit.rejected_rows WHERE source_id = 2"
        ).fetchone()[0]
    assert source_row["dob"] is None and source_row["login"] == "b"


def test_missing_table_or_column_is_refused_before_any_write(legacy, backup_dir):
    with pytest.raises(
        MigrationError, match=r"legacy table public\.'users; DROP TABLE account_user' does not exist"
    ):
        run_stages(
            legacy,
            legacy,
            Settings(mapping=load_mapping({"users_table": "users; DROP TABLE account_user"})),
            "x",
            backup_dir,
        )
    with pytest.raises(MigrationError, match=r"has no column\(s\) 'dob'"):
        run_stages(
            legacy,
            legacy,
            Settings(mapping=load_mapping({"columns": {"date_of_birth": "dob"}})),
            "y",
            backup_dir,
        )
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT count(*) FROM account_user").fetchone()[0] == len(fx.ROWS)
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None
    assert not backup_dir.exists() or not any(backup_dir.iterdir())


def test_empty_legacy_table_succeeds_with_zero(make_db, backup_dir):
    dsn = make_db("empty")
    with psycopg.connect(dsn) as conn:
        conn.execute(fx.LEGACY_DDL.read_text())
    result = run_stages(dsn, dsn, Settings(partitions=4), "empty", backup_dir)
    assert (result["source_rows"], result["migrated"], result["rejected"], result["partitions"]) == (
        0,
        0,
        0,
        1,
    )


def _next_ids(conn: psycopg.Connection) -> tuple[int, int, int]:
    """The ids the application's next user, group link and permission link get (rolled back)."""
    with conn.transaction(force_rollback=True):
        user = conn.execute(
            "INSERT INTO account_newuser (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
            "('x', false, 'new@example.com', 'new', 'New', '2000-01-01', '', true, false, now(), now()) RETURNING id"
        ).fetchone()[0]
        group = conn.execute(
            "INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (%s, 99) RETURNING id", (user,)
        ).fetchone()[0]
        permission = conn.execute(
            "INSERT INTO account_newuser_user_permissions (newuser_id, permission_id) VALUES (%s, 99) RETURNING id",
            (user,),
        ).fetchone()[0]
    return user, group, permission


def test_ids_of_rejected_and_deleted_legacy_users_stay_reserved(make_db, backup_dir):
    """The target's sequences pass every id the legacy tables hold or handed out, not just the migrated ones."""
    legacy, target = make_db("legacy"), make_db("target")
    fx.load(legacy)
    with psycopg.connect(legacy) as conn:
        # The newest legacy user loses a duplicate email (user 1 keeps it), with a link of each kind;
        # users and group links above them were created and deleted (their sequences moved on).
        conn.execute(
            "INSERT INTO account_user (id, password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES "
            "(60, 'h', false, 'alice@example.com', 'newest', 'Newest N', '1990-01-01', '', true, false)"
        )
        conn.execute("INSERT INTO account_user_groups (id, user_id, group_id) VALUES (150, 60, 1)")
        conn.execute(
            "INSERT INTO account_user_user_permissions (id, user_id, permission_id) VALUES (250, 60, 1)"
        )
        conn.execute("SELECT setval(pg_get_serial_sequence('account_user', 'id'), 77)")
        conn.execute("SELECT setval(pg_get_serial_sequence('account_user_groups', 'id'), 160)")
        # The permissions' sequence stays behind its max id (250): the max id counts too.

    result = run_stages(legacy, target, Settings(partitions=3, batch_size=4), "run-1", backup_dir)
    assert rejects(target, "run-1")[60][0] == "duplicate_email"
    assert result["migrated"] == len(fx.MIGRATED)
    with psycopg.connect(target) as conn:
        assert _next_ids(conn) == (78, 161, 251)

    # A later pass never moves a sequence back, though the legacy ids it reads are lower now.
    last_values = (
        "SELECT sequencename, last_value FROM pg_sequences WHERE sequencename LIKE 'account_newuser%' "
        "ORDER BY sequencename"
    )
    with psycopg.connect(target) as conn:
        before = conn.execute(last_values).fetchall()
    with psycopg.connect(legacy) as conn:
        conn.execute("DELETE FROM account_user_groups WHERE user_id = 60")
        conn.execute("DELETE FROM account_user_user_permissions WHERE user_id = 60")
        conn.execute("DELETE FROM account_user WHERE id = 60")
        conn.execute("SELECT setval(pg_get_serial_sequence('account_user', 'id'), 41)")
    run_stages(legacy, target, Settings(partitions=3, batch_size=4), "run-2", backup_dir)
    with psycopg.connect(target) as conn:
        assert conn.execute(last_values).fetchall() == before
        assert dict(before) == {
            "account_newuser_groups_id_seq": 161,
            "account_newuser_id_seq": 78,
            "account_newuser_user_permissions_id_seq": 251,
        }  # the probe above used these


def test_a_legacy_role_that_cannot_read_the_sequences_falls_back_to_max_id(legacy, caplog):
    """Without SELECT on the sequences the floors are the max ids, and the log says so once."""
    role = f"ro_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute("SELECT setval(pg_get_serial_sequence('account_user', 'id'), 77)")
        conn.execute(sql.SQL("CREATE ROLE {} NOLOGIN").format(sql.Identifier(role)))
        try:
            conn.execute(
                sql.SQL(
                    "GRANT SELECT ON account_user, account_user_groups, account_user_user_permissions TO {}"
                ).format(sql.Identifier(role))
            )
            conn.execute(sql.SQL("SET ROLE {}").format(sql.Identifier(role)))
            with caplog.at_level(logging.WARNING, logger="user_migration.finalize"):
                floors = legacy_id_floors(conn, load_mapping())
            conn.execute("RESET ROLE")
            assert floors == {
                "account_newuser": 40,
                "account_newuser_groups": 104,
                "account_newuser_user_permissions": 203,
            }
            warnings = [r.getMessage() for r in caplog.records if r.name == "user_migration.finalize"]
            assert len(warnings) == 1
            assert "public.account_user, public.account_user_groups" in warnings[0]
            assert "grant SELECT on those sequences" in warnings[0]
            conn.execute("SET ROLE NONE")
            assert (
                legacy_id_floors(conn, load_mapping())["account_newuser"] == 77
            )  # readable: the sequence counts
        finally:
            conn.execute("RESET ROLE")
            conn.execute(sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)))
            conn.execute(sql.SQL("DROP ROLE {}").format(sql.Identifier(role)))
