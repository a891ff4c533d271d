"""The fast digit normaliser must give phonenumbers exactly the answers of the library's own."""

from __future__ import annotations

import random

import phonenumbers
import pytest
from phonenumbers import PhoneNumberFormat, PhoneNumberType, phonenumberutil

from tools import seed_legacy
from user_migration import phone_speedup
from user_migration.transforms import to_e164

ALPHABET = "0123456789" * 4 + "+-() ./xX#;,*~extEXTabcABCwp\t" + "٠١٢٣٤٥٦٧٨٩０１２３４５６７８９²³¹½ⅷ⁴₅"
REGIONS = ("NP", "US", "GB", "IN", "DE", "BR")


def fuzz_phones(count: int, seed: int = 20261125) -> list[str]:
    rnd = random.Random(seed)
    shapes = []
    for _ in range(count):
        kind = rnd.random()
        if kind < 0.5:  # what phone columns mostly hold: digits with a few separators
            digits = "".join(rnd.choice("0123456789") for _ in range(rnd.randint(6, 14)))
            prefix = rnd.choice(["", "+", "00", "+977 ", "0", "(", "+1 "])
            cut = rnd.randint(1, len(digits))
            sep = rnd.choice(["", " ", "-", ".", ") ", " ext. ", " x", "#", ";ext=", ",,"])
            shapes.append(prefix + digits[:cut] + sep + digits[cut:])
        else:
            shapes.append("".join(rnd.choice(ALPHABET) for _ in range(rnd.randint(0, 20))))
    return shapes


def test_every_ascii_character_and_some_others_normalise_as_the_library_does():
    chars = [chr(c) for c in range(128)] + list("٠٣９²½ⅷ₅ä€")
    for ch in chars:
        for keep in (False, True):
            assert phone_speedup.normalize_digits_only(
                ch, keep
            ) == phone_speedup.library_normalize_digits_only(ch, keep), repr(ch)
    for text in fuzz_phones(5_000):
        for keep in (False, True):
            assert phone_speedup.normalize_digits_only(
                text, keep
            ) == phone_speedup.library_normalize_digits_only(text, keep), repr(text)


def test_the_parser_uses_the_fast_normaliser():
    assert phonenumberutil.normalize_digits_only is phone_speedup.normalize_digits_only
    # and the comparisons above compare with the library's function, not with the fast one
    assert phone_speedup.library_normalize_digits_only.__module__ == "phonenumbers.phonenumberutil"


def formatted_examples(region: str) -> list[str]:
    """Valid numbers of ``region`` of every type, in every format the library writes."""
    out = []
    for kind in (PhoneNumberType.FIXED_LINE, PhoneNumberType.MOBILE, PhoneNumberType.TOLL_FREE):
        number = phonenumbers.example_number_for_type(region, kind)
        if number is not None:
            for style in (
                PhoneNumberFormat.E164,
                PhoneNumberFormat.INTERNATIONAL,
                PhoneNumberFormat.NATIONAL,
            ):
                out.append(phonenumbers.format_number(number, style))
            out.append(phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL) + " ext. 12")
    return out


@pytest.mark.parametrize("region", REGIONS)
def test_to_e164_gives_the_same_answers_with_and_without_it(region, monkeypatch):
    examples = [p for r in REGIONS for p in formatted_examples(r)]
    phones = fuzz_phones(4_000) + examples + list(seed_legacy.JUNK_PHONES) + ["", " ", "+977-9841234567"]
    fast = [to_e164(p, region) for p in phones]
    monkeypatch.setattr(phonenumberutil, "normalize_digits_only", phone_speedup.library_normalize_digits_only)
    slow = [to_e164(p, region) for p in phones]
    assert fast == slow
    assert sum(1 for e164, _ in fast if e164) >= 10  # valid numbers are among them, not only junk
    assert {problem for _, problem in fast} >= {None, "phone_unparseable", "phone_invalid"}
