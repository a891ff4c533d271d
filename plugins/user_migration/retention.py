"""Backup retention: delete old run backups so hourly passes do not fill the disk, never the ones that matter.

What is kept is decided from the audit trail (migration_audit.runs, partitions, cutovers), never from
folder names alone, and only folders this audit trail wrote are ever considered: a root shared with
another deployment, a symlink, or anything else in the root is left alone. Never deleted:

- the backup of the first load (the earliest non-dry run that began copying into the target) and of
  any run that cut over (migration_audit.cutovers, any state): the states a rollback returns to;
- the folder of a run still running (state 'running'), including the run doing the pruning;
- the newest backup whose manifest verifies, and anything newer than it: a backup is deleted only
  when a newer complete backup replaces it.

Of the rest, a backup is kept while it is one of the newest ``keep`` unpinned backups or younger
than ``keep_days`` days; it is deleted only when it is neither. Every deletion is recorded in
migration_audit.backup_deletions with its reason.
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from user_migration.backup import run_folder_name, verify_backup
from user_migration.db import read_sql
from user_migration.errors import MigrationError

log = logging.getLogger(__name__)

DAY_SECONDS = 86_400
# A folder is renamed to this prefix, then removed: an interrupted removal leaves a name that is
# never a backup (run_folder_name never starts with "."), cleaned up by the next pass.
PRUNING_PREFIX = ".pruning-"


@dataclass
class _Backup:
    run_id: str
    folder: str
    state: str
    age_seconds: float
    first_load: bool
    cutover: bool
    verified: bool | None = None  # None: not checked (not needed for the decision)

    @property
    def pinned(self) -> str | None:
        if self.first_load:
            return "pinned: the backup taken before the first load"
        if self.cutover:
            return "pinned: the backup of a run that cut over"
        return None


def _real_dir(path: Path) -> bool:
    """A directory itself, not a symlink to one (lstat: the link is never followed)."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _folder_bytes(path: Path) -> int:
    """Bytes of the regular files directly in ``path`` (a backup folder has no sub-folders)."""
    total = 0
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file(follow_symlinks=False):
                total += entry.stat(follow_symlinks=False).st_size
    return total


def _verifies(folder: Path) -> bool:
    try:
        verify_backup(folder)
    except (MigrationError, OSError):
        return False
    return True


def _backups(target: psycopg.Connection, root: Path) -> tuple[list[_Backup], list[dict[str, str]]]:
    """This audit trail's backup folders inside ``root`` (resolved), newest first; and the ones skipped."""
    found: list[_Backup] = []
    skipped: list[dict[str, str]] = []
    for run_id, backup_path, state, _started, age, first_load, cutover in target.execute(
        read_sql("retention/backup_runs.sql")
    ).fetchall():
        path = Path(backup_path)
        name = run_folder_name(run_id)
        try:
            inside = path.name == name and path.parent.resolve() == root
        except OSError:
            inside = False
        if not inside:
            continue  # another root (USER_MIGRATION_BACKUP_DIR changed): not this pass's business
        if os.path.lexists(root / name) and not _real_dir(root / name):
            skipped.append({"folder": name, "run_id": run_id, "reason": "not a real folder (a symlink?)"})
            continue
        if not _real_dir(root / name):
            continue  # already gone
        found.append(_Backup(run_id, name, state, float(age), first_load, cutover))
    return found, skipped


def _why_deleted(keep: int, keep_days: int, newest: _Backup) -> str:
    rules = [f"beyond the newest {keep} backups"] if keep else []
    rules += [f"older than {keep_days} days"] if keep_days else []
    why = " and ".join(rules) or "only pinned and the newest complete backups are kept (keep 0, 0 days)"
    return f"{why}; the complete backup {newest.folder} is newer"


def _decide(
    backups: list[_Backup], root: Path, keep: int, keep_days: int, run_id: str
) -> tuple[list[tuple[_Backup, str]], list[tuple[_Backup, str]], _Backup | None, _Backup | None]:
    """Decide each backup (newest first): (to delete, why), (to keep, why), newest complete, covering.

    Manifests are verified newest first until one verifies: older ones need no check to be
    deleted, newer ones are kept because nothing complete replaces them.
    """
    newest: _Backup | None = None
    for backup in backups:
        backup.verified = _verifies(root / backup.folder)
        if backup.verified:
            newest = backup
            break
    # The backup covering this run: its own when it verifies, else the newest complete one before it.
    own = next((i for i, b in enumerate(backups) if b.run_id == run_id), 0)
    covering = None
    for backup in backups[own:]:
        if backup.verified is None:
            backup.verified = _verifies(root / backup.folder)
        if backup.verified:
            covering = backup
            break
    delete: list[tuple[_Backup, str]] = []
    kept: list[tuple[_Backup, str]] = []
    replaced = False  # past the newest complete backup (the list is newest first)
    rank = 0  # position among the unpinned backups, newest first
    for backup in backups:
        reason = backup.pinned
        if reason is None:
            rank += 1
            if backup.state == "running":
                reason = "the run is still running"
            elif backup is newest:
                reason = "the newest complete backup"
            elif not replaced:
                reason = "no newer complete backup replaces it"
            elif rank <= keep:
                reason = f"one of the newest {keep} backups"
            elif backup.age_seconds < keep_days * DAY_SECONDS:
                reason = f"younger than {keep_days} days"
        if backup is newest:
            replaced = True
        if reason is None and newest is not None:
            delete.append((backup, _why_deleted(keep, keep_days, newest)))
        else:
            kept.append((backup, reason or "no newer complete backup replaces it"))
    return delete, kept, newest, covering


def _remove(root: Path, name: str) -> int:
    """Remove the folder ``root/name`` (never a symlink, never outside root); returns the bytes freed."""
    path = root / name
    if not _real_dir(path) or path.parent != root:
        raise OSError(f"{path} is not a folder inside {root}")
    size = _folder_bytes(path)
    doomed = root / (PRUNING_PREFIX + name)
    if os.path.lexists(doomed):
        shutil.rmtree(doomed)
    os.rename(path, doomed)  # atomic: from here on it is not a backup anyone could pick
    shutil.rmtree(doomed)  # fd-based on Linux: symlinks inside are removed, never followed
    return size


def prune_backups(
    target: psycopg.Connection, root: Path, run_id: str, keep: int, keep_days: int, apply: bool = True
) -> dict[str, Any]:
    """Apply the retention policy to ``root`` and record what was deleted; ``apply=False`` only reports.

    Returns the record for the run's summary and report: the backup covering the run, what was
    deleted (or would be) and why, and how many were kept for which reason. A folder that cannot
    be removed is reported, not raised: the pass itself succeeded.
    """
    result: dict[str, Any] = {
        "root": str(root),
        "policy": {"keep": keep, "keep_days": keep_days},
        "applied": apply,
        "covering_backup": None,
        "covering_run_id": None,
        "newest_complete": None,
        "deleted": [],
        "failed": [],
        "kept_by_reason": {},
        "pinned": [],
        "skipped": [],
        "freed_bytes": 0,
    }
    if not root.is_dir():
        return result
    real_root = root.resolve()
    if not shutil.rmtree.avoids_symlink_attacks:
        raise MigrationError(
            "this platform's shutil.rmtree can follow symlinks while deleting; backup retention refuses to "
            "run. Set backup_keep and backup_keep_days high, or prune the backups by hand"
        )
    backups, result["skipped"] = _backups(target, real_root)
    delete, kept, newest, covering = _decide(backups, real_root, keep, keep_days, run_id)
    result["newest_complete"] = newest.folder if newest else None
    if covering is not None:
        result["covering_backup"] = str(real_root / covering.folder)
        result["covering_run_id"] = covering.run_id
    for backup, reason in kept:
        result["kept_by_reason"][reason] = result["kept_by_reason"].get(reason, 0) + 1
        if backup.pinned:
            result["pinned"].append({"folder": backup.folder, "run_id": backup.run_id, "reason": reason})
    removals = _removals(real_root, delete)
    if not apply:
        result["deleted"] = [
            {"folder": f, "run_id": r, "reason": why, "bytes": None} for f, r, why in removals
        ]
        return result
    result["failed"] = _delete(target, real_root, run_id, removals)
    # From the audit trail, so a retried report task still lists what its first attempt deleted.
    result["deleted"] = [
        {"folder": folder, "run_id": backup_run, "reason": reason, "bytes": size}
        for folder, backup_run, reason, size in target.execute(
            "SELECT folder, backup_run_id, reason, bytes FROM migration_audit.backup_deletions "
            "WHERE run_id = %s ORDER BY id",
            (run_id,),
        )
    ]
    result["freed_bytes"] = sum(d["bytes"] or 0 for d in result["deleted"])
    return result


def _removals(real_root: Path, delete: list[tuple[_Backup, str]]) -> list[tuple[str, str | None, str]]:
    """(folder, run id, reason) of each backup to delete, then the leftovers of interrupted deletions."""
    removals = [(b.folder, b.run_id, reason) for b, reason in delete]
    # Leftovers of a removal interrupted by an earlier pass (renamed, never a backup any more).
    with os.scandir(real_root) as entries:
        leftovers = sorted(
            e.name for e in entries if e.name.startswith(PRUNING_PREFIX) and e.is_dir(follow_symlinks=False)
        )
    return removals + [(name, None, "leftover of an interrupted deletion") for name in leftovers]


def _delete(
    target: psycopg.Connection, real_root: Path, run_id: str, removals: list[tuple[str, str | None, str]]
) -> list[dict[str, Any]]:
    """Delete each folder and record it in migration_audit.backup_deletions; returns the failures."""
    failed = []
    for folder, backup_run, reason in removals:
        try:
            if folder.startswith(PRUNING_PREFIX):
                size = _folder_bytes(real_root / folder)
                shutil.rmtree(real_root / folder)
            else:
                size = _remove(real_root, folder)
        except OSError as exc:
            log.warning("backup retention could not delete %s: %s", folder, exc.strerror or exc)
            failed.append(
                {"folder": folder, "run_id": backup_run, "reason": reason, "error": exc.strerror or str(exc)}
            )
            continue
        with target.transaction():
            target.execute(
                read_sql("retention/record_deletion.sql"),
                {
                    "run_id": run_id,
                    "folder": folder,
                    "backup_run_id": backup_run,
                    "reason": reason,
                    "bytes": size,
                },
            )
    return failed
