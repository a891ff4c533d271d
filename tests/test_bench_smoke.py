"""tools/bench.py end to end on 20,000 generated users, against a private embedded server."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import embedded_pg
import psycopg
import pytest

REPO = Path(__file__).resolve().parent.parent
ROWS = 20_000
STAGES = ("backup", "ddl", "plan", "copy", "indexes", "finalize", "validate")


@pytest.fixture(scope="module")
def bench_server() -> Iterator[str]:
    # A short path: the server's Unix socket lives in its data folder.
    base = Path(tempfile.mkdtemp(prefix="umb-", dir="/tmp"))
    try:
        yield embedded_pg.start(base)
    finally:
        embedded_pg.stop(base)
        shutil.rmtree(base, ignore_errors=True)


def test_bench_runs_every_stage_and_reconciles(bench_server: str, tmp_path: Path) -> None:
    results, backups = tmp_path / "results", tmp_path / "backups"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "tools" / "bench.py"),
            "--rows",
            str(ROWS),
            "--dsn",
            bench_server,
            "--results-dir",
            str(results),
            "--backup-dir",
            str(backups),
            # The stages after the first load, small: 400 writes/s for 4 s overflow the cutover's
            # 1,000-user backlog (~1,400 users), so it catches up once before it locks.
            "--writer-rate",
            "400",
            "--catch-up-seconds",
            "4",
            "--trigger-cost-statements",
            "500",
            "--throttle",
            "--throttle-idle-seconds",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (path,) = results.glob(f"bench-{ROWS}-*.json")
    report = json.loads(path.read_text())

    assert report["rows"] == ROWS
    assert report["seed"]["counts"]["account_user"] == ROWS
    assert 0.03 < report["seed"]["dirty_rows"] / ROWS < 0.15
    stages = {s["stage"]: s for s in report["stages"]}
    assert tuple(stages) == STAGES
    for name, stage in stages.items():
        assert stage["rows"] == ROWS, name
        assert stage["seconds"] > 0, name
        assert stage["rss_peak_mb"] > 0, name
    assert len(stages["copy"]["partitions"]) == 2
    counts = report["seed"]["counts"]
    assert stages["backup"]["rows_written"] == sum(counts.values()) > ROWS  # users and their links
    # The first load ran without the secondary indexes and built all four afterwards.
    assert len(report["stage_results"]["indexes"]["built"]) == 4
    assert report["stage_results"]["plan"]["deferred_indexes"] == sorted(
        report["stage_results"]["indexes"]["built"]
    )
    assert sum(p["rows"] for p in stages["copy"]["partitions"]) == ROWS

    validation = report["validation"]
    numbers = validation["reconcile"]
    assert numbers["source_rows"] == ROWS
    assert numbers["migrated"] + numbers["rejected"] == ROWS
    assert 0 < numbers["rejected"] < ROWS * 0.10
    assert validation["accounted"] is True
    assert validation["failed"] == []
    assert validation["checks_passed"] == validation["checks"] > 0

    baselines = report["baselines"]
    assert baselines["a_sql"]["users_inserted"] > 0 and baselines["a_sql"]["seconds"] > 0
    assert baselines["b_orm"]["rows_inserted"] == baselines["a_sql"]["users_inserted"]
    assert report["ratios"]["copy_vs_a"] > 0 and report["ratios"]["copy_vs_b"] > 0
    for key in ("cores", "memory_total_mb", "postgresql_version", "python_version"):
        assert report["machine"][key], key
    assert "user_migration bench" in proc.stdout and "copy" in proc.stdout

    # A second pass with nothing changed reads the change log the first load made trusted.
    quiet = report["quiet_pass"]
    assert quiet["changes"] == "log"
    assert tuple(s["stage"] for s in quiet["stages"]) == ("ddl", "plan", "copy", "finalize", "validate")
    assert quiet["validation"]["accounted"] is True and quiet["validation"]["failed"] == []
    # Nothing changed since the first load's plan: the quiet pass takes its duplicate decision over
    # instead of scanning the legacy table again (decision 0011).
    assert "partition_ranges" in quiet["plan"]["timings"]
    assert "find_duplicates" not in quiet["plan"]["timings"]
    assert quiet["plan"]["duplicates_from"]  # the first load's run, named

    cost = report["trigger_cost"]
    assert cost["with"]["statements"] == cost["without"]["statements"] == 1000
    assert all(r["log_entries"] > 0 for r in cost["runs"] if r["mode"] == "with")
    assert cost["ratio_writes_per_s"] > 0 and cost["ratio_p99"] > 0 and cost["copied_users"] == ROWS

    # The cutover ran while the writer wrote: it caught up, switched, and later writes are refused.
    cut = report["cutover"]
    assert cut["error"] is None and cut["recorded_state"] == "active" and cut["checksums_equal"] is True
    assert cut["catch_up"]["rounds"] >= 1 and cut["catch_up"]["users"] > 1000
    assert 0 <= cut["write_pause_seconds"] < 5 and cut["recorded_pause_seconds"] == cut["write_pause_seconds"]
    assert [name for name, _ in cut["calls"]][-2:] == ["_apply", "_prove"]  # the final sync, then the proof
    writes = cut["writes"]
    assert writes["errors"] == 0, writes["errors_sample"]
    assert writes["catch_up_period"]["ok"] > 500
    assert writes["after_switch"]["read_only"] == writes["after_switch"]["statements"] > 0
    assert "cutover with the application writing" in proc.stdout

    # A first load with the application running, throttle off then on, each into an empty target.
    throttle = report["throttle"]
    assert [m["mode"] for m in throttle["modes"]] == ["off", "on"]
    for mode in throttle["modes"]:
        assert mode["app_errors"] == 0, mode["app_errors_sample"]
        assert mode["idle"]["reads"]["statements"] > 0 and mode["idle"]["writes"]["statements"] > 0
        assert mode["during_copy"]["all"]["statements"] > 0 and mode["p99_factor"] > 0
        assert mode["copy"]["rows"] >= ROWS and mode["copy"]["rows_per_s"] > 0
    assert report["ratios"]["first_pass_vs_a"] > 0
    assert "first load with the application" in proc.stdout

    # Without --keep the bench cleans up after itself: no database, no backup folder.
    with psycopg.connect(bench_server) as conn:
        left = conn.execute("SELECT 1 FROM pg_database WHERE datname = 'user_migration_bench'").fetchone()
    assert left is None
    assert not any(backups.iterdir())
