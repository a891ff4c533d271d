"""fingerprint.fingerprint() and include/sql/cutover/row_fingerprint.sql must agree to the bit.

The cutover proves source and target equal by comparing the sum of the Python fingerprints kept in
source_state with the SQL checksum of the target: any drift between the two blocks every cutover.
"""

from __future__ import annotations

import datetime as dt

import psycopg

from user_migration.db import ensure_audit_schema
from user_migration.fingerprint import fingerprint, target_checksum_sql
from user_migration.schema import apply_schema
from user_migration.transforms import NewUser

KATHMANDU = dt.timezone(dt.timedelta(hours=5, minutes=45))
USERS = [
    NewUser(1, "pbkdf2$1$a$b", None, False, "a@example.com", "a", "A", dt.date(1990, 1, 2), "", True, False),
    NewUser(
        2,
        "bcrypt$x",
        dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=dt.UTC),
        True,
        "B.b+tag@bücher.de",
        "ünï 名",
        "  spaced ",
        dt.date(1900, 1, 1),
        "+9779841234567",
        False,
        True,
    ),
    # A non-UTC offset, a whole second, and a year before 1000 (to_char pads it to four digits).
    NewUser(
        3,
        "p",
        dt.datetime(2024, 1, 1, 0, 0, 0, tzinfo=KATHMANDU),
        False,
        "c@x.np",
        "c",
        "C",
        dt.date(2000, 2, 29),
        "",
        True,
        True,
    ),
    NewUser(
        4,
        "p",
        dt.datetime(999, 12, 31, 23, 59, 59, 1, tzinfo=dt.UTC),
        False,
        "d@x.np",
        "d",
        "D",
        dt.date(1950, 6, 1),
        "",
        True,
        False,
    ),
]


def test_python_and_sql_fingerprints_agree(make_db):
    dsn = make_db("fp")
    with psycopg.connect(dsn, autocommit=True) as conn:
        ensure_audit_schema(conn)
        apply_schema(conn, "fp")
        with (
            conn.cursor() as cur,
            cur.copy(
                "COPY account_newuser (id, password, last_login, is_superuser, email, username, full_name, "
                "date_of_birth, phone_number, is_active, is_staff, joined_at, updated_at) FROM STDIN"
            ) as copy,
        ):
            now = dt.datetime.now(dt.UTC)
            for user in USERS:
                copy.write_row((*user, now, now))
        count, checksum = conn.execute(target_checksum_sql()).fetchone()
    assert count == len(USERS)
    assert checksum == sum(fingerprint(u) for u in USERS)
    assert len({fingerprint(u) for u in USERS}) == len(USERS)
