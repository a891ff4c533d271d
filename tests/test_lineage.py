"""Lineage: the tables each task names for OpenLineage, without a scheduler or a database.

The DAG run that proves the events reach an OpenLineage transport is in tests/test_e2e_dag.py
(test_dag_migrates_the_fixture_exactly_and_leaves_an_audit_trail).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from user_migration.config import Settings, load_mapping
from user_migration.hooks import MigrationDbHook
from user_migration.lineage import LINEAGE, Table, location, namespace, table, task_tables

REPO = Path(__file__).resolve().parent.parent
LEGACY = {"host": "legacy.internal", "port": 5433, "user": "mig", "password": "s3cret", "dbname": "shop"}
TARGET = {"host": "target.internal", "port": 5432, "user": "mig", "password": "s3cret", "dbname": "accounts"}


def names(tables: list[Table]) -> list[str]:
    return [f"{t.namespace}/{t.name}" for t in tables]


def test_postgres_naming_host_port_then_database_schema_table():
    assert table(LEGACY, "public", "account_user") == Table(
        "postgres://legacy.internal:5433", "shop.public.account_user"
    )
    # Defaults as libpq has them; a socket directory is the local machine; a multi-host DSN its first host.
    assert location({}) == ("localhost", 5432, "postgres")
    assert namespace({"host": "/var/run/postgresql", "port": 5432}) == "postgres://localhost:5432"
    assert namespace({"host": "a.db, b.db", "port": "5433,5434"}) == "postgres://a.db:5433"


def test_copy_reads_the_legacy_tables_and_writes_the_new_ones_and_the_audit_trail():
    inputs, outputs = task_tables("copy", load_mapping(), LEGACY, TARGET)
    assert names(inputs)[:3] == [
        "postgres://legacy.internal:5433/shop.public.account_user",
        "postgres://legacy.internal:5433/shop.public.account_user_groups",
        "postgres://legacy.internal:5433/shop.public.account_user_user_permissions",
    ]
    assert "postgres://target.internal:5432/accounts.migration_audit.plans" in names(inputs)
    assert names(outputs)[:3] == [
        "postgres://target.internal:5432/accounts.public.account_newuser",
        "postgres://target.internal:5432/accounts.public.account_newuser_groups",
        "postgres://target.internal:5432/accounts.public.account_newuser_user_permissions",
    ]
    assert "postgres://target.internal:5432/accounts.migration_audit.rejected_rows" in names(outputs)


def test_legacy_names_follow_the_mapping_and_skip_unmapped_link_tables():
    mapping = load_mapping({"schema": "legacy", "users_table": "people", "groups": None})
    inputs, _ = task_tables("backup", mapping, LEGACY, TARGET)
    assert [t.name for t in inputs] == ["shop.legacy.people", "shop.legacy.account_user_user_permissions"]
    # The rollback writes them back.
    _, outputs = task_tables("rollback", mapping, LEGACY, TARGET)
    assert "shop.legacy.people" in [t.name for t in outputs]


def test_a_dry_run_writes_only_the_audit_trail():
    _, outputs = task_tables("copy", load_mapping(), LEGACY, TARGET, dry_run=True)
    assert outputs and all(".migration_audit." in t.name for t in outputs)


def test_every_kind_names_tables_without_credentials():
    for kind in LINEAGE:
        inputs, outputs = task_tables(kind, load_mapping(), LEGACY, TARGET)
        assert inputs or outputs, kind
        text = repr(inputs + outputs)
        assert "s3cret" not in text and "mig@" not in text
    with pytest.raises(KeyError, match="no lineage for operator kind 'nope'"):
        task_tables("nope", load_mapping(), LEGACY, TARGET)


def _operator(cls, **kwargs):
    operator = cls(task_id=cls.lineage_kind, **kwargs)
    operator._settings = Settings(mapping=load_mapping())
    operator._legacy_hook = MigrationDbHook("legacy_db")
    operator._legacy_hook._params = dict(LEGACY)
    operator._target_hook = MigrationDbHook("target_db")
    operator._target_hook._params = dict(TARGET)
    return operator


def test_operators_report_openlineage_datasets_on_complete():
    from openlineage.client.event_v2 import Dataset

    from user_migration import operators as ops

    copy = _operator(ops.PartitionCopyOperator, partition={"lo": 1, "hi": 10})
    lineage = copy.get_openlineage_facets_on_complete(None)
    assert lineage.inputs[0] == Dataset(
        namespace="postgres://legacy.internal:5433", name="shop.public.account_user"
    )
    assert Dataset(namespace="postgres://target.internal:5432", name="accounts.public.account_newuser") in (
        lineage.outputs
    )
    validate = _operator(ops.GreatExpectationsValidationOperator)
    outputs = validate.get_openlineage_facets_on_complete(None).outputs
    assert [d.name for d in outputs] == ["accounts.migration_audit.validation_results"]
    # Skipped (a cutover not requested), or never configured: no tables.
    cutover = _operator(ops.CutoverOperator)
    cutover._skipped = True
    assert cutover.get_openlineage_facets_on_complete(None).outputs == []
    report = ops.MigrationReportOperator(task_id="report")
    assert report.get_openlineage_facets_on_complete(None).inputs == []
    for cls in (
        ops.LegacyBackupOperator,
        ops.TargetSchemaOperator,
        ops.MigrationPlanOperator,
        ops.FinalizeTargetOperator,
        ops.MigrationReportOperator,
        ops.RollbackOperator,
    ):
        assert cls.lineage_kind in LINEAGE


def test_parsing_the_dag_does_not_import_openlineage():
    code = (
        "import json, runpy, sys; runpy.run_path('dags/user_migration_dag.py');"
        "print(json.dumps(sorted(m for m in sys.modules if 'openlineage' in m)))"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "plugins"), str(REPO)])}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stderr[-2000:]
    loaded = json.loads(done.stdout.strip().splitlines()[-1])
    # Airflow's provider registry reads the provider's get_provider_info; nothing else of it is loaded.
    assert [m for m in loaded if not m.endswith(("openlineage", "get_provider_info"))] == []
