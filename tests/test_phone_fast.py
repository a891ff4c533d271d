"""The phone fast path must answer exactly as phonenumbers does, for every input.

A few hundred thousand cases here (bench phones, fuzzed strings over several regions, every region's
example numbers); ``python tools/phone_fast_check.py`` runs millions the same way.
"""

from __future__ import annotations

import phonenumbers
import pytest

from tools import bench_seed, phone_fast_check
from user_migration import phone_fast, transforms
from user_migration.transforms import to_e164

FUZZ_REGIONS = ("NP", "IN", "US", "GB", "DE", "BR", "CA", "AR", "IT", "KZ", "GG")
FUZZ_PER_REGION = 15_000
BENCH_SAMPLE = 200_000


def library(phone: str, region: str) -> tuple[str, str | None]:
    return transforms._to_e164_fully(phone, region) if phone.strip() else ("", None)


def mismatches(phones: list[str], region: str) -> list[str]:
    return [p for p in phones if to_e164(p, region) != library(p, region)]


def test_the_bench_generator_mirror_uses_the_bench_prefixes():
    assert phone_fast_check.BENCH_NP_MOBILE_PREFIXES == bench_seed.NP_MOBILE_PREFIXES


def test_every_bench_phone_gets_the_library_answer_and_nearly_all_take_the_fast_path():
    phones = phone_fast_check.bench_phones(BENCH_SAMPLE)
    assert mismatches(phones, "NP") == []
    fast = phone_fast.for_region("NP")
    answered = sum(1 for p in phones if p.strip() and fast(p) is not None)
    assert answered / len(phones) > 0.96  # all but the blank and junk ones (3%)


@pytest.mark.parametrize("region", FUZZ_REGIONS)
def test_fuzzed_strings_get_the_library_answer(region):
    phones = phone_fast_check.fuzz_phones(region, FUZZ_PER_REGION)
    assert mismatches(phones, region) == []
    # The fuzz reaches the fast path, and with every kind of answer.
    fast = phone_fast.for_region(region)
    answers = [fast(p) for p in phones if p.strip()]
    assert sum(a is not None for a in answers) > 0.6 * len(phones)
    assert {a[1] for a in answers if a is not None} >= {None, "phone_invalid"}
    assert sum(1 for a in answers if a is not None and a[0]) > 0.1 * len(phones)


def test_every_regions_example_numbers_get_the_library_answer():
    others = [p for r in ("NP", "US", "GB", "IN") for p in phone_fast_check.example_numbers(r)]
    checked = 0
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        own = phone_fast_check.example_numbers(region)
        assert mismatches(own + others, region) == [], region
        checked += len(own) + len(others)
    assert checked > 30_000


def test_every_supported_region_has_a_fast_path_and_unknown_ones_do_not():
    assert all(phone_fast.for_region(r) is not None for r in phonenumbers.SUPPORTED_REGIONS)
    for region in ("ZZ", "np", "001", ""):
        assert phone_fast.for_region(region) is None
        assert to_e164("+977 984-1234567", region) == library("+977 984-1234567", region)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("9841234567", ("+9779841234567", None)),
        ("+977 984-123-4567", ("+9779841234567", None)),
        ("(984) 123.4567", ("+9779841234567", None)),
        ("09841234567", ("+9779841234567", None)),  # national prefix
        ("9779841234567", ("+9779841234567", None)),  # calling code without "+"
        ("+9770", ("", "phone_unparseable")),
        ("9831234567", ("", "phone_invalid")),
        ("+9779831234567", ("", "phone_invalid")),
    ],
)
def test_the_fast_path_itself_answers_the_common_shapes(raw, expected):
    assert phone_fast.for_region("NP")(raw) == expected == library(raw, "NP")


@pytest.mark.parametrize(
    "raw",
    ["+44 20 7946 0958", "0097798412345678", "984-123-4567 ext. 12", "９８４１２３４５６７", "98", "1-2"],
)
def test_other_shapes_are_left_to_the_library(raw):
    assert phone_fast.for_region("NP")(raw) is None


def _broken_prefix_stripping(self, number):
    """A plausible mistake: strip a leading national prefix without the library's viability checks."""
    match = self.national_prefix.match(number) if self.national_prefix is not None and number else None
    return number[match.end() :] if match else number


def _broken_length_check(self, number):
    return phonenumbers.phonenumberutil.ValidationResult.IS_POSSIBLE


@pytest.mark.parametrize(
    ("name", "replacement"),
    [("strip_national_prefix", _broken_prefix_stripping), ("test_length", _broken_length_check)],
)
def test_the_differential_tests_catch_a_broken_fast_path(name, replacement, monkeypatch):
    monkeypatch.setattr(phone_fast._MetadataView, name, replacement)
    caught = {
        region: len(mismatches(phone_fast_check.fuzz_phones(region, 5_000), region))
        for region in ("US", "GB", "BR", "AR")
    }
    assert sum(caught.values()) > 0, caught


def test_the_differential_tests_catch_a_separator_left_in_the_digits(monkeypatch):
    """_digits_of_shape replaced a re.sub; separators left in (".", "(", ")") must show up as mismatches."""
    monkeypatch.setattr(
        phone_fast, "_digits_of_shape", lambda raw: raw.replace(" ", "").replace("-", "").replace("+", "")
    )
    caught = {
        region: len(mismatches(phone_fast_check.fuzz_phones(region, 5_000), region))
        for region in ("US", "GB", "NP")
    }
    assert sum(caught.values()) > 0, caught
