"""`make bench` after the first load: the quiet pass, then (tools/bench_cutover.py) the capture
triggers' cost and the cutover with the application writing.
"""

from __future__ import annotations

from pathlib import Path

from bench_pipeline import run_pipeline
from bench_stages import _settings


def run_after_first_load(args, dsn: str, rows: int, run_id: str, workdir: Path, report: dict) -> bool:
    """The quiet pass, the triggers' cost and the cutover with a writer; returns whether they held.

    In this order because the cutover ends the migration (legacy read-only, capture dropped); it
    cuts over the last validated run.
    """
    import bench_cutover  # here, not at the top: the stage children need none of it (their RSS)

    ok, cut_run = True, run_id
    if not args.skip_quiet_pass:
        print("quiet pass: a second pass with nothing changed, each stage in a fresh process:", flush=True)
        quiet_id = f"{run_id}__quiet"
        stages, details = run_pipeline(args, dsn, rows, quiet_id, workdir, first_load=False)
        validation = details["validate"]
        report["quiet_pass"] = {
            "run_id": quiet_id,
            "changes": details["plan"]["changes"],
            "changes_reason": details["plan"]["changes_reason"],
            "copy_paths": sorted({c["path"] for c in details["copy"]}),
            "stages": stages,
            "total": {
                "seconds": round(sum(s["seconds"] for s in stages), 3),
                "process_seconds": round(sum(s["process_seconds"] for s in stages), 3),
            },
            "plan": {
                k: details["plan"][k]
                for k in ("source_rows", "duplicates", "duplicates_from", "duplicates_note", "timings")
            },
            "finalize": details["finalize"],
            "validation": validation,
        }
        ok = ok and validation["accounted"] and not validation["failed"]
        cut_run = quiet_id
    if not args.skip_trigger_cost:
        print(
            f"capture triggers' cost: the writer, {args.trigger_cost_statements:,} statements a run ...",
            flush=True,
        )
        report["trigger_cost"] = bench_cutover.trigger_cost(
            dsn, workdir, args.trigger_cost_statements, users=args.trigger_cost_users
        )
    if not args.skip_cutover:
        print(
            f"cutover of run {cut_run} with the application writing {args.writer_rate:g}/s "
            f"({args.catch_up_seconds:g} s of writes first) ...",
            flush=True,
        )
        settings = _settings({"partitions": args.partitions, "batch_size": args.batch_size})
        report["cutover"] = bench_cutover.cutover_with_writer(
            dsn, settings, cut_run, workdir, args.writer_rate, args.catch_up_seconds
        )
        ok = ok and report["cutover"]["error"] is None and report["cutover"]["writes"]["errors"] == 0
    return ok
