"""Settings that change the transform apply to every row, and the date rule uses the pass's date.

Issue 14, item 1: a pass with another phone region re-transforms the rows that did not change, the
rollback compares rows as the cutover's run transformed them, and a backfill pass (an old logical
date) does not reject users born since that date.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import psycopg
import pytest
from support import fixture_users as fx
from support.pipeline import rejects, run_stages, snapshot

from user_migration.config import Settings, load_mapping
from user_migration.cutover import CutoverOptions, run_cutover
from user_migration.db import ensure_audit_schema
from user_migration.partition_copy import TRANSFORM_CHANGED, copy_partition
from user_migration.rollback import carry_back
from user_migration.schema import apply_schema

NP = Settings(partitions=3, batch_size=5)
IN = Settings(partitions=3, batch_size=5, phone_region="IN")


def phones(dsn: str) -> dict[int, str]:
    return {user[0]: user[8] for user in snapshot(dsn)["users"]}


def test_a_pass_with_another_phone_region_retransforms_unchanged_rows(legacy, backup_dir):
    run_stages(legacy, legacy, NP, "np", backup_dir)
    assert phones(legacy)[1] == "+9779841234567"

    second = run_stages(legacy, legacy, IN, "in", backup_dir)
    # No legacy row changed, yet every migrated row with a local number now has IN's form.
    got = phones(legacy)
    assert got[1] == "+919841234567" and got[27] == "+919801234567"
    assert got[2] == "+9779851234567"  # written with its country code: the region does not apply
    assert {p["path"] for p in second["partition_results"]} == {"merge"}
    assert {p["full_because"] for p in second["partition_results"]} == {TRANSFORM_CHANGED}
    assert second["migrated"] + second["rejected"] == len(fx.ROWS)
    with psycopg.connect(legacy) as conn:
        assert conn.execute(
            "SELECT DISTINCT transform_settings FROM migration_audit.source_state"
        ).fetchall() == [(IN.transform_fingerprint(),)]

    # The next pass with the same settings reads the change log again, and a scheduled run with the
    # old region re-transforms every row back: whichever settings ran last hold for every row.
    third = run_stages(legacy, legacy, IN, "in-again", backup_dir)
    assert {p["path"] for p in third["partition_results"]} == {"log"}
    assert (third["inserted"], third["updated"], third["removed"]) == (0, 0, 0)
    back = run_stages(legacy, legacy, NP, "np-again", backup_dir)
    assert {p["full_because"] for p in back["partition_results"]} == {TRANSFORM_CHANGED}
    assert phones(legacy)[1] == "+9779841234567"


def test_invalid_phone_and_mapping_are_transform_settings(legacy, backup_dir):
    run_stages(legacy, legacy, NP, "fix", backup_dir)
    strict = Settings(partitions=3, batch_size=5, invalid_phone="reject")
    run_stages(legacy, legacy, strict, "reject", backup_dir)
    # Users 10 and 11 have unusable phones: migrated with an empty phone before, rejected now.
    assert rejects(legacy, "reject")[10][0] == "invalid_phone"
    assert 10 not in phones(legacy) and 11 not in phones(legacy)
    fingerprints = {
        NP.transform_fingerprint(),
        IN.transform_fingerprint(),
        strict.transform_fingerprint(),
        Settings(mapping=load_mapping({"schema": "legacy"})).transform_fingerprint(),
    }
    assert len(fingerprints) == 4
    assert Settings(batch_size=7, partitions=9).transform_fingerprint() == NP.transform_fingerprint()


def test_recorded_settings_round_trip():
    mapping = load_mapping(
        {"users_table": "users", "columns": {"is_staff": None}, "groups": None, "permissions": None}
    )
    recorded = Settings(phone_region="IN", invalid_phone="reject", mapping=mapping).public()
    got = Settings(batch_size=3).with_transform_of(recorded)
    assert (got.phone_region, got.invalid_phone, got.mapping, got.batch_size) == ("IN", "reject", mapping, 3)
    assert Settings().with_transform_of(Settings().public()).mapping == Settings().mapping


def test_the_rollback_compares_rows_as_the_cutover_run_transformed_them(legacy, backup_dir):
    result = run_stages(legacy, legacy, IN, "pass-in", backup_dir)
    with psycopg.connect(legacy) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) "
            "VALUES ('pass-in', 'every_source_row_accounted', %s)",
            (result["migrated"] + result["rejected"] == result["source_rows"],),
        )
    with psycopg.connect(legacy, autocommit=True) as conn:
        run_cutover(conn, conn, IN, "pass-in", dt.date.today(), "test", CutoverOptions())
    with psycopg.connect(legacy) as conn:  # the application, now on the new table
        conn.execute("UPDATE account_newuser SET full_name = 'Alice Renamed' WHERE id = 1")
    with psycopg.connect(legacy, autocommit=True) as conn:
        # The rollback DAG's own settings are the defaults (NP): the cutover run's IN must be used.
        carried = carry_back(conn, conn, NP, "test", "rollback-1")
    assert carried["updated"] == 1
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT full_name, phone_number FROM account_user WHERE id = 1").fetchone() == (
            "Alice Renamed",
            "9841234567",  # as the legacy table had it, not rewritten to +91...
        )
        assert conn.execute(
            "SELECT source_id, detail FROM migration_audit.rollback_rows WHERE action = 'update'"
        ).fetchall() == [(1, "full_name")]


def test_a_backfill_pass_does_not_reject_users_born_after_its_logical_date(legacy, monkeypatch):
    from user_migration.hooks import MigrationDbHook
    from user_migration.operators import MigrationPlanOperator

    logical = dt.datetime(2020, 1, 1, tzinfo=dt.UTC)
    born = dt.date.today() - dt.timedelta(days=400)  # after the logical date, before today
    with psycopg.connect(legacy) as conn:
        conn.execute(
            "INSERT INTO account_user (id, password, is_superuser, email, username, full_name, date_of_birth, "
            "phone_number, is_active, is_staff) VALUES (50, 'x', false, 'young@example.com', 'young', 'Young', "
            "%s, '', true, false)",
            (born,),
        )
    monkeypatch.setenv("AIRFLOW_CONN_LEGACY_DB", legacy)
    operator = MigrationPlanOperator(task_id="plan")
    operator._legacy_hook = MigrationDbHook("legacy_db")
    run_id = "backfill__2020-01-01T00:00:00+00:00"
    context = {
        "run_id": run_id,
        "logical_date": logical,
        "dag_run": SimpleNamespace(run_after=logical, run_type="backfill"),
    }
    with (
        psycopg.connect(legacy, autocommit=True) as target,
        psycopg.connect(legacy, autocommit=True) as source,
    ):
        ensure_audit_schema(target)
        apply_schema(target, run_id)
        partitions = operator.run(context, NP, target)
        for partition in partitions:
            copy_partition(source, target, NP, run_id, partition)
    assert 50 not in rejects(legacy, run_id), "rejected as born in the future"
    assert 50 in phones(legacy)
    assert {p["as_of"] for p in partitions} == {dt.datetime.now(dt.UTC).date().isoformat()}


def test_the_rollback_task_refuses_a_mapping_other_than_the_cutover_runs(legacy, backup_dir):
    from user_migration.config import ConfigError
    from user_migration.operators import RollbackOperator

    result = run_stages(legacy, legacy, IN, "pass-in", backup_dir)
    with psycopg.connect(legacy, autocommit=True) as conn:
        conn.execute(
            "INSERT INTO migration_audit.validation_results (run_id, expectation, success) "
            "VALUES ('pass-in', 'every_source_row_accounted', %s)",
            (result["migrated"] + result["rejected"] == result["source_rows"],),
        )
        run_cutover(conn, conn, IN, "pass-in", dt.date.today(), "test", CutoverOptions())
        params = {"confirm": "ROLLBACK", "action": "carry_back", "legacy_mapping": {"users_table": "users"}}
        context = {"params": params, "run_id": "rollback-1", "dag_run": SimpleNamespace()}
        mapping = load_mapping({"users_table": "users"})
        with pytest.raises(
            ConfigError, match="legacy_mapping differs from the mapping of cutover run 'pass-in'"
        ):
            RollbackOperator(task_id="rollback").run(context, Settings(mapping=mapping), conn)
        assert conn.execute("SELECT state FROM migration_audit.cutovers").fetchone() == ("active",)


# --- the rules' code and libraries are part of the transform settings -----------------------------

RULE_MODULES = ("transforms.py", "phone_fast.py", "phone_speedup.py")
# The code of the rule modules (comments and docstrings aside) that RULES_VERSION was last checked
# against. When test_a_change_to_the_rule_code_must_be_acknowledged fails: if the change can alter
# what any legacy row becomes, bump transforms.RULES_VERSION (the next pass re-transforms every row);
# either way, record the new digest and version here.
ACKNOWLEDGED_RULES = {
    "version": 1,
    "code": "b5e8419f1aa4d38890e6d2dea1847be171f742446eb6fa2699233f720d662d15",
}


def rules_code_digest(sources: list[str]) -> str:
    """sha256 of the modules' syntax trees without docstrings: an edit of a comment or a docstring
    keeps it, any change to the code changes it."""
    import ast
    import hashlib

    digest = hashlib.sha256()
    for source in sources:
        tree = ast.parse(source)
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (
                isinstance(body, list)
                and body
                and isinstance(body[0], ast.Expr)
                and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)
            ):
                node.body = body[1:] or [ast.Pass()]
        digest.update(ast.dump(tree).encode())
    return digest.hexdigest()


def rule_sources() -> list[str]:
    from pathlib import Path

    import user_migration

    folder = Path(user_migration.__file__).parent
    return [(folder / name).read_text() for name in RULE_MODULES]


def test_a_change_to_the_rule_code_must_be_acknowledged():
    from user_migration import transforms

    sources = rule_sources()
    # The digest sees code, not prose: proven on the modules themselves.
    commented = [s.replace("\nRULES_VERSION = ", "\n# a new comment\nRULES_VERSION = ", 1) for s in sources]
    assert rules_code_digest(commented) == rules_code_digest(sources)
    changed = [s.replace("MAX_LENGTH = {", "MAX_LENGTH = {'extra': 1, ", 1) for s in sources]
    assert rules_code_digest(changed) != rules_code_digest(sources)

    found = {"version": transforms.RULES_VERSION, "code": rules_code_digest(sources)}
    assert found == ACKNOWLEDGED_RULES, (
        f"the transform rule code changed ({', '.join(RULE_MODULES)}): if the change can alter what a "
        "legacy row becomes, bump transforms.RULES_VERSION so the next pass re-transforms every row; "
        f"then set ACKNOWLEDGED_RULES in this file to {found}"
    )


def test_other_rules_or_library_versions_change_the_transform_fingerprint(monkeypatch):
    import email_validator
    import phonenumbers

    from user_migration import transforms

    seen = {NP.transform_fingerprint()}
    monkeypatch.setattr(phonenumbers, "__version__", "0.0.1")
    seen.add(NP.transform_fingerprint())
    monkeypatch.setattr(email_validator, "__version__", "0.0.1")
    seen.add(NP.transform_fingerprint())
    monkeypatch.setattr(transforms, "RULES_VERSION", transforms.RULES_VERSION + 1)
    seen.add(NP.transform_fingerprint())
    assert len(seen) == 4
