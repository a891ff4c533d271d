"""Settings and mapping: bad input is refused with a sentence that names the setting."""

from __future__ import annotations

import json

import pytest

from user_migration import setting_specs
from user_migration.config import (
    BACKUP_DIR_ENV,
    MAPPING_FILE_ENV,
    ConfigError,
    Settings,
    backup_root,
    load_mapping,
)


def test_defaults_match_the_django_legacy_schema():
    mapping = load_mapping()
    assert (mapping.schema, mapping.users_table) == ("public", "account_user")
    assert mapping.column("date_of_birth") == "date_of_birth"
    assert mapping.groups.table == "account_user_groups"
    assert mapping.permissions.other_column == "permission_id"


def test_overrides_merge_over_the_shipped_mapping():
    mapping = load_mapping(
        {"users_table": "users", "columns": {"date_of_birth": "dob", "phone_number": "ph_number"}}
    )
    assert mapping.users_table == "users"
    assert (mapping.column("date_of_birth"), mapping.column("phone_number")) == ("dob", "ph_number")
    assert mapping.column("email") == "email"


def test_mapping_file_from_environment(tmp_path, monkeypatch):
    path = tmp_path / "mapping.json"
    path.write_text(json.dumps({"users_table": "people", "groups": None}))
    monkeypatch.setenv(MAPPING_FILE_ENV, str(path))
    mapping = load_mapping()
    assert mapping.users_table == "people" and mapping.groups is None
    monkeypatch.setenv(MAPPING_FILE_ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="is not a file"):
        load_mapping()
    monkeypatch.setenv(MAPPING_FILE_ENV, "mapping.json")  # each Celery worker has its own working folder
    with pytest.raises(ConfigError, match="must be an absolute path"):
        load_mapping()


def test_backup_folder_must_be_absolute(tmp_path, monkeypatch):
    monkeypatch.setenv(BACKUP_DIR_ENV, str(tmp_path))
    assert backup_root() == tmp_path
    monkeypatch.setenv(BACKUP_DIR_ENV, "var/backups")
    with pytest.raises(ConfigError, match=r"BACKUP_DIR must be an absolute path.*every worker shares"):
        backup_root()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"tables": "x"}, "unknown keys"),
        ({"columns": {"birthday": "dob"}}, "unknown fields"),
        ({"columns": {"email": None}}, "legacy_mapping.columns.email must be a non-empty name"),
        ({"users_table": ""}, "legacy_mapping.users_table must be a non-empty name"),
        ({"users_table": "x" * 64}, "63-byte identifier limit"),
        ({"groups": "account_user_groups"}, "legacy_mapping.groups must be an object"),
        ({"groups": {"table": "g", "user_column": "u", "grp": "x"}}, "unknown keys"),
    ],
)
def test_bad_mappings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        load_mapping(override)


def test_names_carrying_sql_are_kept_as_names_to_be_quoted():
    # Never executed as SQL: it is only ever composed with sql.Identifier (see test_stages).
    assert load_mapping({"users_table": "users; DROP TABLE x"}).users_table == "users; DROP TABLE x"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"batch_size": 0}, "batch_size must be from 1 to 1000000, got 0"),
        ({"batch_size": -5}, "batch_size must be from 1"),
        ({"batch_size": 10**9}, "batch_size must be from 1 to 1000000"),
        ({"batch_size": "100"}, "batch_size must be a whole number"),
        ({"batch_size": True}, "batch_size must be a whole number"),
        ({"partitions": 0}, "partitions must be from 1 to 256"),
        ({"partitions": 1000}, "partitions must be from 1 to 256"),
        ({"phone_region": "XX"}, "phone_region 'XX' is not a region"),
        ({"phone_region": ""}, "phone_region '' is not a region"),
        ({"invalid_phone": "drop"}, "invalid_phone must be 'fix' or 'reject'"),
        ({"max_reject_ratio": 2}, "max_reject_ratio must be a number from 0 to 1"),
        ({"dry_run": "yes"}, "dry_run must be true or false"),
        ({"lease_grace_seconds": 10}, "lease_grace_seconds must be from 30 to 86400, got 10"),
        ({"backup_keep": -1}, r"Param backup_keep must be a whole number from 0 to 100000 \(0 turns"),
        ({"backup_keep": "24"}, "Param backup_keep must be a whole number"),
        ({"backup_keep_days": 4000}, "Param backup_keep_days must be a whole number from 0 to 3650"),
        ({"backup_keep_days": 1.5}, "Param backup_keep_days must be a whole number"),
    ],
)
def test_bad_params_are_refused(params, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_params(params)


def test_params_become_settings():
    settings = Settings.from_params(
        {"batch_size": 500, "partitions": 4, "phone_region": "in", "dry_run": True, "legacy_mapping": {}}
    )
    assert (settings.batch_size, settings.partitions, settings.phone_region, settings.dry_run) == (
        500,
        4,
        "IN",
        True,
    )
    public = settings.public()
    assert public["mapping"]["users_table"] == "account_user"
    assert json.dumps(public)  # recorded in the audit trail as JSON


def test_backup_retention_from_defaults_environment_then_params(monkeypatch):
    monkeypatch.delenv("USER_MIGRATION_BACKUP_KEEP", raising=False)
    monkeypatch.delenv("USER_MIGRATION_BACKUP_KEEP_DAYS", raising=False)
    settings = Settings.from_params({})
    assert (settings.backup_keep, settings.backup_keep_days) == (24, 7)
    monkeypatch.setenv("USER_MIGRATION_BACKUP_KEEP", "48")
    monkeypatch.setenv("USER_MIGRATION_BACKUP_KEEP_DAYS", " 0 ")
    settings = Settings.from_params({"backup_keep": None})  # an empty Param: the environment decides
    assert (settings.backup_keep, settings.backup_keep_days) == (48, 0)
    settings = Settings.from_params({"backup_keep": 3, "backup_keep_days": 2})
    assert (settings.backup_keep, settings.backup_keep_days) == (3, 2)
    assert settings.public()["backup_keep"] == 3
    monkeypatch.setenv("USER_MIGRATION_BACKUP_KEEP", "lots")
    with pytest.raises(ConfigError, match="environment variable USER_MIGRATION_BACKUP_KEEP must be a whole"):
        Settings.from_params({})


def _dag(filename: str):
    """The DAG object of a file in dags/, imported as the scheduler's parser would (no database)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "dags" / filename
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.dag


def test_every_setting_has_one_spec_and_the_dags_params_are_built_from_it():
    import dataclasses

    settings_fields = {f.name for f in dataclasses.fields(Settings)}
    specified = {spec.setting for spec in setting_specs.SPECS if spec.field != ""}
    assert specified == settings_fields  # a new setting needs its spec, and the spec a setting

    pass_params = _dag("user_migration_dag.py").params
    assert set(pass_params) == set(setting_specs.PASS_PARAMS)
    for spec in setting_specs.SPECS:
        if spec.field == "":
            continue
        param = pass_params.get_param(spec.name)
        assert param.description == spec.description
        for keyword, value in spec.param_schema().items():
            assert param.schema[keyword] == value, (spec.name, keyword)
        expected = (
            getattr(Settings, spec.setting, None)
            if spec.param_default is setting_specs.FROM_SETTINGS
            else None
        )
        if spec.param_default is setting_specs.FROM_SETTINGS:
            assert param.value == expected, spec.name
    rollback_params = _dag("user_migration_rollback_dag.py").params
    assert set(rollback_params) == set(setting_specs.ROLLBACK_PARAMS)
    assert rollback_params["lock_timeout_ms"] == Settings.lock_timeout_ms


@pytest.mark.parametrize(
    "spec",
    [
        s
        for s in __import__("user_migration.setting_specs").setting_specs.SPECS
        if s.type in ("integer", "number")
    ],
    ids=lambda s: s.name,
)
def test_the_trigger_form_and_the_task_refuse_the_same_out_of_range_values(spec):
    """Just above the maximum and just below the minimum: refused by the Param and by from_params."""
    from airflow.sdk import Param
    from airflow.sdk.exceptions import ParamValidationError

    param = Param(None, **spec.param_schema())
    for bad in (spec.maximum + 1, spec.minimum - 1):
        bad = int(bad) if spec.type == "integer" else bad
        with pytest.raises(ParamValidationError):
            param.resolve(bad)
        with pytest.raises(ConfigError, match=spec.name):
            Settings.from_params({spec.name: bad})
    good = int(spec.maximum) if spec.type == "integer" else spec.maximum
    assert param.resolve(good) == good
    assert getattr(Settings.from_params({spec.name: good}), spec.setting) == good
