"""Every DAG imports cleanly, cheaply and without touching a database, and has the properties we rely on.

The DagBag is loaded in a fresh interpreter so the check sees exactly what a DAG processor imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
from itertools import pairwise
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NO_RETRY = {"validate", "approve_cutover", "cutover", "rollback"}
CONSUMER = Path(__file__).with_name("user_migration_consumer_example.py")
HEAVY = ("psycopg", "great_expectations", "pandas", "phonenumbers", "email_validator", "faker")

PROBE = r"""
import json, sys
from airflow.dag_processing.dagbag import DagBag
bag = DagBag(dag_folder=sys.argv[1])
out = {"errors": {k: str(v)[-300:] for k, v in bag.import_errors.items()}, "dags": {}}
for dag_id, dag in bag.dags.items():
    out["dags"][dag_id] = {
        "tags": sorted(dag.tags),
        "doc_md": bool(dag.doc_md and len(dag.doc_md) > 200),
        "max_active_runs": dag.max_active_runs,
        "params": {k: {"description": v.description, "schema": v.schema} for k, v in dag.params.items()},
        "deadline": [
            {"reference": type(d.reference).__name__, "seconds": d.interval.total_seconds(), "callback": d.callback.path}
            for d in ([dag.deadline] if dag.deadline and not isinstance(dag.deadline, list) else dag.deadline or [])
        ],
        "tasks": {
            t.task_id: {
                "retries": t.retries,
                "pool": t.pool,
                "owner": t.owner,
                "mapped": type(t).__name__ == "MappedOperator",
                "downstream": sorted(t.downstream_task_ids),
                "trigger_rule": getattr(t.trigger_rule, "value", t.trigger_rule),
                "outlets": sorted(f"{type(o).__name__}:{o.name}" for o in getattr(t, "outlets", None) or []),
                "type": type(t).__name__,
            }
            for t in dag.tasks
        },
    }
out["heavy_imported"] = [m for m in sys.argv[2].split(",") if m in sys.modules]
consumers = DagBag(dag_folder=sys.argv[3])
out["errors"].update({k: str(v)[-300:] for k, v in consumers.import_errors.items()})
out["consumers"] = {
    dag_id: {"schedule": "".join(f"{type(a).__name__}:{a.name}" for a in [dag.timetable.asset_condition])}
    for dag_id, dag in consumers.dags.items()
}
print("PROBE" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def parsed(tmp_path_factory) -> dict:
    home = tmp_path_factory.mktemp("airflow-home")
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(REPO / "dags"),
        "AIRFLOW__CORE__PLUGINS_FOLDER": str(REPO / "plugins"),
        "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "PYTHONPATH": str(REPO),
        # Unreachable on purpose: parsing must not try to connect.
        "AIRFLOW_CONN_LEGACY_DB": "postgresql://nobody:secret@127.0.0.1:1/none",
    }
    done = subprocess.run(
        [sys.executable, "-c", PROBE, str(REPO / "dags"), ",".join(HEAVY), str(CONSUMER)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        cwd=REPO,
    )
    line = next((x for x in done.stdout.splitlines() if x.startswith("PROBE")), None)
    assert line, f"DagBag probe failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    return json.loads(line[len("PROBE") :])


def test_no_import_errors(parsed):
    assert parsed["errors"] == {}
    assert set(parsed["dags"]) >= {"user_migration", "user_migration_rollback"}


def test_parsing_imports_no_driver_or_heavy_library(parsed):
    assert parsed["heavy_imported"] == []


def test_user_migration_wiring_reads_like_the_process(parsed):
    tasks = parsed["dags"]["user_migration"]["tasks"]
    order = ["backup", "ddl", "plan", "copy", "finalize", "validate", "approve_cutover", "cutover", "report"]
    for upstream, downstream in pairwise(order):
        if upstream != "validate":
            assert tasks[upstream]["downstream"] == [downstream]
    # The report also hangs off validate directly, so it runs after a skipped cutover (not requested,
    # rejected, timed out) but not after a failed validation, nor when the whole pass was skipped.
    assert tasks["validate"]["downstream"] == ["approve_cutover", "report"]
    assert tasks["report"]["trigger_rule"] == "none_failed_min_one_success"
    assert tasks["cutover"]["trigger_rule"] == "all_success"
    assert tasks["copy"]["mapped"] is True


def test_the_cutover_is_gated_by_an_approval_and_assets_come_from_aliases(parsed):
    tasks = parsed["dags"]["user_migration"]["tasks"]
    assert tasks["approve_cutover"]["type"] == "CutoverApprovalOperator"
    assert tasks["cutover"]["outlets"] == ["AssetAlias:user_migration_cutover"]
    assert tasks["report"]["outlets"] == ["AssetAlias:user_migration_target_users"]
    params = parsed["dags"]["user_migration"]["params"]
    assert params["require_approval"]["schema"]["type"] == "boolean"
    assert params["approval_timeout_minutes"]["schema"]["minimum"] == 1


def test_a_pass_has_a_deadline_alert(parsed):
    (deadline,) = parsed["dags"]["user_migration"]["deadline"]
    assert deadline["reference"] == "DagRunQueuedAtDeadline"
    assert deadline["seconds"] == 2 * 3600
    assert deadline["callback"] == "user_migration.deadline.notify_overdue_pass"


def test_the_example_consumer_is_scheduled_on_the_pass_alias(parsed):
    consumer = parsed["consumers"]["user_migration_consumer_example"]
    assert consumer["schedule"] == "AssetAlias:user_migration_target_users"


def test_every_task_retries_uses_the_pool_and_has_an_owner(parsed):
    for dag in parsed["dags"].values():
        for task_id, task in dag["tasks"].items():
            assert task["pool"] == "user_migration_db", task_id
            assert task["owner"] and task["owner"] != "airflow", task_id
            # These deliberately do not retry: a failed check, a refused cutover or a manual rollback
            # is not transient, and retrying them would only repeat the refusal or act twice.
            assert task["retries"] >= (0 if task_id in NO_RETRY else 1), task_id


def test_dag_has_tags_docs_and_one_active_run(parsed):
    dag = parsed["dags"]["user_migration"]
    assert "migration" in dag["tags"]
    assert dag["doc_md"] is True
    assert dag["max_active_runs"] == 1


def test_every_param_is_described_and_typed(parsed):
    params = parsed["dags"]["user_migration"]["params"]
    assert set(params) >= {"batch_size", "partitions", "phone_region", "dry_run", "legacy_mapping"}
    for name, param in params.items():
        assert param["description"] and len(param["description"]) > 20, name
        assert "type" in param["schema"], name
    assert params["batch_size"]["schema"]["minimum"] == 1
    assert params["partitions"]["schema"]["maximum"] == 256
