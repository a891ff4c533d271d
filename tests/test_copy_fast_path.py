"""The copy's hot loop takes shortcuts; each must give exactly what the reference rules give.

- ``Transformer.fast_user`` against ``Transformer.transform`` on generated rows: odd Unicode,
  NULLs, whitespace, long strings, dates at the limits, phones of every kind;
- ``fingerprint.fingerprint`` against the formula it replaced (kept here as the reference), on
  last_login values in several time zones (the SQL side is tests/test_fingerprint.py);
- ``partition_copy._transform_batch`` with the fast path and without it: the same target rows,
  sync state, rejects, fixes and counts, with the plan's duplicate losers and the cutover's claims.

No database: milliseconds to a few seconds.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import random
from zoneinfo import ZoneInfo

import pytest

from user_migration import partition_copy
from user_migration.fingerprint import fingerprint
from user_migration.partition_copy import Claims, PartitionResult, _transform_batch
from user_migration.transforms import (
    DUPLICATE_EMAIL,
    DUPLICATE_USERNAME,
    LegacyRow,
    NewUser,
    Transformer,
)

TODAY = dt.date(2026, 11, 24)
ROWS = 40_000
LONG = "x" * 300

USERNAMES = [
    "user", "ann.lee", " padded ", "名前", "e\u0301", "🙂", "\u200b", "a\x1fb", "u" * 255, "u" * 256,
    None, "", "   ", "\u00a0", "\t\n", "\u3000", "x\\y", "tab\tin", LONG,
]  # fmt: skip
FULL_NAMES = [
    "Ann Lee", "James Smith", " Ann", "Ann ", "\u3000Ann", "Ann\u2028", "Ann\x1c", "Ann\x1f", "\u200bAnn",
    "Émilie Zoë", "شريف", "名前 苗字", "n" * 255, "n" * 256, " " + "n" * 255, None, "", " ", "\u00a0\u00a0",
    "line\nbreak", "back\\slash",
]  # fmt: skip
LOCALS = [
    "user", "Ann.Lee+x", "a", "o'hara", "x_y-z", "{odd}", "l" * 64, "l" * 65, "ÄRGER", "a..b", ".a",
    "a.", "a b", '"quoted"', "名", "a\u00a0", "",
]  # fmt: skip
DOMAINS = [
    "example.com", "Example.COM", "gmail.com", "x.np", "bücher.de", "BÜCHER.de", "localhost", "b",
    "-x.com", "x..com", "x.com.", "[1.2.3.4]", "example.invalid", "test", "d" * 63 + ".com",
    "d" * 64 + ".com", "xn--bcher-kva.de", "a_b.com", "x.c",
]  # fmt: skip
EMAIL_WRAPPERS = ["{}", "{}", "{}", " {} ", "\t{}", "{}\u00a0", "\u3000{}"]
ODD_EMAILS = [None, "", "  ", "no-at-sign", "a@@b.com", "@x.com", "a@", "a@b@c.com", "l" * 250 + "@x.com"]
PHONES = [
    "9841234567", "9851234567", "+977-985-1234567", "984 1234567", "01-4123456", "+1 415 555 2671",
    "(415) 555-2671", "12345", "abc", "9841234567 ext 12", "9841234567;ext=3", "+9779841234567",
    "٩٨٤١٢٣٤٥٦٧", "９８４１２３４５６７", "00977 984 1234567", "+44 20 7946 0958", "98", "9" * 40,
    "+", "++977", " 9841234567 ", None, "", "   ", "\u00a0", LONG,
]  # fmt: skip
PASSWORDS = ["pbkdf2_sha256$600000$abc$def=", "p" * 128, "p" * 129, "", "tab\tpass", None]
DATES = [
    dt.date(1990, 1, 1), dt.date(1900, 1, 1), dt.date(1899, 12, 31), TODAY, TODAY + dt.timedelta(days=1),
    dt.date(2000, 2, 29), None,
]  # fmt: skip
LOGINS = [
    None,
    dt.datetime(2025, 1, 1, 12, 30, 0, tzinfo=dt.UTC),
    dt.datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=ZoneInfo("Etc/UTC")),
    dt.datetime(2024, 5, 6, 7, 8, 9, 5, tzinfo=ZoneInfo("UTC")),
    dt.datetime(2024, 1, 1, 0, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=45))),
    dt.datetime(2024, 7, 1, 23, 59, 59, 999999, tzinfo=ZoneInfo("America/New_York")),
    dt.datetime(999, 12, 31, 23, 59, 59, 1, tzinfo=dt.UTC),
    dt.datetime(1901, 1, 1, 0, 0, 0, tzinfo=ZoneInfo("Asia/Kathmandu")),
]
FLAGS = [True, False, True, False, None]


def generated_rows(count: int, seed: int = 18) -> list[tuple]:
    """Legacy rows as the copy fetches them (LegacyRow's fields, then the row hash): mostly clean, many odd."""
    rng = random.Random(seed)

    def pick(pool, clean_share=0.0):
        return pool[0] if rng.random() < clean_share else rng.choice(pool)

    rows = []
    for user_id in range(1, count + 1):
        if rng.random() < 0.08:
            email = rng.choice(ODD_EMAILS)
        else:
            email = rng.choice(EMAIL_WRAPPERS).format(
                f"{pick(LOCALS, 0.6)}{user_id % 97}@{pick(DOMAINS, 0.6)}"
            )
        rows.append(
            (
                user_id,
                pick(PASSWORDS, 0.85),
                rng.choice(LOGINS),
                pick(FLAGS, 0.85),
                email,
                f"{pick(USERNAMES, 0.85)}{user_id}" if rng.random() < 0.5 else pick(USERNAMES, 0.85),
                pick(FULL_NAMES, 0.85),
                pick(DATES, 0.85),
                pick(PHONES, 0.5),
                pick(FLAGS, 0.85),
                pick(FLAGS, 0.85),
                hashlib.md5(str(user_id).encode()).digest(),
            )
        )
    return rows


@pytest.mark.parametrize(("region", "invalid_phone"), [("NP", "fix"), ("NP", "reject"), ("US", "fix")])
def test_fast_user_answers_only_what_transform_answers_the_same(region, invalid_phone):
    transformer = Transformer(region, invalid_phone, today=TODAY)
    taken = 0
    for values in generated_rows(ROWS):
        fast = transformer.fast_user(values)
        if fast is None:
            continue
        taken += 1
        user, reject, fixes = transformer.transform(LegacyRow(*values[:-1]))
        assert (reject, fixes) == (None, []), values
        assert fast == tuple(user), values
        assert [type(a) for a in fast] == [type(b) for b in user], values
    # Not vacuous: thousands of clean rows take the fast path (fewer in US: NP phones are invalid there).
    assert taken > 500


def test_fast_user_refuses_each_kind_of_odd_row():
    transformer = Transformer("NP", "fix", today=TODAY)
    clean = (
        1,
        "pw",
        None,
        False,
        "a@example.com",
        "u",
        "Ann",
        dt.date(1990, 1, 1),
        "9841234567",
        True,
        False,
    )
    assert transformer.fast_user(clean) == (*clean[:8], "+9779841234567", True, False)
    assert transformer.fast_user((*clean[:8], None, True, False))[8] == ""
    assert transformer.fast_user((*clean[:8], " \u00a0", True, False))[8] == ""
    for position, value in [
        (1, None), (1, "p" * 129), (3, None), (4, "a@Example.com"), (4, " a@example.com"), (4, "ä@example.com"),
        (4, "a@localhost"), (4, "l" * 65 + "@example.com"), (4, None), (5, " "), (5, "u" * 256), (6, " Ann"),
        (6, ""), (6, "n" * 256), (7, TODAY + dt.timedelta(days=1)), (7, dt.date(1899, 12, 31)), (7, None),
        (8, "12345"), (8, "abc"), (8, "9841234567 ext 1"), (9, None), (10, None),
    ]:  # fmt: skip
        odd = (*clean[:position], value, *clean[position + 1 :])
        assert transformer.fast_user(odd) is None, (position, value)


def reference_fingerprint(user: NewUser) -> int:
    """fingerprint.fingerprint as it was before its fast paths (commit 7b1f3cb)."""
    last_login = user.last_login
    text = "\x1f".join(
        (
            str(user.id),
            user.password,
            last_login.astimezone(dt.UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
            if last_login
            else "",
            "1" if user.is_superuser else "0",
            user.email,
            user.username,
            user.full_name,
            user.date_of_birth.isoformat(),
            user.phone_number,
            "1" if user.is_active else "0",
            "1" if user.is_staff else "0",
        )
    )
    return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big", signed=True)


def test_fingerprint_equals_the_reference_formula():
    rng = random.Random(7)
    zones = [
        dt.UTC,
        ZoneInfo("Etc/UTC"),
        ZoneInfo("UTC"),
        ZoneInfo("Asia/Kathmandu"),
        ZoneInfo("Europe/London"),
    ]
    zones += [dt.timezone(dt.timedelta(hours=-3, minutes=-30)), dt.timezone(dt.timedelta(seconds=37))]
    checked = 0
    for values in generated_rows(5_000, seed=3):
        for zone in zones:
            login = dt.datetime(rng.randint(1, 9999), rng.randint(1, 12), rng.randint(1, 28), tzinfo=dt.UTC)
            login += dt.timedelta(seconds=rng.randint(0, 86_399), microseconds=rng.choice([0, 1, 999_999]))
            try:
                login = login.astimezone(zone)
            except OverflowError:
                continue
            user = NewUser(
                values[0],
                values[1] or "",
                rng.choice([login, None]),
                bool(values[3]),
                values[4] or "",
                values[5] or "",
                values[6] or "",
                values[7] or TODAY,
                rng.choice(["", "+9779841234567", values[8] or ""]),
                bool(values[9]),
                bool(values[10]),
            )
            assert fingerprint(user) == fingerprint(tuple(user)) == reference_fingerprint(user), user
            checked += 1
    assert checked > 30_000


def batch_outcome(rows, transformer, losers, claims):
    result = PartitionResult(0, 1, len(rows))
    now = dt.datetime(2026, 11, 24, 12, 0, tzinfo=dt.UTC)
    names = [f"legacy_{name}" for name in LegacyRow._fields]
    batch = _transform_batch(rows, transformer, losers, names, "run", now, result, claims)
    rejects = [(*item[:4], item[4].obj, item[5]) for item in batch.rejects]
    return (
        [tuple(user) for user in batch.good],
        [type(user[8]) for user in batch.good],
        batch.state,
        rejects,
        batch.fixes,
        batch.rejected_ids,
        result.as_dict(),
    )


@pytest.mark.parametrize("with_claims", [False, True])
def test_the_batch_is_the_same_with_and_without_the_fast_path(monkeypatch, with_claims):
    rows = generated_rows(ROWS // 2, seed=11)
    rng = random.Random(5)
    losers = {
        user_id: (rng.choice([DUPLICATE_EMAIL, DUPLICATE_USERNAME]), rng.randint(1, user_id))
        for user_id in rng.sample(range(1, len(rows) + 1), 500)
    }
    transformer = Transformer("NP", "fix", today=TODAY)
    fast = batch_outcome(rows, transformer, losers, Claims() if with_claims else None)
    monkeypatch.setattr(Transformer, "fast_user", lambda self, values: None)
    reference = batch_outcome(rows, transformer, losers, Claims() if with_claims else None)
    assert fast == reference
    assert fast[-1]["migrated"] > 1_000


def test_the_fast_path_is_used_by_the_batch(monkeypatch):
    """Guards the test above against a hot loop that silently stopped calling fast_user."""
    calls = []
    original = Transformer.fast_user
    monkeypatch.setattr(
        Transformer, "fast_user", lambda self, values: calls.append(1) or original(self, values)
    )
    rows = generated_rows(100)
    partition_copy._transform_batch(
        rows,
        Transformer("NP", "fix", today=TODAY),
        {},
        list(LegacyRow._fields),
        "run",
        None,
        PartitionResult(0, 1, 100),
    )
    assert len(calls) == len(rows)
