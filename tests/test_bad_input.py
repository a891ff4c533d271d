"""Bad input: each gets a clear error before anything is written, or migrates exactly, or is
rejected with a reason; nothing is executed that came in as a name, nothing is truncated silently.

Connections are tested through the hook the operators use (MigrationDbHook, AIRFLOW_CONN_* set in
the environment); tables and values through the stages on a real PostgreSQL (tests/support/pipeline.py).
"""

from __future__ import annotations

import datetime as dt
import os

import psycopg
import pytest
from psycopg import sql
from support import fixture_users as fx
from support.fault_tools import (
    PASSWORD_GROUP,
    dbname,
    drop_role,
    find_leaks,
    password_auth,
    with_user,
)
from support.pipeline import rejects, run_stages, snapshot

from user_migration.config import ConfigError, Settings, load_mapping
from user_migration.errors import ConnectionProblem, MigrationError
from user_migration.hooks import MigrationDbHook

RUN = "bad-input"
SECRET = "S3cret-pw-4-tests"


def relations(dsn: str) -> list[tuple[str, str]]:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE c.relkind IN ('r', 'p', 'v') AND n.nspname NOT IN ('pg_catalog', 'information_schema') "
            "AND n.nspname NOT LIKE 'pg_toast%' ORDER BY 1, 2"
        ).fetchall()


def connect_via_hook(monkeypatch, conn_id: str, uri: str | None, fallback: str | None = None) -> str:
    """The error sentence MigrationDbHook(conn_id).get_conn() raises with AIRFLOW_CONN_<ID>=uri."""
    if uri is not None:
        monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", uri)
    with pytest.raises(ConnectionProblem) as failure:
        MigrationDbHook(conn_id, fallback_conn_id=fallback).get_conn()
    message = str(failure.value)
    assert "\n" not in message, "one sentence, one line"
    assert SECRET not in message
    return message


# --- connections ------------------------------------------------------------------------------------


def test_undefined_connection(monkeypatch):
    monkeypatch.delenv("AIRFLOW_CONN_NO_SUCH_DB", raising=False)
    assert connect_via_hook(monkeypatch, "no_such_db", None) == (
        "Airflow connection 'no_such_db' is not defined: set "
        "AIRFLOW_CONN_NO_SUCH_DB=postgresql://user:password@host:5432/database or add it under Admin > Connections"
    )


def test_connection_of_another_type(monkeypatch):
    assert connect_via_hook(monkeypatch, "odd_db", f"mysql://root:{SECRET}@127.0.0.1:3306/app") == (
        "Airflow connection 'odd_db' is of type 'mysql'; it must be a PostgreSQL connection (postgresql://...)"
    )


def test_undefined_target_falls_back_to_the_legacy_connection(monkeypatch, legacy):
    monkeypatch.delenv("AIRFLOW_CONN_TARGET_DB", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_LEGACY_DB", legacy)
    hook = MigrationDbHook("target_db", fallback_conn_id="legacy_db")
    with hook.get_conn() as conn:
        assert conn.execute("SELECT current_database()").fetchone()[0] == dbname(legacy)
    assert hook.conn_id == "legacy_db"


def test_unknown_database_and_unknown_role(monkeypatch, legacy):
    missing_db = with_user(legacy, "postgres", SECRET).rsplit("/", 1)[0] + "/no_such_database"
    message = connect_via_hook(monkeypatch, "legacy_db", missing_db)
    assert message.startswith("cannot connect to the database of connection 'legacy_db': ")
    assert 'database "no_such_database" does not exist' in message
    # The embedded server trusts local logins (pg_hba "trust"): a role that does not exist still fails.
    message = connect_via_hook(monkeypatch, "legacy_db", with_user(legacy, "no_such_role", SECRET))
    assert message.startswith("cannot connect to the database of connection 'legacy_db': ")
    assert 'role "no_such_role" does not exist' in message


def test_wrong_password(monkeypatch, pg_server, legacy):
    """With scram-sha-256 switched on for one role (a pg_hba.conf line, see fault_tools.password_auth)."""
    role = "um_bad_password_user"
    with password_auth(pg_server) as checked:
        if not checked:
            pytest.skip("the server's pg_hba.conf is not reachable from here: passwords are not checked")
        with psycopg.connect(pg_server, autocommit=True) as admin:
            admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(role)))
            admin.execute(
                sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'the-right-one' IN ROLE {}").format(
                    sql.Identifier(role), sql.Identifier(PASSWORD_GROUP)
                )
            )
        try:
            message = connect_via_hook(monkeypatch, "legacy_db", with_user(legacy, role, SECRET))
            assert message.startswith("cannot connect to the database of connection 'legacy_db': ")
            assert f'password authentication failed for user "{role}"' in message
            monkeypatch.setenv("AIRFLOW_CONN_LEGACY_DB", with_user(legacy, role, "the-right-one"))
            MigrationDbHook("legacy_db").get_conn().close()
        finally:
            drop_role(pg_server, role, [])


def test_unreachable_host_names_the_connection_and_the_cause(monkeypatch):
    message = connect_via_hook(monkeypatch, "legacy_db", f"postgresql://migrator:{SECRET}@127.0.0.1:1/app")
    assert message.startswith("cannot connect to the database of connection 'legacy_db': ")
    assert "Connection refused" in message, message


# --- tables, columns and names that carry SQL ---------------------------------------------------------


def test_missing_link_table_or_link_column_is_refused_before_any_write(legacy, backup_dir):
    before = relations(legacy)
    cases = [
        (
            {"groups": {"table": "user_groups"}},
            "legacy table public.'user_groups' does not exist in connection",
        ),
        ({"groups": {"table": "user_groups"}}, "set legacy_mapping.groups.table to the right table name"),
        (
            {"permissions": {"permission_column": "perm_id"}},
            "legacy table public.'account_user_user_permissions' has no column(s) 'perm_id'",
        ),
        ({"schema": "legacy"}, "legacy table legacy.'account_user' does not exist"),
    ]
    for override, message in cases:
        with pytest.raises(MigrationError) as failure:
            run_stages(legacy, legacy, Settings(mapping=load_mapping(override)), RUN, backup_dir)
        assert message in str(failure.value)
    after = relations(legacy)
    assert [r for r in after if r[0] != "migration_audit"] == before
    assert not backup_dir.exists() or not any(backup_dir.iterdir())


@pytest.mark.parametrize(
    ("legacy_mapping", "message"),
    [
        (
            {"users_table": "account_user; DROP TABLE canary"},
            "public.'account_user; DROP TABLE canary' does not exist",
        ),
        ({"users_table": 'account_user"; DROP TABLE canary; --'}, "does not exist"),
        (
            {"schema": "public; DROP TABLE canary"},
            "legacy table public; DROP TABLE canary.'account_user' does not",
        ),
        ({"columns": {"email": "email; DROP TABLE canary"}}, "has no column(s) 'email; DROP TABLE canary'"),
        ({"columns": {"id": 'id") FROM canary; DROP TABLE canary; --'}}, "has no column(s)"),
        ({"groups": {"table": "account_user_groups; DROP TABLE canary"}}, "does not exist"),
        ({"permissions": {"user_column": "user_id; DROP TABLE canary"}}, "has no column(s)"),
    ],
)
def test_mapping_params_carrying_sql_are_refused_never_executed(legacy, backup_dir, legacy_mapping, message):
    """The legacy_mapping Param, through Settings.from_params as the operators read it."""
    with psycopg.connect(legacy) as conn:
        conn.execute("CREATE TABLE canary (id int); INSERT INTO canary VALUES (1)")
    before = relations(legacy)
    settings = Settings.from_params({"legacy_mapping": legacy_mapping})
    with pytest.raises(MigrationError) as failure:
        run_stages(legacy, legacy, settings, RUN, backup_dir)
    assert message in str(failure.value)
    assert [r for r in relations(legacy) if r[0] != "migration_audit"] == before
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT count(*) FROM canary").fetchone()[0] == 1
        assert conn.execute("SELECT count(*) FROM account_user").fetchone()[0] == len(fx.ROWS)


def test_hostile_names_that_exist_are_quoted_and_migrate_exactly(make_db, backup_dir):
    """A legacy table and columns really named like SQL: used as names, the canary survives."""
    dsn = make_db("hostile")
    table = 'users"; DROP TABLE canary; --'
    columns = {
        "id": "id) FROM canary; --",
        "password": "pass'word",
        "email": "e-mail; DELETE FROM canary",
        "username": 'user"name',
        "full_name": "Full Name",
        "date_of_birth": "dob::text",
        "phone_number": "phone$1",
    }
    with psycopg.connect(dsn) as conn:
        conn.execute("CREATE TABLE canary (id int); INSERT INTO canary VALUES (1)")
        conn.execute(
            sql.SQL(
                "CREATE TABLE {} ({} bigint PRIMARY KEY, {} text, {} text, {} text, {} text, {} date, {} text)"
            ).format(sql.Identifier(table), *(sql.Identifier(c) for c in columns.values()))
        )
        conn.execute(
            sql.SQL(
                "INSERT INTO {} VALUES (1, 'h1', 'a@example.com', 'a', 'A', '1990-01-01', '9841234567'), "
                "(2, 'h2', 'A@EXAMPLE.com', 'b', 'B', '1990-01-01', '')"
            ).format(sql.Identifier(table))
        )
    mapping = {
        "users_table": table,
        "columns": {**columns, "last_login": None, "is_superuser": None, "is_staff": None, "is_active": None},
        "groups": None,
        "permissions": None,
    }
    result = run_stages(dsn, dsn, Settings.from_params({"legacy_mapping": mapping}), RUN, backup_dir)
    assert (result["migrated"], result["rejected"]) == (1, 1)
    assert snapshot(dsn)["users"] == [
        (1, "h1", None, False, "a@example.com", "a", "A", dt.date(1990, 1, 1), "+9779841234567", True, False)
    ]
    assert rejects(dsn, RUN) == {2: ("duplicate_email", "same email as user 1, which is kept")}
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT count(*) FROM canary").fetchone()[0] == 1
        source_row = conn.execute("SELECT source_row FROM migration_audit.rejected_rows").fetchone()[0]
    assert source_row["e-mail; DELETE FROM canary"] == "A@EXAMPLE.com" and source_row['user"name'] == "b"


def test_legacy_column_of_the_wrong_type_is_refused_before_any_write(make_db, backup_dir):
    dsn = make_db("types")
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE users (id bigint PRIMARY KEY, password text, email text, username text, "
            "full_name text, date_of_birth text, phone_number text)"
        )
        conn.execute("INSERT INTO users VALUES (1, 'h', 'a@example.com', 'a', 'A', '1990-01-01', '')")
    mapping = {
        "users_table": "users",
        "columns": {"last_login": None, "is_superuser": None, "is_staff": None, "is_active": None},
        "groups": None,
        "permissions": None,
    }
    with pytest.raises(MigrationError, match=r"date_of_birth.*type text.*date"):
        run_stages(dsn, dsn, Settings(mapping=load_mapping(mapping)), RUN, backup_dir)
    with psycopg.connect(dsn) as conn:
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None


def test_unknown_phone_region_is_refused_naming_the_param():
    with pytest.raises(ConfigError, match=r"phone_region 'ZZ' is not a region phonenumbers knows"):
        Settings.from_params({"phone_region": "zz"})


# --- values: too long, NULL, odd Unicode, unusual emails ---------------------------------------------


def make_text_legacy(dsn: str, rows: list[tuple]) -> dict:
    """A legacy users table without length limits (text columns) and its mapping."""
    with psycopg.connect(dsn) as conn:
        conn.execute(
            "CREATE TABLE people (id bigint PRIMARY KEY, password text, email text, username text, "
            "full_name text, date_of_birth date, phone_number text)"
        )
        with conn.cursor() as cur:
            cur.executemany("INSERT INTO people VALUES (%s, %s, %s, %s, %s, '1990-01-01', %s)", rows)
    return {
        "users_table": "people",
        "columns": {"last_login": None, "is_superuser": None, "is_staff": None, "is_active": None},
        "groups": None,
        "permissions": None,
    }


def migrated_values(dsn: str) -> dict[int, tuple]:
    return {u[0]: (u[1], u[4], u[5], u[6], u[8]) for u in snapshot(dsn)["users"]}


def test_values_longer_than_the_new_columns_are_rejected_never_truncated(make_db, backup_dir):
    dsn = make_db("long")
    name_255 = "e\u0301" * 127 + "x"  # 255 code points (combining accents), 382 bytes
    rows = [
        (1, "p" * 128, "one@example.com", "one", "One", ""),
        (2, "p" * 129, "two@example.com", "two", "Two", ""),
        (3, "h3", "three@example.com", "ü" * 255, "Three", ""),
        (4, "h4", "four@example.com", "ü" * 256, "Four", ""),
        (5, "h5", "five@example.com", "five", name_255, ""),
        (6, "h6", "six@example.com", "six", name_255 + "y", ""),
        (7, "h7", "seven@example.com", "seven", "  " + name_255 + "  ", ""),  # 259, 255 once trimmed
        (8, "h8", "x" * 64 + "@" + "d" * 63 + "." + "d" * 63 + "." + "d" * 63 + ".com", "eight", "Eight", ""),
        (9, "h9", "nine@example.com", "nine", "Nine", "9841234567" + " " * 300),
        (10, "h10", "ten@example.com", "ten", "Ten", "🌸" * 200),
    ]
    result = run_stages(
        dsn, dsn, Settings(mapping=load_mapping(make_text_legacy(dsn, rows))), RUN, backup_dir
    )
    assert rejects(dsn, RUN) == {
        2: ("value_too_long", "password has 129 characters, the limit is 128"),
        4: ("value_too_long", "username has 256 characters, the limit is 255"),
        6: ("value_too_long", "full_name has 256 characters, the limit is 255"),
        8: ("invalid_email", "email is not a valid address (too long)"),
    }
    assert migrated_values(dsn) == {
        1: ("p" * 128, "one@example.com", "one", "One", ""),
        3: ("h3", "three@example.com", "ü" * 255, "Three", ""),
        5: ("h5", "five@example.com", "five", name_255, ""),
        7: ("h7", "seven@example.com", "seven", name_255, ""),
        9: ("h9", "nine@example.com", "nine", "Nine", ""),
        10: ("h10", "ten@example.com", "ten", "Ten", ""),
    }
    with psycopg.connect(dsn) as conn:
        fixes = conn.execute(
            "SELECT source_id, field, original_value, reason FROM migration_audit.field_fixes ORDER BY 1"
        ).fetchall()
        octets = conn.execute("SELECT octet_length(full_name) FROM account_newuser WHERE id = 5").fetchone()[
            0
        ]
    assert octets == len(name_255.encode())
    assert fixes == [
        (7, "full_name", "  " + name_255 + "  ", "full_name_trimmed"),
        (9, "phone_number", "9841234567" + " " * 300, "phone_unparseable"),
        (10, "phone_number", "🌸" * 200, "phone_unparseable"),
    ]
    assert result["migrated"] + result["rejected"] == len(rows)


def test_nulls_where_the_legacy_schema_promised_not_null(legacy, backup_dir):
    columns = [
        "password",
        "email",
        "username",
        "full_name",
        "date_of_birth",
        "phone_number",
        "is_superuser",
        "is_active",
        "is_staff",
    ]
    with psycopg.connect(legacy) as conn:
        for column in columns:
            conn.execute(
                sql.SQL("ALTER TABLE account_user ALTER COLUMN {} DROP NOT NULL").format(
                    sql.Identifier(column)
                )
            )
        for offset, column in enumerate(columns):
            source_id = 100 + offset
            conn.execute(
                "INSERT INTO account_user (id, password, is_superuser, email, username, full_name, date_of_birth, "
                "phone_number, is_active, is_staff) VALUES (%s, 'h', false, %s, %s, 'N N', '1990-01-01', '', true, false)",
                (source_id, f"null{source_id}@example.com", f"null{source_id}"),
            )
            conn.execute(
                sql.SQL("UPDATE account_user SET {} = NULL WHERE id = %s").format(sql.Identifier(column)),
                (source_id,),
            )
    run_stages(legacy, legacy, Settings(), RUN, backup_dir)
    got = {k: v for k, v in rejects(legacy, RUN).items() if k >= 100}
    assert got == {
        100: ("missing_value", "password is NULL"),
        101: ("invalid_email", "email is empty"),
        102: ("missing_username", "username is empty"),
        103: ("missing_full_name", "full_name is empty"),
        104: ("invalid_date_of_birth", "date_of_birth is missing"),
        106: ("missing_value", "is_superuser is NULL"),
        107: ("missing_value", "is_active is NULL"),
        108: ("missing_value", "is_staff is NULL"),
    }
    users = {u[0]: u for u in snapshot(legacy)["users"]}
    # A NULL phone is an empty phone: the one value the target may hold for "no phone".
    assert users[105][1:] == (
        "h",
        None,
        False,
        "null105@example.com",
        "null105",
        "N N",
        dt.date(1990, 1, 1),
        "",
        True,
        False,
    )
    with psycopg.connect(legacy) as conn:
        row = conn.execute(
            "SELECT source_row FROM migration_audit.rejected_rows WHERE source_id = 100"
        ).fetchone()[0]
    assert row["password"] is None and row["email"] == "null100@example.com"
    assert set(users) == set(fx.MIGRATED) | {105}


UNICODE_ROWS = [
    # id, email, username, full_name, phone; then the expected (email, username, full_name, phone) or reject
    (1, "rupert+news+2024@gmail.com", "rupert", "Rupert R", ""),
    (2, "sybil@Bücher.DE", "sybil", "Sybil S", ""),
    (3, "punycode@xn--bcher-kva.de", "puny", "Puny Code", ""),
    (4, "用户@例子.广告", "用户", "王小明", ""),
    (5, "jose\u0301@example.com", "jose\u0301", "Jose\u0301 Nfd", ""),  # decomposed é, kept decomposed
    (6, "josé@example.com", "josé", "José Nfc", ""),  # composed é: another address, another user
    (7, "مستخدم@مثال.مصر", "مستخدم", "مريم العربية", ""),
    (8, "family@example.com", "👩\u200d👩\u200d👧", "👩\u200d👩\u200d👧\u200d👦 Family 🇳🇵 👍🏽", ""),
    (9, "rtl@example.com", "\u202eevil", "Zoe\u0308 \u05e9\u05dc\u05d5\u05dd", ""),
    (10, "\u3000ideo@Example.com\u2003", "ideo", "\u3000Kenji Ideographic\u2003", "+977 9841234567"),
    (11, "o'brien@example.ie", "o'brien", "Seán Ó Briain", ""),
    (12, '"john doe"@example.com', "quoted", "Quoted Local", ""),
    (13, "z@ex\u200bample.com", "zwsp", "Zero Width", ""),
    (14, "rlo\u202e@example.com", "rlo", "Right To Left Override", ""),
    (15, "a@localhost", "local", "Local Host", ""),
    (16, "user@[127.0.0.1]", "literal", "Domain Literal", ""),
    (17, "ext@example.com", "ext", "Phone Ext", "9841234567 x123"),
]
UNICODE_MIGRATED = {
    1: ("rupert+news+2024@gmail.com", "rupert", "Rupert R", ""),
    2: ("sybil@bücher.de", "sybil", "Sybil S", ""),
    3: ("punycode@xn--bcher-kva.de", "puny", "Puny Code", ""),
    4: ("用户@例子.广告", "用户", "王小明", ""),
    5: ("jose\u0301@example.com", "jose\u0301", "Jose\u0301 Nfd", ""),
    6: ("josé@example.com", "josé", "José Nfc", ""),
    7: ("مستخدم@مثال.مصر", "مستخدم", "مريم العربية", ""),
    8: ("family@example.com", "👩\u200d👩\u200d👧", "👩\u200d👩\u200d👧\u200d👦 Family 🇳🇵 👍🏽", ""),
    9: ("rtl@example.com", "\u202eevil", "Zoe\u0308 \u05e9\u05dc\u05d5\u05dd", ""),
    10: ("ideo@example.com", "ideo", "Kenji Ideographic", "+9779841234567"),
    11: ("o'brien@example.ie", "o'brien", "Seán Ó Briain", ""),
    17: ("ext@example.com", "ext", "Phone Ext", "+9779841234567"),
}
UNICODE_REJECTED = {
    12: ("invalid_email", "email is not a valid address (quoted local part)"),
    13: ("invalid_email", "email is not a valid address (invalid characters)"),
    14: ("invalid_email", "email is not a valid address (invalid characters)"),
    15: ("invalid_email", "email is not a valid address (domain without a dot)"),
    16: ("invalid_email", "email is not a valid address (domain literal)"),
}


def test_odd_unicode_and_unusual_emails_migrate_byte_exact_or_are_rejected_with_a_reason(make_db, backup_dir):
    dsn = make_db("unicode")
    with psycopg.connect(dsn) as conn:
        conn.execute(fx.LEGACY_DDL.read_text())
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO account_user (id, password, is_superuser, email, username, full_name, date_of_birth, "
                "phone_number, is_active, is_staff) VALUES (%s, 'h', false, %s, %s, %s, '1990-01-01', %s, true, false)",
                UNICODE_ROWS,
            )
    run_stages(dsn, dsn, Settings(partitions=3, batch_size=4), RUN, backup_dir)
    assert rejects(dsn, RUN) == UNICODE_REJECTED
    got = {k: v[1:] for k, v in migrated_values(dsn).items()}
    assert got == UNICODE_MIGRATED
    with psycopg.connect(dsn) as conn:
        stored = dict(
            conn.execute(
                "SELECT id, convert_to(username || full_name || email, 'UTF8') FROM account_newuser"
            ).fetchall()
        )
        fixes = conn.execute(
            "SELECT source_id, field, original_value, new_value, reason FROM migration_audit.field_fixes ORDER BY 1, 2"
        ).fetchall()
    for source_id, (email, username, full_name, _) in UNICODE_MIGRATED.items():
        assert bytes(stored[source_id]) == (username + full_name + email).encode(), source_id
    assert fixes == [
        (2, "email", "sybil@Bücher.DE", "sybil@bücher.de", "email_normalized"),
        (10, "email", "\u3000ideo@Example.com\u2003", "ideo@example.com", "email_normalized"),
        (10, "full_name", "\u3000Kenji Ideographic\u2003", "Kenji Ideographic", "full_name_trimmed"),
        # An extension has no place in E.164: the number moves, the original is recorded.
        (17, "phone_number", "9841234567 x123", "+9779841234567", "phone_extension_dropped"),
    ]


@pytest.mark.parametrize("partitions", [1, 2])
@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("ΟΔΟΣ@example.com", "οδοσ@example.com"),  # final sigma: Python lower() gives ς, PostgreSQL σ
        ("İ@example.com", "i@example.com"),  # dotted capital I: Python gives i + U+0307, PostgreSQL i
    ],
)
def test_emails_postgresql_lowercases_alike_are_duplicates_whatever_the_partitioning(
    make_db, backup_dir, partitions, first, second
):
    """account_newuser_email_ci_key is on lower(email) as the *database* lowercases it."""
    dsn = make_db("case")
    with psycopg.connect(dsn) as conn:
        conn.execute(fx.LEGACY_DDL.read_text())
        lowered = conn.execute("SELECT lower(%s) = lower(%s)", (first, second)).fetchone()[0]
        conn.execute(
            "INSERT INTO account_user (id, password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES "
            "(1, 'h', false, %s, 'u1', 'U One', '1990-01-01', '', true, false), "
            "(2, 'h', false, %s, 'u2', 'U Two', '1990-01-01', '', true, false)",
            (first, second),
        )
    if not lowered:
        pytest.skip(
            f"this database's lower() keeps {first!r} and {second!r} apart (collation {os.environ.get('LANG')})"
        )
    for run in (RUN, RUN + "-again"):
        result = run_stages(dsn, dsn, Settings(partitions=partitions), run, backup_dir)
        assert (result["migrated"], result["rejected"]) == (1, 1)
        assert [u[4] for u in snapshot(dsn)["users"]] == [first]
        assert rejects(dsn, run) == {2: ("duplicate_email", "same email as user 1, which is kept")}
    assert find_leaks(str(rejects(dsn, RUN)), [first, second]) == []


@pytest.mark.parametrize(
    ("raw", "label"),
    [
        ("no-at-sign", "no single @"),
        ("a@b.invalid", "reserved domain"),
        ("a b@example.com", "invalid characters"),
        ("a@@b.com", "invalid characters"),
        ("@example.com", "empty local part"),
        ("a@", "empty domain"),
        ("a@-example.com", "bad domain"),
        ("a..b@example.com", "misplaced dot"),
        ("a@" + "b" * 64 + ".com", "too long"),
    ],
)
def test_invalid_email_details_name_the_actual_problem(raw, label):
    """The detail stored with an invalid_email reject; it never quotes the address."""
    from user_migration.transforms import InvalidValue, clean_email

    with pytest.raises(InvalidValue) as error:
        clean_email(raw)
    assert str(error.value) == f"email is not a valid address ({label})"


def test_email_key_folds_what_any_collation_lowercases_alike():
    from user_migration.transforms import email_key, to_e164

    assert email_key("ΟΔΟΣ@x.org") == email_key("οδοσ@x.org") == email_key("οδος@x.org")
    assert email_key("İ@x.org") == email_key("i@x.org")
    assert email_key("ÄRGER@x.org") == email_key("ärger@x.org") != email_key("arger@x.org")
    assert to_e164("+1 650 253 0000 ext 1", "NP") == ("+16502530000", "phone_extension_dropped")
