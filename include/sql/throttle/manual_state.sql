-- The throttle set by hand (tools/throttle.py, set_state.sql), read by each running partition
-- between batches from a connection of its own: no row means 'run'.
SELECT state, sleep_ms, set_by, set_at
FROM migration_audit.throttle
WHERE target = 'target'
