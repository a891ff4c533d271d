"""The run report: report.json for machines and report.md for people, beside the backup.

The report holds counts, reasons, checks, paths and timings. It never holds a password hash, an
email, a phone number or a row: it says where such data is kept instead.
"""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import psycopg

    from user_migration.config import Settings

PERSONAL_DATA_NOTE = (
    "Personal data of this run is kept in: the backup files in {backup} (mode 0600, folder 0700), "
    "and the tables migration_audit.rejected_rows (whole rejected rows, with password hashes; the view "
    "migration_audit.run_rejects shows them for every run that carried them over) and "
    "migration_audit.field_fixes (original phone values) of the target database. Protect them like "
    "the users table and delete them when the retention period ends."
)


def build_summary(target: psycopg.Connection, run_id: str, settings: Settings, root: Path) -> dict[str, Any]:
    """The pass's summary from the audit trail, after applying the backup retention under ``root``.

    Old backups are pruned here, once the pass succeeded (a dry run only says what it would delete).
    The cutover's outcome is added by the caller (``cutover_outcome``).
    """
    from user_migration import audit
    from user_migration.retention import prune_backups

    numbers = audit.reconcile(target, run_id)
    backup = target.execute(
        "SELECT backup_path, backup_note FROM migration_audit.runs WHERE run_id = %s", (run_id,)
    ).fetchone()
    backup_path, backup_note = backup if backup else (None, None)
    check_backup_visible(backup_path)
    retention = prune_backups(
        target, root, run_id, settings.backup_keep, settings.backup_keep_days, apply=not settings.dry_run
    )
    started = audit.run_started_at(target, run_id)
    target_users = None
    if not settings.dry_run:
        target_users = target.execute("SELECT count(*) FROM account_newuser").fetchone()[0]
    return {
        "run_id": run_id,
        "state": "success",
        "dry_run": settings.dry_run,
        **numbers,
        "target_users": target_users,
        "checks": audit.validation_results(target, run_id),
        "backup_path": backup_path,
        "backup_note": backup_note,
        "covering_backup": retention["covering_backup"],
        "retention": retention,
        "seconds": round((dt.datetime.now(dt.UTC) - started).total_seconds(), 1) if started else None,
        "settings": {k: v for k, v in settings.public().items() if k != "mapping"},
        "personal_data": PERSONAL_DATA_NOTE.format(backup=backup_path),
    }


def check_backup_visible(backup_path: str | None) -> None:
    """The run's backup, written by the backup task (maybe on another worker), must be here too.

    Otherwise the backup folder is not shared: the report would land in a folder of its own on
    this worker, and retention would judge backups it cannot see.
    """
    from user_migration.backup import MANIFEST
    from user_migration.config import ConfigError

    if backup_path and not (Path(backup_path) / MANIFEST).is_file():
        raise ConfigError(
            f"this run's backup {backup_path} (written by its backup task) is not visible on the worker "
            "running the report: USER_MIGRATION_BACKUP_DIR must name one folder that every worker "
            "shares, at the same path. No report written, no backup deleted"
        )


def cutover_outcome(
    target: psycopg.Connection,
    settings: Settings,
    run_id: str,
    approval: dict[str, Any] | None,
    result: dict[str, Any] | None,
) -> dict[str, Any]:
    """What became of the cutover in this run: not requested, not approved, rehearsed or done.

    From the cutover's record (a real cutover), else from the approval's outcome and the cutover
    task's ``result``; ids, counts, timings and the approver's Airflow user name only.
    """
    cut = target.execute(
        "SELECT run_id, state, cut_at, pause_seconds, source_checksum, target_checksum "
        "FROM migration_audit.cutovers WHERE run_id = %s ORDER BY id DESC LIMIT 1",
        (run_id,),
    ).fetchone()
    if cut is not None:
        return {
            "state": cut[1],
            "cut_at": cut[2].isoformat(),
            "write_pause_seconds": round(cut[3], 3),
            "checksums_equal": cut[4] == cut[5],
            "approval": approval,
            "legacy_tables": "read-only" if cut[1] == "active" else "writable",
        }
    if not settings.cutover:
        return {"state": "not_requested", "legacy_tables": "writable"}
    if settings.dry_run and result:
        return {
            "state": "rehearsed",
            "write_pause_seconds": result.get("write_pause_seconds"),
            "checksums_equal": result.get("source_checksum") == result.get("target_checksum"),
            "lock_attempts": result.get("lock_attempts"),
            "legacy_tables": "writable",
        }
    if approval and not approval.get("approved"):
        how = "no answer before the approval timed out" if approval.get("timed_out") else "rejected"
        by = approval.get("by")
        return {
            "state": "not_approved",
            "decision": f"{how}{f' by {by}' if by else ''}",
            "approval": approval,
            "legacy_tables": "writable",
        }
    return {"state": "not_done", "approval": approval, "legacy_tables": "writable"}


def _write_private(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as fh:
        fh.write(text)
    os.replace(tmp, path)


def render_markdown(summary: dict[str, Any]) -> str:
    lines = [
        f"# User migration report: {summary['run_id']}",
        "",
        f"- state: **{summary['state']}**{' (dry run: nothing written to the target tables)' if summary['dry_run'] else ''}",
        f"- source rows: {summary['source_rows']}",
        f"- migrated: {summary['migrated']} (inserted {summary['inserted']}, updated {summary['updated']}, "
        f"unchanged {summary['unchanged']}); removed from target: {summary['removed']}",
        f"- rejected: {summary['rejected']}",
        f"- fixed fields: {summary['fixed_fields']}",
        f"- target users now: {summary.get('target_users', 'n/a')}",
        f"- partitions: {summary['partitions_done']}/{summary['partitions']} done "
        f"({summary['partition_attempts']} attempts)",
        f"- backup: {summary['backup_path'] or summary.get('backup_note') or 'none'}",
        f"- backup covering this run: {summary.get('covering_backup') or 'none that verifies'}",
        f"- changed rows found by: {summary.get('changes') or 'n/a'} ({summary.get('changes_reason') or ''})",
        f"- time taken: {summary['seconds']} s",
        "",
        "## Rejected rows by reason",
        "",
    ]
    if summary["rejected_by_reason"]:
        lines += ["| reason | rows |", "| --- | ---: |"]
        lines += [f"| {reason} | {n} |" for reason, n in summary["rejected_by_reason"].items()]
    else:
        lines.append("none")
    lines += ["", "## Fixed fields", ""]
    if summary["fixed_by_field"]:
        lines += ["| field:reason | rows |", "| --- | ---: |"]
        lines += [f"| {key} | {n} |" for key, n in summary["fixed_by_field"].items()]
    else:
        lines.append("none")
    lines += ["", "## Checks", ""]
    checks = summary.get("checks", [])
    if checks:
        lines += ["| check | result | observed |", "| --- | --- | --- |"]
        lines += [
            f"| {c['name']} | {'passed' if c['success'] else 'FAILED'} | {json.dumps(c.get('observed'))} |"
            for c in checks
        ]
    else:
        lines.append("none")
    lines += ["", "## Cutover", ""]
    lines += render_cutover(summary.get("cutover"))
    lines += ["", "## Backup retention", ""]
    lines += render_retention(summary.get("retention"))
    lines += [
        "",
        "## Where the rows are",
        "",
        "Every source row is in exactly one place: `account_newuser`, or `migration_audit.run_rejects` "
        f"with `run_id = '{summary['run_id']}'` and its reason (a reject this run carried over unread "
        "keeps the row and reason of the run that read it, `recorded_by`).",
        "",
        "## Personal data",
        "",
        summary["personal_data"],
        "",
    ]
    return "\n".join(lines)


CUTOVER_STATES = {
    "not_requested": "not requested (Param cutover=false)",
    "not_approved": "requested but not approved",
    "rehearsed": "rehearsed (dry run): nothing changed",
    "not_done": "requested but not done",
    "active": "done: the new tables are in use",
    "switching": "legacy side still committing",
    "abandoned": "abandoned (the legacy side did not commit)",
    "rolled_back": "done, then rolled back",
}


def render_cutover(cutover: dict[str, Any] | None) -> list[str]:
    """What became of the cutover in this run, and whether the legacy tables are still writable."""
    if not cutover:
        return ["not recorded"]
    lines = [f"- {CUTOVER_STATES.get(cutover['state'], cutover['state'])}"]
    if cutover.get("decision"):
        lines.append(f"- approval: {cutover['decision']}")
    elif (cutover.get("approval") or {}).get("decision"):
        approval = cutover["approval"]
        by = f" by {approval['by']}" if approval.get("by") else ""
        lines.append(f"- approval: {approval['decision']}{by}")
    if cutover.get("write_pause_seconds") is not None:
        lines.append(f"- application writes paused: {cutover['write_pause_seconds']} s")
    if cutover.get("checksums_equal") is not None:
        lines.append(f"- checksums equal: {'yes' if cutover['checksums_equal'] else 'NO'}")
    lines.append(f"- legacy tables: **{cutover.get('legacy_tables', 'unknown')}**")
    return lines


def render_retention(retention: dict[str, Any] | None) -> list[str]:
    """The retention section: what was (or, on a dry run, would be) deleted and why, what is pinned."""
    if not retention:
        return ["not run"]
    policy = retention["policy"]
    verb = "deleted" if retention["applied"] else "would delete (dry run: nothing deleted)"
    lines = [
        f"Policy: keep the newest {policy['keep']} backups and every backup younger than "
        f"{policy['keep_days']} days, in {retention['root']}; pinned backups and the newest complete one "
        "are never deleted.",
        "",
    ]
    if retention["deleted"]:
        lines += [f"{verb}:", "", "| folder | run | reason | bytes |", "| --- | --- | --- | ---: |"]
        lines += [
            f"| {d['folder']} | {d['run_id'] or ''} | {d['reason']} | {d['bytes'] if d['bytes'] is not None else ''} |"
            for d in retention["deleted"]
        ]
    else:
        lines.append(f"{verb}: nothing")
    for failed in retention["failed"]:
        lines.append(f"- could not delete {failed['folder']}: {failed['error']} (tried again next pass)")
    for skipped in retention["skipped"]:
        lines.append(f"- left alone: {skipped['folder']}: {skipped['reason']}")
    lines.append("")
    lines += [f"- pinned: {p['folder']} ({p['reason']})" for p in retention["pinned"]]
    lines += [f"- kept, {reason}: {n}" for reason, n in retention["kept_by_reason"].items()]
    return lines


def write_report(folder: Path, summary: dict[str, Any]) -> dict[str, str]:
    """Write report.json and report.md into ``folder`` (owner-only); returns their paths."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    json_path, md_path = folder / "report.json", folder / "report.md"
    _write_private(json_path, json.dumps(summary, indent=2, default=str) + "\n")
    _write_private(md_path, render_markdown(summary))
    return {"json": str(json_path), "markdown": str(md_path)}
