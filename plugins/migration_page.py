"""Airflow plugin: the migration page in the UI (a FastAPI app, a tab on DAG runs, a nav entry).

The app (user_migration/ui_app.py) is mounted by the API server under /user-migration; its
endpoints ask for Airflow's authentication and read access to the user_migration DAG. The UI shows
its page in an iframe: as an entry of the navigation bar, and as a tab of each DAG run, for that run.

Every task process loads plugins too (for macros and listeners): the app, and the API server's
security module it needs, are imported on the app's first request, never by a task.
"""

from __future__ import annotations

from typing import Any, ClassVar

from airflow.plugins_manager import AirflowPlugin

URL_PREFIX = "/user-migration"


class LazyPageApp:
    """An ASGI app that imports user_migration.ui_app.app when the API server first calls it."""

    def __init__(self) -> None:
        self._app: Any = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            from user_migration.ui_app import app

            self._app = app
        await self._app(scope, receive, send)

    def __repr__(self) -> str:
        return "user_migration.ui_app.app"


class MigrationPagePlugin(AirflowPlugin):
    name = "user_migration_page"
    fastapi_apps: ClassVar[list[dict[str, Any]]] = [
        {"app": LazyPageApp(), "url_prefix": URL_PREFIX, "name": "User migration page"}
    ]
    external_views: ClassVar[list[dict[str, Any]]] = [
        {
            "name": "User migration",
            "href": f"{URL_PREFIX}/page",
            "destination": "nav",
            "url_route": "user-migration",
        },
        {
            "name": "Migration",
            "href": f"{URL_PREFIX}/page?dag_id={{DAG_ID}}&run_id={{RUN_ID}}",
            "destination": "dag_run",
            "url_route": "user-migration-run",
        },
    ]
