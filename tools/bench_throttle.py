"""`make bench` (issue 19): what a first load costs the application, with the throttle off and on.

The application (tools/bench_writer.py with reads: half reads of a user and their group ids, half
the writer's inserts, updates and deletes, each its own transaction) runs at a steady rate against
the legacy tables. For each mode, in a fresh copy of the freshly generated legacy database (made
from it as a template before the bench's own first load touches it, so every mode loads into an
empty target):

1. the application alone for ``idle_seconds``: its idle p50/p99;
2. the first load's ddl and plan, each in a fresh process (application stopped);
3. the application again, and the copy (one process per partition, two at a time, as the bench's
   first load) while it runs; its latencies during the copy, and the copy's rows/s.

Modes:

- ``off``: fixed batches (batch_seconds 0) and every throttle threshold 0: the copy as fast as it goes.
- ``defaults``: the Params' defaults as they are: time-boxed batches (batch_seconds 0.75) and the
  default thresholds (64 active backends, 10 lock waiters, 30 s replay lag), which never fire
  against one application connection on a dev server.
- ``on``: the defaults plus the operator's ``slow`` state (tools/throttle.py slow --ms N, default
  ``slow_ms`` 750): every partition sleeps N ms between batches, holding no legacy snapshot when
  N >= 1 s. The only throttle setting that bites here every time: a server-state threshold needs
  load the bench does not make.
- ``probe``: the defaults plus a custom probe: the application's statements in flight at the check
  (client backends not of the migration, active), pausing when there is any (``throttle_probe_pause``
  0.5), checked between every two batches. At 200,000 users it never fired: one connection at
  200 statements/s is rarely caught mid-statement. Kept to show it.

Reported per mode: the application's p50/p99/max and statements/s idle and during the copy, the
factors p99(during)/p99(idle) and p50(during)/p50(idle), the copy's seconds and rows/s, the seconds
each partition was held by the throttle and the throttle's events.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
import throttle as throttle_cli
from bench_cutover import _finish_writer, _start_writer, latency_stats
from psycopg import sql

THROTTLE_DB = "user_migration_bench_throttle"
# The application's statements in flight (the bench's own sessions are named user_migration*).
APP_PROBE = (
    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' AND state = 'active' "
    "AND pid <> pg_backend_pid() AND coalesce(application_name, '') NOT LIKE 'user\\_migration%'"
)
OFF = {
    "batch_seconds": 0.0,
    "throttle_active_backends_pause": 0,
    "throttle_active_backends_stop": 0,
    "throttle_lock_waiters_pause": 0,
    "throttle_lock_waiters_stop": 0,
    "throttle_replay_lag_pause": 0.0,
    "throttle_replay_lag_stop": 0.0,
    "throttle_probe_sql": None,
}
# Checked at every batch boundary (throttle_check_ms 0): a time-boxed batch already takes ~0.75 s.
PROBE = {"throttle_probe_sql": APP_PROBE, "throttle_probe_pause": 0.5, "throttle_check_ms": 0}
MODES: dict[str, dict[str, Any]] = {"off": OFF, "on": {}, "defaults": {}, "probe": PROBE}
SLOWED = ("on",)  # modes run with the operator's manual state: slow


def _clone(server_dsn: str, template: str) -> str:
    """A fresh database copied from ``template`` (which must have no connections)."""
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(THROTTLE_DB)))
        conn.execute(
            sql.SQL("CREATE DATABASE {} TEMPLATE {} STRATEGY FILE_COPY").format(
                sql.Identifier(THROTTLE_DB), sql.Identifier(template)
            )
        )
    return psycopg.conninfo.make_conninfo(server_dsn, dbname=THROTTLE_DB)


def _drop(server_dsn: str) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(THROTTLE_DB)))


def _app(dsn: str, workdir: Path, name: str, rate: float, read_share: float):
    return _start_writer(dsn, workdir, name, rate=rate, read_share=read_share, seed=19)


def _by_kind(ops: list[list], since: float = float("-inf"), until: float = float("inf")) -> dict[str, Any]:
    reads = [op for op in ops if op[2] == "read"]
    writes = [op for op in ops if op[2] != "read"]
    return {
        "all": latency_stats(ops, since, until),
        "reads": latency_stats(reads, since, until),
        "writes": latency_stats(writes, since, until),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a and b else None


def one_mode(
    mode: str,
    server_dsn: str,
    template: str,
    rows: int,
    workdir: Path,
    run_child: Callable[[dict[str, Any], Path, str], dict[str, Any]],
    base: dict[str, Any],
    copy_workers: int,
    rate: float,
    read_share: float,
    idle_seconds: float,
    slow_ms: int,
) -> dict[str, Any]:
    overrides = MODES[mode]
    started = time.perf_counter()
    load_before = os.getloadavg()
    dsn = _clone(server_dsn, template)
    clone_seconds = time.perf_counter() - started
    try:
        # 1. The application alone.
        proc, out, stop = _app(dsn, workdir, f"throttle-{mode}-idle", rate, read_share)
        time.sleep(idle_seconds)
        idle = _finish_writer(proc, out, stop)
        # 2. ddl and plan of a first load, in fresh processes.
        run_id = f"{base['run_id']}__throttle_{mode}"
        spec = {**base, "dsn": dsn, "run_id": run_id, "settings": overrides}
        run_child({**spec, "stage": "ddl"}, workdir, f"throttle-{mode}-ddl")
        if mode in SLOWED:  # as an operator would: python tools/throttle.py slow --ms N
            throttle_cli.set_state(dsn, "slow", slow_ms, "bench")
        plan = run_child({**spec, "stage": "plan"}, workdir, f"throttle-{mode}-plan")["result"]
        # 3. The application, then the copy while it runs.
        proc, out, stop = _app(dsn, workdir, f"throttle-{mode}-copy", rate, read_share)
        try:
            time.sleep(1.0)

            def one(partition: dict[str, Any]) -> dict[str, Any]:
                return run_child(
                    {**spec, "stage": "copy", "partition": partition},
                    workdir,
                    f"throttle-{mode}-copy-{partition['partition_no']}",
                )

            with ThreadPoolExecutor(max_workers=max(1, copy_workers)) as pool:
                outs = list(pool.map(one, plan["partitions"]))
            time.sleep(0.5)
        finally:
            app = _finish_writer(proc, out, stop)
        copy_start = min(o["started_at"] for o in outs)
        copy_end = max(o["finished_at"] for o in outs)
        during = _by_kind(app["ops"], copy_start - app["wall_start"], copy_end - app["wall_start"])
        with psycopg.connect(dsn, autocommit=True) as conn:
            events = dict(
                conn.execute(
                    "SELECT event || coalesce(':' || signal, ''), count(*) FROM migration_audit.throttle_events "
                    "WHERE run_id = %s GROUP BY 1 ORDER BY 1",
                    (run_id,),
                ).fetchall()
            )
    finally:
        _drop(server_dsn)
    idle_stats = _by_kind(idle["ops"])
    seconds = copy_end - copy_start
    copied = sum(o["result"]["rows_in"] for o in outs)
    return {
        "mode": mode,
        "settings": {k: v for k, v in overrides.items()},
        "manual_state": f"slow {slow_ms} ms" if mode in SLOWED else "run",
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "clone_seconds": round(clone_seconds, 3),
        "idle": idle_stats,
        "during_copy": during,
        "app_errors": idle["error_count"] + app["error_count"],
        "app_errors_sample": (idle["errors"] + app["errors"])[:3],
        "p99_factor": _ratio(during["all"].get("p99_ms"), idle_stats["all"].get("p99_ms")),
        "p50_factor": _ratio(during["all"].get("p50_ms"), idle_stats["all"].get("p50_ms")),
        "throughput_factor": _ratio(during["all"].get("writes_per_s"), idle_stats["all"].get("writes_per_s")),
        "copy": {
            "rows": copied,
            "seconds": round(seconds, 3),
            "rows_per_s": round(copied / seconds) if seconds > 0 else None,
            "rss_peak_mb": max(o["rss_peak_mb"] for o in outs),
            "python_cpu_seconds": round(sum(o["python_cpu_seconds"] for o in outs), 3),
            "partitions": [
                {
                    "partition_no": o["result"]["partition_no"],
                    "rows": o["result"]["rows_in"],
                    "seconds": round(o["seconds"], 3),
                    "batches": o["result"]["batches"],
                    "snapshots": o["result"]["snapshots"],
                    "throttled_seconds": o["result"]["throttled_seconds"],
                }
                for o in outs
            ],
            "throttle_events": events,
        },
    }


def throttle_bench(
    server_dsn: str,
    template: str,
    rows: int,
    workdir: Path,
    run_child: Callable[[dict[str, Any], Path, str], dict[str, Any]],
    base: dict[str, Any],
    copy_workers: int,
    modes: list[str],
    rate: float = 200.0,
    read_share: float = 0.5,
    idle_seconds: float = 8.0,
    slow_ms: int = 750,
) -> dict[str, Any]:
    started = time.perf_counter()
    results = []
    for mode in modes:
        print(
            f"  throttle {mode}: the application alone {idle_seconds:g} s, ddl, plan, copy with it ...",
            flush=True,
        )
        results.append(
            one_mode(
                mode,
                server_dsn,
                template,
                rows,
                workdir,
                run_child,
                base,
                copy_workers,
                rate,
                read_share,
                idle_seconds,
                slow_ms,
            )
        )
    return {
        "app_rate": rate,
        "read_share": read_share,
        "idle_seconds": idle_seconds,
        "slow_ms": slow_ms,
        "probe": APP_PROBE,
        "seconds": round(time.perf_counter() - started, 3),
        "modes": results,
    }


def print_throttle(report: dict[str, Any]) -> None:
    t = report.get("throttle")
    if not t:
        return
    print()
    print(
        f"first load with the application ({t['app_rate']:g} statements/s, {t['read_share']:.0%} reads), "
        f"{t['seconds']:.0f} s in all:"
    )
    for m in t["modes"]:
        i, d, c = m["idle"]["all"], m["during_copy"]["all"], m["copy"]
        held = sum(p["throttled_seconds"] for p in c["partitions"])
        print(
            f"  {m['mode']:<8} app p50/p99 idle {i.get('p50_ms')}/{i.get('p99_ms')} ms -> during the copy "
            f"{d.get('p50_ms')}/{d.get('p99_ms')} ms (p99 x{m['p99_factor']}, max {d.get('max_ms')} ms), "
            f"{i.get('writes_per_s')} -> {d.get('writes_per_s')} statements/s; copy {c['seconds']:.1f} s "
            f"({c['rows_per_s']:,} rows/s), throttle held {held:.1f} s, events {c['throttle_events']}"
        )
