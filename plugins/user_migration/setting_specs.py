"""One specification per setting: the DAGs' Params and the checks of ``Settings.from_params``.

A setting's type, bounds and description are written once here. The trigger form shows the same
bounds the task enforces, and a new setting cannot appear in one place and be missed in the other
(tests/test_config.py compares the two DAGs' Params with this table and ``Settings``). Defaults
come from ``Settings`` itself. No Airflow import at module level: ``dag_params`` imports ``Param``
when a DAG file calls it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Settings whose Param, when empty, defers to the environment (see config.retention).
FROM_SETTINGS = object()


@dataclass(frozen=True)
class Spec:
    name: str
    type: str  # integer | number | boolean | choice | string | object
    description: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    # The Param's default when it is not the Settings field's default (None: "use the environment").
    param_default: Any = FROM_SETTINGS
    nullable: bool = False
    field: str | None = None  # the Settings field, when named otherwise; "" when not a setting

    @property
    def setting(self) -> str:
        return self.name if self.field is None else self.field

    def param_schema(self) -> dict[str, Any]:
        """The JSON-schema keywords of the Param (type, bounds, choices)."""
        kind = {"choice": "string"}.get(self.type, self.type)
        schema: dict[str, Any] = {"type": ["null", kind] if self.nullable else kind}
        if self.minimum is not None:
            schema["minimum"] = self.minimum
        if self.maximum is not None:
            schema["maximum"] = self.maximum
        if self.choices:
            schema["enum"] = list(self.choices)
        if self.pattern:
            schema["pattern"] = self.pattern
        return schema

    def check(self, value: Any) -> Any:
        """The value, checked against the type and bounds; ValueError names the setting and the range."""
        low, high = self.minimum, self.maximum
        if self.type == "integer":
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(
                    f"{self.name} must be a whole number from {low:.0f} to {high:.0f}, got {value!r}"
                )
            if not low <= value <= high:
                raise ValueError(f"{self.name} must be from {low:.0f} to {high:.0f}, got {value}")
            return value
        if self.type == "number":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
                raise ValueError(f"{self.name} must be a number from {low:g} to {high:g}, got {value!r}")
            return float(value)
        if self.type == "boolean":
            if not isinstance(value, bool):
                raise ValueError(f"{self.name} must be true or false, got {value!r}")
            return value
        if self.type == "choice":
            if value not in self.choices:
                options = " or ".join(repr(c) for c in self.choices)
                raise ValueError(f"{self.name} must be {options}, got {value!r}")
            return value
        return value  # strings and objects: checked by their own readers in config.py


MAX_BATCH_SIZE = 1_000_000
MAX_PARTITIONS = 256
MAX_BACKUP_KEEP = 100_000
MAX_BACKUP_KEEP_DAYS = 3_650
_COUNT = 1_000_000  # throttle thresholds: counts of backends
_STOP = "Stop the partition (retried later)"

SPECS: tuple[Spec, ...] = (
    Spec(
        "batch_size",
        "integer",
        "Rows read, transformed and written per batch inside a partition.",
        1,
        MAX_BATCH_SIZE,
    ),
    Spec(
        "batch_seconds",
        "number",
        "Seconds each batch should take: the batch size adapts to it (between batch_min_rows and "
        "batch_max_rows), so a loaded legacy server gets smaller batches. 0 keeps batch_size fixed.",
        0,
        600,
    ),
    Spec("batch_min_rows", "integer", "Fewest rows of a time-boxed batch.", 1, MAX_BATCH_SIZE),
    Spec(
        "batch_max_rows",
        "integer",
        "Most rows of a time-boxed batch; 0 means ten times batch_size.",
        0,
        MAX_BATCH_SIZE,
    ),
    Spec(
        "max_snapshot_seconds",
        "number",
        "After this long a partition ends its legacy read snapshot (which holds back vacuum on the "
        "legacy tables) and reads on from the last id in a new one; its target transaction stays one.",
        0,
        86_400,
    ),
    Spec(
        "throttle_check_ms",
        "integer",
        "How often, at most, a partition reads the manual throttle (tools/throttle.py) and the "
        "legacy server's state between batches.",
        0,
        600_000,
    ),
    Spec(
        "throttle_active_backends_pause",
        "integer",
        "Pause between batches while more legacy backends than this run a statement (0: off).",
        0,
        _COUNT,
    ),
    Spec(
        "throttle_active_backends_stop",
        "integer",
        f"{_STOP} above this many active legacy backends (0: off).",
        0,
        _COUNT,
    ),
    Spec(
        "throttle_lock_waiters_pause",
        "integer",
        "Pause between batches while more legacy backends than this wait on a lock (0: off).",
        0,
        _COUNT,
    ),
    Spec(
        "throttle_lock_waiters_stop",
        "integer",
        f"{_STOP} above this many legacy lock waiters (0: off).",
        0,
        _COUNT,
    ),
    Spec(
        "throttle_replay_lag_pause",
        "number",
        "Pause while a legacy standby's replay lag exceeds this many seconds (0: off). Needs "
        "pg_monitor (pg_read_all_stats) for the migration role; without it the lag is not checked.",
        0,
        86_400,
    ),
    Spec(
        "throttle_replay_lag_stop",
        "number",
        f"{_STOP} above this replay lag in seconds (0: off).",
        0,
        86_400,
    ),
    Spec(
        "throttle_probe_sql",
        "string",
        "Optional custom probe: one SELECT returning one number, run read-only on the legacy "
        "server between batches (2 s timeout); compared with throttle_probe_pause and _stop.",
        nullable=True,
    ),
    Spec(
        "throttle_probe_pause",
        "number",
        "Pause while the custom probe returns more than this (0: off).",
        0,
        1e12,
    ),
    Spec(
        "throttle_probe_stop",
        "number",
        f"{_STOP} when the custom probe returns more than this (0: off).",
        0,
        1e12,
    ),
    Spec(
        "throttle_max_pause_seconds",
        "integer",
        "A partition paused by the legacy server's state longer than this stops and is retried, "
        "giving back its target transaction (0: wait as long as it takes). A pause by hand waits.",
        0,
        604_800,
    ),
    Spec(
        "partitions",
        "integer",
        "Id-range partitions copied as parallel mapped tasks (the pool bounds how many run at once).",
        1,
        MAX_PARTITIONS,
    ),
    Spec(
        "phone_region",
        "string",
        "ISO 3166 region used to read phone numbers written without a country code.",
        pattern="^[A-Za-z]{2}$",
    ),
    Spec(
        "invalid_phone",
        "choice",
        "fix: migrate the user with an empty phone and record the original; reject: reject the user.",
        choices=("fix", "reject"),
    ),
    Spec(
        "dry_run",
        "boolean",
        "Back up, plan and apply the transforms, record rejects and fixes; write nothing to the target tables.",
    ),
    Spec(
        "full_reconcile",
        "boolean",
        "Compare every legacy row with the sync state instead of reading the change log (the safety "
        "net; a pass does this by itself whenever the log cannot be trusted).",
    ),
    Spec(
        "max_reject_ratio",
        "number",
        "Validation fails when more than this share of source rows is rejected.",
        0,
        1,
    ),
    Spec(
        "legacy_mapping",
        "object",
        "Overrides of include/config/legacy_mapping.json for legacy tables named differently, e.g. "
        '{"users_table": "users", "columns": {"date_of_birth": "dob", "phone_number": "ph_number"}}.',
        param_default={},
        field="mapping",
    ),
    Spec(
        "cutover",
        "boolean",
        "After a passing validation: lock the legacy tables, run the final sync, prove equality and "
        "make the legacy tables read-only. With dry_run it is a rehearsal that changes nothing.",
    ),
    Spec(
        "require_approval",
        "boolean",
        "Cutover: wait for a person to Approve in Airflow (Required actions) before locking the legacy "
        "tables. Only for unattended tests and demos: false cuts over without asking. A rehearsal "
        "(dry_run) never asks.",
    ),
    Spec(
        "approval_timeout_minutes",
        "integer",
        "Cutover: how long the approval waits for an answer; without one the answer is Reject and the "
        "legacy tables stay writable. Later passes queue behind the waiting run (max_active_runs=1).",
        1,
        10_080,
    ),
    Spec(
        "lock_timeout_ms",
        "integer",
        "How long one attempt waits for a table lock (the cutover's and the rollback's on the legacy "
        "tables, the rollback's on the new ones; the application's writes pause meanwhile).",
        10,
        600_000,
    ),
    Spec(
        "cutover_attempts",
        "integer",
        "Cutover: attempts to take the lock, with exponential backoff, before giving up cleanly.",
        1,
        50,
    ),
    Spec(
        "lock_wait_seconds",
        "integer",
        "How long a run waits for another run (any deployment) to stop writing the target; a backfill "
        "run instead waits its turn by rescheduling.",
        0,
        86_400,
    ),
    Spec(
        "lease_stale_minutes",
        "integer",
        "Outer bound: a run holding the writer lease that takes no advisory lock (one running older "
        "code) is presumed dead after this long without activity; its lease is taken over.",
        1,
        10_080,
    ),
    Spec(
        "lease_grace_seconds",
        "integer",
        "The writer lease of a run whose task died (its process and connections gone) is taken over at "
        "once; one with no task running is taken over after this long since its last task ended. Keep it "
        "above retry_delay (20 s) plus the scheduler's hand-off between two tasks.",
        30,
        86_400,
    ),
    Spec(
        "backup_keep",
        "integer",
        "Backup retention: keep at least this many of the newest backups (0: no count rule). Empty: "
        "USER_MIGRATION_BACKUP_KEEP, else 24. A backup is deleted only when it is beyond this count AND "
        "older than backup_keep_days; the backups before the first load and of a cutover, and the "
        "newest complete one, are never deleted.",
        0,
        MAX_BACKUP_KEEP,
        param_default=None,
        nullable=True,
    ),
    Spec(
        "backup_keep_days",
        "integer",
        "Backup retention: keep every backup younger than this many days (0: no age rule). Empty: "
        "USER_MIGRATION_BACKUP_KEEP_DAYS, else 7.",
        0,
        MAX_BACKUP_KEEP_DAYS,
        param_default=None,
        nullable=True,
    ),
    Spec("legacy_conn_id", "string", "Airflow connection of the legacy database."),
    Spec(
        "target_conn_id",
        "string",
        "Airflow connection of the target database; the legacy one when it is not defined.",
    ),
    # The rollback DAG's own Params: not run settings.
    Spec(
        "confirm",
        "string",
        "Type ROLLBACK to confirm; anything else changes nothing.",
        param_default="",
        field="",
    ),
    Spec(
        "action",
        "choice",
        "carry_back: undo the cutover keeping every change since; restore: reload a backup.",
        choices=("carry_back", "restore"),
        param_default="carry_back",
        field="",
    ),
    Spec(
        "backup_run_id",
        "string",
        "restore only: the run id whose backup folder under USER_MIGRATION_BACKUP_DIR to reload.",
        param_default="",
        field="",
    ),
)
BY_NAME = {spec.name: spec for spec in SPECS}
ROLLBACK_PARAMS = (
    "confirm",
    "action",
    "backup_run_id",
    "legacy_mapping",
    "lock_timeout_ms",
    "legacy_conn_id",
    "target_conn_id",
)
PASS_PARAMS = tuple(spec.name for spec in SPECS if spec.field != "")


def dag_params(names: tuple[str, ...], descriptions: dict[str, str] | None = None) -> dict[str, Any]:
    """Airflow Params for ``names``, defaults from ``Settings``; ``descriptions`` overrides a few."""
    import dataclasses

    from airflow.sdk import Param

    from user_migration.config import Settings

    defaults = {
        f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
        for f in dataclasses.fields(Settings)
    }
    params = {}
    for name in names:
        spec = BY_NAME[name]
        default = defaults[spec.setting] if spec.param_default is FROM_SETTINGS else spec.param_default
        description = (descriptions or {}).get(name, spec.description)
        params[name] = Param(default, description=description, **spec.param_schema())
    return params
