-- Whether this role sees other sessions' rows of pg_stat_activity and pg_stat_replication in full
-- (superuser, or member of pg_read_all_stats, which pg_monitor includes). Read once per partition.
SELECT pg_has_role(current_user, 'pg_read_all_stats', 'USAGE')
