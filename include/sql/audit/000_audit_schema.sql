-- The audit trail of every migration run. Created (idempotently) before anything else is written,
-- in the target database. Personal data lives only in rejected_rows.source_row and
-- field_fixes.original_value/new_value: protect and expire them like the backups.
CREATE SCHEMA IF NOT EXISTS migration_audit;

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

-- One writer at a time per target database: the run holding the lease; see lease.py.
CREATE TABLE IF NOT EXISTS migration_audit.writer_lease (
    target       text PRIMARY KEY DEFAULT 'target',
    run_id       text NULL,
    dag_id       text NULL,
    hostname     text NULL,
    acquired_at  timestamptz NULL,
    renewed_at   timestamptz NULL
);

CREATE TABLE IF NOT EXISTS migration_audit.cutovers (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    run_id          text NOT NULL,
    state           text NOT NULL CHECK (state IN ('active', 'rolled_back')),
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
CREATE UNIQUE INDEX IF NOT EXISTS cutovers_one_active ON migration_audit.cutovers ((state)) WHERE state = 'active';

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
