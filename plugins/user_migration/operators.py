"""The operators of the user_migration DAG: one job each, logic in the plain modules they call.

Every operator reads the run's Params into checked Settings, records its attempt in
migration_audit.task_attempts, and turns failures into one readable sentence. Mistakes a retry
cannot fix (a bad setting, a missing table, a failed check) fail at once without retries.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from airflow.providers.standard.operators.hitl import ApprovalOperator
from airflow.sdk import BaseOperator
from airflow.sdk.exceptions import AirflowFailException, AirflowRescheduleException, AirflowSkipException

from user_migration.config import ConfigError, Settings, backup_root
from user_migration.errors import ConnectionProblem, MigrationError, ValidationFailed

if TYPE_CHECKING:
    import psycopg

# Database drivers, GX and pandas are imported inside execute(): this module is imported every
# time the DAG file is parsed.
POOL = "user_migration_db"
# Airflow 3 runs a backfill's runs side by side (the backfill's own max_active_runs, 10 by default;
# the DAG's max_active_runs=1 does not apply to them), so its passes take turns on the writer lease:
# a backfill run that finds the lease held is rescheduled, using no worker, pool slot or retry while
# it waits, and gives up only after this long.
BACKFILL_LEASE_WAIT = dt.timedelta(hours=24)
APPROVAL_TASK = "approve_cutover"
# The XCom key under which the approval task leaves its outcome for the report.
APPROVAL_KEY = "approval"


def pass_date() -> dt.date:
    """The date a pass runs on (UTC), for the date-of-birth rule: never the logical date, which a
    backfill sets in the past, so users born since would be rejected as born in the future."""
    return dt.datetime.now(dt.UTC).date()


class WaitingForLease(AirflowRescheduleException):
    """Try the task again at ``reschedule_date``; ``reason`` goes to the audit trail."""

    def __init__(self, reschedule_date: dt.datetime, reason: str) -> None:
        super().__init__(reschedule_date)
        self.reason = reason


class _MigrationOperator(BaseOperator):
    """Shared shape: settings, connections, audit of the attempt, clean errors."""

    ui_color = "#e8f0fe"
    # Every task but the first checks that its run still holds the target's writer lease; every task
    # holding it shows, while it runs, that the holder is alive (lease.active).
    renews_lease = True
    # The task's tables for OpenLineage (user_migration.lineage.LINEAGE); None reports none.
    lineage_kind: str | None = None

    def execute(self, context: Any) -> Any:
        from user_migration import audit
        from user_migration.db import ensure_audit_schema
        from user_migration.hooks import MigrationDbHook

        try:
            settings = Settings.from_params(dict(context["params"]))
        except ConfigError as exc:
            raise AirflowFailException(f"invalid setting: {exc}") from None
        run_id = context["run_id"]
        ti = context["ti"]
        map_index = getattr(ti, "map_index", -1)
        map_index = -1 if map_index is None else map_index
        self._settings = settings
        self._target_hook = MigrationDbHook(settings.target_conn_id, fallback_conn_id=settings.legacy_conn_id)
        self._legacy_hook = MigrationDbHook(settings.legacy_conn_id)
        try:
            target = self._target_hook.get_conn(autocommit=True)
        except ConnectionProblem as exc:
            if exc.permanent:
                raise AirflowFailException(str(exc)) from None
            raise MigrationError(str(exc)) from None
        try:
            ensure_audit_schema(target)
            audit.record_attempt(target, run_id, self.task_id, map_index, ti.try_number, "running")
            result = self._run_recorded(context, settings, target, run_id, map_index)
            audit.record_attempt(target, run_id, self.task_id, map_index, ti.try_number, "success")
            return result
        finally:
            target.close()

    def _run_recorded(
        self, context: Any, settings: Settings, target: psycopg.Connection, run_id: str, map_index: int
    ) -> Any:
        """run() under the run's lease; an attempt that does not succeed is recorded, and its error
        raised as Airflow should treat it (fail for good, retry, skip, wait) and without row values."""
        import psycopg

        from user_migration import audit, lease
        from user_migration.db import safe_error
        from user_migration.faults import fail_once

        ti = context["ti"]
        try:
            fail_once(self.task_id, ti.try_number, run_id)
            # While the task runs, its target session shows the run's lease holder is alive.
            with lease.active(target, run_id, holds=self.renews_lease):
                result = self.run(context, settings, target)
        except AirflowSkipException as exc:
            self._skipped = True
            audit.record_attempt(target, run_id, self.task_id, map_index, ti.try_number, "skipped", str(exc))
            raise
        except AirflowRescheduleException as exc:
            reason = exc.reason if isinstance(exc, WaitingForLease) else None
            audit.record_attempt(target, run_id, self.task_id, map_index, ti.try_number, "waiting", reason)
            raise
        except AirflowFailException as exc:
            self._record_failure(target, run_id, map_index, ti.try_number, str(exc), final=True)
            raise
        except (ConfigError, ValidationFailed) as exc:
            self._record_failure(target, run_id, map_index, ti.try_number, str(exc), final=True)
            raise AirflowFailException(str(exc)) from None
        except Exception as exc:
            message = safe_error(exc)
            final = (ti.try_number or 1) > (getattr(ti, "max_tries", 0) or 0)
            self._record_failure(target, run_id, map_index, ti.try_number, message, final=final)
            if isinstance(exc, psycopg.Error):
                # Driver messages can quote row values (DETAIL, CONTEXT): never let them reach the log.
                raise MigrationError(f"{self.task_id} failed: {message}") from None
            raise
        return result

    def _record_failure(
        self, target: psycopg.Connection, run_id: str, map_index: int, try_number, message, final: bool
    ) -> None:
        """Record the failed attempt; when no retry follows, give up the writer lease and say so."""
        import psycopg

        from user_migration import audit, lease

        try:
            if target.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                target.rollback()
            audit.record_attempt(target, run_id, self.task_id, map_index, try_number, "failed", message)
            if final:
                lease.release(target, run_id)
                audit.finish_run(target, run_id, "failed", {"failed_task": self.task_id, "error": message})
        except psycopg.Error:
            self.log.warning("could not record the failed attempt in migration_audit (connection lost)")

    @contextmanager
    def legacy(self) -> Iterator[psycopg.Connection]:
        try:
            conn = self._legacy_hook.get_conn(autocommit=True)
        except ConnectionProblem as exc:
            if exc.permanent:
                raise AirflowFailException(str(exc)) from None
            raise MigrationError(str(exc)) from None
        try:
            yield conn
        finally:
            conn.close()

    def run(self, context: Any, settings: Settings, target: psycopg.Connection) -> Any:
        raise NotImplementedError

    def get_openlineage_facets_on_complete(self, task_instance: Any) -> Any:
        """The tables this task read and wrote, for the OpenLineage provider's listener.

        Called after execute() in the task's process (on failure too: the provider falls back to this
        method). Host, port and database come from the run's connections; no password, no row. A
        skipped task, or one whose settings were refused, moved no data and reports no table.
        """
        from airflow.providers.openlineage.extractors import OperatorLineage
        from openlineage.client.event_v2 import Dataset

        from user_migration.lineage import task_tables

        settings = getattr(self, "_settings", None)
        if self.lineage_kind is None or settings is None or getattr(self, "_skipped", False):
            return OperatorLineage()
        inputs, outputs = task_tables(
            self.lineage_kind,
            settings.mapping,
            self._legacy_hook.connection_params(),
            self._target_hook.connection_params(),
            dry_run=settings.dry_run,
        )
        return OperatorLineage(
            inputs=[Dataset(namespace=t.namespace, name=t.name) for t in inputs],
            outputs=[Dataset(namespace=t.namespace, name=t.name) for t in outputs],
        )


class LegacyBackupOperator(_MigrationOperator):
    """Check the mapping against the legacy tables, then back them up (gzip'd CSV + manifest).

    As the first task it takes the target's writer lease, and after a cutover it ends the pass: the
    whole run is skipped, saying so.
    """

    lineage_kind = "backup"

    renews_lease = False

    def run(self, context, settings, target):
        from user_migration import audit
        from user_migration.backup import backup_covering, run_backup
        from user_migration.cutover import active_cutover, resolve_pending
        from user_migration.db import check_legacy_tables

        run_id = context["run_id"]
        dag_run = context["dag_run"]
        audit.start_run(
            target, run_id, dag_run.dag_id, context.get("logical_date"), settings.dry_run, settings.public()
        )
        with self.legacy() as legacy:
            resolved = resolve_pending(legacy, target, settings)
        if resolved:
            self.log.warning("a cutover left half-done by a failed legacy commit is now %s", resolved)
        cut = active_cutover(target)
        if cut is not None:
            message = (
                f"the migration was cut over by run '{cut['run_id']}' at {cut['cut_at']:%Y-%m-%d %H:%M:%S %Z}; "
                "this pass does nothing (roll back with the user_migration_rollback DAG to resume passes)"
            )
            self.log.info(message)
            audit.finish_run(target, run_id, "skipped_after_cutover", {"message": message})
            raise AirflowSkipException(message)
        self._take_lease(target, run_id, dag_run, settings)
        with self.legacy() as legacy:
            try:
                check_legacy_tables(legacy, settings.mapping, settings.legacy_conn_id)
            except MigrationError as exc:
                raise ConfigError(str(exc)) from None
            # A run that may cut over always writes its own backup: retention pins it, and it is the
            # state a restore returns to (a skipped run's covering backup would not be pinned).
            skip_allowed = not (settings.full_reconcile or settings.cutover)
            covered = backup_covering(legacy, target, settings, run_id) if skip_allowed else None
            if covered:
                audit.set_backup(target, run_id, None, covered)
                self.log.info("no backup written: %s", covered)
                return {"folder": None, "covered_by": covered}
            result = run_backup(legacy, settings.mapping, backup_root(), run_id, settings.legacy_conn_id)
        audit.set_backup(target, run_id, result.folder)
        self.log.info("backup written to %s: %s", result.folder, result.rows)
        return {"folder": result.folder, "rows": result.rows}

    def _take_lease(self, target, run_id: str, dag_run: Any, settings: Settings) -> None:
        """Take the writer lease; a backfill run that finds it held waits its turn by rescheduling."""
        from user_migration import lease

        wait = settings.lock_wait_seconds if dag_run.run_type != "backfill" else 0
        try:
            took_over = lease.acquire(
                target,
                run_id,
                dag_run.dag_id,
                wait,
                settings.lease_stale_minutes,
                settings.lease_grace_seconds,
                run_state=_dag_run_state,
            )
        except lease.LeaseBusy as busy:
            if dag_run.run_type != "backfill":
                raise
            now = dt.datetime.now(dt.UTC)
            waited = now - (dag_run.start_date or now)
            if waited > BACKFILL_LEASE_WAIT:
                raise AirflowFailException(
                    f"the target database is still being written by run '{busy.holder}' after this backfill "
                    f"run waited its turn for {waited.total_seconds() / 3600:.1f} h; it gives up. Let that run "
                    "finish, then clear this run's tasks to run the pass"
                ) from None
            # Poke often at first (demo-sized passes take seconds), then once a minute.
            delay = min(60.0, max(10.0, waited.total_seconds() / 4))
            reason = f"backfill run waits its turn: run '{busy.holder}' is writing the target"
            self.log.info("%s; trying again in %.0f s", reason, delay)
            raise WaitingForLease(now + dt.timedelta(seconds=delay), reason) from None
        if took_over:
            self.log.warning("%s", took_over)


def _dag_run_state(dag_id: str, run_id: str) -> str | None:
    """A DAG run's state, from Airflow's API server (through the task's supervisor)."""
    from airflow.sdk.execution_time.task_runner import RuntimeTaskInstance

    return RuntimeTaskInstance.get_dagrun_state(dag_id, run_id)


class TargetSchemaOperator(_MigrationOperator):
    """Apply the pending versioned DDL of the new schema (skipped on a dry run)."""

    lineage_kind = "ddl"

    def run(self, context, settings, target):
        from user_migration.schema import apply_schema

        if settings.dry_run:
            self.log.info("dry run: the target schema is not created or changed")
            return {"applied": [], "dry_run": True}
        applied = apply_schema(target, context["run_id"])
        self.log.info("schema changes applied now: %s", applied or "none (up to date)")
        return {"applied": applied}


class MigrationPlanOperator(_MigrationOperator):
    """Split the id range into partitions and decide duplicates globally; returns the partitions."""

    lineage_kind = "plan"

    def run(self, context, settings, target):
        from user_migration.plan import make_plan

        with self.legacy() as legacy:
            plan = make_plan(legacy, target, settings, context["run_id"], pass_date())
        self.log.info(
            "plan: %s source rows, %s partitions, %s duplicates (%s)",
            plan["source_rows"],
            len(plan["partitions"]),
            plan["duplicates"],
            plan["duplicates_note"],
        )
        return plan["partitions"]


class PartitionCopyOperator(_MigrationOperator):
    """Copy one partition (mapped: one task instance per partition, bounded by the pool)."""

    lineage_kind = "copy"

    template_fields = ("partition",)

    def __init__(self, *, partition: dict[str, Any], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.partition = partition

    def run(self, context, settings, target):
        from user_migration.partition_copy import copy_partition

        with self.legacy() as legacy:
            result = copy_partition(
                legacy, target, settings, context["run_id"], self.partition, lease_run_id=context["run_id"]
            )
        summary = result.as_dict()
        if result.full_because:
            self.log.info("partition %s takes the full merge: %s", result.partition_no, result.full_because)
        self.log.info(
            "partition %s (ids %s..%s, %s path): %s rows in %s batches, %s migrated (%s new, %s updated, "
            "%s unchanged), %s removed, %s key holders updated in place, %s rejected %s, %s fixes, "
            "%s drifted ids repaired, %.1f s (%s legacy snapshots, %.1f s held by the throttle)",
            result.partition_no,
            result.lo,
            result.hi,
            result.path,
            result.rows_in,
            result.batches,
            result.migrated,
            result.inserted,
            result.updated,
            result.unchanged,
            result.removed,
            result.holders_updated,
            result.rejected,
            result.rejected_by_reason,
            result.fixed,
            result.drift_repaired,
            result.seconds,
            result.snapshots,
            result.throttled_seconds,
        )
        return summary


class FinalizeTargetOperator(_MigrationOperator):
    """After the copy (finalize.finalize_target): indexes a first load deferred, one account_profile per
    migrated user, sequences past the copied ids, change capture completed, write triggers, VACUUM (ANALYZE)."""

    lineage_kind = "finalize"

    def run(self, context, settings, target):
        from user_migration.finalize import finalize_target

        if settings.dry_run:
            self.log.info("dry run: no profiles created")
            return {"dry_run": True}
        with self.legacy() as legacy:
            result = finalize_target(legacy, target, settings, context["run_id"])
        indexes = result["indexes"]
        if indexes["built"]:
            self.log.info("indexes built after the first load: %s", ", ".join(indexes["built"]))
        if indexes["settled"]:
            self.log.warning(
                "rows that took a key another row holds (changed in the legacy table during the pass), "
                "rejected and decided again next pass: %s",
                indexes["settled"],
            )
        self.log.info(
            "profiles created: %s (total %s); VACUUM (ANALYZE) of the loaded tables took %s s",
            result["profiles_created"],
            result["profiles_total"],
            result["vacuum_analyze_seconds"],
        )
        return result


class GreatExpectationsValidationOperator(_MigrationOperator):
    """Reconcile the counts and run the Great Expectations suite on the target; store the results."""

    lineage_kind = "validate"

    def run(self, context, settings, target):
        from user_migration import audit
        from user_migration.checks import run_checks

        run_id = context["run_id"]
        checked = run_checks(target, run_id, settings, self._target_hook.sqlalchemy_url())
        if checked.suite_note is not None:
            self.log.info("Great Expectations: %s (%.1f s)", checked.suite_note, checked.suite_seconds)
        outcomes = checked.outcomes
        audit.store_validation(target, run_id, outcomes)
        for o in outcomes:
            self.log.info("check %s: %s", o["name"], "passed" if o["success"] else "FAILED")
        if checked.failed:
            raise ValidationFailed(
                f"{len(checked.failed)} of {len(outcomes)} checks failed: "
                + "; ".join(o["details"]["message"] for o in checked.failed)
            )
        return {"checks": len(outcomes), "passed": len(outcomes)}


class MigrationReportOperator(_MigrationOperator):
    """Write report.json and report.md beside the backup; return the summary (no personal data)."""

    lineage_kind = "report"

    def run(self, context, settings, target):
        from user_migration import audit, lease
        from user_migration.report import build_summary, cutover_outcome, write_report

        run_id = context["run_id"]
        summary = build_summary(target, run_id, settings, backup_root())
        summary["cutover"] = cutover_outcome(
            target, settings, run_id, *self._cutover_xcoms(context, settings)
        )
        retention = summary["retention"]
        folder = Path(summary["backup_path"]) if summary["backup_path"] else backup_root()
        summary["report_files"] = write_report(folder, summary)
        audit.finish_run(target, run_id, "success", summary)
        lease.release(target, run_id)
        if not settings.dry_run:
            self._emit_pass_event(context, summary)
        self.log.info(
            "backup retention (keep %s, %s days): %s %s folders (%s bytes), %s could not be deleted; "
            "covering backup %s",
            settings.backup_keep,
            settings.backup_keep_days,
            "deleted" if retention["applied"] else "would delete (dry run)",
            len(retention["deleted"]),
            retention["freed_bytes"],
            len(retention["failed"]),
            retention["covering_backup"],
        )
        self.log.info(
            "run %s: %s source rows, %s migrated, %s rejected %s, %s fixed fields; report at %s",
            run_id,
            summary["source_rows"],
            summary["migrated"],
            summary["rejected"],
            summary["rejected_by_reason"],
            summary["fixed_fields"],
            summary["report_files"]["markdown"],
        )
        return summary

    def _emit_pass_event(self, context: Any, summary: dict[str, Any]) -> None:
        """The target users table was updated by this pass: its asset event, with the pass's counts."""
        from user_migration.assets import TARGET_USERS_ALIAS, pass_extra, target_users_asset

        if not any(getattr(o, "name", None) == TARGET_USERS_ALIAS.name for o in self.outlets or ()):
            return
        asset = target_users_asset(self._target_hook.connection_params())
        context["outlet_events"][TARGET_USERS_ALIAS].add(asset, extra=pass_extra(summary))
        self.log.info("asset event: %s (pass %s)", asset.uri, summary["run_id"])

    @staticmethod
    def _cutover_xcoms(context: Any, settings: Settings) -> tuple[dict | None, dict | None]:
        """The approval's outcome and the cutover task's result, from XCom (None outside Airflow)."""
        ti = context.get("ti")  # absent when the report is run outside Airflow (tests, tools)
        if not settings.cutover or ti is None:
            return None, None
        approval = ti.xcom_pull(task_ids=APPROVAL_TASK, key=APPROVAL_KEY) or ti.xcom_pull(
            task_ids=APPROVAL_TASK
        )
        return approval, ti.xcom_pull(task_ids="cutover")


class CutoverOperator(_MigrationOperator):
    """With Param cutover=true (and a passed validation): lock, final sync, prove, make legacy read-only."""

    lineage_kind = "cutover"

    def run(self, context, settings, target):
        from user_migration.cutover import CutoverOptions, run_cutover
        from user_migration.report import check_backup_visible

        if not settings.cutover:
            raise AirflowSkipException(
                "cutover not requested (Param cutover=false): the legacy tables stay in use"
            )
        dag_run = context["dag_run"]
        # The backup a restore would return to must be on the shared folder before the switch, not
        # found missing by the report after it (Celery: another worker wrote it).
        backup = target.execute(
            "SELECT backup_path FROM migration_audit.runs WHERE run_id = %s", (context["run_id"],)
        ).fetchone()
        check_backup_visible(backup[0] if backup else None)
        as_of = pass_date()
        cut_by = dag_run.triggering_user_name or f"{dag_run.run_type} run"
        options = CutoverOptions(
            lock_timeout_ms=settings.lock_timeout_ms,
            attempts=settings.cutover_attempts,
            dry_run=settings.dry_run,
        )
        same_database = self._legacy_hook.conninfo() == self._target_hook.conninfo()
        if same_database:
            result = run_cutover(target, target, settings, context["run_id"], as_of, cut_by, options)
        else:
            with self.legacy() as legacy:
                result = run_cutover(legacy, target, settings, context["run_id"], as_of, cut_by, options)
        self.log.info(
            "%s: writes paused %.3f s, %s legacy rows = %s migrated + %s rejected, checksums equal",
            "cutover rehearsed (dry run, nothing changed)" if settings.dry_run else "cut over",
            result["write_pause_seconds"],
            result["source_rows"],
            result["target_rows"],
            result["rejected_rows"],
        )
        if not settings.dry_run:
            self._emit_cutover_event(context, context["run_id"], result)
        return {"requested": True, **result}

    def _emit_cutover_event(self, context: Any, run_id: str, result: dict[str, Any]) -> None:
        """The cutover's own asset event (migration_audit.cutovers of the target), only when declared."""
        from user_migration.assets import CUTOVER_ALIAS, cutover_extra, cutovers_asset

        if not any(getattr(o, "name", None) == CUTOVER_ALIAS.name for o in self.outlets or ()):
            return
        asset = cutovers_asset(self._target_hook.connection_params())
        context["outlet_events"][CUTOVER_ALIAS].add(asset, extra=cutover_extra(run_id, result))
        self.log.info("asset event: %s (cutover of run %s)", asset.uri, run_id)


class RollbackOperator(_MigrationOperator):
    """The user_migration_rollback DAG's one job: carry back after a cutover, or restore a backup."""

    lineage_kind = "rollback"

    renews_lease = False

    def run(self, context, settings, target):
        from user_migration import capture
        from user_migration.backup import run_folder_name
        from user_migration.cutover import active_cutover
        from user_migration.rollback import carry_back, cutover_settings, restore

        params = context["params"]
        if params.get("confirm") != "ROLLBACK":
            raise ConfigError("type ROLLBACK in the confirm Param to roll back; nothing was changed")
        cut = active_cutover(target)
        if cut is not None:
            # The cutover's run decides how rows were transformed and where the legacy tables are.
            recorded = cutover_settings(target, cut["run_id"], settings)
            if params.get("legacy_mapping") and recorded.mapping != settings.mapping:
                raise ConfigError(
                    f"legacy_mapping differs from the mapping of cutover run '{cut['run_id']}'; leave it "
                    "empty, the rollback uses that run's mapping; nothing was changed"
                )
            settings = recorded
            self._settings = recorded  # the tables it names (lineage) are the cutover run's
        action = params.get("action")
        dag_run = context["dag_run"]
        by = dag_run.triggering_user_name or f"{dag_run.run_type} run"
        same_database = self._legacy_hook.conninfo() == self._target_hook.conninfo()
        if action == "carry_back":
            if same_database:
                result = carry_back(target, target, settings, by, context["run_id"])
            else:
                with self.legacy() as legacy:
                    result = carry_back(legacy, target, settings, by, context["run_id"])
        elif action == "restore":
            backup_run = params.get("backup_run_id") or ""
            if not backup_run:
                raise ConfigError("backup_run_id is required to restore: the run id whose backup to reload")
            folder = backup_root() / run_folder_name(backup_run)
            if not folder.is_dir():
                raise ConfigError(f"no backup folder {folder} for run {backup_run!r}")
            with self.legacy() as legacy:
                result = restore(legacy, target, settings, folder)
        else:
            raise ConfigError(f"action must be carry_back or restore, got {action!r}")
        # The legacy tables changed outside the change log's watch: the next pass compares every row.
        capture.distrust(target, f"rollback ({action}) by run {context['run_id']}", context["run_id"])
        self.log.info("rollback %s done: %s", action, result)
        return {"action": action, **result}


class CutoverApprovalOperator(ApprovalOperator):
    """The human gate in front of a real cutover (the standard provider's ApprovalOperator).

    - Param cutover=false: skipped, and so is the cutover (shown as skipped in the UI).
    - A rehearsal (dry_run) or require_approval=false: approved at once, saying why.
    - Otherwise: shows this pass's figures from migration_audit and waits in ``awaiting_input`` for
      Approve or Reject; after ``approval_timeout_minutes`` without an answer the answer is Reject.
      Reject (or the timeout) skips the cutover: the legacy tables stay writable; the report says so.
    """

    ui_color = "#fff4d6"
    # Subject and body are built at run time from the audit trail, never from Jinja.
    template_fields = ()

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            subject="Cut over the users table?",
            body="Filled in when the task runs, from this pass's audit figures.",
            defaults=ApprovalOperator.REJECT,
            response_timeout=dt.timedelta(minutes=Settings.approval_timeout_minutes),
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        try:
            settings = Settings.from_params(dict(context["params"]))
        except ConfigError as exc:
            raise AirflowFailException(f"invalid setting: {exc}") from None
        if not settings.cutover:
            raise AirflowSkipException("cutover not requested (Param cutover=false): nothing to approve")
        if settings.dry_run:
            self.log.info("rehearsal (dry_run): it changes nothing, so it needs no approval")
            return {"approved": True, "decision": "not needed: rehearsal", "by": None, "timed_out": False}
        if not settings.require_approval:
            self.log.warning(
                "cutover approved without asking: the run was triggered with require_approval=false"
            )
            return {
                "approved": True,
                "decision": "not asked: require_approval=false",
                "by": None,
                "timed_out": False,
            }
        from user_migration.approval import render_body

        run_id = context["run_id"]
        figures = self._figures_keeping_the_lease(settings, run_id)
        self.subject = f"Cut over the users table? Run {run_id}: {figures['migrated']} users, {figures['rejected']} rejected"
        self.body = render_body(figures, settings.approval_timeout_minutes)
        self.response_timeout = dt.timedelta(minutes=settings.approval_timeout_minutes)
        self.log.info(
            "waiting up to %s min for Approve or Reject (Required actions in the UI, or PATCH "
            ".../taskInstances/%s/-1/hitlDetails); no answer means Reject",
            settings.approval_timeout_minutes,
            self.task_id,
        )
        return super().execute(context)

    def _figures_keeping_the_lease(self, settings: Settings, run_id: str) -> dict[str, Any]:
        """This pass's figures; and the run keeps its writer lease while it waits for the answer
        (plus the grace, for the cutover task to start), however long that is."""
        from user_migration import lease
        from user_migration.approval import cutover_figures
        from user_migration.hooks import MigrationDbHook

        target_hook = MigrationDbHook(settings.target_conn_id, fallback_conn_id=settings.legacy_conn_id)
        legacy_hook = MigrationDbHook(settings.legacy_conn_id)
        try:
            with (
                target_hook.get_conn(autocommit=True) as target,
                legacy_hook.get_conn(autocommit=True) as legacy,
            ):
                figures = cutover_figures(target, run_id, legacy, settings.mapping)
                wait = settings.approval_timeout_minutes * 60 + settings.lease_grace_seconds
                lease.wait_for_answer(target, run_id, wait)
                return figures
        except ConnectionProblem as exc:
            raise AirflowFailException(str(exc)) from None
        except MigrationError as exc:  # the lease was taken over: the cutover would fail on it
            raise AirflowFailException(f"nothing to approve: {exc}") from None

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        timed_out = bool(event.get("timedout")) or event.get("error_type") == "timeout"
        chosen = (event.get("chosen_options") or [ApprovalOperator.REJECT])[0]
        user = event.get("responded_by_user") or {}
        by = user.get("name") if isinstance(user, dict) else getattr(user, "name", None)
        approved = chosen == ApprovalOperator.APPROVE
        outcome = {"approved": approved, "decision": chosen, "by": by, "timed_out": timed_out and not by}
        self.log.info(
            "cutover %s%s",
            "approved" if approved else "not approved: the legacy tables stay writable",
            f" by {by}" if by else (" (no answer before the timeout: default Reject)" if timed_out else ""),
        )
        # Pushed before the provider's execute_complete: on Reject it skips the cutover by raising
        # DownstreamTasksSkipped, so nothing after it runs and no return value would reach the report.
        context["ti"].xcom_push(key=APPROVAL_KEY, value=outcome)
        super().execute_complete(context=context, event=event)
        return outcome
