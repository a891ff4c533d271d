"""`make bench`'s passes: every stage of one pass, each in a fresh process (bench_stages), timed.

``run_pipeline`` runs a first load (backup, ddl, plan, copy with one process per partition,
indexes, finalize, validate) or a later pass, and returns a row of figures per stage.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The stage children run the bench's entry point with --child (bench_stages.child_main).
BENCH_PY = Path(__file__).resolve().with_name("bench.py")
STAGES = ("backup", "ddl", "plan", "copy", "indexes", "finalize", "validate")


class StageFailed(RuntimeError):
    pass


def run_child(spec: dict[str, Any], workdir: Path, name: str) -> dict[str, Any]:
    spec_path = workdir / f"{name}.spec.json"
    spec = {**spec, "output": str(workdir / f"{name}.out.json")}
    spec_path.write_text(json.dumps(spec))
    env = {**os.environ, "GX_ANALYTICS_ENABLED": "false"}
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO / "plugins"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    )
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(BENCH_PY), "--child", str(spec_path)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    out = json.loads(Path(spec["output"]).read_text())
    out["process_seconds"] = wall
    return out


def _rate(rows: int, seconds: float) -> float:
    return rows / seconds if seconds > 0 else 0.0


def _sum_or_none(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else round(sum(values), 3)


def _stage_row(name: str, rows: int, seconds: float, rss: float, process_seconds: float, **extra) -> dict:
    return {
        "stage": name,
        "rows": rows,
        "seconds": round(seconds, 3),
        "rows_per_s": round(_rate(rows, seconds)),
        "rss_peak_mb": rss,
        "process_seconds": round(process_seconds, 3),
        **extra,
    }


def run_pipeline(
    args, dsn: str, rows: int, run_id: str, workdir: Path, first_load: bool = True
) -> tuple[list[dict], dict]:
    """The stages of one pass. ``first_load=False``: a later pass (ddl, plan, copy, finalize, validate),
    without the backup and the separate index build, which a later pass has nothing to do for."""
    base = {
        "dsn": dsn,
        "run_id": run_id,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
        "backup_dir": str(args.backup_dir),
        "as_of": dt.date.today().isoformat(),
    }
    stages: list[dict[str, Any]] = []
    details: dict[str, Any] = {}

    def simple(name: str, **more) -> dict[str, Any]:
        print(f"  {name} ...", flush=True)
        out = run_child({**base, **more, "stage": name}, workdir, name)
        stages.append(
            _stage_row(
                name,
                rows,
                out["seconds"],
                out["rss_peak_mb"],
                out["process_seconds"],
                python_cpu_seconds=out["python_cpu_seconds"],
                server_cpu_seconds=out["server_cpu_seconds"],
            )
        )
        details[name] = out["result"]
        return out["result"]

    if first_load:
        backup = simple("backup")
        # The stage's rows/s counts legacy users, like every stage; the backup also writes the link rows.
        written = sum(backup["rows"].values())
        stages[-1]["rows_written"] = written
        stages[-1]["rows_written_per_s"] = round(_rate(written, stages[-1]["seconds"]))
        simple("ddl", backup_folder=backup["folder"])
    else:
        simple("ddl")
    plan = simple("plan")

    partitions = plan["partitions"]
    print(f"  copy ({len(partitions)} partitions, {args.copy_workers} at a time) ...", flush=True)
    started = time.perf_counter()

    def one(partition: dict[str, Any]) -> dict[str, Any]:
        spec = {**base, "stage": "copy", "partition": partition}
        if args.profile_copy and partition["partition_no"] == 0:
            spec["profile"] = str(Path(args.profile_copy).resolve())
        return run_child(spec, workdir, f"copy-{partition['partition_no']}")

    with ThreadPoolExecutor(max_workers=max(1, args.copy_workers)) as pool:
        outs = list(pool.map(one, partitions))
    wall = time.perf_counter() - started
    work_span = max(o["finished_at"] for o in outs) - min(o["started_at"] for o in outs)
    stages.append(
        _stage_row(
            "copy",
            rows,
            work_span,
            max(o["rss_peak_mb"] for o in outs),
            wall,
            python_cpu_seconds=round(sum(o["python_cpu_seconds"] for o in outs), 3),
            server_cpu_seconds=_sum_or_none(o["server_cpu_seconds"] for o in outs),
            partitions=[
                {
                    "partition_no": o["result"]["partition_no"],
                    "rows": o["result"]["rows_in"],
                    "seconds": round(o["seconds"], 3),
                    "rss_peak_mb": o["rss_peak_mb"],
                    "python_cpu_seconds": o["python_cpu_seconds"],
                    "server_cpu_seconds": o["server_cpu_seconds"],
                    "path": o["result"]["path"],
                }
                for o in outs
            ],
        )
    )
    details["copy"] = [o["result"] for o in outs]

    if first_load:
        simple("indexes")
    simple("finalize")
    validate = simple("validate")
    return stages, {**details, "validate": validate}
