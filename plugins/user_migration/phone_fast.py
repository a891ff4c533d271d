"""A fast path for ``to_e164`` on the common phone shapes, built from phonenumbers' own metadata.

``phonenumbers.parse`` + ``is_valid_number`` run a dozen general regular expressions (extension,
viability, alpha, RFC 3966 ...) on every input; for a string that is only ASCII digits and the usual
separators, with at most a leading "+", nearly all of that is known to be a no-op. What is left
depends only on the digits and the region's metadata: the IDD and country-code checks, the national
prefix (and carrier code) stripping, the possible lengths and the per-type patterns that
``is_valid_number`` tries. ``RegionFastPath`` does exactly those steps, in the library's order, with
the region's patterns compiled once, and answers ``None`` (use the library) for every input it is not
sure about: other shapes, an IDD prefix, another country code, fewer than 3 digits.

Each step mirrors a private function of ``phonenumbers.phonenumberutil`` (named in its docstring);
tests/test_phone_fast.py checks the answers equal the library's on bench phones, fuzzed strings and
every region's example numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import phonenumbers
from phonenumbers import PhoneMetadata, phonenumberutil
from phonenumbers.phonenumberutil import COUNTRY_CODE_TO_REGION_CODE, ValidationResult

PHONE_UNPARSEABLE = "phone_unparseable"
PHONE_INVALID = "phone_invalid"

# What the library would read from such a string is its digits and whether a "+" leads them:
# leading punctuation is skipped up to the first "+" or digit, trailing punctuation dropped, and all of
# " ().-" is valid punctuation that never starts an extension, a second number or an RFC 3966 part.
_SHAPE = re.compile(r"[ ().-]*(\+)?[ ().-]*[0-9][0-9 ().-]*")
_MAX_FAST_INPUT = 64  # well under the library's 250-character limit
_LENGTH_TABLE_SIZE = _MAX_FAST_INPUT + 1  # no digit string here is longer than its input
_MIN_FAST_DIGITS = 3  # fewer digits take the library's special cases for 2-digit "numbers"
_MAX_LENGTH_FOR_NSN = phonenumberutil._MAX_LENGTH_FOR_NSN
_MIN_LENGTH_FOR_NSN = phonenumberutil._MIN_LENGTH_FOR_NSN
# Results of _test_number_length after which parse() keeps the national prefix.
_KEEP_PREFIX = (
    ValidationResult.TOO_SHORT,
    ValidationResult.IS_POSSIBLE_LOCAL_ONLY,
    ValidationResult.INVALID_LENGTH,
)

Result = tuple[str, str | None]


def _desc_matcher(desc) -> tuple[frozenset[int] | None, re.Pattern[str]] | None:
    """(possible lengths or None for any, pattern) for a PhoneNumberDesc, None if it matches nothing.

    Mirrors _is_number_matching_desc / _match_national_number (a whole-string match).
    """
    if desc is None or not desc.national_number_pattern:
        return None
    lengths = frozenset(desc.possible_length) if len(desc.possible_length) > 0 else None
    return lengths, re.compile(desc.national_number_pattern)


class _MetadataView:
    """One region's metadata as compiled patterns, for the steps of parse() and is_valid_number()."""

    def __init__(self, metadata: PhoneMetadata) -> None:
        self.metadata = metadata
        self.country_code: int = metadata.country_code
        general = metadata.general_desc.national_number_pattern
        self.general = re.compile(general) if general else None
        prefix = metadata.national_prefix_for_parsing
        self.national_prefix = re.compile(prefix) if prefix else None
        self.transform_rule = metadata.national_prefix_transform_rule or None
        if self.transform_rule and self.national_prefix is not None and self.national_prefix.groups == 0:
            raise ValueError("transform rule without groups")  # the library itself would fail
        # _test_number_length(number, metadata) depends only on the length: tabulate it.
        self.length_result = [
            phonenumberutil._test_number_length("0" * n, metadata) for n in range(_LENGTH_TABLE_SIZE)
        ]
        self.leading_digits = (
            re.compile(metadata.leading_digits) if metadata.leading_digits is not None else None
        )
        # _number_type_helper's order: any of these makes a known type ...
        typed = [
            metadata.premium_rate,
            metadata.toll_free,
            metadata.shared_cost,
            metadata.voip,
            metadata.personal_number,
            metadata.pager,
            metadata.uan,
            metadata.voicemail,
            metadata.fixed_line,
        ]
        # ... and mobile too, unless the metadata says mobile and fixed line share one pattern.
        if not metadata.same_mobile_and_fixed_line_pattern:
            typed.append(metadata.mobile)
        self.general_desc = _desc_matcher(metadata.general_desc)
        self.typed = [m for m in map(_desc_matcher, typed) if m is not None]
        # One alternation per length of the typed patterns allowing it: fullmatch(A|B) is
        # fullmatch(A) or fullmatch(B) as long as no pattern refers to a group by number.
        self.typed_by_length: list[re.Pattern[str] | None] | None = None
        if all(pattern.groups == 0 for _, pattern in self.typed):
            self.typed_by_length = [
                _alternation([p for lengths, p in self.typed if lengths is None or n in lengths])
                for n in range(_LENGTH_TABLE_SIZE)
            ]

    def general_match(self, number: str) -> bool:
        """_match_national_number(number, general_desc, False)."""
        return self.general is not None and self.general.fullmatch(number) is not None

    def test_length(self, number: str) -> ValidationResult:
        """_test_number_length(number, metadata) (any length past the table's is as TOO_LONG as its last)."""
        return self.length_result[min(len(number), _LENGTH_TABLE_SIZE - 1)]

    def strip_national_prefix(self, number: str) -> str:
        """The number part of _maybe_strip_national_prefix_carrier_code(number, metadata)."""
        if not number or self.national_prefix is None:
            return number
        match = self.national_prefix.match(number)
        if match is None:
            return number
        viable_original = self.general_match(number)
        if self.transform_rule is None or match.groups()[-1] is None:
            stripped = number[match.end() :]
            if viable_original and not self.general_match(stripped):
                return number
            return stripped
        transformed = self.national_prefix.sub(self.transform_rule, number, count=1)
        if viable_original and not self.general_match(transformed):
            return number
        return transformed

    def has_type(self, nsn: str) -> bool:
        """_number_type_helper(nsn, metadata) != PhoneNumberType.UNKNOWN."""
        if not _matches(self.general_desc, nsn):
            return False
        if self.typed_by_length is not None:
            pattern = self.typed_by_length[len(nsn)]
            return pattern is not None and pattern.fullmatch(nsn) is not None
        return any(_matches(desc, nsn) for desc in self.typed)


def _digits_of_shape(raw: str) -> str:
    """The digits of a string _SHAPE matched (ASCII digits, at most one "+" and the separators
    " ().-"): six str.replace calls, about twice as fast as a re.sub on these short strings."""
    return (
        raw.replace(" ", "")
        .replace("-", "")
        .replace(".", "")
        .replace("(", "")
        .replace(")", "")
        .replace("+", "")
    )


def _alternation(patterns: list[re.Pattern[str]]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns))


def _matches(desc: tuple[frozenset[int] | None, re.Pattern[str]] | None, nsn: str) -> bool:
    if desc is None:
        return False
    lengths, pattern = desc
    if lengths is not None and len(nsn) not in lengths:
        return False
    return pattern.fullmatch(nsn) is not None


class RegionFastPath:
    """to_e164 for one region's common phone shapes; calling it answers None for any other input."""

    def __init__(self, region: str) -> None:
        metadata = PhoneMetadata.metadata_for_region(region, None)
        if metadata is None or region not in phonenumbers.SUPPORTED_REGIONS:
            raise ValueError(f"no metadata for region {region!r}")
        self.region = region
        self.view = _MetadataView(metadata)
        self.country_code = metadata.country_code
        self.cc_str = str(self.country_code)
        idd = metadata.international_prefix
        self.idd = re.compile(idd) if idd is not None else None
        # parse() switches to the metadata of the calling code's main region once it has read a code.
        main_region = phonenumberutil.region_code_for_country_code(self.country_code)
        main = PhoneMetadata.metadata_for_region_or_calling_code(self.country_code, main_region)
        self.main_view = self.view if main is metadata else _MetadataView(main)
        # _extract_country_code takes the shortest known code: ours must not have a shorter one.
        self.plus_ok = not any(
            int(self.cc_str[:i]) in COUNTRY_CODE_TO_REGION_CODE for i in range(1, len(self.cc_str))
        )
        # is_valid_number: region_code_for_number picks among the regions sharing the calling code.
        regions = COUNTRY_CODE_TO_REGION_CODE[self.country_code]
        views = []
        for code in regions:
            meta = PhoneMetadata.metadata_for_region(code.upper(), None)
            if meta is None:
                continue
            views.append(
                self.view if meta is metadata else self.main_view if meta is main else _MetadataView(meta)
            )
        self.single_region = views[0] if len(regions) == 1 else None
        self.region_views = views

    def __call__(self, raw: str) -> Result | None:
        """to_e164(raw, region) for a non-blank ``raw`` of a common shape, else None."""
        if len(raw) > _MAX_FAST_INPUT or not raw.isascii():
            return None
        if raw.isdigit():
            digits, plus = raw, False
        else:
            shape = _SHAPE.fullmatch(raw)
            if shape is None:
                return None
            digits, plus = _digits_of_shape(raw), shape.group(1) is not None
        if len(digits) < _MIN_FAST_DIGITS:
            return None
        view = self.view
        cc = self.cc_str
        if plus:
            # _maybe_extract_country_code, FROM_NUMBER_WITH_PLUS_SIGN: only our own calling code.
            if not self.plus_ok or not digits.startswith(cc):
                return None
            national, view = digits[len(cc) :], self.main_view
        elif self.idd is not None and self.idd.match(digits):
            return None  # an IDD prefix (or what looks like one): the library decides
        else:
            national = digits
            if digits.startswith(cc):
                # FROM_DEFAULT_COUNTRY with the region's code written without "+".
                potential = view.strip_national_prefix(digits[len(cc) :])
                if (not view.general_match(digits) and view.general_match(potential)) or view.test_length(
                    digits
                ) == ValidationResult.TOO_LONG:
                    national, view = potential, self.main_view
        if len(national) < _MIN_LENGTH_FOR_NSN:
            return "", PHONE_UNPARSEABLE
        potential = view.strip_national_prefix(national)
        if view.test_length(potential) not in _KEEP_PREFIX:
            national = potential
        if len(national) > _MAX_LENGTH_FOR_NSN:
            return "", PHONE_UNPARSEABLE
        if len(national) < _MIN_LENGTH_FOR_NSN:  # cannot happen after a viable input (as in parse)
            return None
        return (f"+{cc}{national}", None) if self._valid(national) else ("", PHONE_INVALID)

    def _valid(self, nsn: str) -> bool:
        """is_valid_number for a number of our calling code (region_code_for_number, then its type)."""
        chosen = self.single_region
        if chosen is None:
            for candidate in self.region_views:
                if candidate.leading_digits is not None:
                    if candidate.leading_digits.match(nsn):
                        chosen = candidate
                        break
                elif candidate.has_type(nsn):
                    chosen = candidate
                    break
            else:
                return False
        if chosen.country_code != self.country_code:
            return False
        return chosen.has_type(nsn)


_CACHE: dict[str, RegionFastPath | None] = {}


def for_region(region: str) -> Callable[[str], Result | None] | None:
    """The region's fast path, built once per process; None if there is none (unknown region)."""
    try:
        return _CACHE[region]
    except KeyError:
        pass
    try:
        fast: RegionFastPath | None = RegionFastPath(region)
    except (ValueError, KeyError, IndexError, TypeError, re.error):
        fast = None
    _CACHE[region] = fast
    return fast
