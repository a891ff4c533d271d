"""A small dirty legacy fixture with the exact outcome each row must have.

Every transform rule and every duplicate case has a row here; EXPECTED says, per legacy id, either
the target row it must become or the reason it must be rejected with.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[2]
LEGACY_DDL = REPO / "include" / "sql" / "legacy" / "001_legacy_schema.sql"
TODAY = dt.date.today()
FUTURE = TODAY + dt.timedelta(days=30)
LOGIN = dt.datetime(2025, 5, 1, 8, 30, tzinfo=dt.UTC)


def pw(n: int) -> str:
    return f"pbkdf2_sha256$600000$salt{n:04d}salt{n:04d}salt12$hash{n:040d}="


# id, password, last_login, is_superuser, email, username, full_name, date_of_birth, phone_number,
# is_active, is_staff
ROWS = [
    (
        1,
        pw(1),
        LOGIN,
        True,
        "Alice@Example.COM",
        "alice",
        "Alice Adams",
        dt.date(1990, 1, 2),
        "9841234567",
        True,
        True,
    ),
    (
        2,
        pw(2),
        None,
        False,
        "  bob@gmail.com ",
        "bob",
        " Bob Brown ",
        dt.date(1985, 3, 4),
        "+977-9851234567",
        True,
        False,
    ),
    (3, pw(3), None, False, "alice@example.com", "carol", "Carol Case", dt.date(1991, 5, 6), "", True, False),
    (4, pw(4), None, False, "not-an-email", "dave", "Dave Doe", dt.date(1992, 7, 8), "", True, False),
    (5, pw(5), None, False, "", "erin", "Erin Eve", dt.date(1993, 9, 10), "", True, False),
    (
        6,
        pw(6),
        None,
        False,
        "blank.user@example.com",
        "   ",
        "Blank User",
        dt.date(1994, 1, 1),
        "",
        True,
        False,
    ),
    (7, pw(7), None, False, "frank@example.com", "frank", "   ", dt.date(1995, 2, 2), "", True, False),
    (8, pw(8), None, False, "grace@example.com", "grace", "Grace Hopper", FUTURE, "", True, False),
    (
        9,
        pw(9),
        None,
        False,
        "heidi@example.com",
        "heidi",
        "Heidi Klum",
        dt.date(1899, 12, 31),
        "",
        True,
        False,
    ),
    (
        10,
        pw(10),
        None,
        False,
        "ivan@example.com",
        "ivan",
        "Ivan Ivanov",
        dt.date(1980, 1, 1),
        "abc",
        True,
        False,
    ),
    (
        11,
        pw(11),
        None,
        False,
        "judy@example.com",
        "judy",
        "Judy Jones",
        dt.date(1981, 1, 1),
        "12345",
        False,
        False,
    ),
    (
        12,
        pw(12),
        None,
        False,
        "mallory@example.com",
        "mallory",
        "Mallory M",
        dt.date(1982, 1, 1),
        "",
        True,
        False,
    ),
    (13, pw(13), None, False, "shared@example.org", "niaj", "", dt.date(1983, 1, 1), "", True, False),
    (
        14,
        pw(14),
        None,
        False,
        "SHARED@example.org",
        "olivia",
        "Olivia O",
        dt.date(1984, 1, 1),
        "",
        True,
        False,
    ),
    (15, pw(15), None, False, "shared@EXAMPLE.org", "peggy", "Peggy P", dt.date(1985, 1, 1), "", True, False),
    (
        16,
        pw(16),
        None,
        False,
        "rupert+news@gmail.com",
        "rupert",
        "Rupert R",
        dt.date(1986, 1, 1),
        "014123456",
        True,
        False,
    ),
    (17, pw(17), None, False, "sybil@Bücher.DE", "sybil", "Sybil S", dt.date(1987, 1, 1), "", True, False),
    (
        18,
        pw(18),
        None,
        False,
        "trent@example.com",
        "trent",
        "Zoe\u0308 Ma\u0308rta",
        dt.date(1988, 1, 1),
        "",
        True,
        False,
    ),
    (19, pw(19), None, False, "uma@example.com", "úma_ñ", "🌸 Uma", dt.date(1989, 1, 1), "", True, False),
    (
        20,
        pw(20),
        None,
        False,
        "victor@example.com",
        "victor",
        "מריה כהן",
        dt.date(1990, 1, 1),
        "",
        True,
        False,
    ),
    (
        21,
        pw(21),
        None,
        False,
        "Walter.White@Example.com",
        "walter",
        "Walter White",
        dt.date(1958, 9, 7),
        "",
        True,
        False,
    ),
    (
        22,
        pw(22),
        None,
        False,
        "ÄRGER@example.com",
        "xavier",
        "Xavier X",
        dt.date(1970, 1, 1),
        "",
        True,
        False,
    ),
    (
        23,
        pw(23),
        None,
        False,
        "ärger@example.com",
        "yvonne",
        "Yvonne Y",
        dt.date(1971, 1, 1),
        "",
        True,
        False,
    ),
    (24, pw(24), None, False, "zed@example.com ", "zed", "Zed Z", dt.date(1972, 1, 1), "", True, False),
    (
        25,
        pw(25),
        None,
        False,
        "\u00a0zed@example.com",
        "zed2",
        "Zed Two",
        dt.date(1973, 1, 1),
        "",
        True,
        False,
    ),
    (
        26,
        "",
        None,
        False,
        "nopass@example.com",
        "nopass",
        "No Password",
        dt.date(1974, 1, 1),
        "",
        False,
        False,
    ),
    (
        27,
        pw(27),
        LOGIN,
        False,
        "linked@example.com",
        "linked",
        "Linked L",
        dt.date(1975, 1, 1),
        "9801234567",
        True,
        False,
    ),
    (
        28,
        pw(28),
        None,
        False,
        "broken-linked",
        "rejectedlinks",
        "Rejected Links",
        dt.date(1976, 1, 1),
        "",
        True,
        False,
    ),
    (40, pw(40), None, False, "gap@example.com", "gap", "After A Gap", dt.date(1977, 1, 1), "", True, False),
]
GROUP_LINKS = [(101, 27, 1), (102, 27, 2), (103, 28, 1), (104, 1, 3)]
PERMISSION_LINKS = [(201, 27, 1), (202, 28, 2), (203, 40, 3)]

REJECTED = {
    3: ("duplicate_email", "same email as user 1, which is kept"),
    4: ("invalid_email", None),
    5: ("invalid_email", "email is empty"),
    6: ("missing_username", "username is empty"),
    7: ("missing_full_name", "full_name is empty"),
    8: ("invalid_date_of_birth", "date_of_birth is in the future"),
    9: ("invalid_date_of_birth", "date_of_birth is before 1900-01-01"),
    13: ("missing_full_name", "full_name is empty"),
    15: ("duplicate_email", "same email as user 14, which is kept"),
    23: ("duplicate_email", "same email as user 22, which is kept"),
    25: ("duplicate_email", "same email as user 24, which is kept"),
    28: ("invalid_email", None),
}
# id: (email, full_name, phone_number) as they must be in account_newuser.
MIGRATED = {
    1: ("Alice@example.com", "Alice Adams", "+9779841234567"),
    2: ("bob@gmail.com", "Bob Brown", "+9779851234567"),
    10: ("ivan@example.com", "Ivan Ivanov", ""),
    11: ("judy@example.com", "Judy Jones", ""),
    12: ("mallory@example.com", "Mallory M", ""),
    14: ("SHARED@example.org", "Olivia O", ""),
    16: ("rupert+news@gmail.com", "Rupert R", "+97714123456"),
    17: ("sybil@bücher.de", "Sybil S", ""),
    18: ("trent@example.com", "Zoe\u0308 Ma\u0308rta", ""),
    19: ("uma@example.com", "🌸 Uma", ""),
    20: ("victor@example.com", "מריה כהן", ""),
    21: ("Walter.White@example.com", "Walter White", ""),
    22: ("ÄRGER@example.com", "Xavier X", ""),
    24: ("zed@example.com", "Zed Z", ""),
    26: ("nopass@example.com", "No Password", ""),
    27: ("linked@example.com", "Linked L", "+9779801234567"),
    40: ("gap@example.com", "After A Gap", ""),
}
# (legacy id, field, original value, new value, reason)
FIXES = {
    (1, "email", "Alice@Example.COM", "Alice@example.com", "email_normalized"),
    (2, "email", "  bob@gmail.com ", "bob@gmail.com", "email_normalized"),
    (2, "full_name", " Bob Brown ", "Bob Brown", "full_name_trimmed"),
    (10, "phone_number", "abc", "", "phone_unparseable"),
    (11, "phone_number", "12345", "", "phone_invalid"),
    (17, "email", "sybil@Bücher.DE", "sybil@bücher.de", "email_normalized"),
    (21, "email", "Walter.White@Example.com", "Walter.White@example.com", "email_normalized"),
    (24, "email", "zed@example.com ", "zed@example.com", "email_normalized"),
}
MIGRATED_GROUP_LINKS = [(101, 27, 1), (102, 27, 2), (104, 1, 3)]
MIGRATED_PERMISSION_LINKS = [(201, 27, 1), (203, 40, 3)]

assert not set(REJECTED) & set(MIGRATED)
assert set(REJECTED) | set(MIGRATED) == {row[0] for row in ROWS}


def load(dsn: str) -> None:
    """Create the legacy schema in ``dsn`` and insert the fixture."""
    with psycopg.connect(dsn) as conn:
        conn.execute(LEGACY_DDL.read_text())
        conn.execute("INSERT INTO django_content_type (id, app_label, model) VALUES (1, 'account', 'user')")
        for gid, name in ((1, "customers"), (2, "support"), (3, "editors")):
            conn.execute("INSERT INTO auth_group (id, name) VALUES (%s, %s)", (gid, name))
        for pid, code in ((1, "add_user"), (2, "change_user"), (3, "view_user")):
            conn.execute(
                "INSERT INTO auth_permission (id, name, content_type_id, codename) VALUES (%s, %s, 1, %s)",
                (pid, code, code),
            )
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO account_user (id, password, last_login, is_superuser, email, username, full_name, "
                "date_of_birth, phone_number, is_active, is_staff) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                ROWS,
            )
            cur.executemany(
                "INSERT INTO account_user_groups (id, user_id, group_id) VALUES (%s, %s, %s)", GROUP_LINKS
            )
            cur.executemany(
                "INSERT INTO account_user_user_permissions (id, user_id, permission_id) VALUES (%s, %s, %s)",
                PERMISSION_LINKS,
            )
        for table in ("account_user", "account_user_groups", "account_user_user_permissions"):
            conn.execute(
                f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"
            )
