"""The fingerprints that prove a copy: of a target row (in Python as the copy writes it, and the
same in SQL for the cutover, the rollback and the checksum) and of a legacy row (its hash in SQL).

``fingerprint`` and include/sql/cutover/row_fingerprint.sql must agree to the bit
(tests/test_fingerprint.py); ``row_hash_sql`` changes when any migrated value of a legacy row does.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import struct

from psycopg import sql

from user_migration.config import FIELDS, LegacyMapping
from user_migration.db import read_sql
from user_migration.transforms import NewUser

_UTC = dt.UTC
_ZERO = dt.timedelta(0)
# The fingerprint's md5: CPython's own (no OpenSSL call) when it has one, about 40% cheaper on a
# short text; the digest is md5's either way.
try:
    from _md5 import md5 as _md5
except ImportError:  # pragma: no cover - a Python built without it
    _md5 = hashlib.md5
_first_8_bytes_signed = struct.Struct(">q").unpack_from


def fingerprint(user: NewUser | tuple) -> int:
    """A 64-bit fingerprint of a target row; include/sql/cutover/row_fingerprint.sql computes the same in SQL.

    ``user`` is a NewUser or a plain tuple in its order (Transformer.fast_user's).
    """
    user_id, password, last_login, superuser, email, username, full_name, dob, phone, active, staff = user
    if last_login is None:
        login = ""
    elif last_login.utcoffset() == _ZERO:
        # Already UTC (the usual session time zone): the same wall clock as astimezone's, and
        # isoformat's suffix is then "+00:00" exactly: the general case's text, about 2x cheaper.
        login = last_login.isoformat(timespec="microseconds")[:-6]
    else:
        # isoformat, not strftime: twice as fast, and years before 1000 keep 4 digits as to_char's do
        login = last_login.astimezone(_UTC).replace(tzinfo=None).isoformat(timespec="microseconds")
    text = "\x1f".join(
        (
            str(user_id),
            password,
            login,
            "1" if superuser else "0",
            email,
            username,
            full_name,
            dob.isoformat(),
            phone,
            "1" if active else "0",
            "1" if staff else "0",
        )
    )
    return _first_8_bytes_signed(_md5(text.encode()).digest())[0]


def fingerprint_sql() -> sql.SQL:
    """fingerprint() as a SQL expression over an account_newuser row's bare column names."""
    return sql.SQL(read_sql("cutover/row_fingerprint.sql"))


def target_checksum_sql() -> sql.Composed:
    """(row count, sum of every row's fingerprint) of account_newuser."""
    return sql.SQL(read_sql("cutover/target_checksum.sql")).format(fingerprint=fingerprint_sql())


def row_hash_sql(mapping: LegacyMapping) -> sql.Composed:
    """md5 of the mapped legacy columns: changes when any migrated value of the row changes."""
    columns = [sql.Identifier(c) for name in FIELDS if (c := mapping.column(name)) is not None]
    return sql.SQL("decode(md5(ROW({})::text), 'hex')").format(sql.SQL(", ").join(columns))
