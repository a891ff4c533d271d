-- One batch of a partition, for the audit: ids, rows read and written, rejects, seconds, the size the
-- batch sizer asked for, the legacy snapshot it was read in, and the time the throttle held it before.
INSERT INTO migration_audit.batches (run_id, partition_no, batch_no, first_id, last_id, rows_in, rows_ok,
                                     rejected, seconds, target_rows, snapshot_no, waited_seconds)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
