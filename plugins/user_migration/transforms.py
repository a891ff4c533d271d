"""The transform rules from a legacy user row to a new one. Pure Python, no Airflow, no database.

Every rule is here once, used by the plan (to decide duplicates), the copy, the tests and the
benchmark alike. A row either becomes exactly one target row (perhaps with recorded field fixes)
or one reject with a reason; the first failing check names the reason, in the order of CHECKS.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, NamedTuple

import email_validator
import phonenumbers
from email_validator import EmailNotValidError, validate_email

from user_migration import phone_fast, phone_speedup

phone_speedup.install()

# What a legacy row becomes depends on this code and on these libraries' data, not only on the
# settings: Settings.transform_fingerprint() includes rules_identity(), so a pass after an upgrade of
# either re-transforms every row instead of trusting the sync state of the old rules. Bump
# RULES_VERSION with any change to what a row becomes; tests/test_sync_settings.py fails on a code
# change to the rule modules until the change is acknowledged there (bumped or not).
RULES_VERSION = 1

# Limits of the target columns (SCHEMA.md): a longer value is rejected, never truncated.
MAX_LENGTH = {"password": 128, "email": 255, "username": 255, "full_name": 255, "phone_number": 128}
OLDEST_DATE_OF_BIRTH = dt.date(1900, 1, 1)

# Reject reasons, in the order the checks run.
MISSING_USERNAME = "missing_username"
MISSING_FULL_NAME = "missing_full_name"
INVALID_EMAIL = "invalid_email"
INVALID_DATE_OF_BIRTH = "invalid_date_of_birth"
# The one rule that depends on the pass's date (plan.reusable_decision looks for it).
DOB_IN_FUTURE = "date_of_birth is in the future"
MISSING_VALUE = "missing_value"
VALUE_TOO_LONG = "value_too_long"
INVALID_PHONE = "invalid_phone"
DUPLICATE_EMAIL = "duplicate_email"
DUPLICATE_USERNAME = "duplicate_username"
REJECT_REASONS = (
    MISSING_USERNAME,
    MISSING_FULL_NAME,
    INVALID_EMAIL,
    INVALID_DATE_OF_BIRTH,
    MISSING_VALUE,
    VALUE_TOO_LONG,
    INVALID_PHONE,
    DUPLICATE_EMAIL,
    DUPLICATE_USERNAME,
)

# Field-fix reasons: a value that moves, but not exactly as it was, is recorded with its original.
PHONE_UNPARSEABLE = phone_fast.PHONE_UNPARSEABLE  # "phone_unparseable"
PHONE_INVALID = phone_fast.PHONE_INVALID  # "phone_invalid"
PHONE_EXTENSION_DROPPED = "phone_extension_dropped"
EMAIL_NORMALIZED = "email_normalized"
NAME_TRIMMED = "full_name_trimmed"


class LegacyRow(NamedTuple):
    """A legacy user row under canonical field names (see config.FIELDS)."""

    id: int
    password: str | None
    last_login: dt.datetime | None
    is_superuser: bool | None
    email: str | None
    username: str | None
    full_name: str | None
    date_of_birth: dt.date | None
    phone_number: str | None
    is_active: bool | None
    is_staff: bool | None


class NewUser(NamedTuple):
    """A target row, without the timestamps the loader adds."""

    id: int
    password: str
    last_login: dt.datetime | None
    is_superuser: bool
    email: str
    username: str
    full_name: str
    date_of_birth: dt.date
    phone_number: str
    is_active: bool
    is_staff: bool


@dataclass(frozen=True)
class Reject:
    reason: str
    detail: str


@dataclass(frozen=True)
class FieldFix:
    field: str
    original_value: str | None
    new_value: str | None
    reason: str


class InvalidValue(ValueError):
    """A value that cannot move; ``str()`` is a short detail without the value itself."""


def _blank(value: str | None) -> bool:
    return value is None or not value.strip()


def clean_email(raw: str | None) -> str:
    """Trimmed, validated address with the domain lower-cased and the local part kept as given.

    Deliverability is not checked (no DNS from a migration worker). Raises InvalidValue.
    """
    if raw is None or not raw.strip():
        raise InvalidValue("email is empty")
    email = raw.strip()
    local, at, domain = email.rpartition("@")
    if (
        at
        and len(email) <= 254
        and len(local) <= 64
        and _PLAIN_LOCAL.match(local)
        and _PLAIN_DOMAIN.match(domain)
    ):
        # Fast path for the usual address: a plain dot-atom local part (which email-validator
        # accepts as is) and an ASCII domain, whose verdict from email-validator is cached: most
        # users share a few domains. tests/test_transforms.py checks it agrees with the full path.
        domain = domain.lower()
        problem = _domain_problem(domain)
        if problem:
            raise InvalidValue(f"email is not a valid address ({problem})")
        return f"{local}@{domain}"
    return _clean_email_fully(email)


_ATEXT = "A-Za-z0-9!#$%&'*+/=?^_`{|}~-"
_PLAIN_LOCAL = re.compile(f"[{_ATEXT}]+(?:\\.[{_ATEXT}]+)*\\Z")
_PLAIN_DOMAIN = re.compile(r"[A-Za-z0-9.-]+\Z")
# Both at once, for Transformer.fast_user: a match means exactly one "@" (neither part may hold one),
# so rpartition("@") would split it there, and no whitespace, so strip() would leave it as it is.
_PLAIN_EMAIL = re.compile(f"([{_ATEXT}]+(?:\\.[{_ATEXT}]+)*)@([A-Za-z0-9.-]+)")


@lru_cache(maxsize=65536)
def _domain_problem(domain: str) -> str | None:
    try:
        validate_email(f"a@{domain}", check_deliverability=False)
    except EmailNotValidError as exc:
        return _email_problem(str(exc))
    return None


def _clean_email_fully(email: str) -> str:
    try:
        validate_email(email, check_deliverability=False)
    except EmailNotValidError as exc:
        # The library's message can quote the address; keep only its class of problem.
        raise InvalidValue(f"email is not a valid address ({_email_problem(str(exc))})") from None
    local, _, domain = email.rpartition("@")
    return f"{local}@{domain.lower()}"


def _email_problem(message: str) -> str:
    """A short label for email-validator's message (which may quote the address, so it is not kept).

    Most of its messages mention "the @-sign", so the specific needles come first.
    """
    lowered = message.lower()
    for needle, label in (
        ("must have an @-sign", "no single @"),
        ("too long", "too long"),
        ("too many", "too long"),
        ("special-use", "reserved domain"),
        ("bracketed", "domain literal"),
        ("quoting", "quoted local part"),
        ("should have a period", "domain without a dot"),
        ("period", "misplaced dot"),
        ("character", "invalid characters"),
        ("something before", "empty local part"),
        ("something after", "empty domain"),
        ("hyphen", "bad domain"),
        ("after the @-sign", "bad domain"),
        ("domain name", "bad domain"),
        ("before the @-sign", "bad local part"),
        ("@-sign", "no single @"),
    ):
        if needle in lowered:
            return label
    return "syntax"


def email_key(cleaned_email: str) -> str:
    """What two emails must share to be one mailbox: compared case-insensitively after cleaning.

    The target's unique index is on PostgreSQL's lower(email), whose mapping depends on the
    database's collation: libc and the builtin C.UTF-8 provider map one character to one (İ to i, a
    final Σ to σ), while Python, ICU and PG_UNICODE_FAST apply full case mapping (İ to i + U+0307, a
    final Σ to ς). The key folds both ways, so two addresses that any of them lowercases alike share
    a key and the plan rejects the later one, instead of the index refusing the whole partition.
    """
    return cleaned_email.lower().replace("i\u0307", "i").replace("ς", "σ")


def to_e164(raw: str | None, region: str) -> tuple[str, str | None]:
    """(E.164 number or "", None) for a valid or blank phone; ("", fix reason) for one that is not.

    Numbers without a country prefix are read as numbers of ``region``. A valid number with an
    extension gives (E.164 number, PHONE_EXTENSION_DROPPED): E.164 has no room for the extension,
    so the caller records the original value rather than losing it silently.
    """
    if raw is None or not raw.strip():
        return "", None
    fast = phone_fast.for_region(region)
    if fast is not None and type(raw) is str:
        answer = fast(raw)
        if answer is not None:
            return answer
    return _to_e164_fully(raw, region)


def _to_e164_fully(raw: str, region: str) -> tuple[str, str | None]:
    """to_e164 by phonenumbers itself: the fallback of the fast path, and its reference in tests."""
    try:
        number = phonenumbers.parse(raw, region)
    except phonenumbers.NumberParseException:
        return "", PHONE_UNPARSEABLE
    if not phonenumbers.is_valid_number(number):
        return "", PHONE_INVALID
    e164 = phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)
    return e164, PHONE_EXTENSION_DROPPED if number.extension else None


class Transformer:
    """Applies the rules to rows; one instance per task, holding the run's settings."""

    def __init__(self, phone_region: str = "NP", invalid_phone: str = "fix", today: dt.date | None = None):
        self.phone_region = phone_region
        # the region's patterns compiled now, not on the first row
        self._fast_phone = phone_fast.for_region(phone_region)
        self.reject_invalid_phone = invalid_phone == "reject"
        self.today = today or dt.datetime.now(dt.UTC).date()

    def fast_user(self, values: Sequence[Any]) -> tuple | None:
        """transform()'s target row, as a plain tuple, for a row that moves untouched but its phone; else None.

        ``values`` starts with a legacy row's fields in LegacyRow's order (more may follow: the
        copy's row hash). The copy's hot loop calls this first and transform() when it answers
        None: for a reject, any field fix, an address or phone off the fast paths. So it decides
        nothing transform() would not: each test below is one of transform()'s, or implies it, and
        tests/test_transforms.py compares the two on generated rows.

        Left whole on purpose, longer than issue 17's ~60 lines: it runs once per row of the copy's
        hot loop, where every extra call costs (docs/decisions/0012-copy-hot-loop-and-binary-copy.md).
        """
        username = values[5]
        full_name = values[6]
        email = values[4]
        dob = values[7]
        password = values[1]
        if (
            username is None
            or full_name is None
            or email is None
            or dob is None
            or password is None
            or values[3] is None
            or values[9] is None
            or values[10] is None
            or not username.strip()
            # a name that is blank, or would be trimmed (a field fix), takes transform()
            or not full_name
            or full_name.strip() != full_name
            or len(email) > 254
        ):
            return None
        match = _PLAIN_EMAIL.fullmatch(email)
        if match is None or match.end(1) > 64:
            return None
        domain = match[2]
        # A domain with capitals is an email_normalized fix: transform()'s. The checks after the
        # email's come in transform()'s order, so one that raises (a value of an odd type) would
        # raise there too.
        if (
            domain != domain.lower()
            or _domain_problem(domain) is not None
            or dob > self.today
            or dob < OLDEST_DATE_OF_BIRTH
            or len(password) > MAX_LENGTH["password"]
            or len(username) > MAX_LENGTH["username"]
            or len(full_name) > MAX_LENGTH["full_name"]
        ):
            return None
        phone = values[8]
        if phone is None or not phone.strip():
            e164 = ""
        else:
            answer = self._fast_phone(phone) if self._fast_phone is not None and type(phone) is str else None
            if answer is None or answer[1] is not None:
                return None
            e164 = answer[0]
        return (
            values[0],
            password,
            values[2],
            values[3],
            email,
            username,
            full_name,
            dob,
            e164,
            values[9],
            values[10],
        )

    def transform(self, row: LegacyRow) -> tuple[NewUser | None, Reject | None, list[FieldFix]]:
        """One legacy row to (target row, None, fixes) or (None, reject, []).

        The rules in order, the first one a row breaks is its reject: names present, a valid email,
        a plausible date of birth, no NULL password or flag, lengths within the columns, the phone.
        """
        reject = _blank_name(row)
        if reject is not None:
            return None, reject, []
        try:
            email = clean_email(row.email)
        except InvalidValue as exc:
            return None, Reject(INVALID_EMAIL, str(exc)), []
        reject = self._date_of_birth_reject(row.date_of_birth)
        if reject is None:
            reject = _null_value(row)
        if reject is not None:
            return None, reject, []
        full_name = row.full_name.strip()
        reject = _too_long(row, email, full_name)
        if reject is not None:
            return None, reject, []
        phone, fixes, reject = self._phone(row.phone_number)
        if reject is not None:
            return None, reject, []
        fixes += _text_fixes(row, email, full_name)
        return _new_user(row, email, full_name, phone), None, fixes

    def _date_of_birth_reject(self, dob: dt.date | None) -> Reject | None:
        if dob is None:
            return Reject(INVALID_DATE_OF_BIRTH, "date_of_birth is missing")
        if dob > self.today:
            return Reject(INVALID_DATE_OF_BIRTH, DOB_IN_FUTURE)
        if dob < OLDEST_DATE_OF_BIRTH:
            return Reject(INVALID_DATE_OF_BIRTH, "date_of_birth is before 1900-01-01")
        return None

    def _phone(self, raw: str | None) -> tuple[str, list[FieldFix], Reject | None]:
        """The phone in E.164 (or empty) and its field fix; or the reject of an invalid one (invalid_phone=reject)."""
        phone, problem = to_e164(raw, self.phone_region)
        fixes: list[FieldFix] = []
        if problem == PHONE_EXTENSION_DROPPED:
            fixes.append(FieldFix("phone_number", raw, phone, problem))
        elif problem:
            if self.reject_invalid_phone:
                return (
                    phone,
                    [],
                    Reject(INVALID_PHONE, f"phone_number is not a valid {self.phone_region} number"),
                )
            fixes.append(FieldFix("phone_number", raw, "", problem))
        return phone, fixes, None


def _blank_name(row: LegacyRow) -> Reject | None:
    if _blank(row.username):
        return Reject(MISSING_USERNAME, "username is empty")
    if _blank(row.full_name):
        return Reject(MISSING_FULL_NAME, "full_name is empty")
    return None


def _null_value(row: LegacyRow) -> Reject | None:
    for name in ("password", "is_superuser", "is_active", "is_staff"):
        if getattr(row, name) is None:
            return Reject(MISSING_VALUE, f"{name} is NULL")
    return None


def _too_long(row: LegacyRow, email: str, full_name: str) -> Reject | None:
    for name, value in (
        ("password", row.password),
        ("email", email),
        ("username", row.username),
        ("full_name", full_name),
    ):
        if len(value) > MAX_LENGTH[name]:
            return Reject(
                VALUE_TOO_LONG, f"{name} has {len(value)} characters, the limit is {MAX_LENGTH[name]}"
            )
    return None


def _text_fixes(row: LegacyRow, email: str, full_name: str) -> list[FieldFix]:
    """The field fixes of the email (normalised) and the full name (trimmed), when they changed."""
    fixes: list[FieldFix] = []
    if email != row.email:
        fixes.append(FieldFix("email", row.email, email, EMAIL_NORMALIZED))
    if full_name != row.full_name:
        fixes.append(FieldFix("full_name", row.full_name, full_name, NAME_TRIMMED))
    return fixes


def _new_user(row: LegacyRow, email: str, full_name: str, phone: str) -> NewUser:
    return NewUser(
        id=row.id,
        password=row.password,
        last_login=row.last_login,
        is_superuser=row.is_superuser,
        email=email,
        username=row.username,
        full_name=full_name,
        date_of_birth=row.date_of_birth,
        phone_number=phone,
        is_active=row.is_active,
        is_staff=row.is_staff,
    )


def jsonable_row(row: dict[str, Any]) -> dict[str, Any]:
    """A legacy row as JSON-ready values, for rejected_rows.source_row."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, (dt.date, dt.datetime)):
            out[key] = value.isoformat()
        else:
            out[key] = value
    return out


def rules_identity() -> dict[str, Any]:
    """The rule version and the versions of the libraries whose data decides a row's outcome
    (phonenumbers' metadata, email-validator's syntax rules)."""
    return {
        "rules": RULES_VERSION,
        "phonenumbers": phonenumbers.__version__,
        "email_validator": email_validator.__version__,
    }
