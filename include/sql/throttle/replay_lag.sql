-- The replay lag of the legacy server's standbys, in seconds (the largest), read by the throttle
-- between batches. replay_lag is NULL for a standby that has replayed everything and seen no new
-- WAL since: 0. Only roles with pg_read_all_stats (pg_monitor) see the column of other sessions;
-- the throttle checks stats_privilege.sql first and skips this signal without it.
SELECT coalesce(max(extract(epoch FROM replay_lag)), 0)::float8 AS replay_lag_seconds
FROM pg_stat_replication
