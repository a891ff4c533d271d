"""`make bench` stages with the application writing: the cutover, and the capture triggers' cost.

The cutover's promise is a write pause that does not grow with the table (plugins/user_migration/
cutover.py); the only way to see it is to measure it from the application's side while the
application writes. ``cutover_with_writer`` runs tools/bench_writer.py at a steady rate, lets its
writes pile up in the change log for a while (the catch-up the cutover does without the lock),
then cuts over and reports the writer's latencies next to the pause the cutover recorded.

``trigger_cost`` answers what capture costs the application on every write: the same writer,
flat out, against a copy of the legacy tables in a scratch schema of the same database, with and
without the triggers, interleaved. The copy keeps the migration's own tables and trust untouched:
removing the real triggers would make the change log untrusted, and the next pass a full one.
"""

from __future__ import annotations

import datetime as dt
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
import seed_legacy
from bench_stages import wrap_calls
from psycopg import sql

from user_migration import capture
from user_migration.config import LegacyMapping, Settings, load_mapping
from user_migration.cutover import CutoverOptions, CutoverRefused, run_cutover

WRITER = Path(__file__).with_name("bench_writer.py")
COST_SCHEMA = "bench_capture"
# Copied in this order (the links reference the users and the lookup tables).
COPY_ORDER = tuple(reversed(seed_legacy.LEGACY_TABLES))


def latency_stats(
    ops: list[list], since: float = float("-inf"), until: float = float("inf")
) -> dict[str, Any]:
    """p50/p99/max/mean (ms) and writes/s of the statements started in [since, until) (offsets, s)."""
    chosen = [op for op in ops if since <= op[0] < until]
    if not chosen:
        return {"statements": 0}
    ms = sorted(op[1] * 1000 for op in chosen)
    span = max(op[0] + op[1] for op in chosen) - min(op[0] for op in chosen)
    ok = sum(1 for op in chosen if op[3] == "ok")
    return {
        "statements": len(chosen),
        "ok": ok,
        "read_only": sum(1 for op in chosen if op[3] == "read_only"),
        "errors": sum(1 for op in chosen if op[3] == "error"),
        "seconds": round(span, 3),
        "writes_per_s": round(ok / span, 1) if span > 0 else None,
        "p50_ms": round(ms[len(ms) // 2], 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def _start_writer(dsn: str, workdir: Path, name: str, **options: Any) -> tuple[subprocess.Popen, Path, Path]:
    out, stop = workdir / f"{name}.json", workdir / f"{name}.stop"
    command = [sys.executable, str(WRITER), "--dsn", dsn, "--out", str(out), "--stop-file", str(stop)]
    for key, value in options.items():
        if value is not None:
            command += [f"--{key.replace('_', '-')}", str(value)]
    return subprocess.Popen(command), out, stop


def _finish_writer(proc: subprocess.Popen, out: Path, stop: Path) -> dict[str, Any]:
    stop.touch()
    try:
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if proc.returncode != 0:
        raise RuntimeError(f"the bench writer failed (exit {proc.returncode})")
    return json.loads(out.read_text())


def _backlog(conn: psycopg.Connection, mapping: LegacyMapping) -> dict[str, int]:
    entries, users = conn.execute(
        sql.SQL("SELECT count(*), count(DISTINCT source_id) FROM {}").format(capture.log_table(mapping))
    ).fetchone()
    return {"entries": entries, "users": users}


def _record_calls(calls: list[tuple[str, float]], module: Any, *names: str) -> None:
    """Append (name, seconds) per call of the functions: where the cutover's time goes."""
    wrap_calls(module, names, lambda name, seconds: calls.append((name, round(seconds, 3))))


def cutover_with_writer(
    dsn: str, settings: Settings, run_id: str, workdir: Path, rate: float, catch_up_seconds: float
) -> dict[str, Any]:
    """Writer at ``rate`` writes/s for ``catch_up_seconds``, then ``run_cutover`` with default options."""
    from user_migration import cutover

    calls: list[tuple[str, float]] = []  # in order: the catch-up's applies, then the final sync's
    _record_calls(calls, cutover, "_catch_up", "_apply", "_verify_target", "_prove")
    proc, out, stop = _start_writer(dsn, workdir, "cutover-writer", rate=rate, seed=7)
    error = None
    result: dict[str, Any] = {}
    try:
        time.sleep(catch_up_seconds)
        with psycopg.connect(dsn, autocommit=True, application_name="bench_cutover") as conn:
            backlog = _backlog(conn, settings.mapping)
            cut_start = time.time()
            started = time.perf_counter()
            try:
                result = run_cutover(conn, conn, settings, run_id, dt.date.today(), "bench", CutoverOptions())
            except CutoverRefused as exc:
                error = str(exc)
            wall = time.perf_counter() - started
            cut_end = time.time()
            recorded = conn.execute(
                "SELECT pause_seconds, state FROM migration_audit.cutovers WHERE run_id = %s ORDER BY id DESC LIMIT 1",
                (run_id,),
            ).fetchone()
        time.sleep(1.0)  # writes after the switch: they fail at once, naming the new table
    finally:
        writer = _finish_writer(proc, out, stop)
    ops = writer["ops"]
    since, until = cut_start - writer["wall_start"], cut_end - writer["wall_start"]
    return {
        "writer_rate_target": rate,
        "catch_up_seconds": catch_up_seconds,
        "backlog_at_start": backlog,
        "cutover_wall_seconds": round(wall, 3),
        # _catch_up includes its rounds' _apply calls; the last _apply is the final sync, under the lock.
        "calls": [list(call) for call in calls],
        "error": error,
        "write_pause_seconds": result.get("write_pause_seconds"),
        "recorded_pause_seconds": None if recorded is None else round(recorded[0], 3),
        "recorded_state": None if recorded is None else recorded[1],
        "lock_attempts": result.get("lock_attempts"),
        "catch_up": result.get("catch_up"),
        "final_sync": result.get("final_sync"),
        "source_rows": result.get("source_rows"),
        "checksums_equal": result.get("source_checksum") == result.get("target_checksum") if result else None,
        "writes": {
            # Until run_cutover returned: the catch-up period and the cutover. A write that waited on
            # the lock is refused as read-only once the switch commits; its wait is its latency.
            "until_switch": latency_stats(ops, until=until),
            "catch_up_period": latency_stats(ops, until=since),
            "during_cutover": latency_stats(ops, since, until),
            "after_switch": latency_stats(ops, since=until),
            "errors": writer["error_count"],  # anything but the read-only refusal
            "errors_sample": writer["errors"][:3],
        },
    }


# Users copied for the triggers' cost: a statement's cost hardly depends on the table's size (one
# more B-tree level from 200k to 10M rows), and copying all 1M took 30 s on a busy machine.
COST_USERS = 200_000
USER_COLUMN = {
    "account_user": "id",
    "account_user_groups": "user_id",
    "account_user_user_permissions": "user_id",
}


def _copy_legacy(conn: psycopg.Connection, users: int) -> float:
    """The legacy tables with their constraints, in COST_SCHEMA: the users with id <= ``users`` and
    their links, every lookup row; returns seconds."""
    started = time.perf_counter()
    schema = sql.Identifier(COST_SCHEMA)
    conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(schema))
    conn.execute(sql.SQL("CREATE SCHEMA {}").format(schema))
    with conn.transaction():
        conn.execute(sql.SQL("SET LOCAL search_path = {}").format(schema))
        conn.execute(seed_legacy.LEGACY_DDL.read_text())
    for table in COPY_ORDER:
        copy, source = sql.Identifier(COST_SCHEMA, table), sql.Identifier("public", table)
        column = USER_COLUMN.get(table)
        where = sql.SQL(" WHERE {} <= {}").format(sql.Identifier(column), users) if column else sql.SQL("")
        conn.execute(sql.SQL("INSERT INTO {} SELECT * FROM {}{}").format(copy, source, where))
        conn.execute(
            sql.SQL(
                "SELECT setval(pg_get_serial_sequence({q}, 'id'), (SELECT coalesce(max(id), 0) + 1 FROM {t}), false)"
            ).format(q=sql.Literal(f"{COST_SCHEMA}.{table}"), t=copy)
        )
        conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(copy))
    return time.perf_counter() - started


def _writer_run(dsn: str, workdir: Path, name: str, statements: int) -> list[list]:
    out = workdir / f"{name}.json"
    subprocess.run(
        [
            sys.executable,
            str(WRITER),
            *("--dsn", dsn, "--out", str(out), "--count", str(statements), "--schema", COST_SCHEMA),
        ],
        check=True,
    )
    return json.loads(out.read_text())["ops"]


def trigger_cost(
    dsn: str, workdir: Path, statements: int, rounds: int = 2, users: int = COST_USERS
) -> dict[str, Any]:
    """The writer flat out, ``statements`` a run, without then with the triggers, ``rounds`` times,
    on a copy of the first ``users`` legacy users."""
    mapping = load_mapping({"schema": COST_SCHEMA})
    ops: dict[str, list[list]] = {"without": [], "with": []}
    runs: list[dict[str, Any]] = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        copy_seconds = _copy_legacy(conn, users)
        copied = conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(COST_SCHEMA, "account_user"))
        ).fetchone()[0]
        try:
            for number in range(rounds):
                for mode in ("without", "with"):
                    if mode == "with":
                        capture.install(conn, mapping)
                    else:
                        capture.remove(conn, mapping)
                    run = _writer_run(dsn, workdir, f"cost-{mode}-{number}", statements)
                    logged = _backlog(conn, mapping)["entries"] if mode == "with" else 0
                    ops[mode].extend(run)
                    runs.append({"mode": mode, "log_entries": logged, **latency_stats(run)})
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(COST_SCHEMA)))
    without, with_ = (_pooled(ops[m], [r for r in runs if r["mode"] == m]) for m in ("without", "with"))
    return {
        "what": (
            f"bench_writer flat out (no pacing), {statements} statements a run, {rounds} rounds of "
            f"without/with the capture triggers, on a copy of the first {users:,} legacy users and their "
            f"links in schema {COST_SCHEMA}"
        ),
        "copy_seconds": round(copy_seconds, 3),
        "copied_users": copied,
        "runs": runs,
        "without": without,
        "with": with_,
        "ratio_writes_per_s": _ratio(with_["writes_per_s"], without["writes_per_s"]),
        "ratio_p50": _ratio(with_["p50_ms"], without["p50_ms"]),
        "ratio_p99": _ratio(with_["p99_ms"], without["p99_ms"]),
        "ratio_mean": _ratio(with_["mean_ms"], without["mean_ms"]),
    }


def _pooled(ops: list[list], runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Latency percentiles over every statement of a mode; writes/s summed over its runs' time."""
    ms = sorted(op[1] * 1000 for op in ops)
    ok = sum(r["ok"] for r in runs)
    seconds = sum(r["seconds"] for r in runs)
    return {
        "statements": len(ms),
        "writes_per_s": round(ok / seconds, 1) if seconds else None,
        "p50_ms": round(ms[len(ms) // 2], 3),
        "p99_ms": round(ms[min(len(ms) - 1, int(len(ms) * 0.99))], 3),
        "max_ms": round(ms[-1], 3),
        "mean_ms": round(statistics.fmean(ms), 3),
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _ms(stats: dict[str, Any]) -> str:
    if not stats.get("statements"):
        return "no statements"
    return (
        f"{stats['statements']:,} statements, {stats['writes_per_s']} writes/s, p50 {stats['p50_ms']:.3f} ms, "
        f"p99 {stats['p99_ms']:.3f} ms, max {stats['max_ms']:.1f} ms"
    )


def print_extras(report: dict[str, Any]) -> None:
    """The summary lines of the quiet pass, the triggers' cost and the cutover, where they ran."""
    quiet = report.get("quiet_pass")
    if quiet:
        per_stage = ", ".join(f"{s['stage']} {s['seconds']:.2f}" for s in quiet["stages"])
        v = quiet["validation"]
        print()
        print(
            f"quiet pass (nothing changed, changes read from: {quiet['changes']}, copy path "
            f"{'/'.join(quiet['copy_paths'])}): {quiet['total']['seconds']:.2f} s of stage work "
            f"({quiet['total']['process_seconds']:.2f} s with process start-up): {per_stage} s; "
            f"reconcile {'holds' if v['accounted'] else 'DOES NOT HOLD'}, GX {v['checks_passed']}/{v['checks']}"
        )
        for stage in ("plan", "finalize", "validate"):
            timings = (quiet["validation"] if stage == "validate" else quiet[stage]).get("timings")
            if timings:
                print(f"  {stage}: " + ", ".join(f"{k} {v:.2f} s" for k, v in timings.items()))
        if quiet["plan"].get("duplicates_note"):
            print(f"  duplicates: {quiet['plan']['duplicates_note']}")
        if v.get("suite"):
            print(f"  GX: {v['suite']['note']}")
    cost = report.get("trigger_cost")
    if cost:
        print()
        print(
            f"capture triggers' cost ({cost['without']['statements']:,} statements each way, writer flat out):"
        )
        print(f"  without: {_ms(cost['without'])}")
        print(f"  with:    {_ms(cost['with'])}")
        print(
            f"  with / without: writes/s {cost['ratio_writes_per_s']}, p50 {cost['ratio_p50']}, "
            f"p99 {cost['ratio_p99']}, mean {cost['ratio_mean']}"
        )
    cut = report.get("cutover")
    if cut:
        w = cut["writes"]
        print()
        if cut["error"]:
            print(f"cutover FAILED: {cut['error']}")
        print(
            f"cutover with the application writing ({cut['writer_rate_target']:g}/s target, "
            f"{cut['catch_up_seconds']:g} s of writes first, backlog {cut['backlog_at_start']['users']:,} users): "
            f"task {cut['cutover_wall_seconds']:.2f} s, write pause {cut['write_pause_seconds']} s "
            f"(recorded {cut['recorded_pause_seconds']} s), catch-up {cut['catch_up']}, "
            f"final sync {cut['final_sync']['users'] if cut['final_sync'] else None} users"
        )
        print("  calls: " + ", ".join(f"{name} {seconds:.3f} s" for name, seconds in cut["calls"]))
        print(f"  application until the switch: {_ms(w['until_switch'])}")
        print(f"  application during the cutover: {_ms(w['during_cutover'])}")
        print(
            f"  refused as read-only: {w['during_cutover'].get('read_only', 0)} during the cutover (waited on "
            f"its lock), {w['after_switch'].get('read_only', 0)}/{w['after_switch']['statements']} after it; "
            f"other errors: {w['errors']}"
        )
