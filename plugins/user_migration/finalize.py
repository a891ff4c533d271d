"""After the copy: deferred indexes built, profiles for migrated users, id sequences past the copied ids."""

from __future__ import annotations

import datetime as dt

import psycopg

from user_migration import deferred_indexes
from user_migration.config import Settings
from user_migration.db import read_sql


def init_profiles(target: psycopg.Connection) -> dict[str, object]:
    """Create the missing profiles and advance sequences in one transaction; idempotent."""
    now = dt.datetime.now(dt.UTC)
    with target.transaction():
        created = target.execute(read_sql("finalize/create_profiles.sql"), {"now": now}).rowcount
        sequences = dict(target.execute(read_sql("finalize/advance_sequences.sql")).fetchall())
        profiles = target.execute("SELECT count(*) FROM account_profile").fetchone()[0]
    return {"profiles_created": created, "profiles_total": profiles, "sequences": sequences}


def finalize_target(
    source: psycopg.Connection, target: psycopg.Connection, settings: Settings
) -> dict[str, object]:
    """The step after every partition has copied: indexes a first load deferred, then profiles."""
    indexes = deferred_indexes.build(source, target, settings)
    return {"indexes": indexes, **init_profiles(target)}
