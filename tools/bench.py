"""`make bench`: time every stage of the migration on N generated legacy users, plus two baselines.

1. Starts the embedded PostgreSQL (or uses ``--dsn``), recreates the database ``user_migration_bench``
   and generates N legacy users inside it with ``generate_series`` (the same kinds and shares of
   dirty data as tools/seed_legacy.py, deterministic), with group and permission links.
2. Runs the real stages in order, each in its own fresh Python process so peak RSS is per stage:
   backup, ddl, plan, copy (one process per partition, run concurrently like Airflow's mapped
   tasks), finalize, validate (reconciliation + the Great Expectations suite).
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
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO / "plugins"), str(REPO / "tools")]

import psycopg  # noqa: E402
import seed_legacy  # noqa: E402
from psycopg import sql  # noqa: E402

from user_migration.config import FIELDS  # noqa: E402

BENCH_DB = "user_migration_bench"
DEFAULT_RESULTS_DIR = REPO / "bench" / "results"
DEFAULT_BACKUP_DIR = REPO / "var" / "bench" / "backups"
BASELINE_SCHEMA = "bench_baseline"
ORM_BATCH = 1000  # rows per multi-row INSERT in baseline (b), as bulk_create(batch_size=1000)
STAGES = ("backup", "ddl", "plan", "copy", "indexes", "finalize", "validate")
USER_COLUMNS = FIELDS  # the legacy user columns, in the pipeline's order

# --------------------------------------------------------------------------------------------
# Data generation, in SQL. Every "random" value is a hash of (id, salt), so a row's values do not
# depend on how the id range is split across connections and a duplicate can recompute the email
# of the earlier row it copies.
# --------------------------------------------------------------------------------------------
FIRST_NAMES = (
    "James", "Mary", "Robert", "Patricia", "John", "Jennifer", "Michael", "Linda", "David",
    "Elizabeth", "William", "Barbara", "Richard", "Susan", "Joseph", "Jessica", "Thomas", "Sarah",
    "Charles", "Karen", "Aarav", "Sita", "Ram", "Gita", "Hari", "Anita", "Bikash", "Sunita", "Rajesh",
    "Pooja", "Suman", "Asha", "Nabin", "Kabita", "Prakash", "Sabina", "Dipak", "Manisha", "Roshan",
    "Srijana",
)  # fmt: skip
LAST_NAMES = (
    "Smith", "Johnson", "Williams", "Brown", "Jones", "Garcia", "Miller", "Davis", "Rodriguez",
    "Martinez", "Hernandez", "Lopez", "Wilson", "Anderson", "Taylor", "Moore", "Jackson", "Martin",
    "Lee", "Thompson", "Shrestha", "Sharma", "Thapa", "Gurung", "Tamang", "Rai", "Magar", "Karki",
    "Adhikari", "Poudel", "Bhandari", "Khadka", "Basnet", "Limbu", "Joshi", "Pandey", "Acharya",
    "Bhattarai", "Koirala", "Maharjan",
)  # fmt: skip
# Valid NP mobile prefixes (phonenumbers rejects 983 and would turn those into field fixes).
NP_MOBILE_PREFIXES = ("980", "981", "982", "984", "985", "986")


def _lit(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _array(values: tuple[str, ...]) -> str:
    return "ARRAY[" + ", ".join(_lit(v) for v in values) + "]::text[]"


def _u(id_expr: str, salt: int) -> str:
    """A uniform number in [0, 1) from (id, salt)."""
    return f"((hashint8extended({id_expr}, {salt}) & 2147483647)::float8 / 2147483648.0)"


def _pick(values: tuple[str, ...], id_expr: str, salt: int) -> str:
    return f"({_array(values)})[1 + floor({_u(id_expr, salt)} * {len(values)})::int]"


def _base_email(id_expr: str) -> str:
    """The email seed_legacy gives row ``id``: first.last<id>@domain (lower-case)."""
    return (
        f"lower({_pick(FIRST_NAMES, id_expr, 1)}) || '.' || lower({_pick(LAST_NAMES, id_expr, 2)}) || "
        f"({id_expr})::text || '@' || {_pick(seed_legacy.DOMAINS, id_expr, 3)}"
    )


def _categories() -> str:
    """CASE on a per-row roll returning the dirty category (or NULL), with seed_legacy's shares."""
    parts, acc = [], 0.0
    for name, share in seed_legacy.DIRTY.items():
        acc += share
        parts.append(f"WHEN {_u('g.id', 10)} < {acc!r} THEN {_lit(name)}")
    return "CASE " + " ".join(parts) + " END"


def users_insert_sql() -> str:
    """INSERT ... SELECT of legacy users with ids %(lo)s..%(hi)s."""
    today = "current_date"
    normal_dob = f"{today} - (18 * 365 + floor({_u('id', 20)} * 62 * 365))::int"
    number = f"{_pick(NP_MOBILE_PREFIXES, 'id', 30)} || lpad(floor({_u('id', 31)} * 10000000)::bigint::text, 7, '0')"
    style = f"floor({_u('id', 32)} * 4)::int"
    phone = (
        f"CASE {style} WHEN 0 THEN n WHEN 1 THEN '+977' || n "
        "WHEN 2 THEN substr(n, 1, 3) || '-' || substr(n, 4, 3) || '-' || substr(n, 7) "
        "ELSE substr(n, 1, 4) || ' ' || substr(n, 5) END"
    )
    local = "lower(first) || '.' || lower(last) || id::text"
    return f"""
WITH base AS (
    SELECT g.id,
           {_pick(FIRST_NAMES, "g.id", 1)} AS first,
           {_pick(LAST_NAMES, "g.id", 2)} AS last,
           {_pick(seed_legacy.DOMAINS, "g.id", 3)} AS domain,
           {_categories()} AS cat,
           1 + floor({_u("g.id", 11)} * greatest(g.id - 1, 1))::bigint AS earlier,
           {_u("g.id", 12)} AS v,
           {_u("g.id", 13)} AS w
    FROM generate_series(%(lo)s::bigint, %(hi)s::bigint) AS g (id)
),
shaped AS (
    SELECT base.*, {number} AS n FROM base
)
INSERT INTO account_user (id, password, last_login, is_superuser, email, username, full_name,
                          date_of_birth, phone_number, is_active, is_staff)
SELECT
    id,
    'pbkdf2_sha256$600000$'
        || substr(translate(encode(sha256(int8send(id)), 'base64'), '+/=', 'AbC'), 1, 22)
        || '$' || encode(sha256(int8send(id) || '\\x01'::bytea), 'base64'),
    CASE WHEN {_u("id", 40)} < 0.7
         THEN timestamptz '2024-01-01 00:00:00+00' + make_interval(secs => floor({_u("id", 41)} * 51840000))
    END,
    {_u("id", 42)} < 0.005,
    CASE cat
        WHEN 'duplicate_email_case' THEN
            CASE WHEN id > 1 THEN upper({_base_email("earlier")}) ELSE {local} || '@' || domain END
        WHEN 'duplicate_email_exact' THEN
            CASE WHEN id > 1 THEN {_base_email("earlier")} ELSE {local} || '@' || domain END
        WHEN 'invalid_email' THEN ({_array(seed_legacy.INVALID_EMAILS)})[1 + floor(v * {len(seed_legacy.INVALID_EMAILS)})::int]
        WHEN 'padded_email' THEN '  ' || {local} || '@' || domain || ' '
        WHEN 'upper_case_domain' THEN {local} || '@' || upper(domain)
        WHEN 'plus_tag_email' THEN {local} || '+news@' || domain
        WHEN 'idn_email' THEN lower(first) || id::text || '@bücher.de'
        ELSE {local} || '@' || domain
    END,
    {local},
    CASE cat
        WHEN 'blank_full_name' THEN CASE WHEN v < 0.5 THEN '' ELSE '   ' END
        WHEN 'odd_unicode_name' THEN ({_array(seed_legacy.ODD_NAMES)})[1 + floor(v * {len(seed_legacy.ODD_NAMES)})::int]
        ELSE first || ' ' || last
    END,
    CASE cat
        WHEN 'future_date_of_birth' THEN {today} + (1 + floor(v * 3649))::int
        WHEN 'ancient_date_of_birth' THEN
            make_date(1850 + floor(v * 49)::int, 1 + floor(w * 12)::int, 1 + floor({_u("id", 21)} * 28)::int)
        ELSE {normal_dob}
    END,
    CASE cat
        WHEN 'junk_phone' THEN ({_array(seed_legacy.JUNK_PHONES)})[1 + floor(v * {len(seed_legacy.JUNK_PHONES)})::int]
        WHEN 'blank_phone' THEN ''
        ELSE {phone}
    END,
    {_u("id", 43)} < 0.95,
    {_u("id", 44)} < 0.02
FROM shaped
ORDER BY id
"""


GROUP_LINKS_SQL = f"""
INSERT INTO account_user_groups (user_id, group_id)
SELECT u.id, 1 + (floor({_u("u.id", 51)} * 4)::int + k) %% 4
FROM account_user AS u
CROSS JOIN LATERAL generate_series(0, floor({_u("u.id", 52)} * 2)::int) AS k
WHERE u.id BETWEEN %(lo)s AND %(hi)s AND {_u("u.id", 50)} < 0.3
ORDER BY u.id, k
"""
PERMISSION_LINKS_SQL = f"""
INSERT INTO account_user_user_permissions (user_id, permission_id)
SELECT u.id, 1 + (floor({_u("u.id", 61)} * 6)::int + k) %% 6
FROM account_user AS u
CROSS JOIN LATERAL generate_series(0, floor({_u("u.id", 62)} * 3)::int) AS k
WHERE u.id BETWEEN %(lo)s AND %(hi)s AND {_u("u.id", 60)} < 0.1
ORDER BY u.id, k
"""


def recreate_database(server_dsn: str, name: str = BENCH_DB) -> str:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return psycopg.conninfo.make_conninfo(server_dsn, dbname=name)


def drop_database(server_dsn: str, name: str = BENCH_DB) -> None:
    with psycopg.connect(server_dsn, autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def _chunks(rows: int, parts: int) -> list[tuple[int, int]]:
    size = -(-rows // parts)
    return [(lo, min(lo + size - 1, rows)) for lo in range(1, rows + 1, size)]


def generate_legacy(dsn: str, rows: int, workers: int) -> dict[str, Any]:
    """Legacy schema, lookup rows, ``rows`` users and their links, generated by the server."""
    started = time.perf_counter()
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(seed_legacy.LEGACY_DDL.read_text())
        conn.execute("INSERT INTO django_content_type (id, app_label, model) VALUES (1, 'account', 'user')")
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO auth_group (id, name) VALUES (%s, %s)", list(enumerate(seed_legacy.GROUPS, 1))
            )
            cur.executemany(
                "INSERT INTO auth_permission (id, name, content_type_id, codename) VALUES (%s, %s, 1, %s)",
                [(i, name, code) for i, (code, name) in enumerate(seed_legacy.PERMISSIONS, 1)],
            )
    chunks = _chunks(rows, max(1, workers)) if rows else []

    def run(statement: str, lo: int, hi: int) -> None:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(statement, {"lo": lo, "hi": hi}, prepare=False)

    users_sql = users_insert_sql()
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        list(pool.map(lambda c: run(users_sql, *c), chunks))
    users_seconds = time.perf_counter() - started
    # Links: one statement each (their ids follow the user order, as a Django project's would).
    with psycopg.connect(dsn, autocommit=True) as conn:
        for statement in (GROUP_LINKS_SQL, PERMISSION_LINKS_SQL):
            conn.execute(statement, {"lo": 1, "hi": rows}, prepare=False)
        for table in (*seed_legacy.LEGACY_TABLES,):
            conn.execute(
                sql.SQL(
                    "SELECT setval(pg_get_serial_sequence({t}, 'id'), "
                    "(SELECT coalesce(max(id), 0) + 1 FROM {i}), false)"
                ).format(t=sql.Literal(table), i=sql.Identifier(table))
            )
        # A live legacy table is vacuumed; without this the backup would pay for setting hint bits.
        for table in seed_legacy.LEGACY_TABLES:
            conn.execute(sql.SQL("VACUUM (ANALYZE) {}").format(sql.Identifier(table)))
        counts = {}
        for table in ("account_user", "account_user_groups", "account_user_user_permissions"):
            query = sql.SQL("SELECT count(*) FROM {}").format(sql.Identifier(table))
            counts[table] = conn.execute(query).fetchone()[0]
        dirty = dict(
            conn.execute(f"""
                SELECT c, count(*) FROM (SELECT {_categories()} AS c FROM account_user AS g) AS x
                WHERE c IS NOT NULL GROUP BY c ORDER BY c
            """).fetchall()
        )
        size = conn.execute("SELECT pg_total_relation_size('account_user')").fetchone()[0]
    return {
        "seconds": round(time.perf_counter() - started, 3),
        "users_seconds": round(users_seconds, 3),
        "counts": counts,
        "dirty": dirty,
        "dirty_rows": sum(dirty.values()),
        "account_user_bytes": size,
    }


# --------------------------------------------------------------------------------------------
# Stage children: ``bench.py --child SPEC.json`` runs one stage and writes its measurements to
# SPEC["output"]. Imports happen before the clock starts; the parent also records the wall time of
# the whole process (interpreter start and imports included).
# --------------------------------------------------------------------------------------------
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


def _time_calls(timings: dict[str, float], module: Any, *names: str) -> None:
    """Wrap module-level functions so their seconds add up in ``timings``: where a stage's time goes.

    A stage calls them through its module, so wrapping the attribute times the real calls.
    """

    def wrap(name: str, function):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - started, 3)

        return timed

    for name in names:
        setattr(module, name, wrap(name, getattr(module, name)))


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
    from user_migration.validation_reuse import run_suite

    def work():
        started = time.perf_counter()
        numbers = audit.reconcile(conn, spec["run_id"])
        reconciled = time.perf_counter()
        # As the DAG's validate task: the suite runs unless the target is provably as a passed suite saw it.
        suite = run_suite(conn, _sqlalchemy_url(spec["dsn"]), spec["run_id"], numbers["migrated"])
        outcomes = suite.outcomes
        checked = time.perf_counter()
        failed = [o.failure_message() for o in outcomes if not o.success]
        accounted = numbers["migrated"] + numbers["rejected"]
        # Recorded like the DAG's validate task does: the cutover refuses a run without a passed one.
        checks = [{"name": "every_source_row_accounted", "success": accounted == numbers["source_rows"]}]
        checks += [
            {"name": o.name, "success": o.success, "details": {"message": o.failure_message()}}
            for o in outcomes
        ]
        audit.store_validation(conn, spec["run_id"], checks)
        return {
            "timings": {
                "reconcile": round(reconciled - started, 3),
                "validate_target": round(checked - reconciled, 3),
            },
            "reconcile": numbers,
            "suite": {"ran": suite.ran, "basis_run": suite.basis_run, "note": suite.note},
            "accounted": accounted == numbers["source_rows"] == numbers["rows_read"],
            "checks": len(outcomes),
            "checks_passed": len(outcomes) - len(failed),
            "failed": failed,
        }

    return work


def _stage_orm_baseline(spec, conn, settings):
    """Baseline (b): all rows into Python objects first, then multi-row INSERTs (bulk_create)."""
    from psycopg.rows import dict_row

    table = sql.Identifier(BASELINE_SCHEMA, "newuser_orm")
    columns = [*USER_COLUMNS, "joined_at", "updated_at"]
    row_sql = sql.SQL("({})").format(sql.SQL(", ").join(sql.Placeholder() * len(columns)))
    select = sql.SQL("SELECT {} FROM account_user WHERE id <= %s ORDER BY id").format(
        sql.SQL(", ").join(map(sql.Identifier, USER_COLUMNS))
    )

    def insert_sql(n: int) -> sql.Composed:
        return sql.SQL("INSERT INTO {} ({}) VALUES {}").format(
            table, sql.SQL(", ").join(map(sql.Identifier, columns)), sql.SQL(", ").join([row_sql] * n)
        )

    def work():
        fetch_started = time.perf_counter()
        with conn.cursor(row_factory=dict_row) as cur:
            old_users = cur.execute(select, (spec["max_rows"],)).fetchall()  # old_user.objects.all()
        fetch_seconds = time.perf_counter() - fetch_started
        now = dt.datetime.now(dt.UTC)
        seen: set[str] = set()
        new_users = []
        for old in old_users:  # the same skip as baseline (a): first row of each lower(trimmed email)
            key = old["email"].strip().lower()
            if key in seen:
                continue
            seen.add(key)
            new_users.append({**old, "email": old["email"].strip(), "joined_at": now, "updated_at": now})
        full = insert_sql(ORM_BATCH)
        with conn.transaction(), conn.cursor() as cur:  # bulk_create runs in one atomic block
            for start in range(0, len(new_users), ORM_BATCH):
                chunk = new_users[start : start + ORM_BATCH]
                statement = full if len(chunk) == ORM_BATCH else insert_sql(len(chunk))
                cur.execute(statement, [u[c] for u in chunk for c in columns])
        return {
            "rows_read": len(old_users),
            "rows_inserted": len(new_users),
            "fetch_seconds": round(fetch_seconds, 3),
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


# --------------------------------------------------------------------------------------------
# The parent: runs the children, the baselines, prints and saves.
# --------------------------------------------------------------------------------------------
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
        [sys.executable, str(Path(__file__).resolve()), "--child", str(spec_path)],
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


def baseline_sql(dsn: str, rows: int) -> dict[str, Any]:
    """(a) The in-database limit: INSERT ... SELECT into identically indexed empty tables."""
    columns = ", ".join(USER_COLUMNS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {BASELINE_SCHEMA} CASCADE")
        conn.execute(f"CREATE SCHEMA {BASELINE_SCHEMA}")
        for table in ("account_newuser", "account_newuser_groups", "account_newuser_user_permissions"):
            short = table.removeprefix("account_")
            conn.execute(f"CREATE TABLE {BASELINE_SCHEMA}.{short}_sql (LIKE public.{table} INCLUDING ALL)")
        select_list = ", ".join("btrim(email)" if c == "email" else c for c in USER_COLUMNS)
        started = time.perf_counter()
        with conn.transaction():
            users = conn.execute(f"""
                INSERT INTO {BASELINE_SCHEMA}.newuser_sql ({columns}, joined_at, updated_at)
                SELECT {select_list}, now(), now() FROM (
                    SELECT DISTINCT ON (lower(btrim(email))) * FROM public.account_user
                    ORDER BY lower(btrim(email)), id
                ) AS first_of_each_email
                ORDER BY id
            """).rowcount
        users_seconds = time.perf_counter() - started
        started = time.perf_counter()
        links = 0
        with conn.transaction():
            for legacy, short, other in (
                ("account_user_groups", "newuser_groups", "group_id"),
                ("account_user_user_permissions", "newuser_user_permissions", "permission_id"),
            ):
                links += conn.execute(f"""
                    INSERT INTO {BASELINE_SCHEMA}.{short}_sql (id, newuser_id, {other})
                    SELECT l.id, l.user_id, l.{other} FROM public.{legacy} AS l
                    WHERE EXISTS (SELECT 1 FROM {BASELINE_SCHEMA}.newuser_sql AS u WHERE u.id = l.user_id)
                    ORDER BY l.id
                """).rowcount
        links_seconds = time.perf_counter() - started
    total = users_seconds + links_seconds
    return {
        "what": (
            "INSERT INTO (LIKE account_newuser INCLUDING ALL) SELECT the same columns with btrim(email), "
            "now() stamps, DISTINCT ON (lower(btrim(email))) keeping the lowest id, in id order; then "
            "the group/permission links of inserted users into LIKE copies of the link tables. "
            "No transforms, no audit rows."
        ),
        "rows": rows,
        "users_inserted": users,
        "links_inserted": links,
        "users_seconds": round(users_seconds, 3),
        "users_rows_per_s": round(_rate(rows, users_seconds)),
        "links_seconds": round(links_seconds, 3),
        "seconds": round(total, 3),
        "rows_per_s": round(_rate(rows, total)),
    }


def baseline_orm(dsn: str, rows: int, max_rows: int, workdir: Path, args) -> dict[str, Any]:
    """(b) The seed project's approach, in a fresh process: fetch all, then bulk_create."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA IF NOT EXISTS {BASELINE_SCHEMA}")
        conn.execute(f"DROP TABLE IF EXISTS {BASELINE_SCHEMA}.newuser_orm")
        conn.execute(
            f"CREATE TABLE {BASELINE_SCHEMA}.newuser_orm (LIKE public.account_newuser INCLUDING ALL)"
        )
    measured = min(rows, max_rows)
    spec = {
        "dsn": dsn,
        "stage": "orm_baseline",
        "max_rows": measured,
        "partitions": args.partitions,
        "batch_size": args.batch_size,
    }
    out = run_child(spec, workdir, "orm_baseline")
    return {
        "what": (
            f"fresh process: SELECT every row into a list of dicts (fetchall, like objects.all()), skip "
            f"repeated lower(strip(email)) in Python, then one transaction of multi-row INSERT ... VALUES "
            f"of {ORM_BATCH} rows each (like bulk_create) into LIKE account_newuser INCLUDING ALL. "
            "Users only: no transforms, no links, no audit rows."
        ),
        "rows": measured,
        "sampled": measured < rows,
        "seconds": round(out["seconds"], 3),
        "rows_per_s": round(_rate(measured, out["seconds"])),
        "rss_peak_mb": out["rss_peak_mb"],
        "process_seconds": round(out["process_seconds"], 3),
        **out["result"],
    }


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
