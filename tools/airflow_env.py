"""Run the project's DAGs with the real Airflow CLI, configured only through environment variables.

Shared by `make demo`, the end-to-end tests and the benchmark, so all three run the DAG exactly the
way the README tells a user to.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
POOL = "user_migration_db"


def airflow_env(
    home: Path,
    legacy_dsn: str,
    backup_dir: Path,
    target_dsn: str | None = None,
    extra: dict[str, str] | None = None,
) -> dict[str, str]:
    """The environment a user sets: folders, PYTHONPATH, the two connections, the backup folder."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AIRFLOW_CONN_", "AIRFLOW__", "USER_MIGRATION_"))
    }
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
            "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "PYTHONPATH": str(REPO),
            "AIRFLOW_CONN_LEGACY_DB": legacy_dsn,
            "USER_MIGRATION_BACKUP_DIR": str(backup_dir),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    if target_dsn:
        env["AIRFLOW_CONN_TARGET_DB"] = target_dsn
    env.update(extra or {})
    return env


def airflow(
    env: dict[str, str], *args: str, log: Path | None = None, check: bool = True
) -> subprocess.CompletedProcess:
    """Run ``airflow ARGS``; its output goes to ``log`` (or is captured)."""
    cmd = [str(VENV_BIN / "airflow"), *args]
    if log is None:
        return subprocess.run(cmd, env=env, capture_output=True, text=True, check=check, cwd=REPO)
    with open(log, "a", encoding="utf-8") as out:
        return subprocess.run(
            cmd, env=env, stdout=out, stderr=subprocess.STDOUT, text=True, check=check, cwd=REPO
        )


def prepare_metadata(env: dict[str, str], log: Path | None = None) -> None:
    """Create Airflow's metadata database (SQLite in AIRFLOW_HOME) and the pool; idempotent."""
    Path(env["AIRFLOW_HOME"]).mkdir(parents=True, exist_ok=True)
    airflow(env, "db", "migrate", log=log)
    airflow(env, "pools", "set", POOL, "2", "Bounds concurrent database work of user_migration", log=log)


def dags_test(
    env: dict[str, str], dag_id: str = "user_migration", conf: dict | None = None, log: Path | None = None
) -> subprocess.CompletedProcess:
    """``airflow dags test DAG_ID [-c CONF]``; does not raise, the caller checks returncode."""
    # Airflow 3.3.2's dag.test() cannot finish a run of a DAG with a deadline alert (DagRun.update_state
    # reads the serialized alerts as ids): test runs go without it; the scheduler keeps it.
    env = {"USER_MIGRATION_PASS_DEADLINE_MINUTES": "off", **env}
    args = ["dags", "test", dag_id]
    if conf:
        args += ["-c", json.dumps(conf)]
    return airflow(env, *args, log=log, check=False)
