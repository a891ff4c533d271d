"""plan.DuplicateLedger: the on-disk ledger decides exactly as the rule says, across batch boundaries."""

from __future__ import annotations

import os
import random
import stat

from user_migration.plan import DuplicateLedger
from user_migration.transforms import DUPLICATE_EMAIL, DUPLICATE_USERNAME


def rule(candidates: list[tuple[int, str, str]]) -> list[tuple[int, str, int]]:
    """The rule, in memory: in id order, a row loses to the earlier winner of its email key, else of
    its username; a winner claims both; a loser claims nothing."""
    emails: dict[str, int] = {}
    usernames: dict[str, int] = {}
    losers = []
    for row_id, email, username in candidates:
        if email in emails:
            losers.append((row_id, DUPLICATE_EMAIL, emails[email]))
        elif username in usernames:
            losers.append((row_id, DUPLICATE_USERNAME, usernames[username]))
        else:
            emails[email] = usernames[username] = row_id
    return losers


def decide(candidates: list[tuple[int, str, str]], batch: int) -> list[tuple[int, str, int]]:
    with DuplicateLedger() as ledger:
        for start in range(0, len(candidates), batch):
            ledger.decide(candidates[start : start + batch])
        got = [(d.source_id, d.reason, d.kept_id) for d in ledger]
        assert ledger.losers == len(got)
    return got


def test_a_loser_claims_nothing_even_in_a_later_batch():
    candidates = [
        (1, "a@x.org", "ann"),
        (2, "b@x.org", "ann"),  # loses by username: b@x.org stays free
        (3, "b@x.org", "bob"),  # so this one wins it
        (4, "a@x.org", "cat"),  # loses by email to 1
        (5, "c@x.org", "bob"),  # loses by username to 3
    ]
    expected = [(2, DUPLICATE_USERNAME, 1), (4, DUPLICATE_EMAIL, 1), (5, DUPLICATE_USERNAME, 3)]
    for batch in (1, 2, 3, 5):
        assert decide(candidates, batch) == expected, batch


def test_random_candidates_match_the_rule_for_any_batch_size():
    rnd = random.Random(7)
    emails = [f"user{i}@example.org" for i in range(300)] + ["ünï@exämple.org", "😀@x.org", 'q"\\@x']
    names = [f"name{i}" for i in range(300)] + ["Ünï", "名前"]
    ids = sorted(rnd.sample(range(1, 100_000), 2_000))
    candidates = [(i, rnd.choice(emails), rnd.choice(names)) for i in ids]
    expected = rule(candidates)
    assert len(expected) > 1_000  # the sample is dense in duplicates of both kinds
    assert {reason for _, reason, _ in expected} == {DUPLICATE_EMAIL, DUPLICATE_USERNAME}
    for batch in (1, 7, 500, 10_000):
        assert decide(candidates, batch) == expected, batch


def test_the_ledger_is_private_and_removed():
    ledger = DuplicateLedger()
    folder = ledger._folder
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700  # it holds emails and usernames
    ledger.decide([(1, "a@x.org", "ann")])
    ledger.close()
    assert not os.path.exists(folder)
