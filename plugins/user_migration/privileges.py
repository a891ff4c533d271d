"""Readable refusals when a phase runs under a role without the grants it needs (include/sql/roles/).

Passes run under the role of least_privilege.sql; the cutover, its rehearsal, carry_back and
restore need the switch role of switch_privilege.sql: they lock the legacy tables and drop and
create triggers on them, and PostgreSQL lets only a table's owner drop a trigger.
"""

from __future__ import annotations

import re

import psycopg

PASS_SCRIPT = "include/sql/roles/least_privilege.sql"
SWITCH_SCRIPT = "include/sql/roles/switch_privilege.sql"
# The server's own wording names an object and nothing else; any other text (a function's RAISE, say)
# could quote data, so it is left out.
_OBJECT_ONLY = re.compile(r'(permission denied for|must be owner of) [a-z ]+ [\w."$]+')


def denied(exc: psycopg.Error) -> str:
    """What the server refused, e.g. 'must be owner of table account_user', when it names only an object."""
    primary = exc.diag.message_primary or ""
    return primary if _OBJECT_ONLY.fullmatch(primary) else "insufficient privilege"


def switch_refusal(action: str, conn: psycopg.Connection, exc: psycopg.Error) -> str:
    """The message for ``action`` (cutover, carry_back, restore) refused a privilege it needs."""
    return (
        f"{action} refused, nothing changed: the role {conn.info.user} lacks a privilege it needs "
        f"({denied(exc)}). The {action} locks the legacy tables and drops and creates triggers on them, "
        "which PostgreSQL allows only to their owner; run it as the switch role that "
        f"{SWITCH_SCRIPT} creates (a member of the legacy tables' owner and of the pass role)"
    )
