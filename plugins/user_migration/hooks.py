"""A hook that turns an Airflow connection id into psycopg 3 connections and a SQLAlchemy URL.

Written for this project rather than the postgres provider's PostgresHook: it falls back to the
legacy connection, filters libpq extras and names the connection in its errors
(docs/decisions/0008-one-driver-psycopg3-and-own-hook.md).
"""

from __future__ import annotations

from typing import Any

import psycopg
from airflow.sdk import BaseHook
from airflow.sdk.exceptions import AirflowNotFoundException

from user_migration.db import ConnectionProblem, connect

# Connection extras passed through to libpq; anything else in extras is ignored.
LIBPQ_EXTRAS = ("sslmode", "sslrootcert", "sslcert", "sslkey", "options", "target_session_attrs")


class MigrationDbHook(BaseHook):
    """psycopg 3 connections for one Airflow connection (``AIRFLOW_CONN_<ID>`` works).

    With ``fallback_conn_id``, an undefined ``conn_id`` means "use the fallback": the target database
    defaults to the legacy one.
    """

    conn_name_attr = "conn_id"
    hook_name = "User migration PostgreSQL"

    def __init__(self, conn_id: str, fallback_conn_id: str | None = None) -> None:
        super().__init__()
        self.requested_conn_id = conn_id
        self.conn_id = conn_id
        self._params: dict[str, Any] | None = None
        self.fallback_conn_id = fallback_conn_id

    def connection_params(self) -> dict[str, Any]:
        if self._params is None:
            try:
                conn = self.get_connection(self.conn_id)
            except AirflowNotFoundException:
                if not self.fallback_conn_id:
                    raise ConnectionProblem(
                        f"Airflow connection '{self.conn_id}' is not defined: set "
                        f"AIRFLOW_CONN_{self.conn_id.upper()}=postgresql://user:password@host:5432/database "
                        "or add it under Admin > Connections",
                        permanent=True,
                    ) from None
                self.log.info("connection %r is not defined; using %r", self.conn_id, self.fallback_conn_id)
                self.conn_id = self.fallback_conn_id
                self.fallback_conn_id = None
                return self.connection_params()
            if conn.conn_type not in ("postgres", "postgresql", None, ""):
                raise ConnectionProblem(
                    f"Airflow connection '{self.conn_id}' is of type {conn.conn_type!r}; it must be a PostgreSQL "
                    "connection (postgresql://...)",
                    permanent=True,
                )
            extras = conn.extra_dejson or {}
            params = {
                "host": conn.host or "localhost",
                "port": conn.port or 5432,
                "user": conn.login or None,
                "password": conn.password or None,
                "dbname": conn.schema or None,
            }
            params.update({k: extras[k] for k in LIBPQ_EXTRAS if k in extras})
            self._params = {k: v for k, v in params.items() if v is not None}
        return self._params

    def conninfo(self) -> str:
        return psycopg.conninfo.make_conninfo(**self.connection_params())

    def describe(self) -> str:
        """Where the connection points, without its password."""
        p = self.connection_params()
        return f"{self.conn_id} ({p.get('user', '')}@{p['host']}:{p['port']}/{p.get('dbname', '')})"

    def get_conn(self, autocommit: bool = False) -> psycopg.Connection:
        return connect(self.conninfo(), name=self.conn_id, autocommit=autocommit)

    def sqlalchemy_url(self) -> str:
        from sqlalchemy.engine import URL

        p = self.connection_params()
        query = {k: str(v) for k, v in p.items() if k in LIBPQ_EXTRAS}
        return URL.create(
            "postgresql+psycopg",
            username=p.get("user"),
            password=p.get("password"),
            host=p["host"],
            port=int(p["port"]),
            database=p.get("dbname"),
            query=query,
        ).render_as_string(hide_password=False)
