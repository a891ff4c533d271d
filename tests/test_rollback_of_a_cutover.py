"""Rolling a cutover back, and restoring a backup, on the fixture's legacy tables: carry_back
brings every change made in the new tables since the cutover back (batch by batch), refuses a link
to a group the legacy side lacks and a change that breaks a legacy unique key, changing nothing;
restore reproduces the legacy tables and refuses a tampered backup. (With an application table
pointing at the users, and the application writing meanwhile: tests/test_rollback.py.)"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import run_stages
from support.sync import SETTINGS, cut_over_two_databases, cutover, expected_target, migrated, validated_pass

from user_migration import rollback
from user_migration.backup import run_backup
from user_migration.cutover import active_cutover
from user_migration.errors import MigrationError
from user_migration.rollback import carry_back, restore


@pytest.mark.parametrize("batch", [1, 10_000])  # the changed rows are read a batch at a time
def test_rollback_carries_back_every_change_made_after_the_cutover(legacy, backup_dir, batch, monkeypatch):
    monkeypatch.setattr(rollback, "BATCH", batch)
    validated_pass(legacy, "pass-1", backup_dir)
    cutover(legacy, "pass-1")
    login = dt.datetime(2026, 11, 1, 12, 0, tzinfo=dt.UTC)
    with psycopg.connect(legacy) as conn:  # the application, now on the new table
        conn.execute(
            "INSERT INTO account_newuser (id, password, last_login, is_superuser, email, username, full_name, "
            "date_of_birth, phone_number, is_active, is_staff, joined_at, updated_at) VALUES "
            "(1000, 'pbkdf2_sha256$600000$new$user=', NULL, false, 'newbie@example.com', 'newbie', 'New Bie', "
            "'2001-02-03', '+9779841000000', true, false, now(), now())"
        )
        conn.execute("UPDATE account_newuser SET password = 'pbkdf2_sha256$changed' WHERE id = 1")
        conn.execute("UPDATE account_newuser SET last_login = %s WHERE id = 2", (login,))
        conn.execute("UPDATE account_newuser SET is_active = false, is_staff = true WHERE id = 10")
        conn.execute("DELETE FROM account_newuser WHERE id = 27")
        # Links: user 1 leaves "editors" (link 104) and joins "customers"; the new user joins
        # "support"; user 2 gains a permission under an id the legacy table uses for rejected user 28 (202).
        conn.execute("DELETE FROM account_newuser_groups WHERE id = 104")
        conn.execute("INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (1, 1), (1000, 2)")
        conn.execute(
            "INSERT INTO account_newuser_user_permissions (id, newuser_id, permission_id) VALUES (202, 2, 3)"
        )
    with psycopg.connect(legacy, autocommit=True) as conn:
        result = carry_back(conn, conn, SETTINGS, "test", "rollback-1")
    assert (result["inserted"], result["updated"], result["deleted"]) == (1, 3, 1)
    assert (result["links_added"], result["links_removed"]) == (3, 1)
    with psycopg.connect(legacy) as conn:
        rows = {
            r[0]: r
            for r in conn.execute(
                "SELECT id, password, last_login, is_active, is_staff, email, username, phone_number FROM account_user"
            ).fetchall()
        }
        assert rows[1000][1:] == (
            "pbkdf2_sha256$600000$new$user=",
            None,
            True,
            False,
            "newbie@example.com",
            "newbie",
            "+9779841000000",
        )
        assert rows[1][1] == "pbkdf2_sha256$changed"
        assert rows[2][2] == login
        assert rows[10][3:5] == (False, True)
        assert 27 not in rows
        # Only changed fields were written back: row 2's padded email stays as the legacy had it.
        assert rows[2][5] == "  bob@gmail.com "
        assert conn.execute(
            "SELECT action, count(*) FROM migration_audit.rollback_rows GROUP BY action ORDER BY action"
        ).fetchall() == [
            ("delete", 1),
            ("insert", 1),
            ("links:account_user_groups", 2),
            ("links:account_user_user_permissions", 1),
            ("update", 3),
        ]
        assert conn.execute(
            "SELECT source_id, detail FROM migration_audit.rollback_rows WHERE action LIKE 'links:%' "
            "ORDER BY action, source_id"
        ).fetchall() == [(1, "+1 -1"), (1000, "+1 -0"), (2, "+1 -0")]
        # User 28 was rejected, so only the legacy side has it: its links (103, 202) stay as they were.
        assert conn.execute("SELECT user_id, group_id FROM account_user_groups ORDER BY 1, 2").fetchall() == [
            (1, 1),
            (28, 1),
            (1000, 2),
        ]
        permissions = conn.execute(
            "SELECT id, user_id, permission_id FROM account_user_user_permissions ORDER BY id"
        )
        permissions = permissions.fetchall()
        assert [p[1:] for p in permissions] == [(28, 2), (40, 3), (2, 3)]
        assert permissions[2][0] > 203  # 202 was taken on the legacy side: a new id
        conn.execute("INSERT INTO account_user_user_permissions (user_id, permission_id) VALUES (40, 1)")
        assert active_cutover(conn) is None
        conn.execute("UPDATE account_user SET full_name = 'Writable Again' WHERE id = 11")
        conn.commit()
    # Passes resume and bring the target in line with the legacy table again.
    run_stages(legacy, legacy, SETTINGS, "pass-2", backup_dir)
    assert migrated(legacy) == expected_target(legacy, dt.date.today())
    with psycopg.connect(legacy) as conn:
        for legacy_links, target_links, user, other in (
            ("account_user_groups", "account_newuser_groups", "user_id", "group_id"),
            ("account_user_user_permissions", "account_newuser_user_permissions", "user_id", "permission_id"),
        ):
            expected = conn.execute(
                f"SELECT id, {user}, {other} FROM {legacy_links} WHERE {user} IN (SELECT id FROM account_newuser) "
                "ORDER BY id"
            ).fetchall()
            assert (
                conn.execute(f"SELECT id, newuser_id, {other} FROM {target_links} ORDER BY id").fetchall()
                == expected
            )


def test_restore_reproduces_the_legacy_tables_and_refuses_a_tampered_backup(legacy, backup_dir):
    tables = ("account_user", "account_user_groups", "account_user_user_permissions")

    def dump() -> dict:
        with psycopg.connect(legacy) as conn:
            return {t: conn.execute(f"SELECT * FROM {t} ORDER BY id").fetchall() for t in tables}

    original = dump()
    with psycopg.connect(legacy, autocommit=True) as conn:
        folder = Path(run_backup(conn, SETTINGS.mapping, backup_dir, "backup-run").folder)
        conn.execute("DELETE FROM account_user_groups WHERE user_id = 27")
        conn.execute("UPDATE account_user SET email = 'changed@example.com' WHERE id = 1")
        conn.execute(
            "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES ('x', false, 'late@example.com', 'late', 'Late', "
            "'1990-01-01', '', true, false)"
        )
        assert dump() != original
        result = restore(conn, conn, SETTINGS, folder)
    assert result["restored"]["public.account_user"] == len(fx.ROWS)
    assert dump() == original
    with psycopg.connect(legacy) as conn:  # the sequence is past the restored ids
        new_id = conn.execute(
            "INSERT INTO account_user (password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES ('x', false, 'next@example.com', 'next', 'Next', "
            "'1990-01-01', '', true, false) RETURNING id"
        ).fetchone()[0]
        assert new_id > max(r[0] for r in original["account_user"])
        conn.rollback()

    path = folder / "account_user.csv.gz"
    path.write_bytes(path.read_bytes()[:-10])
    with (
        psycopg.connect(legacy, autocommit=True) as conn,
        pytest.raises(MigrationError, match=r"account_user\.csv\.gz does not match its manifest"),
    ):
        restore(conn, conn, SETTINGS, folder)
    assert dump() == original


def test_rollback_into_a_separate_legacy_database_refuses_a_link_to_a_missing_group(make_db, backup_dir):
    """Target and legacy on different databases: the changes cross between two connections, and a link
    the legacy side cannot hold (its group does not exist there) stops the rollback with nothing changed."""
    legacy_db, target_db = cut_over_two_databases(make_db, backup_dir)
    with psycopg.connect(target_db) as conn:  # the application, on the new database
        conn.execute("UPDATE account_newuser SET full_name = 'Renamed' WHERE id = 1")
        conn.execute("INSERT INTO account_newuser_groups (newuser_id, group_id) VALUES (2, 1), (2, 99)")

    def legacy_state() -> tuple:
        with psycopg.connect(legacy_db) as conn:
            return (
                conn.execute("SELECT id, full_name FROM account_user ORDER BY id").fetchall(),
                conn.execute("SELECT * FROM account_user_groups ORDER BY id").fetchall(),
            )

    before = legacy_state()
    with (
        psycopg.connect(legacy_db, autocommit=True) as src,
        psycopg.connect(target_db, autocommit=True) as dst,
    ):
        with pytest.raises(
            MigrationError, match=r"rollback stopped, nothing changed: a link in account_newuser_groups"
        ):
            carry_back(src, dst, SETTINGS, "test", "rollback-sep")
        assert active_cutover(dst) is not None
    assert legacy_state() == before

    with psycopg.connect(target_db) as conn:
        conn.execute("DELETE FROM account_newuser_groups WHERE group_id = 99")
    with (
        psycopg.connect(legacy_db, autocommit=True) as src,
        psycopg.connect(target_db, autocommit=True) as dst,
    ):
        result = carry_back(src, dst, SETTINGS, "test", "rollback-sep")
    assert (result["updated"], result["links_added"], result["links_removed"]) == (1, 1, 0)
    users, groups = legacy_state()
    assert dict(users)[1] == "Renamed"
    assert sorted(g[1:] for g in groups) == sorted([*(g[1:] for g in fx.GROUP_LINKS), (2, 1)])


def test_rollback_that_breaks_a_legacy_unique_key_stops_with_nothing_changed(legacy, backup_dir):
    """After the cutover user 1 takes the username that user 28 (rejected, so only on the legacy side)
    still holds there: the rollback names the key and the user, not the value, and changes nothing."""
    validated_pass(legacy, "pass-1", backup_dir)
    cutover(legacy, "pass-1")
    with psycopg.connect(legacy) as conn:
        taken = conn.execute("SELECT username FROM account_user WHERE id = 28").fetchone()[0]
        conn.execute("UPDATE account_newuser SET username = %s, full_name = 'Changed' WHERE id = 1", (taken,))
        conn.execute("UPDATE account_newuser SET full_name = 'Also Changed' WHERE id = 2")
        before = conn.execute("SELECT * FROM account_user ORDER BY id").fetchall()
    with psycopg.connect(legacy, autocommit=True) as conn:
        with pytest.raises(MigrationError) as raised:
            carry_back(conn, conn, SETTINGS, "test", "rollback-1")
        message = str(raised.value)
        assert "rollback stopped, nothing changed" in message and "account_user_username_key" in message
        assert "users 1" in message and taken not in message
        assert active_cutover(conn) is not None
        assert conn.execute("SELECT * FROM account_user ORDER BY id").fetchall() == before
        assert conn.execute("SELECT count(*) FROM migration_audit.rollback_rows").fetchone() == (0,)
