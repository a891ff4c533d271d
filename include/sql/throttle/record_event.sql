-- One thing the throttle did (throttle.py), written from its own autocommit connection so that it
-- stays when the partition's transaction rolls back. No personal data: signals and figures only.
INSERT INTO migration_audit.throttle_events (run_id, partition_no, event, signal, value, threshold, detail)
VALUES (%(run_id)s, %(partition_no)s, %(event)s, %(signal)s, %(value)s, %(threshold)s, %(detail)s)
