"""The copy writes users and sync state in binary COPY: it must land exactly what text COPY lands.

- one batch of generated rows (odd Unicode, long strings, last_login in several time zones) written
  both ways, on a first load's tables and on a merge's staging tables: the same rows, to the byte;
- the fixture migration run with binary COPY and with text COPY: the same target, state
  (fingerprints included), rejects and fixes;
- a legacy table whose last_login is a timestamp without time zone keeps text COPY (binary would
  refuse its naive values; text reads them in the session's time zone), and still migrates.
"""

from __future__ import annotations

import datetime as dt

import psycopg
import pytest
from psycopg import sql
from support import fixture_users as fx
from support.pipeline import run_stages
from test_copy_fast_path import TODAY, generated_rows

from user_migration import partition_copy
from user_migration.config import Settings
from user_migration.db import ensure_audit_schema, legacy_select_list, users_table
from user_migration.fingerprint import row_hash_sql
from user_migration.partition_copy import (
    PATHS,
    USER_COLUMNS,
    PartitionResult,
    _transform_batch,
    _write_batch,
    binary_copy_ok,
)
from user_migration.schema import apply_schema
from user_migration.transforms import LegacyRow, Transformer

NOW = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
LOAD_TABLES = {
    "account_newuser": "id",
    "migration_audit.source_state": "source_id",
    "migration_audit.rejected_rows": "source_id",
    "migration_audit.field_fixes": "source_id, field",
}
MERGE_TABLES = {
    "stage_users": "id",
    "stage_state": "source_id",
    "migration_audit.rejected_rows": "source_id",
    "migration_audit.field_fixes": "source_id, field",
}


def contents(conn: psycopg.Connection, tables: dict[str, str]) -> dict[str, list]:
    """Each table's rows as Python values and as PostgreSQL's own text of the row."""
    return {
        table: conn.execute(
            sql.SQL("SELECT t::text, t FROM {} AS t ORDER BY {}").format(
                sql.Identifier(*table.split(".")), sql.SQL(order)
            )
        ).fetchall()
        for table, order in tables.items()
    }


@pytest.mark.parametrize("path", ["load", "merge"])
def test_a_batch_lands_the_same_in_binary_and_in_text(make_db, path):
    dsn = make_db("binary")
    rows = generated_rows(6_000, seed=29)
    batch = _transform_batch(
        rows,
        Transformer("NP", "fix", today=TODAY),
        {},
        list(LegacyRow._fields),
        "run",
        NOW,
        PartitionResult(0, 1, len(rows)),
    )
    assert len(batch.good) > 1_000 and batch.rejects and batch.fixes
    # every kind of last_login of the generator reaches the target
    assert len({user[2].utcoffset() for user in batch.good if user[2] is not None}) >= 4
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "binary")
        # the generated rows repeat usernames and emails (the plan's business, not the COPY's)
        for (index,) in conn.execute(
            "SELECT indexrelid::regclass::text FROM pg_index "
            "WHERE indrelid = 'account_newuser'::regclass AND NOT indisprimary"
        ).fetchall():
            conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(index)))
        landed = []
        for binary in (False, True):
            with conn.transaction(), conn.cursor() as out:
                if path == "load":
                    users_copy = sql.SQL("COPY account_newuser ({}) FROM STDIN").format(
                        sql.SQL(", ").join(map(sql.Identifier, [*USER_COLUMNS, "joined_at", "updated_at"]))
                    )
                    stamps, tables = (NOW, NOW), LOAD_TABLES
                else:
                    conn.execute(
                        "CREATE TEMP TABLE stage_state (source_id bigint, row_hash bytea, outcome char(1), "
                        "fingerprint bigint, kept_id bigint) ON COMMIT DROP"
                    )
                    conn.execute(
                        "CREATE TEMP TABLE stage_users ON COMMIT DROP AS SELECT "
                        f"{', '.join(USER_COLUMNS)} FROM account_newuser WITH NO DATA"
                    )
                    users_copy = sql.SQL("COPY stage_users ({}) FROM STDIN").format(
                        sql.SQL(", ").join(map(sql.Identifier, USER_COLUMNS))
                    )
                    stamps, tables = (), MERGE_TABLES
                _write_batch(out, batch, users_copy, stamps, PATHS[path], ("run", 12345), binary)
                landed.append(contents(conn, tables))
                for table in tables:
                    conn.execute(sql.SQL("DELETE FROM {}").format(sql.Identifier(*table.split("."))))
        assert landed[0] == landed[1]
        assert all(landed[0].values())


def legacy_description(dsn: str, alter: str | None) -> list:
    settings = Settings()
    with psycopg.connect(dsn, autocommit=True) as conn:
        fx.load(dsn)
        for statement in (alter or "").split(";"):
            if statement.strip():
                conn.execute(statement)
        select = sql.SQL("SELECT {}, {} AS row_hash FROM {} LIMIT 0").format(
            legacy_select_list(settings.mapping),
            row_hash_sql(settings.mapping),
            users_table(settings.mapping),
        )
        return conn.execute(select).description


@pytest.mark.parametrize(
    ("alter", "binary"),
    [
        (None, True),
        ("ALTER TABLE account_user ALTER last_login TYPE timestamp", False),
        ("ALTER TABLE account_user ALTER is_staff TYPE integer USING is_staff::int", False),
        (
            "ALTER TABLE account_user ALTER id DROP IDENTITY; ALTER TABLE account_user ALTER id TYPE numeric(20)",
            False,
        ),
        ("ALTER TABLE account_user ALTER date_of_birth TYPE timestamp", False),
        ("ALTER TABLE account_user ALTER email TYPE text", True),
        ("ALTER TABLE account_user ALTER id TYPE integer", True),
    ],
)
def test_binary_copy_only_for_the_column_types_it_writes_as_text_would(make_db, alter, binary):
    assert binary_copy_ok(legacy_description(make_db("types"), alter)) is binary


def test_binary_copy_needs_a_description():
    assert binary_copy_ok(None) is False


def migrated(dsn: str) -> dict[str, list]:
    with psycopg.connect(dsn) as conn:
        return {
            "users": conn.execute(
                "SELECT t::text FROM (SELECT id, password, last_login, is_superuser, email, username, "
                "full_name, date_of_birth, phone_number, is_active, is_staff FROM account_newuser) AS t "
                "ORDER BY id"
            ).fetchall(),
            "state": conn.execute(
                "SELECT source_id, row_hash, outcome, fingerprint, kept_id FROM migration_audit.source_state "
                "ORDER BY source_id"
            ).fetchall(),
            "rejects": conn.execute(
                "SELECT source_id, reason, detail, source_row FROM migration_audit.rejected_rows "
                "ORDER BY source_id"
            ).fetchall(),
            "fixes": conn.execute(
                "SELECT source_id, field, original_value, new_value, reason FROM migration_audit.field_fixes "
                "ORDER BY source_id, field"
            ).fetchall(),
        }


@pytest.mark.parametrize("alter", [None, "ALTER TABLE account_user ALTER last_login TYPE timestamp"])
def test_a_migration_lands_the_same_with_binary_copy_and_without(make_db, tmp_path, monkeypatch, alter):
    legacy = make_db("legacy")
    fx.load(legacy)
    if alter:
        with psycopg.connect(legacy, autocommit=True) as conn:
            conn.execute(alter)
    decisions = []
    decide = partition_copy.binary_copy_ok
    monkeypatch.setattr(
        partition_copy, "binary_copy_ok", lambda d: decisions.append(decide(d)) or decisions[-1]
    )
    landed = []
    for _ in range(2):
        target = make_db("target")
        result = run_stages(legacy, target, Settings(batch_size=7), "run", tmp_path / str(len(landed)))
        assert result["migrated"] > 0 and result["rejected"] > 0
        landed.append(migrated(target))
        monkeypatch.setattr(partition_copy, "binary_copy_ok", lambda d: decisions.append(False) or False)
    assert landed[0] == landed[1]
    assert decisions[0] is (alter is None)
