"""A partition's links (groups, permissions): the target's links of its users brought in line with
the legacy's, staged and merged in SQL (copy/remove_stale_links.sql, copy/merge_links.sql).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg
from psycopg import sql

from user_migration.config import LinkTable
from user_migration.db import copy_batches, read_sql

if TYPE_CHECKING:
    from user_migration.partition_copy import PartitionResult


def copy_links(
    source: psycopg.Connection,
    target: psycopg.Connection,
    schema: str,
    link: LinkTable,
    target_link: tuple[str, str],
    users: tuple[int, int, list[int] | None],
    result: PartitionResult,
    dry_run: bool,
) -> None:
    """Bring the target's links of the users lo..hi (or of the listed users only) in line with the legacy's."""
    lo, hi, ids = users
    user, other_column = sql.Identifier(link.user_column), sql.Identifier(link.other_column)
    table_name = sql.Identifier(schema, link.table)
    where = sql.SQL("{} BETWEEN %(lo)s AND %(hi)s" if ids is None else "{} = ANY(%(ids)s)").format(user)
    params: dict[str, Any] = {"lo": lo, "hi": hi} if ids is None else {"ids": ids}
    if dry_run:
        count_query = sql.SQL("SELECT count(*) FROM {} WHERE {}").format(table_name, where)
        result.links_in += source.execute(count_query, params).fetchone()[0]
        return
    query = sql.SQL("SELECT id, {}, {} FROM {} WHERE {} ORDER BY id").format(
        user, other_column, table_name, where
    )
    table, other = target_link
    target.execute(
        "CREATE TEMP TABLE IF NOT EXISTS stage_links (id bigint, user_id bigint, other_id integer) ON COMMIT DROP"
    )
    target.execute("TRUNCATE stage_links")
    result.links_in += copy_batches(
        source,
        f"links_{link.table}",
        query,
        params,
        target,
        "COPY stage_links (id, user_id, other_id) FROM STDIN",
    )
    names = {
        "links": sql.Identifier(table),
        "other": sql.Identifier(other),
        "users": sql.SQL("BETWEEN %(lo)s AND %(hi)s" if ids is None else "= ANY(%(ids)s)"),
    }
    result.links_removed += target.execute(
        sql.SQL(read_sql("copy/remove_stale_links.sql")).format(**names), params
    ).rowcount
    result.links_inserted += target.execute(
        sql.SQL(read_sql("copy/merge_links.sql")).format(**names), params
    ).rowcount
