"""Every transform rule, in milliseconds: no database, no Airflow."""

from __future__ import annotations

import datetime as dt

import pytest

from user_migration.transforms import (
    FieldFix,
    InvalidValue,
    LegacyRow,
    Transformer,
    clean_email,
    email_key,
    to_e164,
)

TODAY = dt.date(2026, 11, 24)


def row(**changes) -> LegacyRow:
    base = LegacyRow(
        id=1,
        password="pbkdf2_sha256$600000$abc$def=",
        last_login=None,
        is_superuser=False,
        email="user@example.com",
        username="user",
        full_name="User Name",
        date_of_birth=dt.date(1990, 1, 1),
        phone_number="9841234567",
        is_active=True,
        is_staff=False,
    )
    return base._replace(**changes)


def transform(**changes):
    return Transformer("NP", "fix", today=TODAY).transform(row(**changes))


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("user@example.com", "user@example.com"),
        ("  User.Name@Example.COM\t", "User.Name@example.com"),
        ("a+tag@Gmail.com", "a+tag@gmail.com"),
        ("sybil@Bücher.DE", "sybil@bücher.de"),
        ("ÄRGER@example.com", "ÄRGER@example.com"),
    ],
)
def test_clean_email_trims_lowercases_domain_and_keeps_local_part(raw, clean):
    assert clean_email(raw) == clean


@pytest.mark.parametrize(
    "raw", [None, "", "   ", "no-at-sign", "a@@b.com", "user name@x.com", "x@localhost", "a@b"]
)
def test_invalid_emails_are_refused_without_quoting_the_value(raw):
    with pytest.raises(InvalidValue) as error:
        clean_email(raw)
    if raw and raw.strip():
        assert raw.strip() not in str(error.value)


def test_email_key_is_case_insensitive_after_cleaning():
    assert email_key(clean_email(" Alice@Example.com ")) == email_key(clean_email("ALICE@example.COM"))
    assert email_key(clean_email("\u00a0zed@example.com")) == email_key(clean_email("zed@example.com"))


@pytest.mark.parametrize(
    ("raw", "region", "expected"),
    [
        ("9841234567", "NP", ("+9779841234567", None)),
        ("+977-985-1234567", "NP", ("+9779851234567", None)),
        ("984 1234567", "NP", ("+9779841234567", None)),
        ("01-4123456", "NP", ("+97714123456", None)),
        ("+1 415 555 2671", "NP", ("+14155552671", None)),
        ("(415) 555-2671", "US", ("+14155552671", None)),
        ("", "NP", ("", None)),
        ("   ", "NP", ("", None)),
        (None, "NP", ("", None)),
        ("abc", "NP", ("", "phone_unparseable")),
        ("12345", "NP", ("", "phone_invalid")),
        ("0000000000", "NP", ("", "phone_invalid")),
    ],
)
def test_to_e164(raw, region, expected):
    assert to_e164(raw, region) == expected


def test_valid_row_moves_with_every_value_kept():
    user, reject, fixes = transform(last_login=dt.datetime(2025, 1, 1, tzinfo=dt.UTC), is_superuser=True)
    assert reject is None and fixes == []
    assert user.password == "pbkdf2_sha256$600000$abc$def="
    assert user.phone_number == "+9779841234567"
    assert (user.is_superuser, user.is_active, user.is_staff) == (True, True, False)
    assert user.last_login == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"username": ""}, "missing_username"),
        ({"username": "  \t"}, "missing_username"),
        ({"username": None}, "missing_username"),
        ({"full_name": ""}, "missing_full_name"),
        ({"full_name": "   "}, "missing_full_name"),
        ({"full_name": None}, "missing_full_name"),
        ({"email": "broken"}, "invalid_email"),
        ({"email": None}, "invalid_email"),
        ({"date_of_birth": TODAY + dt.timedelta(days=1)}, "invalid_date_of_birth"),
        ({"date_of_birth": dt.date(1899, 12, 31)}, "invalid_date_of_birth"),
        ({"date_of_birth": None}, "invalid_date_of_birth"),
        ({"password": None}, "missing_value"),
        ({"is_active": None}, "missing_value"),
        ({"username": "u" * 256}, "value_too_long"),
        ({"full_name": "n" * 256}, "value_too_long"),
        ({"password": "p" * 129}, "value_too_long"),
    ],
)
def test_rejections(changes, reason):
    user, reject, fixes = transform(**changes)
    assert user is None and fixes == []
    assert reject.reason == reason


def test_boundaries_are_accepted():
    assert transform(date_of_birth=TODAY)[0] is not None
    assert transform(date_of_birth=dt.date(1900, 1, 1))[0] is not None
    assert transform(username="u" * 255, full_name="n" * 255, password="p" * 128)[0] is not None


def test_first_failing_check_names_the_reason():
    _, reject, _ = transform(username="", full_name="", email="bad")
    assert reject.reason == "missing_username"


def test_usernames_and_names_are_kept_exactly_whatever_their_characters():
    for name in ("Zoe\u0308 Ma\u0308rta", "🌸 Uma", "מריה כהן", "名前"):
        user, _, _ = transform(username=f" {name} ", full_name=name)
        assert user.username == f" {name} "
        assert user.full_name == name


def test_invalid_phone_is_fixed_and_recorded_by_default():
    user, reject, fixes = transform(phone_number="abc")
    assert reject is None and user.phone_number == ""
    assert fixes == [FieldFix("phone_number", "abc", "", "phone_unparseable")]


def test_invalid_phone_can_reject_instead():
    user, reject, _ = Transformer("NP", "reject", today=TODAY).transform(row(phone_number="12345"))
    assert user is None and reject.reason == "invalid_phone"
    # A blank phone is not invalid, whatever the setting.
    user, reject, _ = Transformer("NP", "reject", today=TODAY).transform(row(phone_number=""))
    assert user is not None and user.phone_number == ""


def test_email_and_name_changes_are_recorded_as_fixes():
    _, _, fixes = transform(email=" A@B.COM", full_name=" Name ")
    assert fixes == [
        FieldFix("email", " A@B.COM", "A@b.com", "email_normalized"),
        FieldFix("full_name", " Name ", "Name", "full_name_trimmed"),
    ]


def test_reject_detail_never_contains_the_value():
    for changes in ({"email": "secret-address"}, {"full_name": "x" * 300}, {"phone_number": "12345"}):
        _, reject, _ = Transformer("NP", "reject", today=TODAY).transform(row(**changes))
        value = next(iter(changes.values()))
        assert value not in reject.detail


def _outcome(fn, raw):
    try:
        return ("ok", fn(raw))
    except InvalidValue:
        return ("invalid", None)


EDGE_EMAILS = [
    "a" * 64 + "@example.com",
    "a" * 65 + "@example.com",
    "a@" + "b" * 63 + ".com",
    "a@" + "b" * 64 + ".com",
    "a" * 60 + "@" + ".".join(["b" * 60] * 3) + ".com",
    "x@localhost",
    "x@mail.test",
    "x@-bad.com",
    "x@bad-.com",
    "x@xn--bcher-kva.de",
    "x@1.2.3.4",
    "x@b",
    "x@.com",
    "x@com.",
    "x@exa_mple.com",
    ".x@example.com",
    "x.@example.com",
    "x..y@example.com",
    "{x}|~@example.com",
    "x@EXAMPLE.COM",
    "x@sub.Example.Org",
    "x@example.c",
    "x@example.123",
]


def test_fast_email_path_agrees_with_email_validator():
    """The cached fast path must accept, refuse and clean exactly as email-validator does."""
    import random

    from user_migration.transforms import _clean_email_fully

    rng = random.Random(7)
    alphabet = "abcXYZ019.-_+@!#$%&'*/=?^`{|}~ \u00e9"
    samples = list(EDGE_EMAILS)
    for _ in range(20_000):
        local = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 8)))
        domain = "".join(rng.choice("abcXY01.-") for _ in range(rng.randint(0, 10)))
        tld = rng.choice(["com", "org", "io", "c", "test", "local", "123", ""])
        samples.append(f"{local}@{domain}.{tld}" if tld else f"{local}@{domain}")
    fast_accepted = 0
    for raw in samples:
        expected = (
            _outcome(lambda r: _clean_email_fully(r.strip()), raw) if raw.strip() else ("invalid", None)
        )
        assert _outcome(clean_email, raw) == expected, raw
        fast_accepted += expected[0] == "ok"
    assert fast_accepted > 500  # the sample exercises the accepting side, not only refusals
