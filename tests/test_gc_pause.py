"""The copy runs with Python's cyclic collector paused, and gives it back as it was, on a real
PostgreSQL: during every batch of a partition the collector is off; after the partition, done or
failed, it is on again (or still off, when the caller had turned it off).
"""

from __future__ import annotations

import gc

import psycopg
import pytest
from support import fixture_users as fx
from support.fault_tools import RUN, assert_fixture_outcome, finish_run, nothing_committed, prepare_run

from user_migration import partition_copy
from user_migration.config import Settings
from user_migration.errors import MigrationError
from user_migration.gc_pause import cyclic_gc_paused
from user_migration.partition_copy import copy_partition

SETTINGS = Settings(partitions=2, batch_size=3, batch_seconds=0)


@pytest.fixture
def legacy(make_db) -> str:
    dsn = make_db("gcp")
    fx.load(dsn)
    return dsn


@pytest.fixture(autouse=True)
def collector_on():
    gc.enable()
    yield
    gc.enable()


def test_the_collector_is_off_inside_and_as_it_was_after(legacy, backup_dir, monkeypatch):
    seen: list[bool] = []
    monkeypatch.setattr(partition_copy, "batch_read", lambda batch_no, rows: seen.append(gc.isenabled()))
    partitions = prepare_run(legacy, legacy, SETTINGS, RUN, backup_dir)
    finish_run(legacy, SETTINGS, partitions)
    assert len(seen) >= 4 and not any(seen), seen  # every batch of both partitions
    assert gc.isenabled()
    assert_fixture_outcome(legacy, RUN)


def test_a_failed_partition_gives_the_collector_back(legacy, backup_dir, monkeypatch):
    def fail(batch_no: int, rows: list[tuple]) -> None:
        if batch_no == 1:
            raise RuntimeError("the legacy server went away")

    monkeypatch.setattr(partition_copy, "batch_read", fail)
    partitions = prepare_run(legacy, legacy, SETTINGS, RUN, backup_dir)
    with (
        psycopg.connect(legacy, autocommit=True) as source,
        psycopg.connect(legacy, autocommit=True) as target,
        pytest.raises(MigrationError, match="partition 0 .* failed: RuntimeError"),
    ):
        copy_partition(source, target, SETTINGS, RUN, partitions[0])
    assert gc.isenabled()
    assert set(nothing_committed(legacy, partitions[0]).values()) == {0}


def test_a_collector_the_caller_turned_off_stays_off():
    gc.disable()
    with cyclic_gc_paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(ValueError), cyclic_gc_paused():
        raise ValueError("inside")
    assert gc.isenabled()
