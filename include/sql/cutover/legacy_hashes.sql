-- The full verification's legacy side, in one statement (one snapshot), in id order: every legacy
-- user's row hash, and whether the change log names it (then the sync state may lag behind it),
-- plus the ids the log names that the table no longer holds (row_hash NULL).
-- {users}, {id}, {log}: identifiers; {row_hash}: partition_copy.row_hash_sql().
SELECT u.{id} AS id, {row_hash} AS row_hash, EXISTS (SELECT 1 FROM {log} AS l WHERE l.source_id = u.{id}) AS logged
FROM {users} AS u
UNION ALL
SELECT DISTINCT l.source_id, NULL::bytea, true
FROM {log} AS l
WHERE l.source_id IS NOT NULL AND NOT EXISTS (SELECT 1 FROM {users} AS u WHERE u.{id} = l.source_id)
ORDER BY 1
