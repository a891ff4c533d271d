-- The audit trail of every migration run. Created (idempotently) before anything else is written,
-- in the target database. Personal data lives only in rejected_rows.source_row and
-- field_fixes.original_value/new_value: protect and expire them like the backups.
CREATE SCHEMA IF NOT EXISTS migration_audit;

-- The sha256 of the version of this file that was applied last (see db.ensure_audit_schema).
CREATE TABLE IF NOT EXISTS migration_audit.audit_schema_version (
    id          boolean PRIMARY KEY DEFAULT true CHECK (id),
    sha256      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS migration_audit.schema_migrations (
    version     text PRIMARY KEY,
    name        text NOT NULL,
    sha256      text NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now(),
    applied_by  text NOT NULL
);

CREATE TABLE IF NOT EXISTS migration_audit.runs (
    run_id        text PRIMARY KEY,
    dag_id        text NOT NULL,
    logical_date  timestamptz NULL,
    dry_run       boolean NOT NULL,
    params        jsonb NOT NULL,
    state         text NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    finished_at   timestamptz NULL,
    source_rows   bigint NULL,
    backup_path   text NULL,
    summary       jsonb NULL
);

CREATE TABLE IF NOT EXISTS migration_audit.task_attempts (
    id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id       text NOT NULL,
    task_id      text NOT NULL,
    map_index    integer NOT NULL DEFAULT -1,
    try_number   integer NULL,
    state        text NOT NULL,
    message      text NULL,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS task_attempts_run_idx ON migration_audit.task_attempts (run_id, task_id);

CREATE TABLE IF NOT EXISTS migration_audit.plans (
    run_id       text PRIMARY KEY,
    source_rows  bigint NOT NULL,
    min_id       bigint NULL,
    max_id       bigint NULL,
    partitions   jsonb NOT NULL,
    duplicates   bigint NOT NULL,
    planned_at   timestamptz NOT NULL DEFAULT now()
);

-- Rows the plan decided not to move because another row with the same key wins.
CREATE TABLE IF NOT EXISTS migration_audit.plan_duplicates (
    run_id     text NOT NULL,
    source_id  bigint NOT NULL,
    reason     text NOT NULL,
    kept_id    bigint NOT NULL,
    PRIMARY KEY (run_id, source_id)
);

CREATE TABLE IF NOT EXISTS migration_audit.partitions (
    run_id        text NOT NULL,
    partition_no  integer NOT NULL,
    lo_id         bigint NOT NULL,
    hi_id         bigint NOT NULL,
    state         text NOT NULL,
    attempts      integer NOT NULL DEFAULT 1,
    rows_in       bigint NULL,
    transformed   bigint NULL,
    inserted      bigint NULL,
    updated       bigint NULL,
    unchanged     bigint NULL,
    removed       bigint NULL,
    displaced     bigint NULL,
    rejected      bigint NULL,
    fixed         bigint NULL,
    links_in      bigint NULL,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    finished_at   timestamptz NULL,
    seconds       double precision NULL,
    error         text NULL,
    PRIMARY KEY (run_id, partition_no)
);
-- Ids whose sync state and target row disagreed and that the partition re-processed (see
-- include/sql/copy/find_drift.sql).
ALTER TABLE migration_audit.partitions ADD COLUMN IF NOT EXISTS drift_repaired bigint NULL;

CREATE TABLE IF NOT EXISTS migration_audit.batches (
    run_id        text NOT NULL,
    partition_no  integer NOT NULL,
    batch_no      integer NOT NULL,
    first_id      bigint NOT NULL,
    last_id       bigint NOT NULL,
    rows_in       integer NOT NULL,
    rows_ok       integer NOT NULL,
    rejected      integer NOT NULL,
    seconds       double precision NOT NULL,
    PRIMARY KEY (run_id, partition_no, batch_no)
);

CREATE TABLE IF NOT EXISTS migration_audit.rejected_rows (
    run_id       text NOT NULL,
    source_id    bigint NOT NULL,
    reason       text NOT NULL,
    detail       text NULL,
    source_row   jsonb NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, source_id)
);
CREATE INDEX IF NOT EXISTS rejected_rows_reason_idx ON migration_audit.rejected_rows (run_id, reason);

CREATE TABLE IF NOT EXISTS migration_audit.field_fixes (
    run_id          text NOT NULL,
    source_id       bigint NOT NULL,
    field           text NOT NULL,
    original_value  text NULL,
    new_value       text NULL,
    reason          text NOT NULL,
    PRIMARY KEY (run_id, source_id, field)
);

CREATE TABLE IF NOT EXISTS migration_audit.validation_results (
    run_id           text NOT NULL,
    expectation      text NOT NULL,
    success          boolean NOT NULL,
    observed         jsonb NULL,
    details          jsonb NULL,
    validated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, expectation)
);

-- What the last pass saw of each legacy row: the hash of the legacy row (to find changed rows without
-- reading them), whether it moved (M) or was rejected (R), and for moved rows a fingerprint of the
-- transformed row, whose order-independent sum proves source and target equal at cutover.
CREATE TABLE IF NOT EXISTS migration_audit.source_state (
    source_id    bigint PRIMARY KEY,
    row_hash     bytea NOT NULL,
    outcome      char(1) NOT NULL CHECK (outcome IN ('M', 'R')),
    fingerprint  bigint NULL,
    run_id       text NOT NULL
);
-- Settings.transform_fingerprint() of the pass that wrote the row's state: a pass with other
-- transform settings (phone region, invalid-phone rule, legacy mapping) re-transforms every row.
-- NULL on installs from before the column: their next pass re-transforms once.
ALTER TABLE migration_audit.source_state ADD COLUMN IF NOT EXISTS transform_settings bigint NULL;

-- One writer at a time per target database: the run holding the lease; see lease.py. lock_run_id:
-- the holder whose tasks hold the lease's advisory lock while they execute (a holder running older
-- code never sets it); task_pids: backend pids of that run's tasks executing now (so a holder found
-- with a task in flight but no advisory lock died mid-task).
CREATE TABLE IF NOT EXISTS migration_audit.writer_lease (
    target       text PRIMARY KEY DEFAULT 'target',
    run_id       text NULL,
    dag_id       text NULL,
    hostname     text NULL,
    acquired_at  timestamptz NULL,
    renewed_at   timestamptz NULL,
    lock_run_id  text NULL,
    task_pids    integer[] NOT NULL DEFAULT '{}'
);
-- Added to leases created before them; ALTER only when missing: an ALTER would wait for the
-- partition transactions that hold the lease row, should this file be applied while they run.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'migration_audit.writer_lease'::regclass AND attname = 'task_pids' AND NOT attisdropped
    ) THEN
        ALTER TABLE migration_audit.writer_lease
            ADD COLUMN IF NOT EXISTS lock_run_id text NULL,
            ADD COLUMN IF NOT EXISTS task_pids integer[] NOT NULL DEFAULT '{}';
    END IF;
    -- waiting_until: the holder runs no task because it waits for a person's answer (the cutover's
    -- approval) until then; it is not presumed dead before that time.
    IF NOT EXISTS (
        SELECT 1 FROM pg_attribute
        WHERE attrelid = 'migration_audit.writer_lease'::regclass AND attname = 'waiting_until' AND NOT attisdropped
    ) THEN
        ALTER TABLE migration_audit.writer_lease ADD COLUMN IF NOT EXISTS waiting_until timestamptz NULL;
    END IF;
END $$;

CREATE TABLE IF NOT EXISTS migration_audit.cutovers (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          text NOT NULL,
    state           text NOT NULL CHECK (state IN ('switching', 'active', 'rolled_back', 'abandoned')),
    cut_at          timestamptz NOT NULL DEFAULT now(),
    cut_by          text NOT NULL,
    source_rows     bigint NOT NULL,
    target_rows     bigint NOT NULL,
    rejected_rows   bigint NOT NULL,
    source_checksum numeric NOT NULL,
    target_checksum numeric NOT NULL,
    pause_seconds   double precision NOT NULL,
    lock_attempts   integer NOT NULL,
    details         jsonb NULL,
    rolled_back_at  timestamptz NULL,
    rolled_back_by  text NULL
);

CREATE TABLE IF NOT EXISTS migration_audit.rollback_rows (
    cutover_id   bigint NOT NULL,
    run_id       text NOT NULL,
    source_id    bigint NOT NULL,
    action       text NOT NULL,
    detail       text NULL,
    at           timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cutover_id, source_id, action)
);

-- Secondary indexes of account_newuser dropped for a first load and not built again yet (see
-- deferred_indexes.py): the finalize step, or the next plan, builds them from these definitions.
CREATE TABLE IF NOT EXISTS migration_audit.deferred_indexes (
    index_name  text PRIMARY KEY,
    definition  text NOT NULL,
    is_unique   boolean NOT NULL,
    run_id      text NOT NULL,
    deferred_at timestamptz NOT NULL DEFAULT now()
);

-- Foreign keys of the link tables dropped for a first load and not added back yet (see
-- deferred_keys.py): the finalize step, or the next plan, adds and validates them.
CREATE TABLE IF NOT EXISTS migration_audit.deferred_keys (
    constraint_name text PRIMARY KEY,
    table_name      text NOT NULL,
    definition      text NOT NULL,
    run_id          text NOT NULL,
    deferred_at     timestamptz NOT NULL DEFAULT now()
);

-- Link rows taken out of a link table before its foreign key to account_newuser was validated:
-- their user had left the target while the key was not in place (ON DELETE CASCADE would have
-- removed them). Kept whole, with the reason, never dropped unrecorded (deferred_keys.py).
CREATE TABLE IF NOT EXISTS migration_audit.quarantined_links (
    run_id         text NOT NULL,
    link_table     text NOT NULL,
    link_id        bigint NOT NULL,
    newuser_id     bigint NOT NULL,
    other_id       bigint NOT NULL,
    reason         text NOT NULL,
    detail         text NOT NULL,
    quarantined_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (run_id, link_table, link_id)
);

-- Change capture (capture.py): whether the legacy change log can be trusted to hold every change
-- since the sync state was written. Passes read the log when it can, and compare every row when not.
CREATE TABLE IF NOT EXISTS migration_audit.capture (
    target      text PRIMARY KEY DEFAULT 'target',
    trusted     boolean NOT NULL,
    reason      text NULL,
    run_id      text NULL,
    changed_at  timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS changes text NULL;
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS changes_reason text NULL;
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS capture_markers bigint[] NULL;
-- For a row rejected as a duplicate: the id of the user that holds the key. When that user changes,
-- the rows that lost to it are decided again (the cutover's final sync reads no plan).
ALTER TABLE migration_audit.source_state ADD COLUMN IF NOT EXISTS kept_id bigint NULL;
CREATE INDEX IF NOT EXISTS source_state_rejected_idx ON migration_audit.source_state (source_id)
    WHERE outcome = 'R';
CREATE INDEX IF NOT EXISTS source_state_kept_idx ON migration_audit.source_state (kept_id)
    WHERE kept_id IS NOT NULL;

-- A cutover with a separate target database commits the target first ('switching'), then the
-- legacy side, then becomes 'active'; one whose legacy commit failed is 'abandoned' by the next
-- run (cutover.resolve_pending), so nothing is left half-switched.
ALTER TABLE migration_audit.cutovers DROP CONSTRAINT IF EXISTS cutovers_state_check;
ALTER TABLE migration_audit.cutovers ADD CONSTRAINT cutovers_state_check
    CHECK (state IN ('switching', 'active', 'rolled_back', 'abandoned'));
DROP INDEX IF EXISTS migration_audit.cutovers_one_active;
CREATE UNIQUE INDEX IF NOT EXISTS cutovers_one_live ON migration_audit.cutovers ((true))
    WHERE state IN ('switching', 'active');

-- Backup folders deleted by the retention policy (retention.py): which, whose, why, by which run.
-- Folder names derive from run ids; no personal data here.
CREATE TABLE IF NOT EXISTS migration_audit.backup_deletions (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id         text NOT NULL,
    folder         text NOT NULL,
    backup_run_id  text NULL,
    reason         text NOT NULL,
    bytes          bigint NULL,
    deleted_at     timestamptz NOT NULL DEFAULT now()
);

-- Change-log entries a partition consumed (capture.py): a run whose partitions consumed none changed
-- nothing, so the next pass may skip its backup (audit/quiet_since_backup.sql).
ALTER TABLE migration_audit.partitions ADD COLUMN IF NOT EXISTS consumed bigint NULL;
-- Why a run wrote no backup of its own (the backup that covers it is named there).
ALTER TABLE migration_audit.runs ADD COLUMN IF NOT EXISTS backup_note text NULL;

-- Yielding to the application (throttle.py). Each batch's size asked for (time-boxed batches adapt
-- it), the legacy snapshot it was read in (a partition renews its snapshot after
-- max_snapshot_seconds), and how long the throttle held the partition before the batch was read.
ALTER TABLE migration_audit.batches ADD COLUMN IF NOT EXISTS target_rows integer NULL;
ALTER TABLE migration_audit.batches ADD COLUMN IF NOT EXISTS snapshot_no integer NULL;
ALTER TABLE migration_audit.batches ADD COLUMN IF NOT EXISTS waited_seconds double precision NULL;
-- How many legacy snapshots the partition read in (1: one, as before max_snapshot_seconds).
ALTER TABLE migration_audit.partitions ADD COLUMN IF NOT EXISTS snapshots integer NULL;

-- Throttle by hand: one row per target database, read between batches by every running partition
-- from a connection of its own (never inside the partition's transaction). state 'run' goes on,
-- 'pause' waits between batches until the state changes, 'slow' sleeps sleep_ms between batches.
-- Set it with tools/throttle.py or the SQL in include/sql/throttle/set_state.sql.
CREATE TABLE IF NOT EXISTS migration_audit.throttle (
    target    text PRIMARY KEY DEFAULT 'target',
    state     text NOT NULL DEFAULT 'run' CHECK (state IN ('run', 'pause', 'slow')),
    sleep_ms  integer NOT NULL DEFAULT 0 CHECK (sleep_ms BETWEEN 0 AND 600000),
    set_by    text NULL,
    set_at    timestamptz NOT NULL DEFAULT now()
);

-- What the throttle did: manual state changes seen, pauses and stops on the legacy server's
-- signals (the signal, its value, the threshold), signals that could not be read.
-- Written from the throttle's own connection, so it stays when the partition rolls back.
CREATE TABLE IF NOT EXISTS migration_audit.throttle_events (
    id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id        text NOT NULL,
    partition_no  integer NOT NULL,
    event         text NOT NULL,
    signal        text NULL,
    value         double precision NULL,
    threshold     double precision NULL,
    detail        text NULL,
    at            timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX IF NOT EXISTS throttle_events_run_idx ON migration_audit.throttle_events (run_id, partition_no);

-- A running partition's progress, for the migration page in the Airflow UI (plugins/migration_page.py).
-- The partition's batches commit with its one transaction, so they cannot be seen while it runs: this
-- row is written between batches from the throttle's own autocommit connection (at most once a
-- second), and stays after the partition ends. rows_planned: the ids the partition reads, when it
-- reads a list of ids; NULL when it reads its whole id range (the plan's source_rows tell how many).
-- Figures only, no personal data.
CREATE TABLE IF NOT EXISTS migration_audit.partition_progress (
    run_id        text NOT NULL,
    partition_no  integer NOT NULL,
    path          text NULL,
    rows_done     bigint NOT NULL,
    rows_planned  bigint NULL,
    batches       integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at    timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (run_id, partition_no)
);

-- A quiet pass (issue 13 item 4). The plan records the change-log entries its snapshot saw and the
-- transform settings it decided with, so that a later plan can prove the legacy table unchanged
-- since and take over its duplicate decision (plan/reusable_duplicates.sql) instead of scanning
-- the table again; duplicates_from names the run whose decision was taken over, and why.
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS log_entries bigint NULL;
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS transform_settings bigint NULL;
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS duplicates_from text NULL;
ALTER TABLE migration_audit.plans ADD COLUMN IF NOT EXISTS duplicates_note text NULL;

-- Statements that changed rows of the tables the validation checks, noted by statement-level
-- triggers on them (include/sql/validation/install_write_triggers.sql). Insert-only.
CREATE TABLE IF NOT EXISTS migration_audit.target_writes (
    seq         bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    table_name  text NOT NULL,
    op          text NOT NULL,
    xid         xid8 NOT NULL DEFAULT pg_current_xact_id(),
    at          timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- Each run's Great Expectations suite: the state of the target it was run on or taken over for
-- (basis: validation/target_basis.sql plus the suite's own fingerprint), whether it ran (ran) or its
-- results were taken over from basis_run's because that state was the same, its outcomes, and why.
CREATE TABLE IF NOT EXISTS migration_audit.suite_runs (
    run_id       text PRIMARY KEY,
    basis        jsonb NOT NULL,
    ran          boolean NOT NULL,
    basis_run    text NULL,
    passed       boolean NOT NULL,
    outcomes     jsonb NOT NULL,
    note         text NOT NULL,
    seconds      double precision NULL,
    recorded_at  timestamptz NOT NULL DEFAULT clock_timestamp()
);
-- A pass's rejects it did not read again (decision 0013): unchanged legacy rows whose reject the
-- pass takes over from the run that last read them (from_run_id, the run whose rejected_rows holds
-- the row, its reason and detail), by reference: one row per partition and run taken from.
CREATE TABLE IF NOT EXISTS migration_audit.carried_rejects (
    run_id        text NOT NULL,
    partition_no  integer NOT NULL,
    from_run_id   text NOT NULL,
    source_ids    bigint[] NOT NULL,
    PRIMARY KEY (run_id, partition_no, from_run_id)
);
-- Every run's rejects, read or carried: what a run's accounting, report and page count. A carried
-- row keeps the reason, detail, source row and time of the run that read it (recorded_by).
CREATE OR REPLACE VIEW migration_audit.run_rejects AS
SELECT r.run_id, r.source_id, r.reason, r.detail, r.source_row, r.rejected_at, r.run_id AS recorded_by
FROM migration_audit.rejected_rows AS r
UNION ALL
-- One index lookup per carried id, and the id from the array (so a range on source_id filters the
-- ids before any lookup). As a plain join the planner drove it from the rejected rows in a range
-- and matched each against the whole unnested array: at 10M users the validate stage's accounting
-- ran for over 40 minutes instead of about 2 s (the LIMIT keeps the subquery from being flattened;
-- (run_id, source_id) is the key, so it changes no result).
SELECT c.run_id, i.source_id, r.reason, r.detail, r.source_row, r.rejected_at, c.from_run_id
FROM migration_audit.carried_rejects AS c
CROSS JOIN LATERAL unnest(c.source_ids) AS i (source_id)
CROSS JOIN LATERAL (
    SELECT x.reason, x.detail, x.source_row, x.rejected_at
    FROM migration_audit.rejected_rows AS x
    WHERE x.run_id = c.from_run_id AND x.source_id = i.source_id
    LIMIT 1
) AS r;
-- The drift comparison's proof (decision 0013): the partition's transaction id (its own writes to
-- the target are noted in target_writes under it, so they are not someone else's), and, when it
-- compared sync state and target in full, the count of other writes noted at that moment.
ALTER TABLE migration_audit.partitions ADD COLUMN IF NOT EXISTS xid xid8 NULL;
ALTER TABLE migration_audit.partitions ADD COLUMN IF NOT EXISTS drift_writes bigint NULL;
-- A run whose every partition compared sync state and target in full: from then on, while no other
-- write is noted (foreign_writes unchanged) and the write triggers stay in place, the target has
-- not drifted from the state, and a pass reading the change log leaves the comparison out.
CREATE TABLE IF NOT EXISTS migration_audit.drift_checks (
    run_id          text PRIMARY KEY,
    foreign_writes  bigint NOT NULL,
    checked_at      timestamptz NOT NULL DEFAULT clock_timestamp()
);
