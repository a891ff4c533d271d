"""`make airflow` / `make airflow-stop`: a real local Airflow 3 stack for the bundle, no Docker.

Starts, under ``var/airflow-stack/`` (git-ignored):
- an embedded PostgreSQL of its own (``pg/``) holding two databases: ``airflow`` (Airflow's
  metadata; PostgreSQL rather than SQLite so the LocalExecutor runs mapped partitions side by side)
  and ``user_migration`` (the demo legacy table and the migration target), seeded with the demo's
  fake users when the legacy table is empty;
- ``airflow api-server`` (REST API and web UI, on 127.0.0.1 only), ``scheduler`` (LocalExecutor,
  parallelism 4), ``dag-processor`` and ``triggerer``, each in its own process group, pids in
  ``stack.json``;
- connections ``legacy_db``/``target_db`` by environment (``AIRFLOW_CONN_*``) and the pool
  ``user_migration_db`` (2 slots: one partition per core).

Login: SimpleAuthManager, user ``admin``, whose password is generated once into
``simple_auth_manager_passwords.json.generated`` (mode 0600) and printed at start.
``stop`` signals only the process groups it recorded, then stops the embedded server it started.

Usage: ``python tools/airflow_stack.py start|stop|status [--base DIR] [--port 8080] [--users N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import embedded_pg
from airflow_env import POOL, REPO, VENV_BIN, airflow, airflow_env

DEFAULT_BASE = REPO / "var" / "airflow-stack"
DEFAULT_PORT = 8080
COMPONENTS = ("api-server", "scheduler", "dag-processor", "triggerer")
USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
META_DB = "airflow"
DATA_DB = "user_migration"


@dataclass
class Stack:
    base: Path
    port: int
    env: dict[str, str]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def password(self) -> str:
        return json.loads((self.base / "home" / PASSWORDS_FILE).read_text())[USER]

    @property
    def legacy_dsn(self) -> str:
        return self.env["AIRFLOW_CONN_LEGACY_DB"]

    def token(self) -> str:
        """A JWT for the REST API, by SimpleAuthManager's token flow (POST /auth/token)."""
        body = json.dumps({"username": USER, "password": self.password}).encode()
        request = urllib.request.Request(
            f"{self.url}/auth/token", data=body, headers={"Content-Type": "application/json"}, method="POST"
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())["access_token"]


def _private_json(path: Path, data: dict[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh)


def _secrets(base: Path) -> dict[str, str]:
    """Signing keys shared by every component (tokens issued by one must verify in the others)."""
    path = base / "secrets.json"
    if not path.exists():
        _private_json(path, {"jwt": secrets.token_urlsafe(32), "api": secrets.token_urlsafe(32)})
    return json.loads(path.read_text())


def _ensure_database(server_dsn: str, name: str) -> str:
    import psycopg
    from psycopg import sql

    with psycopg.connect(server_dsn, autocommit=True) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(server_dsn, dbname=name)


def _uri(conninfo: str, driver: str = "postgresql") -> str:
    import psycopg

    p = psycopg.conninfo.conninfo_to_dict(conninfo)
    return f"{driver}://{p.get('user', 'postgres')}@{p['host']}:{p['port']}/{p['dbname']}"


def _seed_if_empty(dsn: str, users: int) -> int:
    import seed_legacy

    if seed_legacy.legacy_users(dsn):
        return 0
    seed_legacy.seed(dsn, users=users, reset=True)
    return users


def stack_env(base: Path, port: int, pg_dsn: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment every component runs with: the user's settings plus the stack's own."""
    keys = _secrets(base)
    home = base / "home"
    data = _uri(_ensure_database(pg_dsn, DATA_DB))
    meta = _uri(_ensure_database(pg_dsn, META_DB), "postgresql+psycopg")
    settings = {
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": meta,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__API__BASE_URL": f"http://127.0.0.1:{port}",
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__SECRET_KEY": keys["api"],
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt"],
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{USER}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / PASSWORDS_FILE),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "10",
        "AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK": "False",
        "AIRFLOW__TRIGGERER__ENABLE_HEALTH_CHECK": "False",
        "GX_ANALYTICS_ENABLED": "false",
    }
    settings.update(extra or {})
    return airflow_env(home, data, base / "backups", target_dsn=data, extra=settings)


def _alive(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"airflow" in cmdline  # a pid reused by something else is not ours to signal


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


def start(
    base: Path = DEFAULT_BASE,
    port: int = DEFAULT_PORT,
    users: int = 10_000,
    extra_env: dict[str, str] | None = None,
    timeout: float = 180,
) -> Stack:
    """Start the stack (or return the running one); waits until the API answers."""
    base = base.resolve()
    state_file = base / "stack.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if all(_alive(pid) for pid in state["pids"].values()):
            return Stack(base, state["port"], state["env"])
        stop(base)
    home = base / "home"
    for folder in (base, home, home / "logs", base / "backups"):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pg_dsn = embedded_pg.start(base / "pg")
    env = stack_env(base, port, pg_dsn, extra_env)
    passwords = home / PASSWORDS_FILE
    if not passwords.exists():
        _private_json(passwords, {USER: secrets.token_urlsafe(12)})
    seeded = _seed_if_empty(env["AIRFLOW_CONN_LEGACY_DB"], users)
    log = home / "logs" / "setup.log"
    airflow(env, "db", "migrate", log=log)
    airflow(env, "pools", "set", POOL, "2", "Bounds concurrent database work of user_migration", log=log)

    pids: dict[str, int] = {}
    state = {"port": port, "pids": pids, "env": env, "pg": str(base / "pg"), "seeded": seeded}
    try:
        for name in COMPONENTS:
            args = [str(VENV_BIN / "airflow"), name]
            if name == "api-server":
                args += ["--host", "127.0.0.1", "--port", str(port)]
            out = open(home / "logs" / f"{name}.log", "a")  # noqa: SIM115 (the child keeps it)
            proc = subprocess.Popen(
                args, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            out.close()
            pids[name] = proc.pid
            _private_json(state_file, state)
        stack = Stack(base, port, env)
        deadline = time.monotonic() + timeout
        while not _healthy(stack.url):
            dead = [name for name, pid in pids.items() if not _alive(pid)]
            if dead or time.monotonic() > deadline:
                raise RuntimeError(
                    f"the Airflow stack did not come up ({', '.join(dead) or 'timed out'}); "
                    f"see {home / 'logs'}"
                )
            time.sleep(1)
        return stack
    except BaseException:
        stop(base)
        raise


def stop(base: Path = DEFAULT_BASE, grace: float = 30) -> list[str]:
    """Stop what ``start`` recorded (process groups, then the embedded server); returns what it stopped."""
    base = base.resolve()
    state_file = base / "stack.json"
    stopped: list[str] = []
    if state_file.exists():
        state = json.loads(state_file.read_text())
        pids = {name: pid for name, pid in state["pids"].items() if _alive(pid)}
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
            time.sleep(0.5)
        for pid in pids.values():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)  # the group: LocalExecutor workers and task processes too
        stopped = sorted(pids)
        state_file.unlink()
    if embedded_pg.is_running(base / "pg"):
        embedded_pg.stop(base / "pg")
        stopped.append("postgresql")
    return stopped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status"])
    parser.add_argument("--base", type=Path, default=DEFAULT_BASE)
    parser.add_argument("--port", type=int, default=int(os.environ.get("AIRFLOW_STACK_PORT", DEFAULT_PORT)))
    parser.add_argument(
        "--users", type=int, default=10_000, help="demo users seeded into an empty legacy table"
    )
    args = parser.parse_args(argv)
    if args.command == "stop":
        stopped = stop(args.base)
        print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
        return 0
    if args.command == "status":
        state_file = args.base.resolve() / "stack.json"
        if not state_file.exists():
            print("not running")
            return 1
        state = json.loads(state_file.read_text())
        for name, pid in state["pids"].items():
            print(f"{name:<14} pid {pid:<8} {'running' if _alive(pid) else 'stopped'}")
        return 0
    stack = start(args.base, args.port, args.users)
    home = stack.base / "home"
    print(
        f"Airflow is up: {stack.url}  (API: {stack.url}/api/v2, docs: {stack.url}/docs)\n"
        f"  log in as {USER} with password {stack.password}  (kept in {home / PASSWORDS_FILE})\n"
        f"  legacy/target database: {stack.legacy_dsn}  (connections legacy_db and target_db)\n"
        f"  DAG user_migration starts paused: unpause it, or trigger it from the UI\n"
        f"  logs: {home / 'logs'}; stop everything with: make airflow-stop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
