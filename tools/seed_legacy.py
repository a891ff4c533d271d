"""Create the legacy tables and fill them with fake users, some of them dirty as real data is.

Deterministic for a given seed. About 6% of rows carry a defect the migration must handle: emails
that are invalid or duplicated (also differing only in case), blank names, impossible birth dates,
junk phone numbers; plus rows that are odd but valid (padded or upper-case emails, plus-tags, IDN
domains, names with combining marks, emoji or right-to-left text, local and punctuated phones).

Usage: ``python tools/seed_legacy.py --dsn postgresql://... [--users 10000] [--seed 42] [--reset]``
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import string
import sys
from collections import Counter
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parent.parent
LEGACY_DDL = REPO / "include" / "sql" / "legacy" / "001_legacy_schema.sql"
LEGACY_TABLES = (
    "account_user_user_permissions",
    "account_user_groups",
    "account_user",
    "auth_permission",
    "auth_group",
    "django_content_type",
)
GROUPS = ("customers", "support", "editors", "billing")
PERMISSIONS = (
    ("add_user", "Can add user"),
    ("change_user", "Can change user"),
    ("delete_user", "Can delete user"),
    ("view_user", "Can view user"),
    ("view_report", "Can view report"),
    ("export_report", "Can export report"),
)
MOBILE_PREFIXES = ("980", "981", "982", "984", "985", "986", "974", "975", "961", "988")
DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "example.com", "mail.com.np", "wlink.com.np")
ODD_NAMES = (
    "Zoë Ångström",
    "José Nuñez",
    "Ma\u0308rta Kova\u0301c\u030c",
    "Ana 🌸 Shrestha",
    "مريم الحسن",
    "עמית כהן",
)
INVALID_EMAILS = (
    "no-at-sign.example.com",
    "a@@b.com",
    "user name@mail.com",
    "",
    "   ",
    "trailing.dot.@gmail.com",
)
JUNK_PHONES = ("abc", "12345", "N/A", "0000000000", "+1 999", "98-12")
DIRTY = {  # category: share of rows
    "duplicate_email_case": 0.010,
    "duplicate_email_exact": 0.005,
    "invalid_email": 0.008,
    "blank_full_name": 0.005,
    "future_date_of_birth": 0.003,
    "ancient_date_of_birth": 0.002,
    "junk_phone": 0.020,
    "blank_phone": 0.010,
    "padded_email": 0.005,
    "upper_case_domain": 0.005,
    "plus_tag_email": 0.005,
    "idn_email": 0.002,
    "odd_unicode_name": 0.005,
}


def _password(rng: random.Random) -> str:
    alphabet = string.ascii_letters + string.digits
    salt = "".join(rng.choices(alphabet, k=22))
    digest = "".join(rng.choices(alphabet + "+/", k=43)) + "="
    return f"pbkdf2_sha256$600000${salt}${digest}"


def _phone(rng: random.Random) -> str:
    number = f"{rng.choice(MOBILE_PREFIXES)}{rng.randrange(10**7):07d}"
    style = rng.randrange(4)
    if style == 0:
        return number
    if style == 1:
        return f"+977{number}"
    if style == 2:
        return f"{number[:3]}-{number[3:6]}-{number[6:]}"
    return f"{number[:4]} {number[4:]}"


def generate_users(count: int, seed: int = 42) -> tuple[list[tuple], Counter]:
    """Rows for account_user (id, password, last_login, is_superuser, email, username, full_name,
    date_of_birth, phone_number, is_active, is_staff) and how many of each dirty category."""
    from faker import Faker

    fake = Faker()
    Faker.seed(seed)
    rng = random.Random(seed)
    today = dt.date.today()
    rows: list[tuple] = []
    categories: Counter = Counter()
    thresholds = []
    acc = 0.0
    for name, share in DIRTY.items():
        acc += share
        thresholds.append((acc, name))
    for user_id in range(1, count + 1):
        first, last = fake.first_name(), fake.last_name()
        username = f"{first.lower()}.{last.lower()}{user_id}"
        email = f"{first.lower()}.{last.lower()}{user_id}@{rng.choice(DOMAINS)}"
        full_name = f"{first} {last}"
        dob = today - dt.timedelta(days=rng.randrange(18 * 365, 80 * 365))
        phone = _phone(rng)
        roll = rng.random()
        category = next((name for limit, name in thresholds if roll < limit), None)
        if category in ("duplicate_email_case", "duplicate_email_exact") and rows:
            earlier = rows[rng.randrange(len(rows))][4]
            email = earlier.upper() if category == "duplicate_email_case" else earlier
        elif category == "invalid_email":
            email = rng.choice(INVALID_EMAILS)
        elif category == "blank_full_name":
            full_name = rng.choice(("", "   "))
        elif category == "future_date_of_birth":
            dob = today + dt.timedelta(days=rng.randrange(1, 3650))
        elif category == "ancient_date_of_birth":
            dob = dt.date(1850 + rng.randrange(49), 1 + rng.randrange(12), 1 + rng.randrange(28))
        elif category == "junk_phone":
            phone = rng.choice(JUNK_PHONES)
        elif category == "blank_phone":
            phone = ""
        elif category == "padded_email":
            email = f"  {email} "
        elif category == "upper_case_domain":
            local, _, domain = email.partition("@")
            email = f"{local}@{domain.upper()}"
        elif category == "plus_tag_email":
            local, _, domain = email.partition("@")
            email = f"{local}+news@{domain}"
        elif category == "idn_email":
            email = f"{first.lower()}{user_id}@bücher.de"
        elif category == "odd_unicode_name":
            full_name = rng.choice(ODD_NAMES)
        if category:
            categories[category] += 1
        last_login = (
            dt.datetime(2024, 1, 1, tzinfo=dt.UTC) + dt.timedelta(seconds=rng.randrange(60 * 60 * 24 * 600))
            if rng.random() < 0.7
            else None
        )
        rows.append(
            (
                user_id,
                _password(rng),
                last_login,
                rng.random() < 0.005,
                email,
                username,
                full_name,
                dob,
                phone,
                rng.random() < 0.95,
                rng.random() < 0.02,
            )
        )
    return rows, categories


def seed(dsn: str, users: int = 10_000, seed_value: int = 42, reset: bool = False) -> dict[str, object]:
    """Create the legacy schema in ``dsn`` and load ``users`` fake users with links; returns counts."""
    rows, categories = generate_users(users, seed_value)
    rng = random.Random(seed_value + 1)
    with psycopg.connect(dsn) as conn:
        if reset:
            for table in LEGACY_TABLES:
                conn.execute(
                    psycopg.sql.SQL("DROP TABLE IF EXISTS {} CASCADE").format(psycopg.sql.Identifier(table))
                )
        conn.execute(LEGACY_DDL.read_text())
        if conn.execute("SELECT count(*) FROM account_user").fetchone()[0]:
            raise SystemExit("account_user is not empty; pass --reset to replace its rows")
        conn.execute(
            "INSERT INTO django_content_type (id, app_label, model) VALUES (1, 'account', 'user') "
            "ON CONFLICT DO NOTHING"
        )
        for group_id, name in enumerate(GROUPS, start=1):
            conn.execute(
                "INSERT INTO auth_group (id, name) VALUES (%s, %s) ON CONFLICT DO NOTHING", (group_id, name)
            )
        for perm_id, (codename, name) in enumerate(PERMISSIONS, start=1):
            conn.execute(
                "INSERT INTO auth_permission (id, name, content_type_id, codename) VALUES (%s, %s, 1, %s) "
                "ON CONFLICT DO NOTHING",
                (perm_id, name, codename),
            )
        with conn.cursor() as cur:
            with cur.copy(
                "COPY account_user (id, password, last_login, is_superuser, email, username, full_name, "
                "date_of_birth, phone_number, is_active, is_staff) FROM STDIN"
            ) as copy:
                for row in rows:
                    copy.write_row(row)
            groups = perms = 0
            with cur.copy("COPY account_user_groups (user_id, group_id) FROM STDIN") as copy:
                for row in rows:
                    if rng.random() < 0.3:
                        for group_id in rng.sample(range(1, len(GROUPS) + 1), rng.randint(1, 2)):
                            copy.write_row((row[0], group_id))
                            groups += 1
            with cur.copy("COPY account_user_user_permissions (user_id, permission_id) FROM STDIN") as copy:
                for row in rows:
                    if rng.random() < 0.1:
                        for perm_id in rng.sample(range(1, len(PERMISSIONS) + 1), rng.randint(1, 3)):
                            copy.write_row((row[0], perm_id))
                            perms += 1
        for table in ("account_user", "account_user_groups", "account_user_user_permissions"):
            conn.execute(
                psycopg.sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({t}, 'id'), (SELECT coalesce(max(id), 0) + 1 FROM {i}), false)"
                ).format(t=psycopg.sql.Literal(table), i=psycopg.sql.Identifier(table))
            )
    return {"users": len(rows), "group_links": groups, "permission_links": perms, "dirty": dict(categories)}


def legacy_users(dsn: str) -> int:
    """Rows in account_user (0 when the table does not exist)."""
    with psycopg.connect(dsn) as conn:
        if conn.execute("SELECT to_regclass('account_user') IS NULL").fetchone()[0]:
            return 0
        return conn.execute("SELECT count(*) FROM account_user").fetchone()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--users", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--reset", action="store_true", help="drop and recreate the legacy tables first")
    parser.add_argument(
        "--if-empty", action="store_true", help="do nothing when account_user already holds rows"
    )
    args = parser.parse_args(argv)
    if args.if_empty and legacy_users(args.dsn):
        print("account_user already holds users: nothing seeded")
        return 0
    result = seed(args.dsn, args.users, args.seed, args.reset)
    print(
        f"seeded {result['users']} legacy users, {result['group_links']} group links, "
        f"{result['permission_links']} permission links; dirty rows: {sum(result['dirty'].values())}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
