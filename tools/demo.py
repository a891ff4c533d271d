"""`make demo`: the whole migration, end to end, on the embedded PostgreSQL.

Starts the embedded server, (re)creates the demo database with 10,000 fake legacy users (some
dirty), runs `airflow dags test user_migration` exactly as a user would, and prints the
reconciliation summary from the run's report. Set DEMO_DSN=postgresql://... to use another server
(a database named user_migration_demo is recreated there).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent))

import embedded_pg
import seed_legacy
from airflow_env import REPO, airflow_env, dags_test, prepare_metadata

DEMO_DB = "user_migration_demo"


def recreate_database(server_dsn: str, name: str) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(server_dsn, dbname=name)


def to_uri(conninfo: str) -> str:
    params = psycopg.conninfo.conninfo_to_dict(conninfo)
    auth = params.get("user", "")
    if params.get("password"):
        auth += f":{params['password']}"
    return (
        f"postgresql://{auth}@{params.get('host', 'localhost')}:{params.get('port', 5432)}/{params['dbname']}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=10_000)
    args = parser.parse_args(argv)
    started = time.perf_counter()
    var = REPO / "var"
    server_dsn = os.environ.get("DEMO_DSN") or embedded_pg.start()
    print(f"PostgreSQL: {server_dsn.split('@')[-1]}")
    legacy = to_uri(recreate_database(server_dsn, DEMO_DB))
    seeded = seed_legacy.seed(legacy, users=args.users)
    print(
        f"legacy data: {seeded['users']} users ({sum(seeded['dirty'].values())} with odd or dirty values), "
        f"{seeded['group_links']} group links, {seeded['permission_links']} permission links"
    )
    backups = Path(os.environ.get("USER_MIGRATION_BACKUP_DIR") or var / "backups")
    env = airflow_env(var / "airflow", legacy, backups)
    log = var / "demo-airflow.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("")
    prepare_metadata(env, log=log)
    print("running: airflow dags test user_migration ...")
    result = dags_test(env, log=log)
    if result.returncode != 0:
        print(f"the DAG run failed; the last lines of {log}:", file=sys.stderr)
        print("\n".join(log.read_text().splitlines()[-40:]), file=sys.stderr)
        return 1
    reports = sorted(backups.glob("*/report.json"), key=lambda p: p.stat().st_mtime)
    if not reports:
        print(f"no report.json under {backups}", file=sys.stderr)
        return 1
    summary = json.loads(reports[-1].read_text())
    print_summary(summary)
    print(f"demo finished in {time.perf_counter() - started:.1f} s (Airflow log: {log})")
    return 0


def print_summary(summary: dict) -> None:
    checks = summary.get("checks", [])
    passed = sum(1 for c in checks if c["success"])
    print()
    print(f"run {summary['run_id']}: {summary['state']}")
    print(f"  source rows     {summary['source_rows']}")
    print(
        f"  migrated        {summary['migrated']} (new {summary['inserted']}, updated {summary['updated']}, "
        f"unchanged {summary['unchanged']})"
    )
    print(f"  rejected        {summary['rejected']}")
    for reason, count in summary["rejected_by_reason"].items():
        print(f"    {reason:<22}{count}")
    print(f"  fixed fields    {summary['fixed_fields']}")
    for key, count in summary["fixed_by_field"].items():
        print(f"    {key:<34}{count}")
    print(f"  checks passed   {passed}/{len(checks)}")
    print(f"  backup          {summary['backup_path']}")
    print(f"  report          {Path(summary['backup_path']) / 'report.md'}")
    print(f"  time taken      {summary['seconds']} s")


if __name__ == "__main__":
    sys.exit(main())
