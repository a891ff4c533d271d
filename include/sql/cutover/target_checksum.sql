-- Order-independent checksum of account_newuser: the sum of the fingerprint (see
-- row_fingerprint.sql) of every row, as partition_copy.fingerprint() computes it for the
-- transformed legacy rows.
SELECT count(*), coalesce(sum((
{fingerprint}
)::numeric), 0)
FROM account_newuser
