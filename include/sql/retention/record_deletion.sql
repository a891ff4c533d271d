-- One backup folder deleted by retention, recorded by the run that deleted it.
INSERT INTO migration_audit.backup_deletions (run_id, folder, backup_run_id, reason, bytes)
VALUES (%(run_id)s, %(folder)s, %(backup_run_id)s, %(reason)s, %(bytes)s)
