"""Database addresses for the tests."""

from __future__ import annotations

import psycopg


def uri_for(server_dsn: str, dbname: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(server_dsn)
    auth = params.get("user", "postgres")
    if params.get("password"):
        auth += f":{params['password']}"
    return f"postgresql://{auth}@{params.get('host', 'localhost')}:{params.get('port', 5432)}/{dbname}"
