"""Differential check of the phone fast path: to_e164 must answer exactly as phonenumbers does.

Three sources of phones, all deterministic for a seed: the bench's phones (the shapes and shares of
tools/bench_seed.py's generator and of tools/seed_legacy.py), fuzzed strings built around each region's
calling code, prefixes and example numbers, and every region's example numbers in every format.
tests/test_phone_fast.py runs a few hundred thousand cases; this script runs millions:

``python tools/phone_fast_check.py [--fuzz 3000000] [--bench 1000000] [--regions NP,IN,US,GB,DE,BR]``
(``--regions all`` for every region phonenumbers supports). Prints counts only, never a phone.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO / "tools")]

import phonenumbers  # noqa: E402
import seed_legacy  # noqa: E402
from phonenumbers import PhoneNumberFormat, PhoneNumberType  # noqa: E402

from user_migration import transforms  # noqa: E402

DEFAULT_REGIONS = ("NP", "IN", "US", "GB", "DE", "BR", "CA", "AR", "IT", "KZ", "GG", "MX", "AU", "FI")
# The bench's valid NP mobile prefixes (tools/bench_seed.py NP_MOBILE_PREFIXES, kept in step by a test).
BENCH_NP_MOBILE_PREFIXES = ("980", "981", "982", "984", "985", "986")
NUMBER_TYPES = tuple(
    getattr(PhoneNumberType, name)
    for name in (
        "FIXED_LINE",
        "MOBILE",
        "TOLL_FREE",
        "PREMIUM_RATE",
        "SHARED_COST",
        "VOIP",
        "PERSONAL_NUMBER",
        "PAGER",
        "UAN",
        "VOICEMAIL",
    )
)
FORMATS = (
    PhoneNumberFormat.E164,
    PhoneNumberFormat.INTERNATIONAL,
    PhoneNumberFormat.NATIONAL,
    PhoneNumberFormat.RFC3966,
)
SEPARATORS = (" ", "-", ".", "(", ")", ") ", " (", "  ", "--", "- ")
ODD = ("/", "x", "+", "\t", "٣", "９", " ext ", "#", ",", ";", "*", "~", "_", "a", "/x", "++", "\n")


def bench_phones(count: int, seed: int = 42) -> list[str]:
    """Phones as the bench and seed_legacy make them: NP mobiles in 4 styles, junk and blanks."""
    rng = random.Random(seed)
    junk_share = seed_legacy.DIRTY["junk_phone"]
    blank_share = seed_legacy.DIRTY["blank_phone"]
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < junk_share:
            out.append(rng.choice(seed_legacy.JUNK_PHONES))
        elif roll < junk_share + blank_share:
            out.append("")
        elif rng.random() < 0.5:
            out.append(seed_legacy._phone(rng))  # seed_legacy's own generator (wider prefixes)
        else:  # tools/bench_seed.py's SQL: a valid prefix, 7 digits, one of the same 4 styles
            number = f"{rng.choice(BENCH_NP_MOBILE_PREFIXES)}{rng.randrange(10**7):07d}"
            style = rng.randrange(4)
            out.append(
                (
                    number,
                    f"+977{number}",
                    f"{number[:3]}-{number[3:6]}-{number[6:]}",
                    f"{number[:4]} {number[4:]}",
                )[style]
            )
    return out


def example_numbers(region: str) -> list[str]:
    """The region's example numbers of every type, in every format, some with an extension."""
    out = []
    for kind in NUMBER_TYPES:
        number = phonenumbers.example_number_for_type(region, kind)
        if number is None:
            continue
        for style in FORMATS:
            out.append(phonenumbers.format_number(number, style))
        national = phonenumbers.format_number(number, PhoneNumberFormat.NATIONAL)
        out.append(national + " ext. 12")
        out.append(phonenumbers.national_significant_number(number))
    return out


def _digit_seeds(region: str) -> list[str]:
    """National significant numbers of the region and of the regions sharing its calling code."""
    code = phonenumbers.country_code_for_region(region)
    seeds = []
    for other in phonenumbers.COUNTRY_CODE_TO_REGION_CODE.get(code, (region,)):
        for kind in NUMBER_TYPES:
            number = phonenumbers.example_number_for_type(other, kind)
            if number is not None:
                seeds.append(phonenumbers.national_significant_number(number))
    return seeds or ["123456789"]


def _mutate(rng: random.Random, digits: str) -> str:
    kind = rng.random()
    if kind < 0.35:
        return digits
    if kind < 0.6:  # change a few digits
        chars = list(digits)
        for _ in range(rng.randint(1, 3)):
            if chars:
                chars[rng.randrange(len(chars))] = rng.choice("0123456789")
        return "".join(chars)
    if kind < 0.75:  # drop or add digits at either end
        if rng.random() < 0.5:
            return digits[: max(0, len(digits) - rng.randint(1, 3))]
        return digits + "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 3)))
    if kind < 0.85:
        return digits[rng.randint(1, 3) :]
    return "".join(rng.choice("0123456789") for _ in range(rng.randint(0, 18)))


def _punctuate(rng: random.Random, text: str) -> str:
    """Separators between digits, now and then an odd character; mostly shapes the fast path takes."""
    if not text or rng.random() < 0.35:
        return text
    chars = []
    for i, ch in enumerate(text):
        if i and rng.random() < 0.2:
            chars.append(rng.choice(SEPARATORS))
        chars.append(ch)
    if rng.random() < 0.08:
        chars.insert(rng.randint(0, len(chars)), rng.choice(ODD))
    if rng.random() < 0.1:
        chars.insert(0, rng.choice((" ", "(", "-", ".", " (", "( ")))
    if rng.random() < 0.1:
        chars.append(rng.choice((" ", ")", "-", ".", ". ")))
    return "".join(chars)


def fuzz_phones(region: str, count: int, seed: int = 20261129) -> list[str]:
    """Strings around ``region``'s numbers: own and other calling codes, IDD, national prefixes."""
    rng = random.Random(f"{seed}:{region}")
    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region)
    cc = str(metadata.country_code)
    national_prefix = metadata.national_prefix or "0"
    idd = "00" if not metadata.international_prefix else rng.choice(("00", "011", "0011", "810"))
    seeds = _digit_seeds(region)
    prefixes = (
        ("", 30),
        ("+" + cc, 15),
        (cc, 10),
        (national_prefix, 10),
        ("+" + cc + national_prefix, 4),
        (cc + national_prefix, 4),
        ("+", 4),
        (idd + cc, 4),
        ("00", 2),
        ("+1", 2),
        ("+44", 2),
        ("+977", 2),
        ("+91", 2),
        ("+" + cc + cc, 2),
        ("0" + cc, 2),
        ("+0", 1),
        ("+(" + cc + ")", 2),
        ("+ " + cc, 2),
    )
    choices, weights = zip(*prefixes, strict=True)
    out = []
    for _ in range(count):
        digits = _mutate(rng, rng.choice(seeds))
        text = _punctuate(rng, rng.choices(choices, weights)[0] + digits)
        out.append(text if text.strip() else text + rng.choice("0123456789"))
    return out


def compare(phones: list[str], region: str) -> tuple[int, Counter, list[str]]:
    """(cases, outcome counts, mismatching inputs) of to_e164 against the library on ``phones``."""
    outcomes: Counter = Counter()
    bad = []
    fast = transforms.phone_fast.for_region(region)
    for phone in phones:
        got = transforms.to_e164(phone, region)
        want = transforms._to_e164_fully(phone, region) if phone.strip() else ("", None)
        if got != want:
            bad.append(phone)
        taken = fast is not None and phone.strip() and fast(phone) is not None
        outcomes[("fast" if taken else "library", got[1] or "valid")] += 1
    return len(phones), outcomes, bad


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz", type=int, default=3_000_000, help="fuzzed strings in all, over the regions")
    parser.add_argument("--bench", type=int, default=1_000_000, help="bench phones (region NP)")
    parser.add_argument("--regions", default=",".join(DEFAULT_REGIONS), help="comma-separated, or 'all'")
    parser.add_argument("--seed", type=int, default=20261129)
    args = parser.parse_args(argv)
    regions = (
        sorted(phonenumbers.SUPPORTED_REGIONS) if args.regions == "all" else args.regions.upper().split(",")
    )
    started = time.perf_counter()
    failures = 0
    cases, outcomes, bad = compare(bench_phones(args.bench, args.seed), "NP")
    failures += len(bad)
    print(f"bench NP: {cases} cases, {len(bad)} mismatches, {dict(outcomes)}")
    total_examples = 0
    examples = {r: example_numbers(r) for r in sorted(phonenumbers.SUPPORTED_REGIONS)}
    others = [p for r in DEFAULT_REGIONS for p in examples[r]]  # read as numbers of every region
    for region in sorted(phonenumbers.SUPPORTED_REGIONS):
        cases, _, bad = compare(examples[region] + others, region)
        total_examples += cases
        failures += len(bad)
    print(f"examples: {total_examples} cases over {len(phonenumbers.SUPPORTED_REGIONS)} regions")
    per_region = max(1, args.fuzz // len(regions))
    for region in regions:
        cases, outcomes, bad = compare(fuzz_phones(region, per_region, args.seed), region)
        failures += len(bad)
        fast = sum(n for (path, _), n in outcomes.items() if path == "fast")
        print(f"fuzz {region}: {cases} cases, {len(bad)} mismatches, {fast} on the fast path")
    print(f"{failures} mismatches in all, {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
