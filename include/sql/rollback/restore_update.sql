-- Restore by difference, step 2 (parent's table first): set the rows of {live} whose values differ
-- from the staged backup {staging} back to the backup's, and only those, so triggers and
-- row versions of unchanged rows are left alone. {assign}: c = s.c, ...; {differs}:
-- l.c IS DISTINCT FROM s.c OR ...; {match}: the primary key.
UPDATE {live} AS l SET {assign} FROM {staging} AS s WHERE {match} AND ({differs})
