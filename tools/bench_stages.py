"""`make bench`'s stage children: ``bench.py --child SPEC.json`` runs one stage in a fresh process.

It writes the stage's measurements (seconds, peak RSS, Python and server CPU, the stage's result) to
SPEC["output"]. Imports happen before the clock starts; the parent (bench_pipeline.run_child) also
records the wall time of the whole process (interpreter start and imports included).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from bench_baselines import _stage_orm_baseline


def _proc_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def _settings(spec: dict[str, Any]):
    from user_migration.config import Settings

    # "settings": Params to change for this stage (the throttle bench's modes); else the defaults.
    return Settings(partitions=spec["partitions"], batch_size=spec["batch_size"], **spec.get("settings", {}))


def _sqlalchemy_url(dsn: str) -> str:
    from sqlalchemy.engine import URL

    p = psycopg.conninfo.conninfo_to_dict(dsn)
    return URL.create(
        "postgresql+psycopg",
        username=p.get("user"),
        password=p.get("password"),
        host=p.get("host", "localhost"),
        port=int(p.get("port", 5432)),
        database=p.get("dbname"),
    ).render_as_string(hide_password=False)


def _stage_backup(spec, conn, settings):
    from user_migration.backup import run_backup
    from user_migration.db import check_legacy_tables

    def work():
        check_legacy_tables(conn, settings.mapping, "legacy_db")
        result = run_backup(conn, settings.mapping, Path(spec["backup_dir"]), spec["run_id"])
        return {
            "folder": result.folder,
            "rows": result.rows,
            "bytes": sum(t["bytes"] for t in result.tables),
        }

    return work


def _stage_ddl(spec, conn, settings):
    from user_migration import audit
    from user_migration.db import ensure_audit_schema
    from user_migration.schema import apply_schema

    def work():
        ensure_audit_schema(conn)
        audit.start_run(conn, spec["run_id"], "user_migration", None, False, settings.public())
        audit.set_backup(conn, spec["run_id"], spec.get("backup_folder") or "")
        return {"applied": apply_schema(conn, spec["run_id"])}

    return work


def wrap_calls(module: Any, names: tuple[str, ...], on_call: Callable[[str, float], None]) -> None:
    """Wrap module-level functions so each call reports (name, seconds) to ``on_call``.

    The code measured calls them through its module, so wrapping the attribute times the real calls.
    """

    def wrap(name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                on_call(name, time.perf_counter() - started)

        return timed

    for name in names:
        setattr(module, name, wrap(name, getattr(module, name)))


def _time_calls(timings: dict[str, float], module: Any, *names: str) -> None:
    """The functions' seconds add up in ``timings``: where a stage's time goes."""

    def add(name: str, seconds: float) -> None:
        timings[name] = round(timings.get(name, 0.0) + seconds, 3)

    wrap_calls(module, names, add)


def _stage_plan(spec, conn, settings):
    from user_migration import capture, deferred_indexes
    from user_migration import plan as plan_module

    timings: dict[str, float] = {}
    _time_calls(timings, plan_module, "partition_ranges", "find_duplicates")
    _time_calls(timings, capture, "prepare")
    _time_calls(timings, deferred_indexes, "build", "defer")

    def work():
        target = spec["target"]
        as_of = dt.date.fromisoformat(spec["as_of"])
        result = plan_module.make_plan(conn, target, settings, spec["run_id"], as_of)
        return {**result, "timings": timings}

    return work


def _stage_copy(spec, conn, settings):
    from user_migration.partition_copy import copy_partition

    def work():
        result = copy_partition(conn, spec["target"], settings, spec["run_id"], spec["partition"])
        return result.as_dict()

    if spec.get("profile"):
        from pyinstrument import Profiler

        def profiled():
            profiler = Profiler(interval=0.001)
            profiler.start()
            try:
                return work()
            finally:
                profiler.stop()
                Path(spec["profile"]).write_text(
                    profiler.output_text(unicode=False, color=False, show_all=False)
                )
                Path(spec["profile"]).with_suffix(".html").write_text(profiler.output_html())

        return profiled
    return work


def _stage_indexes(spec, conn, settings):
    from user_migration.deferred_indexes import build

    def work():
        return build(conn, conn, settings)

    return work


def _stage_finalize(spec, conn, settings):
    from user_migration import capture, deferred_indexes, finalize
    from user_migration.finalize import finalize_target

    timings: dict[str, float] = {}
    _time_calls(timings, finalize, "init_profiles", "legacy_id_floors")
    _time_calls(timings, deferred_indexes, "build")
    _time_calls(timings, capture, "complete_pass")

    def work():
        # With the run id a pass that compared every row makes the change log trusted, as in the DAG:
        # the quiet pass then reads the log, and the cutover accepts it.
        return {**finalize_target(conn, conn, settings, spec["run_id"]), "timings": timings}

    return work


def _stage_validate(spec, conn, settings):
    import great_expectations  # noqa: F401  (imported before the clock starts: ~seconds of imports)

    from user_migration import audit
    from user_migration.checks import run_checks

    def work():
        started = time.perf_counter()
        numbers = audit.reconcile(conn, spec["run_id"])
        reconciled = time.perf_counter()
        # The DAG's validate task's own checks (checks.run_checks): the accounting, the reject ratio,
        # the full sync-drift comparison, and the suite unless the target is provably as a passed
        # suite saw it. Its reconcile runs again inside; the figure below is the whole stage.
        run = run_checks(conn, spec["run_id"], settings, _sqlalchemy_url(spec["dsn"]))
        checked = time.perf_counter()
        # Recorded like the DAG's validate task does: the cutover refuses a run without a passed one.
        audit.store_validation(conn, spec["run_id"], run.outcomes)
        failed = [o["details"]["message"] for o in run.failed]
        accounted = numbers["migrated"] + numbers["rejected"]
        return {
            "timings": {
                "reconcile": round(reconciled - started, 3),
                "validate_target": round(checked - reconciled, 3),
            },
            "reconcile": numbers,
            "suite": {"note": run.suite_note, "seconds": run.suite_seconds},
            "accounted": accounted == numbers["source_rows"] == numbers["rows_read"],
            "checks": len(run.outcomes),
            "checks_passed": len(run.outcomes) - len(failed),
            "failed": failed,
        }

    return work


CHILD_STAGES = {
    "backup": _stage_backup,
    "ddl": _stage_ddl,
    "plan": _stage_plan,
    "copy": _stage_copy,
    "indexes": _stage_indexes,
    "finalize": _stage_finalize,
    "validate": _stage_validate,
    "orm_baseline": _stage_orm_baseline,
}


def _backend_cpu(conns: list[psycopg.Connection]) -> float | None:
    """CPU seconds the server processes behind ``conns`` used so far (local server only)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for conn in conns:
        try:
            fields = Path(f"/proc/{conn.info.backend_pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


OPENED: list[psycopg.Connection] = []


def _connect(dsn: str) -> psycopg.Connection:
    """An autocommit connection like the operators' (the stage functions open their own transactions),
    named like theirs (user_migration.db.connect): the throttle does not count the migration's own sessions."""
    from user_migration.db import APPLICATION_NAME

    conn = psycopg.connect(dsn, autocommit=True, application_name=APPLICATION_NAME)
    OPENED.append(conn)
    return conn


def child_main(spec_path: Path) -> int:
    spec = json.loads(spec_path.read_text())
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
    settings = _settings(spec)
    with _connect(spec["dsn"]) as conn:
        work = CHILD_STAGES[spec["stage"]](spec, conn, settings)
        if spec["stage"] in ("plan", "copy"):
            spec["target"] = _connect(spec["dsn"])
        rss_before = _proc_status_kb("VmRSS")
        server_cpu_before = _backend_cpu(OPENED)
        cpu_before = _own_cpu()
        started_at = time.time()
        started = time.perf_counter()
        result = work()
        seconds = time.perf_counter() - started
        finished_at = time.time()
        cpu = _own_cpu() - cpu_before
        server_cpu_after = _backend_cpu(OPENED)
        for extra in OPENED[1:]:
            extra.close()
    server_cpu = None
    if server_cpu_before is not None and server_cpu_after is not None:
        server_cpu = round(server_cpu_after - server_cpu_before, 3)
    output = {
        "stage": spec["stage"],
        "seconds": seconds,
        "started_at": started_at,
        "finished_at": finished_at,
        "python_cpu_seconds": round(cpu, 3),
        "server_cpu_seconds": server_cpu,
        "rss_before_mb": round(rss_before / 1024, 1),
        "rss_peak_mb": round(_proc_status_kb("VmHWM") / 1024, 1),
        "ru_maxrss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "result": result,
    }
    Path(spec["output"]).write_text(json.dumps(output, default=str))
    return 0
