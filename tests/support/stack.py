"""What the end-to-end tests on the local Airflow stack share (tests/test_stack_e2e.py with the
LocalExecutor, tests/test_celery_e2e.py with the CeleryExecutor): the REST API client, reads of the
target and the audit trail, and the backfill check."""

from __future__ import annotations

import datetime as dt
import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import airflow_stack
import psycopg
from airflow_env import airflow

free_port = airflow_stack.free_port


def cmdline(proc: Path) -> bytes:
    try:
        return (proc / "cmdline").read_bytes() + (proc / "environ").read_bytes()
    except OSError:
        return b""


def cwd(proc: Path) -> str:
    try:
        return os.readlink(proc / "cwd")
    except OSError:
        return ""


def leftovers(base: Path) -> list[Path]:
    """Processes that still run from, or with settings naming, the stack's folder. (A Celery worker
    retitles itself over its environment, so its working folder is what names the stack.)"""
    return [
        p
        for p in Path("/proc").glob("[0-9]*")
        if str(base).encode() in cmdline(p) or cwd(p).startswith(f"{base}/")
    ]


class Api:
    """The REST API (/api/v2) with a bearer token from SimpleAuthManager's token flow."""

    def __init__(self, stack: airflow_stack.Stack) -> None:
        self.base = f"{stack.url}/api/v2"
        self.token = stack.token()

    def __call__(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            self.base + path,
            data=None if body is None else json.dumps(body).encode(),
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def wait_for_dag(self, dag_id: str = "user_migration", timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            try:
                return self("GET", f"/dags/{dag_id}")
            except urllib.error.HTTPError as exc:
                if exc.code != 404 or time.monotonic() > deadline:
                    raise
            time.sleep(2)

    def wait_for_run(self, run_id: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self("GET", f"/dags/user_migration/dagRuns/{run_id}")
            if run["state"] in ("success", "failed"):
                if run["state"] == "failed":
                    self.explain(run_id)
                return run
            time.sleep(2)
        raise AssertionError(f"run {run_id} did not finish in {timeout} s (state {run['state']})")

    def explain(self, run_id: str) -> None:
        """Print the failed tasks' logs (the tail): a red CI run then says why, not only that."""
        for (task_id, index), ti in sorted(self.task_instances(run_id).items()):
            if ti["state"] not in ("failed", "upstream_failed"):
                continue
            print(f"--- {run_id} {task_id}[{index}] {ti['state']} (try {ti['try_number']})")
            if ti["state"] != "failed":
                continue
            suffix = f"?map_index={index}" if index >= 0 else ""
            path = f"/dags/user_migration/dagRuns/{run_id}/taskInstances/{task_id}/logs/{ti['try_number']}{suffix}"
            try:
                content = self("GET", path).get("content", [])
            except urllib.error.HTTPError as exc:
                print(f"(log unavailable: {exc})")
                continue
            lines = [e.get("event", str(e)) if isinstance(e, dict) else str(e) for e in content]
            print("\n".join(lines[-40:]))

    def wait_for_task_state(self, run_id: str, task_id: str, state: str, timeout: float = 300) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            ti = self.task_instances(run_id).get((task_id, -1))
            if ti and ti["state"] == state:
                return ti
            assert time.monotonic() < deadline, f"{task_id} of {run_id} is {ti and ti['state']}, not {state}"
            time.sleep(2)

    def task_instances(self, run_id: str) -> dict[tuple[str, int], dict]:
        items = self("GET", f"/dags/user_migration/dagRuns/{run_id}/taskInstances")["task_instances"]
        return {(t["task_id"], t["map_index"]): t for t in items}

    def tries(self, run_id: str, task_id: str, map_index: int = -1) -> list[dict]:
        """Every try of a task instance, the current one included (its history in the metadata)."""
        path = f"/dags/user_migration/dagRuns/{run_id}/taskInstances/{task_id}/{map_index}/tries"
        return sorted(self("GET", path)["task_instances"], key=lambda t: t["try_number"])


def wait_until_parked(stack: airflow_stack.Stack, run_id: str, task_id: str, timeout: float = 90) -> None:
    """Wait until the scheduler has handled the end of the workload that parked a task in
    ``awaiting_input``, before anyone answers it.

    Airflow 3.3.2 races otherwise: the worker's supervisor reports the parked workload's end up to
    ``[workers] min_heartbeat_interval`` (5 s) after the task parked. An answer given before the
    scheduler handles that report re-queues the same try under the same executor key; the late
    report then removes the key from the executor and the scheduler fails the resumed task as
    "killed externally", with no log of its own (CI, approval_approve_1). docs/operations.md says
    the same to users.
    """
    log = stack.base / "home" / "logs" / "scheduler.log"
    needle = f"TaskInstance Finished: dag_id=user_migration, task_id={task_id}, run_id={run_id},"
    deadline = time.monotonic() + timeout
    while True:
        lines = log.read_text(errors="replace").splitlines() if log.exists() else []
        if any(needle in line and "state=awaiting_input" in line for line in lines):
            return
        assert time.monotonic() < deadline, f"the scheduler never saw {task_id} of {run_id} parked"
        time.sleep(1)


def target(stack: airflow_stack.Stack) -> list[tuple]:
    with psycopg.connect(stack.legacy_dsn) as conn:
        return conn.execute(
            "SELECT id, password, last_login, email, username, full_name, date_of_birth, phone_number, "
            "is_active, joined_at, updated_at FROM account_newuser ORDER BY id"
        ).fetchall()


def audit_run(stack: airflow_stack.Stack, run_id: str) -> tuple[str, dict]:
    with psycopg.connect(stack.legacy_dsn) as conn:
        row = conn.execute(
            "SELECT state, summary FROM migration_audit.runs WHERE run_id = %s", (run_id,)
        ).fetchone()
    assert row is not None, f"no audit record for {run_id}"
    return row


def meta(stack: airflow_stack.Stack, query: str, args: tuple) -> list[tuple]:
    """Rows from Airflow's own metadata database (PostgreSQL in the stack)."""
    dsn = stack.env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(dsn) as conn:
        return conn.execute(query, args).fetchall()


def backfill_makes_passes_that_change_nothing(
    stack: airflow_stack.Stack, api: Api, from_date: str, to_date: str, timeout: float = 400
) -> list[dict]:
    """`airflow backfill create` over the days from_date..to_date: one pass a day, all successful,
    none changing the target, taking turns on the writer lease without spending retries."""
    first, last = dt.date.fromisoformat(from_date), dt.date.fromisoformat(to_date)
    days = [str(first + dt.timedelta(days=n)) for n in range((last - first).days + 1)]
    before = target(stack)
    airflow(
        stack.env,
        "backfill",
        "create",
        "--dag-id",
        "user_migration",
        "--from-date",
        from_date,
        "--to-date",
        to_date,
    )
    deadline = time.monotonic() + timeout
    while True:
        runs = [
            r
            for r in api("GET", "/dags/user_migration/dagRuns?run_type=backfill")["dag_runs"]
            if r["run_type"] == "backfill" and from_date <= r["logical_date"][:10] <= to_date
        ]
        if len(runs) == len(days) and all(r["state"] in ("success", "failed") for r in runs):
            break
        assert time.monotonic() < deadline, (
            f"backfill not done: {[(r['dag_run_id'], r['state']) for r in runs]}"
        )
        time.sleep(3)
    assert sorted(r["logical_date"][:10] for r in runs) == days
    assert all(r["state"] == "success" for r in runs)
    for r in runs:
        state, audit = audit_run(stack, r["dag_run_id"])
        assert state == "success"
        assert (audit["inserted"], audit["updated"], audit["removed"]) == (0, 0, 0)
    with psycopg.connect(stack.legacy_dsn) as conn:
        logged = conn.execute(
            "SELECT count(*) FROM migration_audit.runs WHERE run_id = ANY(%s) AND logical_date IS NOT NULL",
            ([r["dag_run_id"] for r in runs],),
        ).fetchone()[0]
        duplicates = conn.execute(
            "SELECT count(*) FROM (SELECT lower(email) FROM account_newuser GROUP BY 1 HAVING count(*) > 1) AS d"
        ).fetchone()[0]
        # Airflow starts a backfill's runs side by side; they take turns on the writer lease by
        # rescheduling (state 'waiting'), never by failing and spending retries.
        attempts = dict(
            conn.execute(
                "SELECT state, count(*) FROM migration_audit.task_attempts WHERE run_id = ANY(%s) GROUP BY state",
                ([r["dag_run_id"] for r in runs],),
            ).fetchall()
        )
    print("task attempts of the backfill's runs by state:", attempts)
    assert logged == len(days) and duplicates == 0
    assert "failed" not in attempts, attempts
    assert target(stack) == before
    return runs
