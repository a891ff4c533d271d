"""Run settings and the legacy table mapping, validated before anything is read or written.

Everything a user may set at trigger time arrives here as plain data (Airflow Params, a JSON file),
so a mistake is reported as one sentence naming the setting and the fix, never as a traceback from
deep inside a task. No Airflow import: the benchmark and the tests use this module directly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from user_migration import setting_specs
from user_migration.setting_specs import MAX_BATCH_SIZE, MAX_PARTITIONS  # noqa: F401 (re-exported)

REPO_ROOT = Path(__file__).resolve().parents[2]
INCLUDE_DIR = REPO_ROOT / "include"
DEFAULT_MAPPING_FILE = INCLUDE_DIR / "config" / "legacy_mapping.json"
MAPPING_FILE_ENV = "USER_MIGRATION_MAPPING_FILE"
BACKUP_DIR_ENV = "USER_MIGRATION_BACKUP_DIR"
DEFAULT_BACKUP_DIR = REPO_ROOT / "var" / "backups"
# Backup retention (retention.py): how many unpinned backups to keep, and for how many days.
BACKUP_KEEP_ENV = "USER_MIGRATION_BACKUP_KEEP"
BACKUP_KEEP_DAYS_ENV = "USER_MIGRATION_BACKUP_KEEP_DAYS"

# Canonical field names, in the order rows travel through the pipeline.
FIELDS = (
    "id",
    "password",
    "last_login",
    "is_superuser",
    "email",
    "username",
    "full_name",
    "date_of_birth",
    "phone_number",
    "is_active",
    "is_staff",
)
# Fields a legacy table may lack (mapped to null): the value every Django user gets by default.
OPTIONAL_FIELD_DEFAULTS: dict[str, Any] = {
    "last_login": None,
    "is_superuser": False,
    "is_staff": False,
    "is_active": True,
}
# A throttle probe (Param throttle_probe_sql) is one SELECT; longer text is more likely a mistake.
MAX_PROBE_CHARS = 2_000
PG_IDENTIFIER_MAX_BYTES = 63


class ConfigError(ValueError):
    """A setting is wrong; the message names it and says how to fix it."""


@dataclass(frozen=True)
class LinkTable:
    table: str
    user_column: str
    other_column: str


@dataclass(frozen=True)
class LegacyMapping:
    """Where the legacy users live and what their columns are called."""

    schema: str
    users_table: str
    columns: dict[str, str | None]
    groups: LinkTable | None
    permissions: LinkTable | None

    def column(self, canonical: str) -> str | None:
        return self.columns.get(canonical)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _identifier(value: Any, setting: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{setting} must be a non-empty name, got {value!r}")
    if len(value.encode()) > PG_IDENTIFIER_MAX_BYTES:
        raise ConfigError(
            f"{setting} is longer than PostgreSQL's {PG_IDENTIFIER_MAX_BYTES}-byte identifier limit: {value!r}"
        )
    if "\x00" in value:
        raise ConfigError(f"{setting} contains a NUL character")
    return value


def _deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _link(raw: Any, setting: str, other_key: str) -> LinkTable | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"{setting} must be an object like {{'table': ..., 'user_column': ...}} or null")
    unknown = set(raw) - {"table", "user_column", other_key}
    if unknown:
        raise ConfigError(
            f"{setting} has unknown keys {sorted(unknown)}; allowed: table, user_column, {other_key}"
        )
    return LinkTable(
        table=_identifier(raw.get("table"), f"{setting}.table"),
        user_column=_identifier(raw.get("user_column"), f"{setting}.user_column"),
        other_column=_identifier(raw.get(other_key), f"{setting}.{other_key}"),
    )


def load_mapping(overrides: dict[str, Any] | None = None) -> LegacyMapping:
    """The shipped mapping, then the file named by USER_MIGRATION_MAPPING_FILE, then ``overrides``."""
    raw = json.loads(DEFAULT_MAPPING_FILE.read_text())
    env_file = os.environ.get(MAPPING_FILE_ENV)
    if env_file:
        path = Path(env_file)
        if not path.is_absolute():
            raise ConfigError(
                f"{MAPPING_FILE_ENV} must be an absolute path, got {env_file!r}: each worker would read a "
                "relative one from its own working folder"
            )
        if not path.is_file():
            raise ConfigError(f"{MAPPING_FILE_ENV} points at {path}, which is not a file")
        try:
            raw = _deep_merge(raw, json.loads(path.read_text()))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if overrides:
        if not isinstance(overrides, dict):
            raise ConfigError("legacy_mapping must be a JSON object")
        raw = _deep_merge(raw, overrides)

    unknown = set(raw) - {"schema", "users_table", "columns", "groups", "permissions"}
    if unknown:
        raise ConfigError(
            f"legacy_mapping has unknown keys {sorted(unknown)}; allowed: schema, users_table, columns, "
            "groups, permissions"
        )
    columns_raw = raw.get("columns") or {}
    unknown_fields = set(columns_raw) - set(FIELDS)
    if unknown_fields:
        raise ConfigError(
            f"legacy_mapping.columns has unknown fields {sorted(unknown_fields)}; the fields are {', '.join(FIELDS)}"
        )
    columns: dict[str, str | None] = {}
    for name in FIELDS:
        value = columns_raw.get(name, name)
        if value is None and name in OPTIONAL_FIELD_DEFAULTS:
            columns[name] = None
            continue
        columns[name] = _identifier(value, f"legacy_mapping.columns.{name}")
    return LegacyMapping(
        schema=_identifier(raw.get("schema", "public"), "legacy_mapping.schema"),
        users_table=_identifier(raw.get("users_table"), "legacy_mapping.users_table"),
        columns=columns,
        groups=_link(raw.get("groups"), "legacy_mapping.groups", "group_column"),
        permissions=_link(raw.get("permissions"), "legacy_mapping.permissions", "permission_column"),
    )


def probe_sql(value: Any) -> str | None:
    """The throttle probe as given, when it is one SELECT; None when empty.

    It runs on the legacy server between batches, in a read-only transaction with a statement
    timeout. Anything but a single SELECT is refused here, before the run starts: a probe that
    writes, or runs two statements, is a mistake (or worse) the throttle must not carry out.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise ConfigError(f"throttle_probe_sql must be a SELECT returning one number, got {value!r}")
    text = value.strip().rstrip(";").strip()
    words = text.split(None, 1)
    if len(text) > MAX_PROBE_CHARS:
        raise ConfigError(f"throttle_probe_sql is longer than {MAX_PROBE_CHARS} characters; shorten it")
    if len(words) < 2 or words[0].lower() != "select" or ";" in text or "\x00" in text:
        raise ConfigError(
            "throttle_probe_sql must be a single SELECT statement returning one number "
            "(e.g. SELECT count(*) FROM pg_stat_activity WHERE state = 'active'); "
            "other statements and several statements are refused"
        )
    return text


@dataclass(frozen=True)
class Settings:
    """One run's settings, checked; built from the DAG's Params."""

    batch_size: int = 10_000
    partitions: int = 2
    phone_region: str = "NP"
    invalid_phone: str = "fix"
    dry_run: bool = False
    max_reject_ratio: float = 0.10
    legacy_conn_id: str = "legacy_db"
    target_conn_id: str = "target_db"
    mapping: LegacyMapping = field(default_factory=load_mapping)
    cutover: bool = False
    # A real cutover waits for a person's Approve (the approve_cutover task) unless this is false.
    require_approval: bool = True
    approval_timeout_minutes: int = 60
    lock_timeout_ms: int = 3000
    cutover_attempts: int = 5
    lock_wait_seconds: int = 60
    lease_stale_minutes: int = 30
    lease_grace_seconds: int = 120
    full_reconcile: bool = False
    # A day of hourly passes, and a week of anything: a bad pass noticed the next morning, or after a
    # weekend, still has the backup taken before it. At 10M users (~1 GB a backup) that is ~190 GB.
    backup_keep: int = 24
    backup_keep_days: int = 7
    # Yielding to the application (throttle.py). Batches aim at batch_seconds each (0: a fixed
    # batch_size), between batch_min_rows and batch_max_rows (0: ten times batch_size).
    batch_seconds: float = 0.75
    batch_min_rows: int = 100
    batch_max_rows: int = 0
    # A partition's legacy read ends its snapshot after this long and goes on in a new one, so it
    # does not hold back vacuum on the legacy tables for the whole partition.
    max_snapshot_seconds: float = 120.0
    # The legacy server's state is read at most this often (a check costs ~1 ms: <1% of a batch).
    throttle_check_ms: int = 1000
    # Pause above the first figure, stop the partition (retryable) above the second; 0 turns it off.
    throttle_active_backends_pause: int = 64
    throttle_active_backends_stop: int = 256
    throttle_lock_waiters_pause: int = 10
    throttle_lock_waiters_stop: int = 100
    throttle_replay_lag_pause: float = 30.0
    throttle_replay_lag_stop: float = 600.0
    throttle_probe_sql: str | None = None
    throttle_probe_pause: float = 1.0
    throttle_probe_stop: float = 100.0
    # A partition paused by the server's state longer than this stops (retryable) and gives back
    # its target transaction; 0 waits as long as it takes. A pause set by hand waits indefinitely.
    throttle_max_pause_seconds: int = 1800

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Settings:
        """Checked settings from a run's Params: each against its one specification (setting_specs)."""

        def checked(spec: setting_specs.Spec) -> Any:
            try:
                return spec.check(params.get(spec.name, getattr(cls, spec.name)))
            except ValueError as exc:
                raise ConfigError(str(exc)) from None

        def retention(name: str, env: str) -> int:
            """The Param when given, else the environment variable, else the default."""
            high = setting_specs.BY_NAME[name].maximum
            value = params.get(name)
            where = f"Param {name}"
            if value is None:
                raw = os.environ.get(env, "").strip()
                if not raw:
                    return getattr(cls, name)
                where = f"environment variable {env}"
                try:
                    value = int(raw)
                except ValueError:
                    raise ConfigError(
                        f"{where} must be a whole number from 0 to {high}, got {raw!r}; fix or unset it"
                    ) from None
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= high:
                raise ConfigError(
                    f"{where} must be a whole number from 0 to {high} (0 turns that rule off), got {value!r}"
                )
            return value

        region = str(params.get("phone_region", cls.phone_region) or "").upper()
        import phonenumbers

        if region not in phonenumbers.SUPPORTED_REGIONS:
            raise ConfigError(
                f"phone_region {region!r} is not a region phonenumbers knows; use a two-letter ISO 3166 code "
                "such as NP, IN, US or GB"
            )
        special = {
            "phone_region": lambda: region,
            "backup_keep": lambda: retention("backup_keep", BACKUP_KEEP_ENV),
            "backup_keep_days": lambda: retention("backup_keep_days", BACKUP_KEEP_DAYS_ENV),
            "throttle_probe_sql": lambda: probe_sql(params.get("throttle_probe_sql")),
            "legacy_conn_id": lambda: _identifier(
                params.get("legacy_conn_id", cls.legacy_conn_id), "legacy_conn_id"
            ),
            "target_conn_id": lambda: _identifier(
                params.get("target_conn_id", cls.target_conn_id), "target_conn_id"
            ),
            "legacy_mapping": lambda: load_mapping(params.get("legacy_mapping") or None),
        }
        values = {}
        for spec in setting_specs.SPECS:
            if spec.field == "":
                continue  # the rollback DAG's own Params
            values[spec.setting] = special[spec.name]() if spec.name in special else checked(spec)
        return cls(**values)

    def batch_bounds(self) -> tuple[int, int]:
        """(fewest, most) rows a time-boxed batch may hold; batch_size lies between them."""
        most = self.batch_max_rows or min(self.batch_size * 10, MAX_BATCH_SIZE)
        most = max(most, self.batch_size)
        return min(self.batch_min_rows, self.batch_size), most

    def public(self) -> dict[str, Any]:
        """The settings as recorded in the audit trail and report (no secrets in here)."""
        data = asdict(self)
        data["mapping"] = self.mapping.as_dict()
        return data

    def transform_fingerprint(self) -> int:
        """64 bits naming the settings that decide what a legacy row becomes.

        Stored with each row's sync state, so a pass with other settings, other rules or other
        library versions (``transforms.rules_identity``) re-transforms every row instead of only the
        rows that changed. Links are re-read in full every pass: not included.
        """
        from user_migration.transforms import rules_identity

        mapping = self.mapping
        text = json.dumps(
            {
                **rules_identity(),
                "phone_region": self.phone_region,
                "invalid_phone": self.invalid_phone,
                "schema": mapping.schema,
                "users_table": mapping.users_table,
                "columns": mapping.columns,
            },
            sort_keys=True,
        )
        return int.from_bytes(hashlib.md5(text.encode()).digest()[:8], "big", signed=True)

    def with_transform_of(self, recorded: dict[str, Any]) -> Settings:
        """These settings with another run's transform settings (its recorded ``public()``).

        The rollback compares and writes legacy rows as the cutover's run transformed them, whatever
        the rollback DAG's own defaults say.
        """
        try:
            raw = recorded["mapping"]
            mapping = LegacyMapping(
                schema=raw["schema"],
                users_table=raw["users_table"],
                columns=dict(raw["columns"]),
                groups=LinkTable(**raw["groups"]) if raw.get("groups") else None,
                permissions=LinkTable(**raw["permissions"]) if raw.get("permissions") else None,
            )
            return dataclasses.replace(
                self,
                phone_region=recorded["phone_region"],
                invalid_phone=recorded["invalid_phone"],
                mapping=mapping,
            )
        except (KeyError, TypeError) as exc:
            raise ConfigError(
                f"the recorded run settings lack {exc}; they come from migration_audit.runs.params, "
                "written by the run's backup task: re-run that pass before rolling back"
            ) from None


def backup_root() -> Path:
    """The backup folder. Tasks of one run may run on different workers (Celery, Kubernetes): they
    all read and write it, so it must be one absolute path naming the same shared folder on each."""
    value = os.environ.get(BACKUP_DIR_ENV)
    if not value:
        return DEFAULT_BACKUP_DIR
    path = Path(value)
    if not path.is_absolute():
        raise ConfigError(
            f"{BACKUP_DIR_ENV} must be an absolute path, got {value!r}: each worker would read a relative "
            "one from its own working folder. Name the folder every worker shares"
        )
    return path
