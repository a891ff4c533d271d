"""docker-compose.yaml, checked without Docker (no engine runs here): the services, the image's
Airflow version against requirements.txt, mounts that exist, and settings the bundle really reads."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
AIRFLOW_SERVICES = {"airflow-init", "api-server", "scheduler", "dag-processor", "triggerer", "airflow-worker"}
LONG_RUNNING = {"postgres-airflow", "postgres-data", "redis"} | AIRFLOW_SERVICES - {"airflow-init"}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yaml").read_text())


def _pin(package: str) -> str:
    match = re.search(rf"^{re.escape(package)}==(\S+)$", (REPO / "requirements.txt").read_text(), re.M)
    assert match, f"{package} is not pinned in requirements.txt"
    return match.group(1)


def _code_text() -> str:
    files = [*REPO.glob("dags/**/*.py"), *REPO.glob("plugins/**/*.py")]
    return "\n".join(f.read_text() for f in files)


def test_services_and_executor(compose):
    services = compose["services"]
    assert set(services) >= AIRFLOW_SERVICES | {"postgres-airflow", "postgres-data", "redis"}
    for name in AIRFLOW_SERVICES:
        env = services[name]["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert "redis:6379" in env["AIRFLOW__CELERY__BROKER_URL"], name
        assert "@postgres-airflow/" in env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"], name
        # The demo data lives on its own server, not beside Airflow's metadata.
        assert "@postgres-data:" in env["AIRFLOW_CONN_LEGACY_DB"], name
    assert services["airflow-worker"]["command"] == "celery worker"
    assert "container_name" not in services["airflow-worker"]  # `--scale airflow-worker=4` needs that
    assert services["airflow-worker"].get("ports") is None


def test_image_matches_the_pinned_airflow(compose):
    dockerfile = (REPO / compose["services"]["scheduler"]["build"]["dockerfile"]).read_text()
    base = re.search(r"^FROM apache/airflow:(\S+)$", dockerfile, re.M).group(1)
    airflow = _pin("apache-airflow")
    assert base.startswith(f"{airflow}-python3.11"), (base, airflow)
    assert compose["services"]["scheduler"]["image"].endswith(f":{airflow}")
    assert "-r /opt/user_migration/requirements.txt -c /opt/user_migration/constraints.txt" in dockerfile
    for copied in re.search(r"^COPY (.+) /opt/user_migration/$", dockerfile, re.M).group(1).split():
        assert (REPO / copied).is_file(), copied


def test_bind_mounts_exist_and_named_volumes_are_declared(compose):
    declared = set(compose.get("volumes") or {})
    for name, service in compose["services"].items():
        for volume in service.get("volumes", []):
            source, target = volume.split(":")[:2]
            if source.startswith("."):
                assert (REPO / source).is_dir(), f"{name}: {source} does not exist"
            else:
                assert source in declared, f"{name}: volume {source} is not declared"
            assert target.startswith("/"), volume
    mounted = {v.split(":")[0] for v in compose["services"]["scheduler"]["volumes"]}
    assert {"./dags", "./plugins", "./include"} <= mounted


def test_environment_names_are_the_ones_the_bundle_reads(compose):
    code = _code_text()
    env = compose["services"]["scheduler"]["environment"]
    # Connections by id: legacy_db and target_db are the DAG's defaults.
    assert re.search(r'legacy_conn_id.*"legacy_db"', code) and re.search(r'target_conn_id.*"target_db"', code)
    assert {"AIRFLOW_CONN_LEGACY_DB", "AIRFLOW_CONN_TARGET_DB"} <= set(env)
    ours = [name for name in env if name.startswith("USER_MIGRATION_")]
    assert "USER_MIGRATION_BACKUP_DIR" in ours
    for name in ours:
        assert f'"{name}"' in code, f"{name} is set in docker-compose.yaml but nothing reads it"
    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == "/opt/airflow/dags"
    assert env["AIRFLOW__CORE__PLUGINS_FOLDER"] == "/opt/airflow/plugins"


def test_init_creates_the_pool_and_everything_long_running_has_a_healthcheck(compose):
    services = compose["services"]
    init = "\n".join(services["airflow-init"]["command"])
    assert "airflow db migrate" in init
    assert re.search(r"airflow pools set user_migration_db \d+", init)
    pool = re.search(r'^POOL = "([^"]+)"', (REPO / "plugins/user_migration/operators.py").read_text(), re.M)
    assert pool and pool.group(1) == "user_migration_db"
    for name in LONG_RUNNING:
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    for name in AIRFLOW_SERVICES - {"airflow-init"}:
        assert services[name]["depends_on"]["airflow-init"]["condition"] == "service_completed_successfully"


def test_nothing_published_beyond_loopback(compose):
    for name, service in compose["services"].items():
        for port in service.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_workers_share_the_backup_folder_at_one_path_as_in_the_celery_test(compose):
    """The topology tests/test_celery_e2e.py runs: several workers, prefetch off, one shared backup path."""
    services = compose["services"]
    worker = services["airflow-worker"]
    assert worker["deploy"]["replicas"] >= 2
    env = worker["environment"]
    assert json.loads(env["AIRFLOW__CELERY__EXTRA_CELERY_CONFIG"]) == {"worker_disable_prefetch": True}
    backup_dir = env["USER_MIGRATION_BACKUP_DIR"]
    assert backup_dir.startswith("/")  # the bundle refuses a relative one
    for name in AIRFLOW_SERVICES:
        assert services[name]["environment"]["USER_MIGRATION_BACKUP_DIR"] == backup_dir, name
        assert f"backups:{backup_dir}" in services[name]["volumes"], name
