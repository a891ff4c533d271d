"""The run report: report.json for machines and report.md for people, beside the backup.

The report holds counts, reasons, checks, paths and timings. It never holds a password hash, an
email, a phone number or a row: it says where such data is kept instead.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

PERSONAL_DATA_NOTE = (
    "Personal data of this run is kept in: the backup files in {backup} (mode 0600, folder 0700), "
    "and the tables migration_audit.rejected_rows (whole rejected rows, with password hashes) and "
    "migration_audit.field_fixes (original phone values) of the target database. Protect them like "
    "the users table and delete them when the retention period ends."
)


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
        "Every source row is in exactly one place: `account_newuser`, or `migration_audit.rejected_rows` "
        f"with `run_id = '{summary['run_id']}'` and its reason.",
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
