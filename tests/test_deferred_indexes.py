"""A first load runs without account_newuser's secondary indexes; they come back, and clashes are settled."""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import run_stages, snapshot

from user_migration import audit, deferred_indexes
from user_migration.backup import run_backup
from user_migration.config import Settings
from user_migration.db import ensure_audit_schema
from user_migration.errors import MigrationError
from user_migration.finalize import finalize_target
from user_migration.partition_copy import copy_partition
from user_migration.plan import make_plan
from user_migration.schema import apply_schema

SECONDARY = {
    "account_newuser_date_of_birth_idx",
    "account_newuser_email_ci_key",
    "account_newuser_email_key",
    "account_newuser_username_key",
}


def _indexes(conn: psycopg.Connection) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'account_newuser'"
        ).fetchall()
    )


def _plan(conn: psycopg.Connection, settings: Settings, run_id: str, backup_dir) -> dict:
    ensure_audit_schema(conn)
    audit.start_run(conn, run_id, "user_migration", None, False, settings.public())
    run_backup(conn, settings.mapping, backup_dir, run_id)
    apply_schema(conn, run_id)
    return make_plan(conn, conn, settings, run_id, dt.date.today())


def test_first_load_defers_then_rebuilds_identical_indexes(legacy, backup_dir):
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "schema-only")
        before = _indexes(conn)
        assert set(before) >= SECONDARY

        plan = _plan(conn, settings, "run-1", backup_dir)
        assert set(plan["deferred_indexes"]) == SECONDARY
        assert set(_indexes(conn)) == {"account_newuser_pkey"}
        recorded = conn.execute("SELECT index_name FROM migration_audit.deferred_indexes").fetchall()
        assert {name for (name,) in recorded} == SECONDARY

        for partition in plan["partitions"]:
            with psycopg.connect(legacy, autocommit=True) as source:
                copy_partition(source, conn, settings, "run-1", partition)
        result = finalize_target(conn, conn, settings)
        assert set(result["indexes"]["built"]) == SECONDARY
        assert result["indexes"]["settled"] == {}
        assert _indexes(conn) == before
        assert conn.execute("SELECT count(*) FROM migration_audit.deferred_indexes").fetchone()[0] == 0
        numbers = audit.reconcile(conn, "run-1")
        assert numbers["migrated"] == len(fx.MIGRATED) and numbers["rejected"] == len(fx.REJECTED)

        # A later pass finds users in the target: nothing is deferred, and finalize has nothing to do.
        plan2 = _plan(conn, settings, "run-2", backup_dir)
        assert plan2["deferred_indexes"] == []
        assert _indexes(conn) == before


def test_a_key_taken_after_the_plan_is_settled_at_the_build(legacy, backup_dir):
    """A legacy row that takes another's email between plan and copy: the lowest id keeps it."""
    settings = Settings(partitions=2, batch_size=5)
    kept_id, later_id = sorted(fx.MIGRATED)[0], sorted(fx.MIGRATED)[-1]
    kept_email = fx.MIGRATED[kept_id][0]
    with psycopg.connect(legacy, autocommit=True) as conn:
        plan = _plan(conn, settings, "run-1", backup_dir)
        assert plan["deferred_indexes"]
        # The application writes after the plan was made: the later user now has the same email,
        # in other letters' case, which only the case-insensitive unique index refuses.
        conn.execute("UPDATE account_user SET email = upper(%s) WHERE id = %s", (kept_email, later_id))
        for partition in plan["partitions"]:
            with psycopg.connect(legacy, autocommit=True) as source:
                copy_partition(source, conn, settings, "run-1", partition)
        assert (
            conn.execute(
                "SELECT count(*) FROM account_newuser WHERE lower(email) = lower(%s)", (kept_email,)
            ).fetchone()[0]
            == 2
        )

        assert later_id == 40 and (203, 40, 3) in fx.PERMISSION_LINKS  # the loser has a link
        result = finalize_target(conn, conn, settings)
        assert result["indexes"]["settled"] == {"account_newuser_email_ci_key": 1}
        # The link keys came back before the settling: its link left with it (ON DELETE CASCADE),
        # as on a normal load, instead of waiting in the table for a key to refuse it.
        assert result["indexes"]["keys"]["quarantined"] == {}
        assert (
            conn.execute(
                "SELECT count(*) FROM account_newuser_user_permissions WHERE newuser_id = %s", (later_id,)
            ).fetchone()[0]
            == 0
        )
        assert set(_indexes(conn)) >= SECONDARY
        ids = [u[0] for u in snapshot(legacy)["users"]]
        assert kept_id in ids and later_id not in ids
        reason, detail, source_row = conn.execute(
            "SELECT reason, detail, source_row FROM migration_audit.rejected_rows "
            "WHERE run_id = 'run-1' AND source_id = %s",
            (later_id,),
        ).fetchone()
        assert reason == "duplicate_email"
        assert f"same email as user {kept_id}" in detail and "decided again next pass" in detail
        assert source_row["id"] == later_id
        state = conn.execute(
            "SELECT outcome FROM migration_audit.source_state WHERE source_id = %s", (later_id,)
        ).fetchone()
        assert state == ("R",)
        numbers = audit.reconcile(conn, "run-1")
        assert numbers["migrated"] + numbers["rejected"] == numbers["source_rows"] == len(fx.ROWS)
        assert numbers["migrated"] == len(fx.MIGRATED) - 1
        assert numbers["migrated"] == conn.execute("SELECT count(*) FROM account_newuser").fetchone()[0]

    # The next pass reads the rejected row again and decides by the plan's rule: still a duplicate.
    result = run_stages(legacy, legacy, settings, "run-2", backup_dir)
    assert result["migrated"] + result["rejected"] == len(fx.ROWS)
    with psycopg.connect(legacy) as conn:
        assert conn.execute(
            "SELECT reason FROM migration_audit.rejected_rows WHERE run_id = 'run-2' AND source_id = %s",
            (later_id,),
        ).fetchone() == ("duplicate_email",)


def test_a_run_that_failed_before_the_build_leaves_the_next_plan_to_build(legacy, backup_dir):
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        plan = _plan(conn, settings, "run-1", backup_dir)
        with psycopg.connect(legacy, autocommit=True) as source:
            copy_partition(source, conn, settings, "run-1", plan["partitions"][0])  # then the run fails
        assert set(_indexes(conn)) == {"account_newuser_pkey"}

    result = run_stages(legacy, legacy, settings, "run-2", backup_dir)
    assert result["migrated"] == len(fx.MIGRATED)
    with psycopg.connect(legacy) as conn:
        assert set(_indexes(conn)) >= SECONDARY
        assert conn.execute("SELECT count(*) FROM migration_audit.deferred_indexes").fetchone()[0] == 0
        assert [u[0] for u in snapshot(legacy)["users"]] == sorted(fx.MIGRATED)


def _profile_constraints(conn: psycopg.Connection) -> dict[str, str]:
    return dict(
        conn.execute(
            "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
            "WHERE conrelid = 'account_profile'::regclass"
        ).fetchall()
    )


def test_the_first_profile_fill_adds_back_identical_foreign_keys_that_still_hold(legacy, backup_dir):
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        plan = _plan(conn, settings, "run-1", backup_dir)
        before = _profile_constraints(conn)
        assert (
            "FOREIGN KEY (user_id) REFERENCES account_newuser(id)" in before["account_profile_user_id_fkey"]
        )
        for partition in plan["partitions"]:
            with psycopg.connect(legacy, autocommit=True) as source:
                copy_partition(source, conn, settings, "run-1", partition)

        analyzed = (
            "SELECT count(*) FROM pg_stat_user_tables WHERE last_analyze IS NOT NULL AND relname = ANY(%s)"
        )
        tables = [
            "account_newuser",
            "account_newuser_groups",
            "account_newuser_user_permissions",
            "account_profile",
        ]
        assert conn.execute(analyzed, (tables,)).fetchone()[0] == 0
        first = finalize_target(conn, conn, settings)
        assert first["foreign_keys_rebuilt"] == ["account_profile_user_id_fkey"]
        # Statistics and visibility map for the loaded tables (last_vacuum/last_analyze: never autovacuum's).
        assert conn.execute(analyzed, (tables,)).fetchone()[0] == len(tables)
        assert first["profiles_created"] == first["profiles_total"] == len(fx.MIGRATED)
        assert _profile_constraints(conn) == before
        orphans = conn.execute(
            "SELECT count(*) FROM account_profile AS p "
            "WHERE NOT EXISTS (SELECT 1 FROM account_newuser AS u WHERE u.id = p.user_id)"
        ).fetchone()[0]
        assert orphans == 0

        # The key is enforced again (deferred, so at commit), and deleting a user takes its profile.
        with pytest.raises(psycopg.errors.ForeignKeyViolation), conn.transaction():
            conn.execute("INSERT INTO account_profile (user_id, updated_at) VALUES (%s, now())", (10**9,))
        some_user = min(fx.MIGRATED)
        with conn.transaction():
            conn.execute("DELETE FROM account_newuser WHERE id = %s", (some_user,))
        assert (
            conn.execute("SELECT count(*) FROM account_profile WHERE user_id = %s", (some_user,)).fetchone()[
                0
            ]
            == 0
        )

        # A later pass adds the missing profiles only, with the keys in place.
        again = finalize_target(conn, conn, settings)
        assert again["foreign_keys_rebuilt"] == []
        assert again["profiles_created"] == 0
        assert _profile_constraints(conn) == before


@pytest.mark.parametrize(
    ("index", "tamper", "says"),
    [
        (
            "account_newuser_email_key",
            "UPDATE migration_audit.deferred_indexes SET definition = definition || '; DROP TABLE canary' "
            "WHERE index_name = %(index)s",
            "set its definition back to the versioned one: CREATE UNIQUE INDEX account_newuser_email_key "
            "ON public.account_newuser USING btree (email)",
        ),
        (
            "account_newuser_email_ci_key",
            "UPDATE migration_audit.deferred_indexes SET definition = replace(definition, 'email', 'password') "
            "WHERE index_name = %(index)s",
            "not the one include/sql/target/001_create_new_schema.sql gives it",
        ),
        (
            "zz_not_versioned",
            "INSERT INTO migration_audit.deferred_indexes (index_name, definition, is_unique, run_id) VALUES "
            "(%(index)s, 'CREATE INDEX zz_not_versioned ON public.account_newuser USING btree (email); "
            "DROP TABLE canary', false, 'run-1')",
            "that no CREATE INDEX on account_newuser in include/sql/target/*.sql defines",
        ),
    ],
)
def test_a_tampered_deferred_index_record_is_refused_and_nothing_runs(
    legacy, backup_dir, index, tamper, says
):
    """The build runs the versioned DDL's statement, and only for a record that matches it exactly."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        plan = _plan(conn, settings, "run-1", backup_dir)
        assert set(plan["deferred_indexes"]) == SECONDARY
        conn.execute("CREATE TABLE canary (id int)")
        conn.execute(tamper, {"index": index})
        records = conn.execute(
            "SELECT * FROM migration_audit.deferred_indexes ORDER BY index_name"
        ).fetchall()

        with pytest.raises(MigrationError, match=index) as refused:
            deferred_indexes.build(conn, conn, settings)
        assert says in str(refused.value)
        assert conn.execute("SELECT to_regclass('canary') IS NOT NULL").fetchone()[0]
        assert set(_indexes(conn)) == {"account_newuser_pkey"}  # not one index was built
        assert (
            conn.execute("SELECT * FROM migration_audit.deferred_indexes ORDER BY index_name").fetchall()
            == records
        )
        # The next plan builds the deferred indexes first: it refuses alike.
        with pytest.raises(MigrationError, match=index):
            _plan(conn, settings, "run-2", backup_dir)


def test_an_index_the_versioned_ddl_does_not_create_is_not_deferred(legacy, backup_dir):
    """A hand-made index on account_newuser stays through the first load (it could never be rebuilt)."""
    settings = Settings(partitions=2, batch_size=5)
    with psycopg.connect(legacy, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "schema-only")
        conn.execute("CREATE INDEX account_newuser_full_name_idx ON account_newuser (full_name)")
        before = _indexes(conn)
        plan = _plan(conn, settings, "run-1", backup_dir)
        assert set(plan["deferred_indexes"]) == SECONDARY
        assert set(_indexes(conn)) == {"account_newuser_pkey", "account_newuser_full_name_idx"}
        for partition in plan["partitions"]:
            with psycopg.connect(legacy, autocommit=True) as source:
                copy_partition(source, conn, settings, "run-1", partition)
        result = finalize_target(conn, conn, settings)
        assert set(result["indexes"]["built"]) == SECONDARY
        assert _indexes(conn) == before
