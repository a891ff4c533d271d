"""Post-migration data checks on the target database, run with Great Expectations 1.x.

The migration's own SQL enforces most rules through constraints, but a migration that ran with
constraints dropped or deferred (the fast bulk-load path), or a target that someone edited by hand,
can still end up wrong. These checks look at the data itself, after the load, and report in plain
Python so the caller (an Airflow task, the CLI, a test) decides what a failure means.

Why GX and not hand-written SQL: the expectations are the shared, reviewable vocabulary of the data
team, and GX computes them SQL-side (aggregates bundled into one query per batch, uniqueness through
a window count), so nothing is pulled into pandas however large the tables are.

Every check runs on a *table* asset, one batch and one suite per table. The checks that need SQL of
their own (case-insensitive email, missing profiles, dangling link rows) are UnexpectedRowsExpectations
that ask only for the count (``_row_count_only``), not query assets, which GX reads whole
(docs/decisions/0007-gx-count-only-sql-checks.md).

Nothing here imports Airflow, and great_expectations (slow to import) is imported only when
``validate_target`` runs, so importing this module stays cheap for DAG parsing.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

USERS_TABLE = "account_newuser"
PROFILE_TABLE = "account_profile"
GROUPS_TABLE = "account_newuser_groups"
PERMISSIONS_TABLE = "account_newuser_user_permissions"
REQUIRED_TABLES = (USERS_TABLE, PROFILE_TABLE, GROUPS_TABLE, PERMISSIONS_TABLE)

REQUIRED_COLUMNS = (
    "id",
    "password",
    "username",
    "email",
    "full_name",
    "date_of_birth",
    "phone_number",
    "is_active",
    "is_staff",
    "is_superuser",
    "joined_at",
    "updated_at",
)

# Empty, or E.164: "+", a non-zero digit, then 1 to 14 more digits. PostgreSQL (ARE) syntax.
PHONE_REGEX = r"^(\+[1-9][0-9]{1,14})?$"

# Only the counts are needed. partial_unexpected_count=0 keeps GX's "unexpected values" sample
# query at LIMIT 0, which PostgreSQL answers without scanning (with the default 20 it would
# repeat the uniqueness window over the whole table).
_RESULT_FORMAT = {"result_format": "BASIC", "partial_unexpected_count": 0}

_SCHEMA_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]*$")

# This key in an expectation's meta ties a GX result back to its check; _ROW_COUNT marks the
# helper expectation that only fetches the batch's row count.
_META_KEY = "outcome"
_ROW_COUNT = "_row_count"


@dataclass(frozen=True)
class ExpectationOutcome:
    """The result of one check, in plain Python so it can cross XCom, logs and JSON unchanged.

    ``expected`` is set for exact-value checks (the row count) so the failure message can say by
    how much it is off; ``error`` is set when GX could not evaluate the check at all (which counts
    as a failure: an unverified rule is not a kept one).
    """

    name: str
    description: str
    success: bool
    observed: object
    unexpected_count: int | None
    element_count: int | None
    expected: object = None
    error: str | None = None

    def failure_message(self) -> str:
        """One line for logs and task failures that names the check and says how it failed."""
        if self.error is not None:
            return f"{self.name} could not be evaluated: {self.error} ({self.description})"
        if self.success:
            return f"{self.name} passed ({self.description})"
        if self.unexpected_count is not None:
            of_total = "" if self.element_count is None else f" of {self.element_count}"
            return f"{self.name} failed: {self.unexpected_count}{of_total} rows break it ({self.description})"
        if isinstance(self.expected, int) and isinstance(self.observed, int):
            return (
                f"{self.name} failed: expected {self.expected}, observed {self.observed} "
                f"(off by {self.observed - self.expected:+d})"
            )
        return (
            f"{self.name} failed: expected {self.expected!r}, observed {self.observed!r} ({self.description})"
        )


@dataclass(frozen=True)
class _Check:
    """One expectation to run: the outcome's name and sentence, and how to build it with GX.

    ``rows_query`` marks an UnexpectedRowsExpectation: GX reports only how many rows the query
    returned, so the element count is taken from the row count of the same batch.
    """

    name: str
    description: str
    build: Callable[[Any], Any]  # gxe module -> Expectation
    expected: object = None
    rows_query: bool = False


@dataclass(frozen=True)
class _Asset:
    """One GX table asset and the checks validated together on its single whole-table batch."""

    name: str
    table: str
    checks: tuple[_Check, ...]


def _unexpected_rows(name: str, description: str, query: str) -> _Check:
    """A check written as SQL returning the offending rows; ``{batch}`` is the asset's table.

    GX substitutes ``{batch}`` with a derived table: a query without JOIN gets an alias from GX
    (so it must not add one), a query with JOIN must alias it itself.
    """
    return _Check(
        name,
        description,
        lambda gxe: _row_count_only(gxe)(unexpected_rows_query=query, description=description),
        rows_query=True,
    )


@functools.cache
def _row_count_only(gxe: Any) -> type:
    """GX's UnexpectedRowsExpectation, asking GX for the number of offending rows only.

    The stock expectation depends on two metrics, the offending rows themselves and their count,
    and GX runs the query once for each (docs/decisions/0007-gx-count-only-sql-checks.md).
    The outcome uses only the count (rows would be personal data in a report anyway), so this
    subclass drops the rows metric. Subclassing UnexpectedRowsExpectation is how GX's docs build
    custom SQL expectations; overriding its metrics goes a step beyond them, so the seeded
    violations of tests/test_validation_gx.py check every count it reports on the pinned GX.
    """

    class UnexpectedRowCountExpectation(gxe.UnexpectedRowsExpectation):
        metric_dependencies: ClassVar[tuple[str, ...]] = ("unexpected_rows_query.row_count",)

        def _validate(self, metrics: dict, runtime_configuration: dict | None = None, execution_engine=None):
            count = metrics["unexpected_rows_query.row_count"]
            return {"success": count == 0, "result": {"observed_value": count}}

    return UnexpectedRowCountExpectation


def _plan(expected_users: int) -> tuple[_Asset, ...]:
    """The assets and their checks (one batch and one GX metric graph per table)."""
    # Left whole (issue 17): a declarative list of every check, best read top to bottom in one place.
    users_checks = (
        _Check(
            "users_row_count",
            f"{USERS_TABLE} has as many rows as source rows minus rejected rows (expected {expected_users})",
            lambda gxe: gxe.ExpectTableRowCountToEqual(value=expected_users),
            expected=expected_users,
        ),
        _Check(
            "username_unique",
            f"{USERS_TABLE}.username values must be unique",
            lambda gxe: gxe.ExpectColumnValuesToBeUnique(column="username"),
        ),
        _Check(
            "email_unique",
            f"{USERS_TABLE}.email values must be unique",
            lambda gxe: gxe.ExpectColumnValuesToBeUnique(column="email"),
        ),
        # Counted like GX's own uniqueness: every row whose lower(email) repeats. The repeated
        # values come from one hash aggregate, materialized so that parallel workers do not each
        # rebuild it; a window count would sort the table (docs/decisions/0007-gx-count-only-sql-checks.md).
        _unexpected_rows(
            "email_unique_ci",
            f"{USERS_TABLE}.email values must be unique ignoring case (lower(email))",
            "WITH repeated AS MATERIALIZED (SELECT lower(b.email) AS email FROM {batch} AS b GROUP BY 1 "
            "HAVING count(*) > 1) SELECT u.id FROM {batch} AS u JOIN repeated AS r ON lower(u.email) = r.email",
        ),
        *(
            _Check(
                f"not_null_{column}",
                f"{USERS_TABLE}.{column} must never be NULL",
                lambda gxe, column=column: gxe.ExpectColumnValuesToNotBeNull(column=column),
            )
            for column in REQUIRED_COLUMNS
        ),
        _Check(
            "phone_e164_or_empty",
            f"{USERS_TABLE}.phone_number must be empty or an E.164 number (+ then 2 to 15 digits)",
            lambda gxe: gxe.ExpectColumnValuesToMatchRegex(column="phone_number", regex=PHONE_REGEX),
        ),
        _unexpected_rows(
            "profile_for_every_user",
            f"every {USERS_TABLE} row must have an {PROFILE_TABLE} row",
            f"SELECT u.id FROM {{batch}} AS u LEFT JOIN {PROFILE_TABLE} AS p ON p.user_id = u.id "
            "WHERE p.user_id IS NULL",
        ),
    )
    profile_checks = (
        _Check(
            "profile_user_unique",
            f"{PROFILE_TABLE}.user_id values must be unique (at most one profile per user)",
            lambda gxe: gxe.ExpectColumnValuesToBeUnique(column="user_id"),
        ),
    )
    return (
        _Asset("users", USERS_TABLE, users_checks),
        _Asset("profiles", PROFILE_TABLE, profile_checks),
        _link_asset("groups_link_users_exist", GROUPS_TABLE),
        _link_asset("permissions_link_users_exist", PERMISSIONS_TABLE),
    )


def _link_asset(name: str, table: str) -> _Asset:
    """A many-to-many link table whose every newuser_id must point at an existing user."""
    check = _unexpected_rows(
        name,
        f"every {table}.newuser_id must reference an existing {USERS_TABLE} row",
        f"SELECT l.id FROM {{batch}} AS l LEFT JOIN {USERS_TABLE} AS u ON u.id = l.newuser_id "
        "WHERE u.id IS NULL",
    )
    return _Asset(table, table, (check,))


# The order outcomes are returned in (documented in validate_target); every check appears once.
OUTCOME_ORDER = (
    "users_row_count",
    "username_unique",
    "email_unique",
    "email_unique_ci",
    *(f"not_null_{column}" for column in REQUIRED_COLUMNS),
    "phone_e164_or_empty",
    "profile_user_unique",
    "profile_for_every_user",
    "groups_link_users_exist",
    "permissions_link_users_exist",
)


def validate_target(
    sqlalchemy_url: str, *, expected_users: int, schema: str = "public"
) -> list[ExpectationOutcome]:
    """Run every check against the target database and return one outcome per check, in order.

    Failures are returned, not raised, so the caller can report all of them at once and decide
    which are fatal. Raises ``RuntimeError`` naming the table if a checked table is missing (the
    checks would all be meaningless), and ``ValueError`` for an unusable ``schema`` name.

    ``sqlalchemy_url`` is a SQLAlchemy URL such as ``postgresql+psycopg://user@host:5432/db``.
    The schema is applied through the connection's ``search_path`` (GX 1.x deprecates a per-asset
    schema), so the tables and the checks' own SQL both resolve in it. Uniqueness counts follow GX:
    every row sharing a repeated value breaks the rule (two rows with one username count as 2).

    Outcomes come in ``OUTCOME_ORDER``: users_row_count, username_unique, email_unique,
    email_unique_ci, not_null_<column> for each of ``REQUIRED_COLUMNS``, phone_e164_or_empty,
    profile_user_unique, profile_for_every_user, groups_link_users_exist,
    permissions_link_users_exist.
    """
    if not _SCHEMA_NAME.match(schema):
        raise ValueError(f"schema must be a plain SQL identifier, got {schema!r}")

    _quiet_gx()
    import great_expectations as gx
    import great_expectations.expectations as gxe
    from great_expectations.data_context.types.base import (
        DataContextConfig,
        InMemoryStoreBackendDefaults,
        ProgressBarsConfig,
    )

    context = gx.get_context(
        mode="ephemeral",
        project_config=DataContextConfig(
            store_backend_defaults=InMemoryStoreBackendDefaults(init_temp_docs_sites=False),
            analytics_enabled=False,
            progress_bars=ProgressBarsConfig(globally=False, metric_calculations=False),
        ),
    )
    datasource = context.data_sources.add_postgres(
        name="migration_target",
        connection_string=sqlalchemy_url,
        kwargs={
            "connect_args": {
                "options": f'-c search_path="{schema}"',
                "application_name": "user_migration_validation",
            },
        },
    )
    try:
        _require_tables(datasource.get_engine(), schema)
        outcomes: dict[str, ExpectationOutcome] = {}
        for asset_spec in _plan(expected_users):
            outcomes.update(_validate_asset(gx, gxe, datasource, asset_spec))
        return [outcomes[name] for name in OUTCOME_ORDER]
    finally:
        # GX keeps two engines (datasource + execution engine); release their pooled connections
        # so a long-lived worker does not hold idle sessions on the target.
        datasource.get_execution_engine().close()
        datasource.get_engine().dispose()


def _quiet_gx() -> None:
    """No usage statistics from a pipeline; progress bars are switched off in the context config."""
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")


def _require_tables(engine: Any, schema: str) -> None:
    """Fail fast, naming the tables, rather than reporting every check as an obscure GX error."""
    import sqlalchemy as sa

    with engine.connect() as connection:
        missing = [
            table
            for table in REQUIRED_TABLES
            if connection.execute(
                sa.text("SELECT to_regclass(format('%I.%I', CAST(:schema AS text), CAST(:table AS text)))"),
                {"schema": schema, "table": table},
            ).scalar()
            is None
        ]
    if missing:
        raise RuntimeError(
            f"cannot validate the target: table {', '.join(missing)} does not exist in schema "
            f"{schema!r} (has the target schema been created?)"
        )


def _validate_asset(gx: Any, gxe: Any, datasource: Any, spec: _Asset) -> dict[str, ExpectationOutcome]:
    """Validate all of one asset's checks on a single whole-table batch (one GX metric graph)."""
    asset = datasource.add_table_asset(name=spec.name, table_name=spec.table)
    batch = asset.add_batch_definition_whole_table(f"{spec.name}_whole_table").get_batch()

    suite = gx.ExpectationSuite(name=f"{spec.name}_checks")
    # The batch's row count, for checks GX reports without one. GX computes each metric once per
    # graph, so on the users table this shares the count of users_row_count.
    suite.add_expectation(gxe.ExpectTableRowCountToBeBetween(min_value=0, meta={_META_KEY: _ROW_COUNT}))
    for check in spec.checks:
        expectation = check.build(gxe)
        expectation.meta = {_META_KEY: check.name}
        # add_expectation raises on an invalid expectation; ExpectationSuite(expectations=[...])
        # would only log it and silently drop the check.
        suite.add_expectation(expectation)

    results = {
        (result.expectation_config.meta or {}).get(_META_KEY): result
        for result in batch.validate(suite, result_format=_RESULT_FORMAT).results
    }
    row_count_result = results.get(_ROW_COUNT)
    row_count = (row_count_result.result or {}).get("observed_value") if row_count_result else None
    return {
        check.name: _outcome(check, results.get(check.name), None if row_count is None else int(row_count))
        for check in spec.checks
    }


def _outcome(check: _Check, result: Any, row_count: int | None) -> ExpectationOutcome:
    """Translate one GX ExpectationValidationResult into an ExpectationOutcome."""
    if result is None:  # not expected from GX; reported rather than lost
        return ExpectationOutcome(
            check.name, check.description, False, None, None, None, check.expected, "GX returned no result"
        )
    error = _exception_message(result.exception_info)
    details: Mapping[str, Any] = result.result or {}
    observed = _plain(details.get("observed_value"))
    if check.rows_query:
        # UnexpectedRowsExpectation's observed value is the number of offending rows.
        unexpected, elements, observed = observed, row_count, None
    else:
        unexpected, elements = details.get("unexpected_count"), details.get("element_count")
    return ExpectationOutcome(
        name=check.name,
        description=check.description,
        success=bool(result.success) and error is None,
        observed=observed,
        unexpected_count=None if unexpected is None else int(unexpected),
        element_count=None if elements is None else int(elements),
        expected=check.expected,
        error=error,
    )


def _exception_message(info: Any) -> str | None:
    """GX reports errors either flat or keyed by metric id; return the first message's first line."""
    if not info:
        return None
    if isinstance(info, Mapping) and "raised_exception" in info:
        if not info["raised_exception"]:
            return None
        text = str(info.get("exception_message") or "").strip()
        return text.splitlines()[0] if text else "unknown error"
    if isinstance(info, Mapping):
        for value in info.values():
            message = _exception_message(value)
            if message:
                return message
    return None


def _plain(value: Any) -> object:
    """Observed values as JSON-friendly builtins (GX may hand back numpy scalars)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if hasattr(value, "item"):
        return value.item()
    return str(value)
