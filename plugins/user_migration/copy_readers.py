"""How a partition reads legacy rows: a range in id order, or a list of ids, each resumable in a
new snapshot (throttle.Snapshot) so a long copy does not hold one snapshot open.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import sql

from user_migration.throttle import Snapshot


class RangeReader:
    """The rows of ids lo..hi in id order, through a named cursor, resumable in a new snapshot.

    ``release`` closes the cursor and ends the snapshot; the next fetch opens a new one from the id
    after the last row read. Rows changed in the ids already read after the first snapshot are in
    the change log (the partition consumes only the entries its first snapshot saw), so the next
    pass writes them; a row read in a later snapshot is only fresher.
    """

    def __init__(
        self,
        source: psycopg.Connection,
        snapshot: Snapshot,
        select: sql.Composed,
        id_column: sql.Identifier,
        bounds: tuple[int, int],
        name: str,
    ) -> None:
        self.source, self.snapshot, self.name = source, snapshot, name
        self.query = sql.SQL("{} WHERE {} BETWEEN %s AND %s ORDER BY {}").format(select, id_column, id_column)
        self.next_id, self.hi = bounds
        self.cursor: psycopg.ServerCursor | None = None
        self.description: list[Any] | None = None

    def fetch(self, size: int) -> list[tuple]:
        if self.next_id > self.hi:
            return []
        if self.cursor is None:
            self.snapshot.ensure()
            self.cursor = self.source.cursor(name=self.name)
            self.cursor.execute(self.query, (self.next_id, self.hi))
        rows = self.cursor.fetchmany(size)
        self.description = self.cursor.description
        if rows:
            self.next_id = rows[-1][0] + 1
        else:
            self.next_id = self.hi + 1
        return rows

    def release(self) -> None:
        self.close()
        self.snapshot.end()

    def close(self) -> None:
        if self.cursor is not None:
            self.cursor.close()
            self.cursor = None


class IdReader:
    """The rows of the listed ids in id order, a batch of ids per query; any batch in a new snapshot.

    The ids were chosen in the first snapshot. A row deleted before a later snapshot reads it is
    neither written nor removed by this pass: its change-log entry (or, without the log, its hash
    against the sync state) makes the next pass remove it.
    """

    def __init__(
        self,
        source: psycopg.Connection,
        snapshot: Snapshot,
        select: sql.Composed,
        id_column: sql.Identifier,
        ids: list[int],
    ) -> None:
        self.source, self.snapshot, self.ids = source, snapshot, ids
        self.query = sql.SQL("{} WHERE {} = ANY(%s) ORDER BY {}").format(select, id_column, id_column)
        self.position = 0
        self.description: list[Any] | None = None

    def fetch(self, size: int) -> list[tuple]:
        while self.position < len(self.ids):
            chunk = self.ids[self.position : self.position + size]
            self.position += size
            self.snapshot.ensure()
            cursor = self.source.execute(self.query, (chunk,))
            rows = cursor.fetchall()
            self.description = cursor.description
            if rows:
                return rows
        return []

    def release(self) -> None:
        self.snapshot.end()

    def close(self) -> None:
        """Nothing stays open between fetches."""
