"""The migration page's FastAPI app, mounted by the Airflow API server (plugins/migration_page.py).

Two endpoints under URL_PREFIX, both behind Airflow's own security dependency
``requires_access_dag(method="GET")`` for the user_migration DAG: ``page`` (the HTML the UI shows
in its iframe) and ``api/data`` (the same figures as JSON). Airflow mounts a plugin's app without
any authentication of its own, so the dependency is what refuses a request: no token gives 401,
an invalid token or a user without read access to the DAG gives 403. The user is found the way
the core API finds it: an ``Authorization: Bearer`` token, or else the UI's ``_token`` cookie (an
HttpOnly cookie the browser sends with the iframe's request: the page needs no script to
authenticate). The data come from the target database of the connection ids the operators use
(target_db, falling back to legacy_db), in a read-only session.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

import psycopg
from airflow.api_fastapi.core_api.security import requires_access_dag
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import HTMLResponse

from user_migration.config import Settings
from user_migration.errors import ConnectionProblem
from user_migration.ui_data import DAG_ID, page_data
from user_migration.ui_render import render

URL_PREFIX = "/user-migration"  # as mounted by plugins/migration_page.py
STATEMENT_TIMEOUT_MS = 15_000

# One object, so that tests can override it (app.dependency_overrides[read_access]).
read_access = requires_access_dag(method="GET", param_dag_id=DAG_ID)

app = FastAPI(
    title="User migration page",
    description="The migration's progress and readiness from migration_audit (figures only).",
    docs_url=None,
    redoc_url=None,
    openapi_url=None,
)


def audit_connection() -> Iterator[psycopg.Connection]:
    """A read-only session on the target database (where migration_audit lives)."""
    from user_migration.hooks import MigrationDbHook

    hook = MigrationDbHook(Settings.target_conn_id, fallback_conn_id=Settings.legacy_conn_id)
    try:
        conn = hook.get_conn(autocommit=True)
    except ConnectionProblem as exc:
        raise HTTPException(status_code=503, detail=str(exc)) from None
    try:
        conn.execute("SET default_transaction_read_only = on")
        conn.execute(f"SET statement_timeout = {STATEMENT_TIMEOUT_MS}")
        yield conn
    finally:
        conn.close()


Connection = Annotated[psycopg.Connection, Depends(audit_connection)]
RunId = Annotated[
    str | None, Query(max_length=250, description="a run of user_migration; the newest when absent")
]
DagId = Annotated[str | None, Query(max_length=250, description="the DAG of the run the UI shows it for")]


def _data(conn: psycopg.Connection, run_id: str | None, dag_id: str | None) -> dict[str, Any]:
    # The UI's run view is offered on every DAG's runs; another DAG's run id means nothing here.
    return page_data(conn, run_id if dag_id in (None, DAG_ID) else None)


@app.get("/page", response_class=HTMLResponse, dependencies=[Depends(read_access)])
def page(request: Request, conn: Connection, run_id: RunId = None, dag_id: DagId = None) -> HTMLResponse:
    html = render(_data(conn, run_id, dag_id), page_url=request.url.path, dag_id=dag_id)
    return HTMLResponse(html, headers={"Cache-Control": "no-store"})


@app.get("/api/data", dependencies=[Depends(read_access)])
def data(conn: Connection, run_id: RunId = None, dag_id: DagId = None) -> dict[str, Any]:
    return _data(conn, run_id, dag_id)
