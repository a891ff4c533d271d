"""`make bench`: time every stage of the migration on N generated legacy users, plus two baselines.

1. Starts the embedded PostgreSQL (or uses ``--dsn``), recreates the database ``user_migration_bench``
   and generates N legacy users inside it with ``generate_series`` (the same kinds and shares of
   dirty data as tools/seed_legacy.py, deterministic), with group and permission links.
2. Runs the real stages in order, each in its own fresh Python process so peak RSS is per stage:
   backup, ddl, plan, copy (one process per partition, run concurrently like Airflow's mapped
   tasks), finalize, validate (the DAG's checks.run_checks: accounting, drift, GX suite).
3. Baselines on the same rows: (a) a plain in-database ``INSERT ... SELECT`` into an identically
   indexed empty table, (b) the seed project's approach: every row fetched into Python dicts,
   then multi-row INSERTs of 1,000 rows (as Django's ``bulk_create``).
4. After the first load (tools/bench_cutover.py): a quiet pass (ddl, plan, copy, finalize, validate
   again with nothing changed), the capture triggers' cost to the application's writes, and the
   cutover with a writer playing the application (its latencies, the pause, the catch-up).
5. Prints a table and writes everything to bench/results/bench-<rows>-<timestamp>.json.

Usage: ``python tools/bench.py --rows 1000000 [--partitions 2] [--batch-size 10000] [--keep]
[--skip-baselines] [--skip-quiet-pass] [--skip-trigger-cost] [--skip-cutover] [--writer-rate 100]
[--catch-up-seconds 12] [--dsn postgresql://...] [--data-dir DIR]``.

This file is the command line; one module a job: bench_seed.py generates the legacy users,
bench_stages.py runs one stage in a child process (``--child``), bench_pipeline.py runs the stages
of a pass, bench_baselines.py the two baselines, bench_after_load.py the quiet pass (then
bench_cutover.py the triggers' cost and the cutover, bench_throttle.py the throttle modes), and
bench_report.py prints the summary.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO / "tools")]

import psycopg  # noqa: E402
from bench_after_load import run_after_first_load  # noqa: E402
from bench_baselines import baseline_orm, baseline_sql  # noqa: E402
from bench_pipeline import _rate, run_child, run_pipeline  # noqa: E402
from bench_report import machine_facts, print_report  # noqa: E402
from bench_seed import BENCH_DB, drop_database, generate_legacy, recreate_database  # noqa: E402
from bench_stages import child_main  # noqa: E402

DEFAULT_RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_BACKUP_DIR = REPO / "var" / "bench" / "backups"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000, help="legacy users to generate")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=10_000)
    parser.add_argument(
        "--copy-workers", type=int, default=2, help="partition processes at a time (the pool size)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the database and the backup files")
    parser.add_argument("--skip-baselines", action="store_true")
    parser.add_argument("--dsn", help="server DSN (any database of it); default: the embedded server")
    parser.add_argument("--data-dir", type=Path, help="embedded server folder (default var/pg)")
    parser.add_argument("--results-dir", type=Path, default=DEFAULT_RESULTS_DIR)
    parser.add_argument("--backup-dir", type=Path, default=DEFAULT_BACKUP_DIR)
    parser.add_argument(
        "--seed-workers", type=int, default=os.cpu_count() or 2, help="connections generating the rows"
    )
    parser.add_argument(
        "--orm-baseline-max-rows",
        type=int,
        default=2_000_000,
        help="baseline (b) holds every row in memory: above this it runs on the first N ids",
    )
    parser.add_argument("--skip-quiet-pass", action="store_true", help="no second pass after the first load")
    parser.add_argument(
        "--skip-trigger-cost", action="store_true", help="no writer with/without capture triggers"
    )
    parser.add_argument("--skip-cutover", action="store_true", help="no cutover with a writer at the end")
    parser.add_argument(
        "--writer-rate", type=float, default=100.0, help="the application's writes/s at the cutover"
    )
    parser.add_argument(
        "--catch-up-seconds",
        type=float,
        default=12.0,
        help="writes pile up in the change log this long before the cutover (100/s x 12 s > its 1,000-user backlog)",
    )
    parser.add_argument(
        "--trigger-cost-statements", type=int, default=10_000, help="writer statements per run"
    )
    parser.add_argument(
        "--trigger-cost-users", type=int, default=200_000, help="legacy users copied for the triggers' cost"
    )
    parser.add_argument(
        "--throttle",
        action="store_true",
        help="first loads with the application running, throttle off and on (tools/bench_throttle.py; ~2 min at 1M)",
    )
    parser.add_argument(
        "--throttle-modes", default="off,on", help="with --throttle: of off, on, defaults, probe"
    )
    parser.add_argument(
        "--throttle-slow-ms",
        type=int,
        default=750,
        help="mode on: the operator's slow state, ms between batches",
    )
    parser.add_argument(
        "--throttle-app-rate", type=float, default=200.0, help="the application's statements/s (half reads)"
    )
    parser.add_argument(
        "--throttle-idle-seconds", type=float, default=8.0, help="the application alone first, this long"
    )
    parser.add_argument("--profile-copy", help="write a pyinstrument profile of copy partition 0 here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child is None and args.rows < 1:
        parser.error("--rows must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child is not None:
        return child_main(args.child)
    args.backup_dir = args.backup_dir.resolve()
    rows = args.rows
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    run_id = f"bench__{stamp}"
    if args.dsn:
        server_dsn = args.dsn
    else:
        import warnings

        import embedded_pg

        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")

        server_dsn = embedded_pg.start(args.data_dir.resolve()) if args.data_dir else embedded_pg.start()
    dsn = recreate_database(server_dsn)
    print(f"database {BENCH_DB} on {psycopg.conninfo.conninfo_to_dict(dsn).get('host')}; run {run_id}")
    workdir = Path(tempfile.mkdtemp(prefix="umbench-"))
    report: dict[str, Any] = {"rows": rows, "timestamp": stamp, "run_id": run_id}
    try:
        report["machine"] = machine_facts(dsn)
        report["machine"]["loadavg_before"] = os.getloadavg()
        print(f"generating {rows:,} legacy users in the database ...", flush=True)
        report["seed"] = generate_legacy(dsn, rows, args.seed_workers)
        seed = report["seed"]
        print(
            f"  {seed['seconds']:.1f} s: {seed['counts']['account_user']:,} users "
            f"({seed['dirty_rows']:,} odd or dirty), {seed['counts']['account_user_groups']:,} group links, "
            f"{seed['counts']['account_user_user_permissions']:,} permission links"
        )
        from user_migration.config import Settings

        report["settings"] = {
            "partitions": args.partitions,
            "batch_size": args.batch_size,
            "copy_workers": args.copy_workers,
            # The stages run with the Params' defaults: time-boxed batches (batch_size is the first
            # batch's size; later ones aim at batch_seconds each) and the default throttle thresholds.
            "batch_seconds": Settings.batch_seconds,
            "batch_bounds": Settings(batch_size=args.batch_size).batch_bounds(),
        }
        modes = [m for m in args.throttle_modes.split(",") if m] if args.throttle else []
        if modes:
            # Before the bench's first load: each mode copies the legacy database as generated.
            import bench_throttle

            print("first load with the application running, throttle " + " / ".join(modes) + ":", flush=True)
            base = {
                "partitions": args.partitions,
                "batch_size": args.batch_size,
                "backup_dir": str(args.backup_dir),
                "as_of": dt.date.today().isoformat(),
                "run_id": run_id,
            }
            report["throttle"] = bench_throttle.throttle_bench(
                server_dsn, BENCH_DB, rows, workdir, run_child, base, args.copy_workers, modes,
                rate=args.throttle_app_rate, idle_seconds=args.throttle_idle_seconds,
                slow_ms=args.throttle_slow_ms,
            )  # fmt: skip
        print("running the stages, each in a fresh process:")
        stages, details = run_pipeline(args, dsn, rows, run_id, workdir)
        report["stages"] = stages
        report["total"] = {
            "seconds": round(sum(s["seconds"] for s in stages), 3),
            "process_seconds": round(sum(s["process_seconds"] for s in stages), 3),
        }
        report["stage_results"] = {k: v for k, v in details.items() if k != "validate"}
        report["validation"] = details["validate"]
        if not args.skip_baselines:
            print("baseline (a): INSERT ... SELECT in the database ...", flush=True)
            a = baseline_sql(dsn, rows)
            print("baseline (b): fetch everything into Python, then multi-row INSERTs ...", flush=True)
            b = baseline_orm(dsn, rows, args.orm_baseline_max_rows, workdir, args)
            copy = next(s for s in stages if s["stage"] == "copy")
            # A first load builds account_newuser's secondary indexes after the copy; (a) maintains
            # them as it inserts, so the fair comparison is copy + index build.
            indexes = next(s for s in stages if s["stage"] == "indexes")
            loaded = copy["seconds"] + indexes["seconds"]
            report["baselines"] = {"a_sql": a, "b_orm": b}
            first_pass = report["total"]["seconds"]
            report["ratios"] = {
                "copy_seconds_with_indexes": round(loaded, 3),
                # The whole first pass (backup, ddl, plan, copy, indexes, finalize, validate) against (a).
                "first_pass_seconds": round(first_pass, 3),
                "first_pass_vs_a": round(_rate(rows, first_pass) / a["rows_per_s"], 4),
                "copy_vs_a": round(_rate(rows, loaded) / a["rows_per_s"], 4),
                "copy_vs_a_users": round(_rate(rows, loaded) / a["users_rows_per_s"], 4),
                "copy_only_vs_a": round(_rate(rows, copy["seconds"]) / a["rows_per_s"], 4),
                "copy_vs_b": round(_rate(rows, loaded) / b["rows_per_s"], 3),
                "rss_b_vs_copy": round(b["rss_peak_mb"] / copy["rss_peak_mb"], 2),
                "note": "rows/s ratios, copy counted with the index build: above 1 means the pipeline is faster",
            }
        ok_extra = run_after_first_load(args, dsn, rows, run_id, workdir, report)
        report["machine"]["loadavg_after"] = os.getloadavg()
        print_report(report)
        import bench_cutover

        bench_cutover.print_extras(report)
        import bench_throttle

        bench_throttle.print_throttle(report)
        args.results_dir.mkdir(parents=True, exist_ok=True)
        path = args.results_dir / f"bench-{rows}-{stamp}.json"
        path.write_text(json.dumps(report, indent=2, default=str) + "\n")
        print(f"results: {path}")
        ok = report["validation"]["accounted"] and not report["validation"]["failed"] and ok_extra
        return 0 if ok else 1
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        if not args.keep:
            drop_database(server_dsn)
            from user_migration.backup import run_folder_name

            shutil.rmtree(args.backup_dir / run_folder_name(run_id), ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
