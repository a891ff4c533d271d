"""Backup of the legacy tables: COPY ... TO STDOUT streamed into gzip'd CSV files with a manifest.

All tables are read in one REPEATABLE READ transaction, so the files agree with each other. Each
file is written under a temporary name, fsync'd, then renamed, and the manifest (with the sha256
of every file as written) is written last: a folder without manifest.json is not a backup.
Folders are 0700 and files 0600, since they hold password hashes and personal data.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import os
import re
import select
import shutil
import tempfile
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from isal import igzip
from psycopg import pq, sql

from user_migration.config import LegacyMapping, Settings
from user_migration.db import MigrationError

MANIFEST = "manifest.json"
# ISA-L's deflate (python-isal): the same gzip format as zlib, several times faster; level 2 of 0-3
# is its default (docs/decisions/0004-backup-isal-deflate-and-libpq-copy.md).
GZIP_LEVEL = 2
WRITE_CHUNK = 4 << 20  # bytes of CSV per gzip member
COMPRESS_THREADS = max(2, min(4, os.cpu_count() or 2))
COMPRESS_AHEAD = 2 * COMPRESS_THREADS


@dataclass(frozen=True)
class BackupResult:
    folder: str
    tables: list[dict[str, Any]]

    @property
    def rows(self) -> dict[str, int]:
        return {t["table"]: t["rows"] for t in self.tables}


def run_folder_name(run_id: str) -> str:
    """A file-system-safe folder name for an Airflow run id (which holds ':' and '+').

    Never ``.``, ``..`` or a hidden name: Airflow's run id pattern allows dots, and the folder of a
    run is deleted and rewritten by a retry, so it must always be a new entry inside the backup root.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", run_id)
    if not name:
        raise MigrationError("the run id is empty: it cannot name a backup folder")
    return "_" + name[1:] if name.startswith(".") else name


class _HashingWriter:
    """A binary file wrapper that hashes exactly the bytes that reach the file."""

    def __init__(self, fileobj):
        self._file = fileobj
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data) -> int:
        self.sha256.update(data)
        self.size += len(data)
        return self._file.write(data)

    def flush(self) -> None:
        self._file.flush()


def _private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def _open_private(path: Path):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    return os.fdopen(fd, "wb")


def _next_result(pgconn: pq.abc.PGconn, poller: select.poll) -> pq.abc.PGresult | None:
    """The next result of the query in flight, waiting in poll() (interruptible, GIL released)."""
    pgconn.consume_input()
    while pgconn.is_busy():
        poller.poll()
        pgconn.consume_input()
    return pgconn.get_result()


def _drain(pgconn: pq.abc.PGconn, poller: select.poll) -> None:
    """Read and drop whatever the query in flight still sends (after a cancel, usually little)."""
    while (result := _next_result(pgconn, poller)) is not None:
        if result.status == pq.ExecStatus.COPY_OUT:
            while (size := pgconn.get_copy_data(1)[0]) >= 0:
                if size == 0:
                    poller.poll()
                    pgconn.consume_input()


def _read_copy(
    pgconn: pq.abc.PGconn, poller: select.poll, on_chunk: Callable[[bytearray], None]
) -> bytearray:
    """Hand the rows of a COPY in progress to ``on_chunk`` in chunks; returns the last, partial one."""
    get = pgconn.get_copy_data
    buffer = bytearray()
    while True:
        size, data = get(1)
        if size > 0:
            buffer += data
            if len(buffer) >= WRITE_CHUNK:
                on_chunk(buffer)
                buffer = bytearray()
        elif size == 0:  # nothing buffered: wait for the socket
            poller.poll()
            pgconn.consume_input()
        else:
            return buffer


def _copy_out(
    conn: psycopg.Connection, statement: sql.Composable, on_chunk: Callable[[bytearray], None]
) -> int:
    """Run ``COPY ... TO STDOUT``, handing its data to ``on_chunk`` about WRITE_CHUNK bytes at a time.

    Returns the rows copied. It calls libpq's PQgetCopyData in non-blocking mode through psycopg.pq
    rather than psycopg's per-row Copy iterator, which was the backup's bottleneck
    (docs/decisions/0004-backup-isal-deflate-and-libpq-copy.md). The waits are in poll(), so a task
    being stopped interrupts them; an interrupted COPY is cancelled and drained, leaving the
    connection usable for its rollback.
    """
    pgconn = conn.pgconn
    poller = select.poll()
    poller.register(pgconn.socket, select.POLLIN)
    pgconn.send_query(statement.as_bytes(conn))
    try:
        result = _next_result(pgconn, poller)
        copying = result is not None and result.status == pq.ExecStatus.COPY_OUT
        rest = _read_copy(pgconn, poller, on_chunk) if copying else bytearray()
    except BaseException:
        with contextlib.suppress(Exception):  # the connection may be what failed: keep the first error
            conn.cancel_safe()
            _drain(pgconn, poller)
        raise
    if copying:
        result = _next_result(pgconn, poller)
    _drain(pgconn, poller)
    if result is None:
        raise MigrationError("COPY ended without a result from the server")
    if result.status != pq.ExecStatus.COMMAND_OK:
        raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
    if rest:
        on_chunk(rest)
    return int(result.command_tuples or 0)


def _dump_table(conn: psycopg.Connection, table: sql.Identifier, path: Path) -> tuple[int, str, int]:
    """Stream one COPY into ``path``; returns (rows, sha256, bytes).

    Chunks of the stream are compressed on worker threads (ISA-L releases the GIL) while the next
    chunk is read, and written in order as consecutive gzip members: one valid .gz file that gzip,
    zcat and Python read whole. At most COMPRESS_AHEAD chunks are held, so memory stays bounded
    whatever the table's size.
    """
    tmp = path.with_name(path.name + ".partial")
    copy_out = sql.SQL("COPY {} TO STDOUT WITH (FORMAT csv, HEADER true)").format(table)
    with _open_private(tmp) as raw, ThreadPoolExecutor(COMPRESS_THREADS) as pool:
        hashing = _HashingWriter(raw)
        pending: deque[Future[bytes]] = deque()

        def compress(chunk: bytearray) -> None:
            pending.append(pool.submit(igzip.compress, chunk, GZIP_LEVEL, mtime=0))
            while len(pending) > COMPRESS_AHEAD:
                hashing.write(pending.popleft().result())

        rows = _copy_out(conn, copy_out, compress)
        if not pending:
            compress(bytearray())  # an empty table still gets a valid, empty gzip file
        while pending:
            hashing.write(pending.popleft().result())
        raw.flush()
        os.fsync(raw.fileno())
    os.replace(tmp, path)
    return rows, hashing.sha256.hexdigest(), hashing.size


def run_backup(
    conn: psycopg.Connection,
    mapping: LegacyMapping,
    root: Path,
    run_id: str,
    conn_id: str = "legacy_db",
) -> BackupResult:
    """Write the backup of the legacy users and their links for ``run_id``; safe to repeat."""
    _check_writable(root)
    folder = root / run_folder_name(run_id)
    if folder.resolve().parent != root.resolve():  # a symlink in place of the run's folder
        raise MigrationError(f"backup folder {folder} does not lie inside {root}; remove it and retry")
    if folder.exists():
        # A retry: whatever an earlier attempt left is replaced, never trusted.
        shutil.rmtree(folder)
    _private_dir(folder)
    started = dt.datetime.now(dt.UTC)
    # Whole tables in physical order (COPY table TO: no sort, the fastest read PostgreSQL has).
    tables = [mapping.users_table] + [link.table for link in (mapping.groups, mapping.permissions) if link]
    try:
        conn.isolation_level = psycopg.IsolationLevel.REPEATABLE_READ
        conn.read_only = True
        with conn.transaction():
            version = conn.execute("SHOW server_version").fetchone()[0]
            entries = [_dump_entry(conn, mapping.schema, table, folder) for table in tables]
        manifest = {
            "run_id": run_id,
            "connection": conn_id,
            "server_version": version,
            "started_at": started.isoformat(),
            "finished_at": dt.datetime.now(dt.UTC).isoformat(),
            "tables": entries,
        }
        _write_manifest(folder, manifest)
    except OSError as exc:
        shutil.rmtree(folder, ignore_errors=True)
        raise MigrationError(
            f"cannot write the backup to {folder}: {exc.strerror or exc}. Free space or fix permissions of "
            f"that folder, or point USER_MIGRATION_BACKUP_DIR elsewhere; nothing was migrated"
        ) from None
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)  # never leave a half-written backup behind
        raise
    finally:
        conn.read_only = False
        conn.isolation_level = None
    return BackupResult(folder=str(folder), tables=entries)


def _dump_entry(conn: psycopg.Connection, schema: str, table: str, folder: Path) -> dict[str, Any]:
    """Dump one table into ``folder``; returns its manifest entry (rows, sha256, columns, times)."""
    ident = sql.Identifier(schema, table)
    path = folder / f"{table}.csv.gz"
    started = dt.datetime.now(dt.UTC)
    columns = [d.name for d in conn.execute(sql.SQL("SELECT * FROM {} LIMIT 0").format(ident)).description]
    rows, sha, size = _dump_table(conn, ident, path)
    return {
        "table": f"{schema}.{table}",
        "path": path.name,
        "rows": rows,
        "sha256": sha,
        "bytes": size,
        "columns": columns,
        "format": "csv, header, gzip",
        "started_at": started.isoformat(),
        "finished_at": dt.datetime.now(dt.UTC).isoformat(),
    }


def _write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest last, whole or not at all: its presence marks the backup complete."""
    tmp = folder / (MANIFEST + ".partial")
    with _open_private(tmp) as fh:
        fh.write(json.dumps(manifest, indent=2).encode())
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, folder / MANIFEST)


def _check_writable(root: Path) -> None:
    """Create the backup root if needed (0700) and prove it takes a file, before anything is written.

    A root that already exists keeps its mode: it is the operator's folder (it may be shared, or be
    /tmp), and each run's own folder inside it is 0700 anyway.
    """
    if root.exists() and not root.is_dir():
        raise MigrationError(
            f"backup folder {root} is a file, not a folder; remove it or set USER_MIGRATION_BACKUP_DIR to a "
            "writable folder. Nothing was migrated"
        )
    try:
        if not root.is_dir():
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(root, 0o700)
        # A name of its own: runs sharing the root must not remove each other's probe.
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=root)
        try:
            os.write(fd, b"ok")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as exc:
        raise MigrationError(
            f"backup folder {root} is not writable ({exc.strerror or exc}); fix its permissions or set "
            "USER_MIGRATION_BACKUP_DIR to a writable folder. Nothing was migrated"
        ) from None


def verify_backup(folder: Path) -> dict[str, Any]:
    """Check every file of a backup against its manifest; raises naming the file and both checksums."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise MigrationError(f"{folder} has no {MANIFEST}: it is not a complete backup")
    try:
        manifest = json.loads(manifest_path.read_text())
        entries = [(str(entry["path"]), str(entry["sha256"])) for entry in manifest["tables"]]
    except (ValueError, KeyError, TypeError):
        raise MigrationError(
            f"{manifest_path} is damaged (not the JSON the backup wrote): refusing to use it"
        ) from None
    for name, _ in entries:
        if Path(name).name != name or name in ("", ".", ".."):
            raise MigrationError(
                f"{manifest_path} names a file outside its folder ({name!r}): refusing to use it"
            )
        if not (folder / name).is_file():
            raise MigrationError(
                f"backup file {folder / name} listed in its manifest is missing: the backup is incomplete. "
                "Refusing to use it"
            )
    for entry in manifest["tables"]:
        path = folder / entry["path"]
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise MigrationError(
                f"backup file {path} does not match its manifest: sha256 is {digest.hexdigest()}, "
                f"the manifest says {entry['sha256']}. Refusing to use it"
            )
    return manifest


def backup_covering(
    legacy: psycopg.Connection, target: psycopg.Connection, settings: Settings, run_id: str
) -> str | None:
    """Why ``run_id`` need not write a backup (naming the one that covers it), or None to write one.

    A pass whose change log shows nothing changed since the last backup would write the same rows
    again (a gigabyte an hour at 10M users); that backup is kept instead, when it still verifies.
    """
    from user_migration import capture

    if settings.dry_run:
        return None
    quiet = capture.quiet_since_backup(legacy, target, settings.mapping, run_id)
    if quiet is None:
        return None
    backup_run, folder = quiet
    try:
        verify_backup(Path(folder))
    except MigrationError:
        return None
    return f"nothing changed since run '{backup_run}' took its backup, which covers this run: {folder}"
