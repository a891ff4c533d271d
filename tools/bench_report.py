"""`make bench`'s report: the machine it ran on, and the printed summary of the first load."""

from __future__ import annotations

import os
import platform
from pathlib import Path
from typing import Any

import psycopg
from bench_pipeline import _rate


def machine_facts(dsn: str) -> dict[str, Any]:
    mem_kb = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    cpu_model = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    with psycopg.connect(dsn) as conn:
        version = conn.execute("SHOW server_version").fetchone()[0]
        settings = dict(
            conn.execute(
                "SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name = ANY(%s)",
                (
                    [
                        "shared_buffers",
                        "work_mem",
                        "maintenance_work_mem",
                        "fsync",
                        "synchronous_commit",
                        "max_wal_size",
                        "full_page_writes",
                    ],
                ),
            ).fetchall()
        )
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_total_mb": round(mem_kb / 1024),
        "postgresql_version": version,
        "postgresql_settings": settings,
        "python_version": platform.python_version(),
        "psycopg_version": psycopg.__version__,
        "psycopg_impl": psycopg.pq.__impl__,
        "platform": platform.platform(),
    }


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def print_report(report: dict[str, Any]) -> None:
    rows = report["rows"]
    print()
    print(f"user_migration bench: {rows:,} legacy rows, {report['settings']['partitions']} partitions, "
          f"batch size {report['settings']['batch_size']:,}")  # fmt: skip
    header = (
        f"{'stage':<10} | {'seconds':>9} | {'rows/s':>11} | {'peak RSS MB':>11} | {'process s':>9} | "
        f"{'py CPU s':>8} | {'pg CPU s':>8}"
    )
    print(header)
    print("-" * len(header))
    for s in report["stages"]:
        print(
            f"{s['stage']:<10} | {s['seconds']:>9.2f} | {s['rows_per_s']:>11,} | "
            f"{s['rss_peak_mb']:>11.1f} | {s['process_seconds']:>9.2f} | {s['python_cpu_seconds']:>8.2f} | "
            f"{_fmt(s['server_cpu_seconds']):>8}"
        )
    print("-" * len(header))
    total = report["total"]
    print(
        f"{'total':<10} | {total['seconds']:>9.2f} | {round(_rate(rows, total['seconds'])):>11,} | "
        f"{'':>11} | {total['process_seconds']:>9.2f}"
    )
    for s in report["stages"]:
        for p in s.get("partitions", []):
            print(
                f"  copy partition {p['partition_no']}: {p['rows']:,} rows, {p['seconds']:.2f} s "
                f"({round(_rate(p['rows'], p['seconds'])):,} rows/s), peak RSS {p['rss_peak_mb']:.1f} MB, "
                f"CPU python {p['python_cpu_seconds']:.1f} s + server {_fmt(p['server_cpu_seconds'])} s"
            )
    backup = next(s for s in report["stages"] if s["stage"] == "backup")
    print(
        f"  backup: {backup['rows_written']:,} rows written (users and their group and permission links), "
        f"{backup['rows_written_per_s']:,} rows/s"
    )
    v = report["validation"]
    r = v["reconcile"]
    print(
        f"reconcile: {r['source_rows']:,} source = {r['migrated']:,} migrated + {r['rejected']:,} rejected "
        f"({'holds' if v['accounted'] else 'DOES NOT HOLD'}); GX checks passed {v['checks_passed']}/{v['checks']}"
    )
    b = report.get("baselines") or {}
    if b:
        a, orm = b["a_sql"], b["b_orm"]
        print()
        print("baselines (same rows, same server):")
        print(
            f"  (a) INSERT ... SELECT  users {a['users_seconds']:.2f} s ({a['users_rows_per_s']:,} rows/s), "
            f"+ links {a['links_seconds']:.2f} s = {a['seconds']:.2f} s ({a['rows_per_s']:,} rows/s)"
        )
        sample = f" (first {orm['rows']:,} rows)" if orm["sampled"] else ""
        print(
            f"  (b) fetch all + bulk INSERT{sample}: {orm['seconds']:.2f} s ({orm['rows_per_s']:,} rows/s), "
            f"peak RSS {orm['rss_peak_mb']:.1f} MB (fetch {orm['fetch_seconds']:.2f} s)"
        )
        ratios = report["ratios"]
        print(
            f"  copy + index build = {ratios['copy_seconds_with_indexes']:.2f} s: rows/s / (a) rows/s = "
            f"{ratios['copy_vs_a']:.3f} (vs (a) users only: {ratios['copy_vs_a_users']:.3f}; copy stage alone: "
            f"{ratios['copy_only_vs_a']:.3f}); / (b) rows/s = {ratios['copy_vs_b']:.2f}; "
            f"peak RSS (b) / copy = {ratios['rss_b_vs_copy']:.1f}"
        )
        print(
            f"  whole first pass (backup..validate) = {ratios['first_pass_seconds']:.2f} s: rows/s / (a) rows/s = "
            f"{ratios['first_pass_vs_a']:.3f}"
        )
    print(f"end to end (backup..validate): {total['seconds']:.2f} s of stage work, "
          f"{total['process_seconds']:.2f} s with process start-up")  # fmt: skip
