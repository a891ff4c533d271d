-- Restore by difference, step 3 (parent's table first): insert the backup's rows that {live}
-- lacks, keeping their own key values (OVERRIDING SYSTEM VALUE: also for GENERATED ALWAYS ids).
INSERT INTO {live} ({columns}) OVERRIDING SYSTEM VALUE
SELECT {columns} FROM {staging} AS s
WHERE NOT EXISTS (SELECT 1 FROM {live} AS l WHERE {match})
ORDER BY {key}
