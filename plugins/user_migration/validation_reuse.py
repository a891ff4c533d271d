"""Run the Great Expectations suite only when the target may have changed since a suite passed.

The suite's outcomes are a function of the checked tables' rows, their columns and the suite itself
(its checks and the expected number of users). Statement-level triggers on the checked tables note
every statement that changed rows, whoever ran it (include/sql/validation/install_write_triggers.sql),
so a pass that changed nothing (a quiet pass) can prove that the target is what an earlier passing
suite saw, and take over its outcomes instead of reading every table again. Every run records in
migration_audit.suite_runs which state it validated, whether the suite ran, and why not.

What it cannot see, as with the legacy change capture (docs/decisions/0001-change-capture-with-triggers.md):
a write triggers do not fire for (session_replication_role = replica, which needs a superuser) or a
trigger disabled and enabled again between two passes. A missing or disabled trigger is seen, and
the suite runs; Param full_reconcile runs it in any case; the cutover verifies the target in full.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from user_migration.db import read_sql
from user_migration.validation import PHONE_REGEX, REQUIRED_TABLES, ExpectationOutcome, _plan, validate_target

TRIGGER_EVENTS = ("insert", "update", "delete", "truncate")
TRIGGERS = len(TRIGGER_EVENTS) * len(REQUIRED_TABLES)


@dataclass(frozen=True)
class SuiteResult:
    outcomes: list[ExpectationOutcome]
    ran: bool
    basis_run: str | None  # the run whose suite ran on this state, when this one took it over
    note: str
    seconds: float


def install_write_triggers(target: psycopg.Connection) -> bool:
    """Put the write triggers on the checked tables, unless all are there and enabled; returns whether
    they are in place. (Re)installing notes a write, so no earlier suite is taken over: while a
    trigger was missing or disabled, writes may have gone unnoted. False when this role may not."""
    if _basis(target)["triggers"] == TRIGGERS:
        return True
    try:
        with target.transaction():
            for table in REQUIRED_TABLES:
                target.execute(
                    sql.SQL(read_sql("validation/install_write_triggers.sql")).format(
                        table=sql.Identifier(table)
                    )
                )
            target.execute(
                "INSERT INTO migration_audit.target_writes (table_name, op) VALUES ('*', 'TRIGGERS INSTALLED')"
            )
    except psycopg.errors.InsufficientPrivilege:
        return False
    return True


def note_write(target: psycopg.Connection, op: str) -> None:
    """Note a write the triggers may not see (the application's, between a cutover and a rollback):
    no suite is taken over across it, whatever state the triggers are left in."""
    target.execute("INSERT INTO migration_audit.target_writes (table_name, op) VALUES ('*', %s)", (op,))


def disable_write_triggers(target: psycopg.Connection) -> None:
    """After the cutover the application writes the new tables: nothing is validated any more, and its
    writes should not pay for a note each. In the caller's transaction (SHARE ROW EXCLUSIVE locks),
    before it writes the tables: ALTER TABLE refuses a table with deferred constraint checks pending.
    A cutover that does not commit leaves them enabled; one whose legacy side then fails (abandoned)
    leaves them disabled, and the next pass reinstalls them, so its suite runs."""
    for table in REQUIRED_TABLES:
        for event in TRIGGER_EVENTS:
            name = f"user_migration_writes_{event}"
            exists = target.execute(
                "SELECT EXISTS (SELECT 1 FROM pg_trigger WHERE tgrelid = to_regclass(%s) AND tgname = %s)",
                (table, name),
            ).fetchone()[0]
            if exists:
                target.execute(
                    sql.SQL("ALTER TABLE {} DISABLE TRIGGER {}").format(
                        sql.Identifier(table), sql.Identifier(name)
                    )
                )
    note_write(target, "CUTOVER")


def suite_fingerprint(expected_users: int) -> str:
    """The suite as it would run: every check's name, sentence and expected value, and the GX version."""
    from importlib.metadata import version

    checks = [
        [asset.name, asset.table, check.name, check.description, repr(check.expected)]
        for asset in _plan(expected_users)
        for check in asset.checks
    ]
    text = json.dumps([version("great_expectations"), PHONE_REGEX, checks])
    return hashlib.sha256(text.encode()).hexdigest()


def _basis(target: psycopg.Connection) -> dict[str, Any]:
    cur = target.execute(read_sql("validation/target_basis.sql"), {"tables": list(REQUIRED_TABLES)})
    names = [column.name for column in cur.description]
    return dict(zip(names, cur.fetchone(), strict=True))


def _why_it_runs(basis: dict[str, Any], last: tuple | None, force: bool) -> str:
    if force:
        return "suite run: full_reconcile requested"
    if basis["triggers"] != TRIGGERS:
        return (
            f"suite run: {basis['triggers']} of the {TRIGGERS} write triggers on the checked tables are in "
            "place and enabled, so a change to them could go unnoticed"
        )
    if last is None:
        return "suite run: no suite has passed on the target yet"
    run_id, seen = last
    if seen.get("writes") != basis["writes"]:
        return f"suite run: the target was written since run {run_id}'s suite passed"
    if seen.get("storage") != basis["storage"] or seen.get("columns") != basis["columns"]:
        return f"suite run: a checked table was rewritten or its columns changed since run {run_id}'s suite"
    return f"suite run: the suite or the expected number of users differs from run {run_id}'s"


def run_suite(
    target: psycopg.Connection,
    sqlalchemy_url: str,
    run_id: str,
    expected_users: int,
    *,
    force: bool = False,
    validate: Callable[..., list[ExpectationOutcome]] = validate_target,
) -> SuiteResult:
    """The suite's outcomes for the target as it is, run or taken over; recorded in suite_runs."""
    started = time.perf_counter()
    basis = {**_basis(target), "suite": suite_fingerprint(expected_users)}
    row = target.execute(
        "SELECT run_id, coalesce(basis_run, run_id), outcomes FROM migration_audit.suite_runs "
        "WHERE passed AND basis = %s AND run_id <> %s ORDER BY recorded_at DESC LIMIT 1",
        (Jsonb(basis), run_id),
    ).fetchone()
    if row is not None and not force and basis["triggers"] == TRIGGERS:
        seen_by, basis_run, stored = row
        outcomes = [ExpectationOutcome(**item) for item in stored]
        note = (
            f"suite not run: the target is as it was when run {basis_run}'s suite passed "
            f"(no write to the checked tables since, same columns and storage, same suite and expected users; "
            f"taken over via run {seen_by})"
            if seen_by != basis_run
            else f"suite not run: the target is as it was when run {basis_run}'s suite passed "
            "(no write to the checked tables since, same columns and storage, same suite and expected users)"
        )
        result = SuiteResult(outcomes, False, basis_run, note, round(time.perf_counter() - started, 3))
    else:
        last = target.execute(
            "SELECT run_id, basis FROM migration_audit.suite_runs WHERE passed AND run_id <> %s "
            "ORDER BY recorded_at DESC LIMIT 1",
            (run_id,),
        ).fetchone()
        note = _why_it_runs(basis, last, force)
        outcomes = validate(sqlalchemy_url, expected_users=expected_users)
        result = SuiteResult(outcomes, True, None, note, round(time.perf_counter() - started, 3))
    target.execute(
        "INSERT INTO migration_audit.suite_runs (run_id, basis, ran, basis_run, passed, outcomes, note, seconds) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (run_id) DO UPDATE SET basis = EXCLUDED.basis, "
        "ran = EXCLUDED.ran, basis_run = EXCLUDED.basis_run, passed = EXCLUDED.passed, outcomes = EXCLUDED.outcomes, "
        "note = EXCLUDED.note, seconds = EXCLUDED.seconds, recorded_at = clock_timestamp()",
        (
            run_id,
            Jsonb(basis),
            result.ran,
            result.basis_run,
            all(o.success for o in result.outcomes),
            Jsonb([dataclasses.asdict(o) for o in result.outcomes]),
            result.note,
            result.seconds,
        ),
    )
    return result
