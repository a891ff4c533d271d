-- In one statement, so in one snapshot: the legacy users counted, and the change-log entries that
-- snapshot sees. Entries added after it adjust the count under the lock (an I adds a user, a D
-- removes one), which counts the legacy table without scanning it while writes wait.
SELECT (SELECT count(*) FROM {users}),
       (SELECT coalesce(array_agg(seq), '{{}}') FROM {log})
