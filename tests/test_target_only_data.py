"""Data that lives only in the target survives passes (issue 14, item 3).

A pass that moves a still-valid user out of another user's way used to delete it and let its own
partition insert it again; ON DELETE CASCADE took its profile bio, addresses, activity and
notifications with it.
"""

from __future__ import annotations

import psycopg
from support import fixture_users as fx
from support.pipeline import run_stages, snapshot

from user_migration.config import Settings

SETTINGS = Settings(partitions=2, batch_size=5)
TAKER, HOLDER = 1, 27  # in partitions 0 and 1


def test_a_displaced_holder_keeps_its_profile_and_addresses(legacy, backup_dir):
    first = run_stages(legacy, legacy, SETTINGS, "first", backup_dir)
    ranges = [(p["lo"], p["hi"]) for p in first["partition_list"]]
    assert [lo <= TAKER <= hi for lo, hi in ranges] == [True, False]
    assert [lo <= HOLDER <= hi for lo, hi in ranges] == [False, True]
    with psycopg.connect(legacy) as conn:
        # The application (after a rollback, or a target used early) wrote data only the target has.
        conn.execute(
            "UPDATE account_profile SET bio = 'likes ' || user_id, avatar = 'a.png' WHERE user_id IN (%s, %s)",
            (TAKER, HOLDER),
        )
        conn.execute(
            "INSERT INTO address_address (user_id, street_address, city, state, postal_code, country) "
            "VALUES (%s, 'Main St 1', 'Kathmandu', 'Bagmati', 44600, 'NP')",
            (HOLDER,),
        )
        held = conn.execute("SELECT email FROM account_newuser WHERE id = %s", (HOLDER,)).fetchone()[0]
        # In the legacy table the holder moves to a new address and the taker takes its old one.
        conn.execute("UPDATE account_user SET email = 'moved@example.com' WHERE id = %s", (HOLDER,))
        conn.execute("UPDATE account_user SET email = %s WHERE id = %s", (held, TAKER))

    second = run_stages(legacy, legacy, SETTINGS, "second", backup_dir)  # the taker's partition first
    with psycopg.connect(legacy) as conn:
        assert conn.execute(
            "SELECT id, email FROM account_newuser WHERE id IN (%s, %s) ORDER BY id", (TAKER, HOLDER)
        ).fetchall() == [(TAKER, held), (HOLDER, "moved@example.com")]
        assert conn.execute(
            "SELECT user_id, bio, avatar FROM account_profile WHERE user_id IN (%s, %s) ORDER BY 1",
            (TAKER, HOLDER),
        ).fetchall() == [(TAKER, f"likes {TAKER}", "a.png"), (HOLDER, f"likes {HOLDER}", "a.png")]
        assert conn.execute("SELECT city FROM address_address WHERE user_id = %s", (HOLDER,)).fetchall() == [
            ("Kathmandu",)
        ]
        assert conn.execute(
            "SELECT count(*) FROM account_newuser_groups WHERE newuser_id = %s", (HOLDER,)
        ).fetchone()[0] == sum(1 for link in fx.MIGRATED_GROUP_LINKS if link[1] == HOLDER)
    assert second["migrated"] + second["rejected"] == len(fx.ROWS)
    # User 3 had lost the taker's old email as a duplicate; now free, it takes it: the taker is a
    # holder too, and moves once the holder has moved out of its way.
    assert [p["holders_updated"] for p in second["partition_results"]] == [2, 0]
    assert [p["displaced"] for p in second["partition_results"]] == [0, 0]
    assert 3 in {row[0] for row in snapshot(legacy)["users"]}
    assert (second["inserted"], second["drift_repaired"]) == (1, 0)  # user 3
