"""psycopg 3 helpers shared by every stage: connecting with clear errors, SQL files, safe errors.

psycopg 3 is the one driver of this project (docs/decisions/0008-one-driver-psycopg3-and-own-hook.md);
nothing here imports Airflow.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from user_migration.config import INCLUDE_DIR, LegacyMapping
from user_migration.errors import ConnectionProblem, MigrationError

__all__ = ["ConnectionProblem", "MigrationError"]

SQL_DIR = INCLUDE_DIR / "sql"
APPLICATION_NAME = "user_migration"


def connect(conninfo: str, *, name: str, autocommit: bool = False) -> psycopg.Connection:
    """Open a connection, turning driver errors into one sentence that names ``name``."""
    try:
        return psycopg.connect(
            conninfo,
            autocommit=autocommit,
            application_name=APPLICATION_NAME,
            connect_timeout=10,
        )
    except psycopg.OperationalError as exc:
        cause = first_line(exc)
        permanent = any(
            marker in cause
            for marker in ("password authentication failed", "does not exist", "no pg_hba.conf entry", "SSL")
        )
        raise ConnectionProblem(
            f"cannot connect to the database of connection '{name}': {cause}. "
            f"Check that connection's host, port, user, password and database.",
            permanent=permanent,
        ) from None


def first_line(exc: BaseException) -> str:
    """The primary message of a driver error, without DETAIL/CONTEXT lines that may quote row values."""
    if isinstance(exc, psycopg.Error) and exc.diag and exc.diag.message_primary:
        return exc.diag.message_primary.strip()
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    # libpq: 'connection failed: connection to server at "h", port p failed: <cause>' then, for a
    # refused connection, a hint line; for a server-side refusal the cause is 'FATAL:  <reason>'.
    line = text.splitlines()[0].strip().removeprefix("connection failed:").strip()
    if "FATAL:" in line:
        line = line.split("FATAL:", 1)[1]
    return " ".join(line.split())


def safe_error(exc: BaseException) -> str:
    """A description of a database error that never includes data values (for logs and audit)."""
    if isinstance(exc, psycopg.Error):
        diag = exc.diag
        parts = [type(exc).__name__]
        if diag.sqlstate:
            parts.append(f"sqlstate {diag.sqlstate}")
        if diag.constraint_name:
            parts.append(f"constraint {diag.constraint_name}")
        if diag.table_name:
            parts.append(f"table {diag.table_name}")
        if diag.column_name:
            parts.append(f"column {diag.column_name}")
        return ", ".join(parts)
    if isinstance(exc, (MigrationError, ConnectionProblem)):
        return str(exc)
    return type(exc).__name__


def read_sql(relative: str) -> str:
    return (SQL_DIR / relative).read_text()


def run_sql_file(
    conn: psycopg.Connection, relative: str | Path, params: dict[str, Any] | None = None
) -> None:
    """Execute a whole .sql file (several statements) in the connection's current transaction."""
    text = Path(relative).read_text() if isinstance(relative, Path) else read_sql(relative)
    with conn.cursor() as cur:
        cur.execute(text.encode(), params, prepare=False)


def fetch_batches(
    conn: psycopg.Connection, name: str, query: sql.Composable, params: Any = None, size: int = 10_000
) -> Iterator[list[tuple[Any, ...]]]:
    """The rows of ``query``, ``size`` at a time, through a server-side cursor of the open transaction."""
    with conn.cursor(name=name) as cur:
        cur.itersize = size
        cur.execute(query, params)
        while rows := cur.fetchmany(size):
            yield rows


def copy_batches(
    source: psycopg.Connection,
    name: str,
    query: sql.Composable,
    params: Any,
    dest: psycopg.Connection,
    copy: str,
    size: int = 10_000,
) -> int:
    """Rows of ``query`` on ``source`` into ``dest`` by COPY; returns how many.

    Fetch, then write, a batch at a time: the two may be one connection (the cutover, a same-database
    rollback), where a COPY cannot run while a cursor streams.
    """
    count = 0
    for rows in fetch_batches(source, name, query, params, size):
        with dest.cursor() as cur, cur.copy(copy) as out:
            for row in rows:
                out.write_row(row)
        count += len(rows)
    return count


AUDIT_SCHEMA_FILE = "audit/000_audit_schema.sql"


def ensure_audit_schema(conn: psycopg.Connection) -> None:
    """Create or upgrade the audit schema once per version of its file; safe from concurrent tasks.

    Every task calls this. Its DDL (CREATE INDEX / ALTER TABLE ... IF NOT EXISTS) takes table locks
    even when there is nothing to do, and those wait for any partition's open transaction on the
    same table: run on every task, it made the mapped partitions copy one after the other. So the
    file's sha256 is recorded, and a task whose file matches reads one row and touches no lock.
    """
    digest = hashlib.sha256(read_sql(AUDIT_SCHEMA_FILE).encode()).hexdigest()
    if _audit_schema_version(conn) == digest:
        return
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('user_migration.audit_schema'))")
        if _audit_schema_version(conn) == digest:
            return
        run_sql_file(conn, AUDIT_SCHEMA_FILE)
        conn.execute(
            "INSERT INTO migration_audit.audit_schema_version (sha256) VALUES (%s) "
            "ON CONFLICT (id) DO UPDATE SET sha256 = EXCLUDED.sha256, applied_at = now()",
            (digest,),
        )


def _audit_schema_version(conn: psycopg.Connection) -> str | None:
    with conn.transaction():
        if conn.execute("SELECT to_regclass('migration_audit.audit_schema_version')").fetchone()[0] is None:
            return None
        row = conn.execute("SELECT sha256 FROM migration_audit.audit_schema_version").fetchone()
    return row[0] if row else None


def foreign_keys(conn: psycopg.Connection, table: str) -> list[tuple[str, str]]:
    """(name, pg_get_constraintdef) of each foreign key of ``table``, by name: what to add back as it was."""
    return conn.execute(
        "SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE conrelid = to_regclass(%s) AND contype = 'f' ORDER BY conname",
        (table,),
    ).fetchall()


def users_table(mapping: LegacyMapping) -> sql.Composed:
    return sql.Identifier(mapping.schema, mapping.users_table)


def legacy_select_list(mapping: LegacyMapping) -> sql.Composed:
    """``"col" AS canonical, ...`` for every field; unmapped optional fields get their default."""
    from user_migration.config import FIELDS, OPTIONAL_FIELD_DEFAULTS

    items = []
    for name in FIELDS:
        column = mapping.column(name)
        if column is None:
            default = OPTIONAL_FIELD_DEFAULTS[name]
            literal = sql.SQL("NULL::timestamptz") if default is None else sql.Literal(default)
            items.append(sql.SQL("{} AS {}").format(literal, sql.Identifier(name)))
        else:
            items.append(sql.SQL("{} AS {}").format(sql.Identifier(column), sql.Identifier(name)))
    return sql.SQL(", ").join(items)


def check_legacy_tables(conn: psycopg.Connection, mapping: LegacyMapping, conn_id: str) -> None:
    """Fail before anything is written if a mapped table or column does not exist."""
    wanted: list[tuple[str, list[str], str]] = [
        (
            mapping.users_table,
            [c for c in mapping.columns.values() if c is not None],
            "legacy_mapping.users_table",
        )
    ]
    for key, link in (("groups", mapping.groups), ("permissions", mapping.permissions)):
        if link is not None:
            wanted.append((link.table, [link.user_column, link.other_column], f"legacy_mapping.{key}.table"))
    for table, columns, setting in wanted:
        rows = conn.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            (mapping.schema, table),
        ).fetchall()
        if not rows:
            raise MigrationError(
                f"legacy table {mapping.schema}.{table!r} does not exist in connection '{conn_id}' "
                f"(or this role cannot see it); set {setting} to the right table name"
            )
        present = {r[0] for r in rows}
        missing = [c for c in columns if c not in present]
        if missing:
            raise MigrationError(
                f"legacy table {mapping.schema}.{table!r} has no column(s) {', '.join(repr(m) for m in missing)}; "
                f"map them in legacy_mapping (columns, or the link table's columns) to the real names"
            )
    _check_column_types(conn, mapping)


# The PostgreSQL types each canonical field may have in a legacy table.
_INTEGER = {"smallint", "integer", "bigint"}
_TEXT = {"text", "character varying", "character"}
FIELD_TYPES = {
    "id": _INTEGER,
    "password": _TEXT,
    "last_login": {"timestamp with time zone", "timestamp without time zone"},
    "is_superuser": {"boolean"},
    "email": _TEXT,
    "username": _TEXT,
    "full_name": _TEXT,
    "date_of_birth": {"date"},
    "phone_number": _TEXT,
    "is_active": {"boolean"},
    "is_staff": {"boolean"},
}


def _check_column_types(conn: psycopg.Connection, mapping: LegacyMapping) -> None:
    """A mapped column of the wrong type would fail deep inside the copy; refuse it up front."""
    types = dict(
        conn.execute(
            "SELECT column_name, data_type FROM information_schema.columns WHERE table_schema = %s AND table_name = %s",
            (mapping.schema, mapping.users_table),
        ).fetchall()
    )
    for name, allowed in FIELD_TYPES.items():
        column = mapping.column(name)
        if column is not None and types.get(column) not in allowed:
            raise MigrationError(
                f"legacy column {mapping.users_table}.{column} (field {name}) has type {types.get(column)}; "
                f"it must be {' or '.join(sorted(allowed))}. Convert it in a view and map the view with "
                "legacy_mapping.users_table"
            )
