"""A faster, equivalent ``normalize_digits_only`` for phonenumbers: the costliest step of its parser.

phonenumbers normalises every input one character at a time through ``unicodedata.digit``, a
large share of ``to_e164``'s time (docs/decisions/0009-ascii-digit-normaliser-for-phonenumbers.md). For an
ASCII string the result is known without the loop: ``unicodedata.digit`` is 0-9 for the ASCII digits
and undefined for every other ASCII character, so the digits-only form is the string without its
non-digits, and the form that keeps non-digits is the string itself. Anything else (full-width or
Arabic-Indic digits, letters of other scripts) goes to the library's own function, and
tests/test_phone_speedup.py checks both paths agree with it character by character.
"""

from __future__ import annotations

import re

from phonenumbers import phonenumberutil

_ASCII_NON_DIGITS = re.compile(r"[^0-9]+")
# The library's own function, captured before install() replaces it (the equivalence tests use it).
library_normalize_digits_only = phonenumberutil.normalize_digits_only


def normalize_digits_only(number: str, keep_non_digits: bool = False) -> str:
    """phonenumbers' ``normalize_digits_only``, without its per-character loop for ASCII input."""
    if type(number) is str and number.isascii():
        return number if keep_non_digits else _ASCII_NON_DIGITS.sub("", number)
    return library_normalize_digits_only(number, keep_non_digits)


def install() -> None:
    """Make phonenumbers' parser use the fast normaliser (its module-level name is what it calls)."""
    phonenumberutil.normalize_digits_only = normalize_digits_only
