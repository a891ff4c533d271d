"""Shared fixtures: one real PostgreSQL server per test session, a fresh database per test.

The server is the embedded one (tools/embedded_pg.py) unless TEST_PG_DSN names another server
(e.g. Debian's PostgreSQL 15 for a compatibility run); nothing here is mocked.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import embedded_pg
import psycopg
import pytest
from psycopg import sql
from support import fixture_users as fx
from support.db import uri_for

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """DSN of a PostgreSQL server for this session (the maintenance database)."""
    external = os.environ.get("TEST_PG_DSN")
    if external:
        yield external
        return
    base = Path(tempfile.mkdtemp(prefix="umt-", dir="/tmp"))
    try:
        yield embedded_pg.start(base)
    finally:
        embedded_pg.stop(base)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def make_db(pg_server: str) -> Iterator[Callable[[str], str]]:
    """Factory of fresh, empty databases; each is dropped after the test. Returns a postgresql:// URI."""
    created: list[str] = []

    def make(prefix: str = "t") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(pg_server, autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        created.append(name)
        return uri_for(pg_server, name)

    yield make
    with psycopg.connect(pg_server, autocommit=True) as conn:
        for name in created:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@pytest.fixture
def legacy(make_db, request: pytest.FixtureRequest) -> str:
    """A fresh database holding the legacy fixture users (support/fixture_users.py), named after the module."""
    dsn = make_db(request.module.__name__.rpartition(".")[2].removeprefix("test_"))
    fx.load(dsn)
    return dsn


@pytest.fixture
def backup_dir(tmp_path: Path) -> Path:
    return tmp_path / "backups"


@pytest.fixture(scope="session")
def scratch_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="umx-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)
