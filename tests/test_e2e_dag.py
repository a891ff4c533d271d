"""The user_migration DAG under real Airflow (`airflow dags test`), configured only by environment.

These runs go through the scheduler-side machinery (Params, mapped tasks, XCom, retries config)
exactly as a user's do; the outcome is asserted row by row against the fixture.
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import psycopg
import pytest
from airflow_env import airflow_env, dags_test, prepare_metadata
from support import fixture_users as fx
from support.db import uri_for
from support.pipeline import rejects, snapshot

from user_migration.approval import cutover_figures, render_body

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="session")
def airflow_home(scratch_dir: Path) -> Path:
    home = scratch_dir / "airflow"
    env = airflow_env(home, "postgresql://unused@127.0.0.1:1/unused", scratch_dir / "unused")
    prepare_metadata(env)
    return home


def run_dag(
    airflow_home: Path,
    legacy: str,
    backups: Path,
    tmp_path: Path,
    target: str | None = None,
    conf=None,
    dag_id: str = "user_migration",
    extra: dict[str, str] | None = None,
):
    env = airflow_env(airflow_home, legacy, backups, target_dsn=target, extra=extra)
    if dag_id == "user_migration":
        conf = {"max_reject_ratio": 0.5, **(conf or {})}  # the fixture is 41% dirty on purpose
    log = tmp_path / f"airflow-{len(list(tmp_path.glob('airflow-*.log')))}.log"
    done = dags_test(env, dag_id=dag_id, conf=conf, log=log)
    return done.returncode, log.read_text()


def latest_run_id(dsn: str) -> str:
    with psycopg.connect(dsn) as conn:
        return conn.execute(
            "SELECT run_id FROM migration_audit.runs ORDER BY started_at DESC LIMIT 1"
        ).fetchone()[0]


def task_states(airflow_home: Path, run_id: str) -> dict[str, str]:
    """The task instances' states of ``run_id`` in Airflow's metadata database (SQLite here)."""
    with sqlite3.connect(airflow_home / "airflow.db") as meta:
        return dict(
            meta.execute(
                "SELECT task_id, state FROM task_instance WHERE run_id = ? AND map_index = -1", (run_id,)
            ).fetchall()
        )


def asset_events(airflow_home: Path, run_id: str) -> list[tuple[str, str, dict]]:
    """(task, asset uri, extra) of every asset event ``run_id`` emitted, through which alias."""
    with sqlite3.connect(airflow_home / "airflow.db") as meta:
        rows = meta.execute(
            "SELECT e.source_task_id, a.uri, e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id "
            "WHERE e.source_run_id = ? ORDER BY e.id",
            (run_id,),
        ).fetchall()
    return [(task, uri, json.loads(extra) if isinstance(extra, str) else extra) for task, uri, extra in rows]


def personal_values() -> list[str]:
    values = []
    for row in fx.ROWS:
        values += [row[1], row[4].strip(), row[8]]
    return [v for v in values if v and len(v) > 4]


def openlineage_env(events: Path) -> dict[str, str]:
    """The OpenLineage provider on, writing every event as one JSON line to ``events``."""
    transport = {"type": "file", "log_file_path": str(events), "append": True}
    return {"AIRFLOW__OPENLINEAGE__TRANSPORT": json.dumps(transport)}


def lineage_events(events: Path) -> dict[str, list[dict]]:
    """Task job name (after the DAG's) -> its COMPLETE events' {"inputs", "outputs"} dataset names."""
    found: dict[str, list[dict]] = {}
    for line in events.read_text().splitlines():
        event = json.loads(line)
        job = event["job"]["name"]
        if event["eventType"] != "COMPLETE" or not job.startswith("user_migration."):
            continue
        found.setdefault(job.removeprefix("user_migration."), []).append(
            {
                side: {f"{d['namespace']}/{d['name']}" for d in event.get(side) or []}
                for side in ("inputs", "outputs")
            }
        )
    return found


def test_dag_migrates_the_fixture_exactly_and_leaves_an_audit_trail(
    airflow_home, legacy, backup_dir, tmp_path
):
    # With OpenLineage on (file transport), and a password in the connection that must go nowhere.
    events = tmp_path / "openlineage.jsonl"
    with_password = legacy.replace("postgres@", "postgres:hunter2@", 1)
    assert with_password != legacy
    code, output = run_dag(airflow_home, with_password, backup_dir, tmp_path, extra=openlineage_env(events))
    assert code == 0, output[-4000:]
    run_id = latest_run_id(legacy)

    snap = snapshot(legacy)
    assert [u[0] for u in snap["users"]] == sorted(fx.MIGRATED)
    assert {u[0]: (u[4], u[6], u[8]) for u in snap["users"]} == fx.MIGRATED
    assert snap["groups"] == fx.MIGRATED_GROUP_LINKS
    assert snap["permissions"] == fx.MIGRATED_PERMISSION_LINKS
    assert [p[0] for p in snap["profiles"]] == sorted(fx.MIGRATED)
    assert {k: v[0] for k, v in rejects(legacy, run_id).items()} == {k: v[0] for k, v in fx.REJECTED.items()}

    with psycopg.connect(legacy) as conn:
        state, summary, backup_path = conn.execute(
            "SELECT state, summary, backup_path FROM migration_audit.runs WHERE run_id = %s", (run_id,)
        ).fetchone()
        attempts = conn.execute(
            "SELECT task_id, state FROM migration_audit.task_attempts WHERE run_id = %s AND state = 'success'",
            (run_id,),
        ).fetchall()
        checks = conn.execute(
            "SELECT count(*), bool_and(success) FROM migration_audit.validation_results WHERE run_id = %s",
            (run_id,),
        ).fetchone()
    assert state == "success"
    assert {t for t, _ in attempts} == {"backup", "ddl", "plan", "copy", "finalize", "validate", "report"}
    # Param cutover=false: the approval and the cutover show as skipped, the report still ran.
    states = task_states(airflow_home, run_id)
    assert (states["approve_cutover"], states["cutover"], states["report"]) == (
        "skipped",
        "skipped",
        "success",
    )
    # The pass updated the target users table: one asset event, through the alias, with its counts.
    params = psycopg.conninfo.conninfo_to_dict(legacy)
    ((task, uri, extra),) = asset_events(airflow_home, run_id)
    assert task == "report"
    assert uri == f"postgres://{params['host']}:{params['port']}/{params['dbname']}/public/account_newuser"
    assert extra["kind"] == "pass" and extra["run_id"] == run_id
    assert (extra["migrated"], extra["rejected"]) == (len(fx.MIGRATED), len(fx.REJECTED))
    assert summary["cutover"] == {"state": "not_requested", "legacy_tables": "writable"}
    assert checks[0] >= 20 and checks[1] is True
    assert summary["source_rows"] == len(fx.ROWS)
    assert (summary["migrated"], summary["rejected"]) == (len(fx.MIGRATED), len(fx.REJECTED))
    assert summary["rejected_by_reason"]["duplicate_email"] == 4

    folder = Path(backup_path)
    assert folder.parent == backup_dir
    report = json.loads((folder / "report.json").read_text())
    assert report["migrated"] == len(fx.MIGRATED)
    markdown = (folder / "report.md").read_text()
    assert "rejected_rows" in markdown and "Personal data" in markdown
    # No password hash, email or phone of any user in the report or anything Airflow logged.
    for text in (json.dumps(report), markdown, output, json.dumps(extra)):
        for value in personal_values():
            assert value not in text

    # Lineage: the operators' tables reached the OpenLineage transport, named postgres://host:port
    # and database.schema.table; the legacy users table in, the new tables and the audit trail out.
    raw = events.read_text()
    lineage = lineage_events(events)
    where = f"postgres://{params['host']}:{params['port']}/{params['dbname']}"
    legacy_users = f"{where}.public.account_user"
    assert [legacy_users in e["inputs"] for e in lineage["backup"]] == [True]
    assert lineage["backup"][0]["outputs"] == {f"{where}.migration_audit.runs"}
    assert len(lineage["copy"]) == 2  # one per mapped partition
    for event in lineage["copy"]:
        assert {legacy_users, f"{where}.public.account_user_groups"} <= event["inputs"]
        assert {
            f"{where}.public.account_newuser",
            f"{where}.public.account_newuser_groups",
            f"{where}.migration_audit.rejected_rows",
        } <= event["outputs"]
    # validate reads the new tables and the audit counts, not the legacy rows; writes its results.
    ((validate,),) = [lineage["validate"]]
    assert f"{where}.public.account_newuser" in validate["inputs"]
    assert legacy_users not in validate["inputs"]
    assert validate["outputs"] == {f"{where}.migration_audit.validation_results"}
    assert "cutover" not in lineage  # skipped by the scheduler: it never ran
    assert "hunter2" not in raw  # the connection's password
    for value in personal_values():
        assert value not in raw


def test_second_run_changes_nothing_and_other_batching_gives_the_same_result(
    airflow_home, legacy, make_db, backup_dir, tmp_path
):
    assert run_dag(airflow_home, legacy, backup_dir, tmp_path)[0] == 0
    first = snapshot(legacy)
    code, output = run_dag(airflow_home, legacy, backup_dir, tmp_path)
    assert code == 0, output[-4000:]
    assert snapshot(legacy) == first
    with psycopg.connect(legacy) as conn:
        summary = conn.execute(
            "SELECT summary FROM migration_audit.runs WHERE run_id = %s", (latest_run_id(legacy),)
        ).fetchone()[0]
    assert (summary["inserted"], summary["updated"], summary["removed"]) == (0, 0, 0)
    assert summary["unchanged"] == len(fx.MIGRATED)
    with psycopg.connect(legacy) as conn:  # a quiet pass: both taken over (decision 0011)
        taken = conn.execute(
            "SELECT p.duplicates_from IS NOT NULL, s.ran FROM migration_audit.plans AS p "
            "JOIN migration_audit.suite_runs AS s USING (run_id) WHERE run_id = %s",
            (latest_run_id(legacy),),
        ).fetchone()
    assert taken == (True, False)

    other = make_db("e2e_other")
    fx.load(other)
    code, output = run_dag(airflow_home, other, backup_dir, tmp_path, conf={"partitions": 5, "batch_size": 2})
    assert code == 0, output[-4000:]
    assert snapshot(other) == first
    assert rejects(other, latest_run_id(other)) == rejects(legacy, latest_run_id(legacy))


def test_separate_target_database(airflow_home, legacy, make_db, backup_dir, tmp_path):
    target = make_db("e2e_target")
    code, output = run_dag(airflow_home, legacy, backup_dir, tmp_path, target=target)
    assert code == 0, output[-4000:]
    assert [u[0] for u in snapshot(target)["users"]] == sorted(fx.MIGRATED)
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None


def test_dry_run_writes_nothing_to_target_tables(airflow_home, legacy, backup_dir, tmp_path):
    code, output = run_dag(airflow_home, legacy, backup_dir, tmp_path, conf={"dry_run": True})
    assert code == 0, output[-4000:]
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None
        summary = conn.execute("SELECT summary FROM migration_audit.runs").fetchone()[0]
    assert summary["dry_run"] is True
    assert (summary["migrated"], summary["rejected"]) == (len(fx.MIGRATED), len(fx.REJECTED))
    assert asset_events(airflow_home, latest_run_id(legacy)) == []  # a dry run updates no table


def test_rehearsal_needs_no_approval_and_emits_no_cutover_event(airflow_home, legacy, backup_dir, tmp_path):
    assert run_dag(airflow_home, legacy, backup_dir, tmp_path)[0] == 0
    code, output = run_dag(
        airflow_home, legacy, backup_dir, tmp_path, conf={"cutover": True, "dry_run": True}
    )
    assert code == 0, output[-4000:]
    run_id = latest_run_id(legacy)
    assert task_states(airflow_home, run_id)["cutover"] == "success"
    assert "rehearsal (dry_run): it changes nothing, so it needs no approval" in output
    assert asset_events(airflow_home, run_id) == []
    with psycopg.connect(legacy) as conn:
        summary = conn.execute(
            "SELECT summary FROM migration_audit.runs WHERE run_id = %s", (run_id,)
        ).fetchone()[0]
        # The approval of a later real cutover shows this measured pause, read from migration_audit.
        figures = cutover_figures(conn, run_id)
    assert summary["cutover"]["state"] == "rehearsed"
    assert summary["cutover"]["legacy_tables"] == "writable"
    assert figures["rehearsal"]["run_id"] == run_id
    assert figures["rehearsal"]["write_pause_seconds"] == summary["cutover"]["write_pause_seconds"]
    body = render_body(figures, 60)
    assert f"rehearsal {run_id}: writes paused" in body and "duplicate_email: 4" in body
    for value in personal_values():
        assert value not in body


def test_wrong_database_fails_at_once_with_one_clear_sentence(airflow_home, pg_server, backup_dir, tmp_path):
    wrong = uri_for(pg_server, "no_such_database").replace("postgres@", "postgres:hunter2@")
    code, output = run_dag(airflow_home, wrong, backup_dir, tmp_path)
    assert code != 0
    assert "cannot connect to the database of connection 'target_db'" not in output  # falls back to legacy_db
    assert (
        "cannot connect to the database of connection 'legacy_db': "
        'database "no_such_database" does not exist. Check that connection\'s host, port, user, password and '
        "database." in output
    )
    assert "hunter2" not in output
    # A wrong database is not transient: no retries were spent on it.
    assert "up_for_retry" not in output.lower() and "UP_FOR_RETRY" not in output


def test_bad_param_is_refused_before_anything_runs(airflow_home, legacy, backup_dir, tmp_path):
    code, output = run_dag(airflow_home, legacy, backup_dir, tmp_path, conf={"batch_size": 0})
    assert code != 0
    assert "batch_size" in output
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT to_regclass('account_newuser')").fetchone()[0] is None


def test_too_many_rejects_fail_validation_and_say_by_how_much(airflow_home, legacy, backup_dir, tmp_path):
    code, output = run_dag(airflow_home, legacy, backup_dir, tmp_path, conf={"max_reject_ratio": 0.1})
    assert code != 0
    assert "12 of 29 rows rejected (41.38%), the limit is 10.00% (Param max_reject_ratio)" in output
    with psycopg.connect(legacy) as conn:
        failed = conn.execute(
            "SELECT expectation FROM migration_audit.validation_results WHERE NOT success"
        ).fetchall()
        state = conn.execute("SELECT state FROM migration_audit.runs").fetchone()[0]
    assert failed == [("reject_ratio_within_limit",)]
    assert state == "failed"  # recorded as failed, and its writer lease released


def test_cutover_then_passes_stop_then_rollback_dag_resumes(airflow_home, legacy, backup_dir, tmp_path):
    # dag.test() would wait for a human's answer: this run skips the gate (the stack test answers it).
    code, output = run_dag(
        airflow_home, legacy, backup_dir, tmp_path, conf={"cutover": True, "require_approval": False}
    )
    assert code == 0, output[-4000:]
    run_id = latest_run_id(legacy)
    events = {task: (uri, extra) for task, uri, extra in asset_events(airflow_home, run_id)}
    assert set(events) == {"cutover", "report"}
    uri, extra = events["cutover"]
    assert uri.endswith("/migration_audit/cutovers")
    assert extra["kind"] == "cutover" and extra["run_id"] == run_id
    assert extra["source_checksum"] == extra["target_checksum"] and extra["write_pause_seconds"] >= 0
    with psycopg.connect(legacy) as conn:
        cut = conn.execute(
            "SELECT state, source_rows, target_rows, rejected_rows FROM migration_audit.cutovers"
        ).fetchone()
        assert cut == ("active", len(fx.ROWS), len(fx.MIGRATED), len(fx.REJECTED))
        with pytest.raises(
            psycopg.errors.ReadOnlySqlTransaction, match="read-only: users moved to account_newuser"
        ):
            conn.execute("DELETE FROM account_user WHERE id = 1")

    code, output = run_dag(airflow_home, legacy, backup_dir, tmp_path)
    assert code == 0, output[-4000:]
    assert "this pass does nothing" in output
    with psycopg.connect(legacy) as conn:
        assert (
            conn.execute(
                "SELECT state FROM migration_audit.runs ORDER BY started_at DESC LIMIT 1"
            ).fetchone()[0]
            == "skipped_after_cutover"
        )
        conn.execute("UPDATE account_newuser SET password = 'pbkdf2_sha256$after-cutover' WHERE id = 1")

    code, output = run_dag(
        airflow_home, legacy, backup_dir, tmp_path, conf={"confirm": "nope"}, dag_id="user_migration_rollback"
    )
    assert code != 0 and "type ROLLBACK in the confirm Param" in output
    code, output = run_dag(
        airflow_home,
        legacy,
        backup_dir,
        tmp_path,
        conf={"confirm": "ROLLBACK"},
        dag_id="user_migration_rollback",
    )
    assert code == 0, output[-4000:]
    with psycopg.connect(legacy) as conn:
        assert conn.execute("SELECT password FROM account_user WHERE id = 1").fetchone()[0] == (
            "pbkdf2_sha256$after-cutover"
        )
        assert conn.execute("SELECT state FROM migration_audit.cutovers").fetchone()[0] == "rolled_back"
        conn.execute("UPDATE account_user SET full_name = 'Writable' WHERE id = 2")
