"""Versioned DDL for the target schema: include/sql/target/NNN_name.sql, applied once each.

Every pending file is applied in one transaction under an advisory lock and recorded in
migration_audit.schema_migrations with its sha256, so a second run is a no-op and an applied file
that was edited afterwards is refused instead of silently diverging.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import psycopg

from user_migration.db import SQL_DIR, MigrationError

TARGET_DDL_DIR = SQL_DIR / "target"
_VERSIONED = re.compile(r"^(\d{3})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class SchemaChange:
    version: str
    name: str
    path: Path
    sha256: str


def schema_changes(folder: Path = TARGET_DDL_DIR) -> list[SchemaChange]:
    changes = []
    for path in sorted(folder.glob("*.sql")):
        match = _VERSIONED.match(path.name)
        if not match:
            raise MigrationError(f"{path} is not named NNN_description.sql; rename it")
        changes.append(
            SchemaChange(match.group(1), match.group(2), path, hashlib.sha256(path.read_bytes()).hexdigest())
        )
    return changes


def apply_schema(conn: psycopg.Connection, run_id: str, folder: Path = TARGET_DDL_DIR) -> list[str]:
    """Apply the pending schema changes; returns the versions applied now (empty when up to date)."""
    applied_now: list[str] = []
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('user_migration.schema'))")
        done = dict(conn.execute("SELECT version, sha256 FROM migration_audit.schema_migrations").fetchall())
        for change in schema_changes(folder):
            if change.version in done:
                if done[change.version] != change.sha256:
                    raise MigrationError(
                        f"schema change {change.path.name} was edited after it was applied "
                        f"(sha256 {done[change.version][:12]}… then, {change.sha256[:12]}… now); "
                        "add a new NNN_*.sql file instead of editing an applied one"
                    )
                continue
            conn.execute(change.path.read_text())
            conn.execute(
                "INSERT INTO migration_audit.schema_migrations (version, name, sha256, applied_by) "
                "VALUES (%s, %s, %s, %s)",
                (change.version, change.name, change.sha256, run_id),
            )
            applied_now.append(change.version)
    return applied_now
